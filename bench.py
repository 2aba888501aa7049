"""
Speed benchmarks: training throughput, time-to-loss, sampling and memory, printed as a table at the
end and written to JSON.

    python prepare.py && python prepare.py --dataset=shakespeare
    python bench.py --suite=gpu --profile=True --out=bench.json    # one H100: everything, ~9 min
    python bench.py --suite=gpu --parts=train,plain,sample         # some of it
    python bench.py --suite=cpu --out=bench_cpu.json               # cpu_quick vs nanoGPT's CPU recipe

gpu parts: train (gpu_124m: bf16 autocast, torch.compile, fused AdamW, flash attention; with
--profile=True also the top CUDA kernels of a step), plain (the same step eager, fp32 matmuls,
unfused AdamW: every speed-up is a ratio to it), sample (tokens/s with and without the KV cache),
memory (peak memory of a sweep of shapes at block 1024), ttl_fast and ttl_best (time-to-loss of
the shakespeare_char configs), batch (gpu_124m at a larger micro-batch). Each measurement runs on its own: one that fails
(even with SystemExit, as train.py stops on a NaN loss) is recorded with its error and the others
still run, and the JSON is rewritten after each, so a run cut short keeps what it measured.
"""
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import string
import subprocess
import sys
import time
import traceback

import torch
import torch._functorch.config  # AOTAutograd's settings, which two levers patch

import speed
from training import StepOptions, train_step
from configurator import configure
from scripts import run_script, script_config
from data import get_batch, open_dataset
from architecture import DEFAULTS as MODEL_DEFAULTS
from architecture import MODEL_KEYS, build_model
from metrics import plot_runs
from runtime import code_version, float8_training, read_jsonl, resolve_device, set_threads

DEFAULTS = dict(
    suite="gpu",          # gpu | cpu
    parts="",             # comma-separated parts of the suite; empty = all
    out="bench.json",
    out_dir="out/bench",  # training runs of the time-to-loss parts
    data_dir="data",
    device="auto",
    threads=0,            # torch CPU threads (the time-to-loss runs get as many); 0: the cores the load average leaves
                          # idle (runtime.set_threads)
    config="config/gpu_124m.py",  # the throughput, profile, sampling and memory model
    steps=3,              # timed optimizer steps of the compiled train step (each config's accumulation
    warmup_steps=1,       # steps of micro-batches: 40 x 12 x 1024 tokens for gpu_124m), after warmup_steps
    plain_steps=1,
    best_batch=32,        # the batch of the `batch` part
    new_tokens=512,       # sampling
    profile=False,        # the train part also records the top CUDA kernels of a few gpu_124m steps
    budget_s=0,           # skip the parts not started after this many seconds (0: no limit)
    smoke=False,          # tiny shapes and few steps: checks every part runs, e.g. on a CPU; numbers mean nothing
    levers="",            # the levers part: comma-separated names from LEVERS; empty = all but max_autotune
    lever_budget_s=0,     # levers (but best) not started this many seconds into the levers part are skipped (0: no limit)
    nanogpt="",           # the nanogpt part: path to a nanoGPT checkout (kept outside the repo) whose bench.py it runs
    parity_lever={},      # the parity part: train.py overrides (a lever of LEVERS, e.g. {"ce_chunks": 8}) to train against default
    parity_steps=300,     # ... for this many steps of 8 x 12 x 1024 tokens on BPE shakespeare
    warm_only=False,      # only compile what the timed parts will (levers, gpu_1b, decode), filling inductor's on-disk
                          # caches: a later run then compiles in seconds (experiments/speed_round3_gpu.sh)
    levers_1b="default",  # the gpu_1b part: comma-separated names from LEVERS_1B
    gpu_1b_accum=0,       # micro-batches per gpu_1b optimizer step (0: the config's 64, ~10 s a step)
    decode_modes="",      # the decode part: comma-separated names from DECODE_MODES; empty = all
    before_tree="",       # the sample_py part: a checkout of the code before a change, whose sample.py it also runs
    sample_rounds=3,      # ... each tree once per round, in turn
)
GPU_PARTS = ["train", "plain", "ttl_fast", "sample", "memory", "ttl_best", "batch", "levers", "nanogpt", "gpu_1b", "parity",
             "decode", "sample_py", "kernels", "muon"]
CPU_PARTS = ["cpu_quick", "nanogpt_recipe", "sample_py"]
H100_BF16_PEAK = 989e12
# shapes of the memory sweep (n_layer, n_head, n_embd), smallest first: GPT-2 small, medium, large, XL
MEMORY_SWEEP = [(12, 12, 768), (24, 16, 1024), (36, 20, 1280), (48, 25, 1600)]
# nanoGPT's CPU recipe (its README): 4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 iters, lr 1e-3
NANOGPT_CPU_RECIPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000,
                          lr_decay_iters=2000, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99,
                          dropout=0.0, weight_decay=0.1, optimizer="adamw", schedule="cosine", grad_clip=1.0)


# ----------------------------------------------------------------------------- helpers

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device):
    """Free what earlier measurements left; returns the bytes still allocated, which peaks discount."""
    gc.collect()
    torch._dynamo.reset()
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory_gb(device, before=0):
    """Peak GPU memory allocated since the last reset, less what was there before (None on a CPU)."""
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30 if device.type == "cuda" else None


def set_matmul_precision(fast):
    """tf32 tensor cores for fp32 matmuls in fast mode; true fp32 in plain mode."""
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast


def model_args(cfg, vocab_size, **shape):
    return {k: cfg[k] for k in MODEL_KEYS if k in cfg} | shape | {"vocab_size": vocab_size}


def batch_source(cfg, bench, device, batch_size):
    """(fetch, vocab_size): real batches of the config's dataset when prepared, else random tokens."""
    try:
        meta = open_dataset(bench["data_dir"], cfg["dataset"], cfg["block_size"])
    except SystemExit:
        meta = None
    if meta is None:
        vocab = 50304
        def fetch():
            shape = (batch_size, cfg["block_size"])
            return torch.randint(vocab, shape, device=device), torch.randint(vocab, shape, device=device)
        return fetch, vocab, "random tokens"
    generator = torch.Generator().manual_seed(0)
    def fetch():
        return get_batch(meta, "train", batch_size, cfg["block_size"], generator, device)
    return fetch, meta["vocab_size"], cfg["dataset"]


def build(cfg, bench, device, fast, batch_size=None, accum=1, compile_model=None, lever=None, **shape):
    """Model, optimizer, autocast and batch source for one training measurement; lever: a dict of the
    speed options to try (fp8, fp8_head, fp8_recipe, compile_options, compile_blocks, optimizer), see LEVERS."""
    lever = lever or {}
    batch_size = batch_size or cfg["batch_size"]
    fetch, vocab, data = batch_source(cfg, bench, device, batch_size)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: a 1.5B model takes long on the host
        raw = build_model(model_args(cfg, vocab, **shape))
    # fused AdamW on CUDA in fast mode; device_type="cpu" asks configure_optimizers for the unfused one
    optimizer = raw.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]),
                                         device.type if fast else "cpu", lever.get("optimizer", cfg["optimizer"]),
                                         cfg["muon_lr"])
    if lever.get("fp8"):
        float8_training(raw, head=lever.get("fp8_head", True), recipe=lever.get("fp8_recipe", "tensorwise"))
    use_bf16 = fast and device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    compile_model = fast if compile_model is None else compile_model
    options = lever.get("compile_options", {})
    model = torch.compile(raw, options=options or None) if compile_model and not lever.get("compile_blocks") else raw
    if compile_model and lever.get("compile_blocks"):
        # regional compilation: each block compiled on its own, one graph serving every block (seconds to compile
        # where the whole 36-layer model takes minutes); embedding, head and loss stay eager
        for block in raw.blocks:
            block.compile(options=options or None)
    return dict(raw=raw, model=model, optimizer=optimizer, autocast=autocast, fetch=fetch, data=data,
                static_grads=options.get("triton.cudagraphs", False),
                batch_size=batch_size, accum=accum, tokens_per_step=batch_size * cfg["block_size"] * accum)


def run_steps(run, n, grad_clip):
    """n optimizer steps; returns the last loss tensor (read by the caller: one sync at the end)."""
    batch, loss = run.get("batch") or run["fetch"](), None
    for _ in range(n):
        loss, batch = train_step(run["model"], [run["optimizer"]], batch, run["fetch"],
                                 StepOptions(run["accum"], grad_clip, run["autocast"], run["static_grads"]))
    run["batch"] = batch
    return loss


def time_steps(run, n, grad_clip, device):
    sync(device)
    t0 = time.perf_counter()
    loss = run_steps(run, n, grad_clip)
    loss_value = loss.item()  # waits for the GPU
    return (time.perf_counter() - t0) / n, loss_value


# ----------------------------------------------------------------------------- gpu parts

def lever_context(lever):
    """The process-wide settings a lever needs while its step compiles and runs: an SDPA backend, the min-cut
    partitioner's activation memory budget (torch recomputes the cheapest activations to fit the fraction)."""
    stack = contextlib.ExitStack()
    if lever.get("sdpa"):
        from torch.nn.attention import sdpa_kernel
        stack.enter_context(sdpa_kernel(speed.sdpa_backends(lever["sdpa"])))
        # AOTAutograd's cache key leaves the SDPA backend out: a cached graph of another backend would be reused
        stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
    if lever.get("activation_budget"):
        stack.enter_context(torch._functorch.config.patch(activation_memory_budget=lever["activation_budget"]))
    return stack


def measure_training(cfg, bench, device, fast, steps, batch_size=None, lever=None, **shape):
    """Steady-state tokens/s, ms per micro-batch, MFU and peak memory of the config's train step, with
    its gradient accumulation (which spreads the optimizer's cost over the micro-batches). With --warm_only
    one micro-batch only, which compiles the step and fills inductor's caches."""
    with lever_context(lever or {}):
        return timed_training(cfg, bench, device, fast, steps, batch_size, lever, **shape)


def timed_training(cfg, bench, device, fast, steps, batch_size=None, lever=None, **shape):
    before = reset_memory(device)
    set_matmul_precision(fast)
    batch_size = batch_size or cfg["batch_size"]
    # the same tokens per optimizer step as the config, whatever the micro-batch
    accum = max(1, cfg["gradient_accumulation_steps"] * cfg["batch_size"] // batch_size)
    run = build(cfg, bench, device, fast, batch_size, 1 if bench["warm_only"] else accum, lever=lever, **shape)
    t0 = time.perf_counter()
    if bench["warm_only"]:
        loss = run_steps(run, 1, cfg["grad_clip"]).item()
        return dict(warm_only=True, first_step_s=time.perf_counter() - t0, batch_size=batch_size, first_loss=loss)
    first_loss = run_steps(run, 1, cfg["grad_clip"]).item()  # compiles, when compiling
    compile_s = time.perf_counter() - t0
    run_steps(run, bench["warmup_steps"] if fast else 0, cfg["grad_clip"])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dt, loss = time_steps(run, steps, cfg["grad_clip"], device)
    result = dict(mode="fast" if fast else "plain", batch_size=batch_size, block_size=cfg["block_size"],
                  gradient_accumulation_steps=accum, data=run["data"], params_M=run["raw"].num_params(False) / 1e6,
                  steps=steps, ms_per_step=dt / accum * 1e3, ms_per_optimizer_step=dt * 1e3,
                  tokens_per_s=run["tokens_per_step"] / dt,
                  mfu=run["raw"].estimate_mfu(run["tokens_per_step"], dt, H100_BF16_PEAK),
                  peak_memory_gb=peak_memory_gb(device, before), first_step_s=compile_s, first_loss=first_loss, loss=loss)
    if (lever or {}).get("sdpa") and device.type == "cuda":  # which attention kernels ran: the lever's proof
        result["attention_kernels"] = attention_kernels(run)
    if bench["profile_run"]:
        try:
            result["profile"] = profile_steps(run, cfg, device)
        except (Exception, SystemExit) as e:  # the throughput above still counts
            result["profile"] = error_record(e)
    return result


def attention_kernels(run):
    """Names of the CUDA kernels of one micro-batch's forward and backward that look like attention's."""
    from torch.profiler import ProfilerActivity, profile
    x, y = run["fetch"]()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with run["autocast"]:
            _, loss = run["model"](x, y)
        loss.backward()
        torch.cuda.synchronize()
    run["optimizer"].zero_grad(set_to_none=not run["static_grads"])
    names = {e.key for e in prof.key_averages()}
    return sorted(n[:120] for n in names if any(w in n.lower() for w in ("flash", "fmha", "cudnn", "attention", "sdpa")))


def profile_steps(run, cfg, device, steps=1):
    """The kernels (or CPU ops) that take the most time over a few train steps, per step."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        run_steps(run, steps, cfg["grad_clip"])
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events)
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:25]
    return dict(timer=key, total_ms_per_step=total / 1e3 / steps,
                top=[dict(name=e.key[:160], ms_per_step=getattr(e, key) / 1e3 / steps,
                          share=getattr(e, key) / total, calls_per_step=e.count / steps) for e in top])


def part_train(cfg, bench, device):
    # --profile=True profiles a few more steps of the same compiled model
    return {"gpu_124m": measure_training(cfg, bench | {"profile_run": bench["profile"]}, device, True, bench["steps"])}


def part_plain(cfg, bench, device):
    return {"gpu_124m_plain": measure_training(cfg, bench | {"profile_run": False}, device, False, bench["plain_steps"])}


def part_batch(cfg, bench, device):
    return {f"gpu_124m_batch{bench['best_batch']}": measure_training(
        cfg, bench | {"profile_run": False}, device, True, bench["steps"], batch_size=bench["best_batch"])}


# speed levers for gpu_124m, each measured alone against the default step in the same run (issue 16); a
# lever sets a micro-batch (the accumulation keeps the tokens per step), GPTConfig fields (MODEL_LEVERS),
# fp8, or Inductor options (train.py's compile_options)
LEVERS = {
    "default": {},
    "batch16": dict(batch_size=16),
    "batch24": dict(batch_size=24),
    "batch32": dict(batch_size=32),
    "batch48": dict(batch_size=48),
    "ce_chunks4": dict(ce_chunks=4),
    "ce_chunks8": dict(ce_chunks=8),
    "cudagraphs": dict(compile_options={"triton.cudagraphs": True}),
    "coordinate_descent": dict(compile_options={"coordinate_descent_tuning": True}),
    "flex_attention": dict(attention="flex"),
    "bf16_residual": dict(bf16_residual=True),
    "fp8_blocks": dict(fp8=True, fp8_head=False),
    "fp8_all": dict(fp8=True, fp8_head=True),
    "max_autotune": dict(compile_options={"max_autotune": True, "coordinate_descent_tuning": True}),  # ~5 min to compile
    "fp8_all_batch24": dict(fp8=True, fp8_head=True, batch_size=24),
    # round three (issue 32): library kernels
    "liger_ce": dict(liger_ce=True),                      # Liger Kernel's fused linear cross-entropy
    "sdpa_cudnn": dict(sdpa="cudnn"),                     # one SDPA backend chosen explicitly
    "sdpa_flash": dict(sdpa="flash"),
    "sdpa_efficient": dict(sdpa="efficient"),
    "fp8_rowwise": dict(fp8=True, fp8_head=False, fp8_recipe="rowwise"),  # torchao, one scale per row
    "batch48_bf16_residual": dict(batch_size=48, bf16_residual=True),    # round three's best, as one lever
    "batch32_bf16_residual": dict(batch_size=32, bf16_residual=True),    # the same gain in 23 GB (round four)
    "best": None,  # the levers measured before it that beat default by MIN_GAIN, together
}
MODEL_LEVERS = ("ce_chunks", "attention", "bf16_residual", "liger_ce", "checkpoint_activations")
# gpu_1b's levers (issue 32, target >= 50% MFU within 32 GB); MFU counts 6 FLOPs per parameter per token, so the
# forward that checkpointing recomputes is work it does not credit: the levers trade that recompute for memory
LEVERS_1B = {
    "default": {},                                        # config/gpu_1b.py: whole-model compile, every block checkpointed
    "blocks": dict(compile_blocks=True),                  # the same step, each block compiled on its own
    "fp8": dict(compile_blocks=True, fp8=True, fp8_head=False),
    "fp8_rowwise": dict(compile_blocks=True, fp8=True, fp8_head=False, fp8_recipe="rowwise"),
    "budget": dict(compile_blocks=True, checkpoint_activations=False, activation_budget=0.5),  # the compiler
                                                          # recomputes what it chooses, to half the activations
    "batch4_no_ckpt": dict(compile_blocks=True, checkpoint_activations=False, batch_size=4),
    "batch16": dict(compile_blocks=True, batch_size=16),
    "fp8_budget": dict(compile_blocks=True, fp8=True, fp8_head=False, checkpoint_activations=False,
                       activation_budget=0.5),
}
MIN_GAIN = 1.01  # a lever joins "best" only above the few percent of run-to-run noise


def combine_winners(results):
    """The lever dict of every measured lever at least MIN_GAIN x default, merged: where two set the same key
    (two micro-batches) the larger gain wins; Inductor options are united."""
    winners = sorted((r for r in results.values() if r.get("ratio_to_default", 0) >= MIN_GAIN and r.get("lever")),
                     key=lambda r: r["ratio_to_default"])
    combined = {}
    for r in winners:
        for key, value in r["lever"].items():
            combined[key] = combined.get(key, {}) | value if key == "compile_options" else value
    return combined


def measure_lever(cfg, bench, device, lever):
    lever = dict(lever)
    shape = {k: lever.pop(k) for k in MODEL_LEVERS if k in lever}
    return measure_training(cfg, bench | {"profile_run": False}, device, True, bench["steps"],
                            batch_size=lever.pop("batch_size", None), lever=lever, **shape)


def part_levers(cfg, bench, device):
    """gpu_124m's train step with one speed option at a time (--levers=a,b picks some), each a ratio to default;
    `best` then measures the winners together. Yields each lever's result as it is measured."""
    names = [n for n in bench["levers"].split(",") if n] or [n for n in LEVERS if n != "max_autotune"]
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise SystemExit(f"unknown levers {unknown}; known: {', '.join(LEVERS)}")
    results, start = {}, time.perf_counter()
    # each lever is a ratio to default, measured first; warming caches needs only the levers named
    order = names if bench.get("warm_only") else ["default"] + [n for n in names if n != "default"]
    for name in order:
        lever = LEVERS[name] if name != "best" else combine_winners(results)
        if name != "best" and bench["lever_budget_s"] and time.perf_counter() - start > bench["lever_budget_s"]:
            results[f"lever_{name}"] = dict(error=f"skipped: past lever_budget_s={bench['lever_budget_s']}")
            yield f"lever_{name}", results[f"lever_{name}"]
            continue
        try:
            if name == "best" and not lever:
                raise SystemExit(f"no lever beat default by {MIN_GAIN:.2f}x: nothing to combine")
            results[f"lever_{name}"] = measure_lever(cfg, bench, device, lever) | {"lever": lever}
        except (Exception, SystemExit) as e:
            results[f"lever_{name}"] = error_record(e) | {"lever": lever}
        result = results[f"lever_{name}"]
        print(f"  lever_{name}: {result.get('tokens_per_s', result.get('error'))}", flush=True)
        base = results.get("lever_default", {}).get("tokens_per_s")
        if base and result.get("tokens_per_s"):
            result["ratio_to_default"] = result["tokens_per_s"] / base
        yield f"lever_{name}", result


def part_parity(cfg, bench, device):
    """Does a lever leave the loss unchanged? gpu_124m trained parity_steps steps on BPE shakespeare (the same
    seed, data and tokens per step) with the default step and with parity_lever; both curves in parity.png
    beside --out. The runs differ only by rounding, so their val curves should agree within bf16 noise."""
    lever = dict(bench["parity_lever"])
    if not lever:
        return {"parity": dict(error="skipped: pass --parity_lever={...}, e.g. {'ce_chunks': 8}")}
    unknown = [k for k in lever if k not in script_config("train.py")]
    if unknown:
        raise SystemExit(f"parity_lever keys {unknown} are not train.py keys")
    base = 4 if bench["smoke"] else cfg["batch_size"]  # time_to_loss's smoke shapes use micro-batch 4
    seqs, evals = 8 * base, 24 * base  # sequences per optimizer step, and per evaluation
    batch = lever.pop("batch_size", base)
    if seqs % batch:
        raise SystemExit(f"parity_lever batch_size={batch} must divide the {seqs} sequences of a step")
    steps = bench["parity_steps"]
    common = dict(dataset="shakespeare", max_iters=steps, lr_decay_iters=steps, warmup_iters=max(1, steps // 10),
                  eval_interval=max(1, steps // 6), log_interval=10)
    if bench["smoke"]:
        common.update(max_iters=20, lr_decay_iters=20, warmup_iters=2, eval_interval=10)
    results = {}
    # the sampler draws the same windows for any micro-batch that splits them evenly, in training and evaluation
    for name, overrides in (("parity_default", dict(gradient_accumulation_steps=8, eval_iters=24)),
                            ("parity_lever", lever | dict(batch_size=batch, gradient_accumulation_steps=seqs // batch,
                                                          eval_iters=evals // batch))):
        results |= time_to_loss(bench["config"], bench, device, None, common | overrides, name=name)
    a, b = (dict((step, v) for step, _, v in results[n]["curve"]) for n in ("parity_default", "parity_lever"))
    results["parity_max_val_difference"] = max(abs(a[s] - b[s]) for s in a if s in b)
    plot_runs([os.path.join(bench["out_dir"], n) for n in ("parity_default", "parity_lever")],
              os.path.join(os.path.dirname(os.path.abspath(bench["out"])), "parity.png"))
    return results


def part_nanogpt(cfg, bench, device):
    """nanoGPT's own bench.py (GPT-2 124M, 12x1024, compile, random tokens) run from --nanogpt=PATH in this
    same run, so the ratio to µLM's train step is measured on the same GPU at the same moment."""
    if not bench["nanogpt"]:
        return {"nanogpt": dict(error="skipped: pass --nanogpt=<path to a nanoGPT checkout> to measure it")}
    proc = subprocess.run([sys.executable, "bench.py", "--real_data=False", "--compile=True"], cwd=bench["nanogpt"],
                          capture_output=True, text=True, timeout=900)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("time per iteration")), None)
    if proc.returncode or line is None:
        return {"nanogpt": dict(error=f"nanoGPT bench.py failed (exit {proc.returncode}): {proc.stderr[-800:]}")}
    ms = float(line.split(":")[1].split("ms")[0])
    return {"nanogpt": dict(ms_per_iteration=ms, batch_size=12, block_size=1024, tokens_per_s=12 * 1024 / ms * 1e3,
                            output=line)}


def part_gpu_1b(cfg, bench, device):
    """config/gpu_1b.py's train step: peak memory (budget 32 GB) and MFU, with its own accumulation (or
    --gpu_1b_accum), for each of --levers_1b (LEVERS_1B), each a ratio to the first measured."""
    big = script_config("train.py", ["config/gpu_1b.py"])
    if bench["smoke"]:
        big.update(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=2, gradient_accumulation_steps=2)
    if bench["gpu_1b_accum"]:
        big["gradient_accumulation_steps"] = bench["gpu_1b_accum"]
    names = [n for n in bench["levers_1b"].split(",") if n]
    unknown = [n for n in names if n not in LEVERS_1B]
    if unknown:
        raise SystemExit(f"unknown levers_1b {unknown}; known: {', '.join(LEVERS_1B)}")
    base = None
    for name in names:
        lever = dict(optimizer=big["optimizer"]) | LEVERS_1B[name]
        shape = {k: big[k] for k in ("n_layer", "n_head", "n_embd", "checkpoint_activations")}
        shape |= {k: lever.pop(k) for k in MODEL_LEVERS if k in lever}
        key = "gpu_1b" if name == "default" else f"gpu_1b_{name}"
        try:
            result = measure_training(big, bench | {"profile_run": False}, device, True, 1,
                                      batch_size=lever.pop("batch_size", None), lever=lever, **shape)
        except (Exception, SystemExit) as e:  # out of memory, a missing library: the next lever still runs
            result = error_record(e)
        result["lever"] = LEVERS_1B[name]
        base = base or result.get("tokens_per_s")
        if base and result.get("tokens_per_s"):
            result["ratio_to_first"] = result["tokens_per_s"] / base
        print(f"  {key}: {result.get('mfu', result.get('error'))}", flush=True)
        yield key, result


def part_sample(cfg, bench, device):
    """Tokens/s of greedy decoding, batch 1 and 16, without the cache, with it, and with the compiled step."""
    reset_memory(device)
    set_matmul_precision(True)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(model_args(cfg, 50304)).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    results, n = {}, bench["new_tokens"]
    for batch in (1, 16):
        prompt = torch.randint(50304, (batch, 16), device=device)
        for name, kw in [("no_cache", dict(use_cache=False)), ("cache", dict(use_cache=True)),
                         ("cache_compiled", dict(use_cache=True, compile=True))]:
            key = f"sample_b{batch}_{name}"
            try:
                t0 = time.perf_counter()
                # warm up; a cached step at the timed run's length: its cache shape is in the compiled graph and
                # in the eager step's cuDNN attention plan, and a shorter warm-up would leave a recompile (it read
                # 42 tokens/s for 1,600) or a new plan (0.82x) inside the timing
                model.generate(prompt, n if kw["use_cache"] else 2, temperature=0.0, **kw)
                warm_s = time.perf_counter() - t0
                sync(device)
                t0 = time.perf_counter()
                model.generate(prompt, n, temperature=0.0, **kw)
                sync(device)
                dt = time.perf_counter() - t0
                results[key] = dict(batch=batch, new_tokens=n, tokens_per_s=batch * n / dt,
                                    ms_per_token_step=dt / n * 1e3, warmup_s=warm_s)
            except (Exception, SystemExit) as e:  # one sampling mode failing leaves the others
                results[key] = error_record(e)
            print(f"  {key}: {results[key]}", flush=True)
        base = results.get(f"sample_b{batch}_no_cache", {}).get("tokens_per_s")
        best = max((results[f"sample_b{batch}_{m}"].get("tokens_per_s", 0) for m in ("cache", "cache_compiled")))
        if base and best:
            results[f"sample_b{batch}_cache_speedup"] = best / base
    return results


# decode paths (issue 32, target 1): generate_stream's keywords, and the batch sizes each is measured at
DECODE_MODES = {
    "eager": (dict(graph=False), (1,)),                     # before round three: each kernel launched from Python
    "compiled": (dict(graph=False, compile=True), (1,)),    # before: torch.compile's reduce-overhead CUDA graphs
    "graph": (dict(), (1, 16)),                             # the default now: the eager step as one CUDA graph
    "graph_compiled": (dict(compile=True), (1, 16)),        # inductor's step in that graph
    "graph_compiled_cdt": (dict(compile=True, compile_options={"coordinate_descent_tuning": True}), (1,)),
}  # coordinate descent tuning: inductor writes its own matrix-vector kernels at batch 1 (a reduction it can fuse)


def decode_model(cfg, device):
    """gpu_124m's shape with random weights, in bf16 on a GPU, for decoding."""
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(model_args(cfg, 50304)).eval()
    return model.to(torch.bfloat16) if device.type == "cuda" else model


def timed_generate(model, prompt, n, device, **kw):
    """(tokens, seconds) of one generate call, the device's work included."""
    sync(device)
    t0 = time.perf_counter()
    tokens = model.generate(prompt, n, **kw)
    sync(device)
    return tokens, time.perf_counter() - t0


def part_decode(cfg, bench, device):
    """Tokens/s of gpu_124m's decoding (random weights, bf16, 16-token prompt, --new_tokens) on each of DECODE_MODES:
    the first call (compile and capture, with inductor's cache as it is) and the second; greedy tokens checked
    against the eager path's; sampled decoding (sample.py's temperature and top-k) at batch 1; a profile of each
    mode's step (kernels per token and their GPU time). Yields each measurement."""
    import warnings
    set_matmul_precision(True)
    model, n = decode_model(cfg, device), bench["new_tokens"]
    modes = [m for m in bench["decode_modes"].split(",") if m] or list(DECODE_MODES)
    unknown = [m for m in modes if m not in DECODE_MODES]
    if unknown:
        raise SystemExit(f"unknown decode_modes {unknown}; known: {', '.join(DECODE_MODES)}")
    reference = {}
    for mode in modes:
        kw, batches = DECODE_MODES[mode]
        for batch in batches:
            key = f"decode_b{batch}_{mode}"
            try:
                torch._dynamo.reset()  # each compiled mode compiles afresh: its first call is what a process pays
                prompt = torch.randint(50304, (batch, 16), generator=torch.Generator().manual_seed(batch)).to(device)
                if bench["warm_only"]:  # compile at the timed run's cache length, a few tokens only
                    t0 = time.perf_counter()
                    for _, _ in zip(range(8), model.generate_stream(prompt, n, temperature=0.0, **kw)):
                        pass
                    yield key, dict(warm_only=True, first_call_s=time.perf_counter() - t0)
                    continue
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    _, first_s = timed_generate(model, prompt, n, device, temperature=0.0, **kw)
                tokens, dt = timed_generate(model, prompt, n, device, temperature=0.0, **kw)
                reference.setdefault(batch, tokens)
                result = dict(batch=batch, new_tokens=n, tokens_per_s=batch * n / dt, ms_per_token_step=dt / n * 1e3,
                              first_call_s=first_s, same_tokens_as_first_mode=bool(torch.equal(tokens, reference[batch])),
                              first_mode=modes[0], warnings=[str(w.message)[:300] for w in caught], keywords=kw)
            except (Exception, SystemExit) as e:  # one mode failing leaves the others
                result = error_record(e)
            yield key, result
    if not bench["warm_only"]:
        yield from sampled_decoding(model, device, n, [m for m in modes if 1 in DECODE_MODES[m][1]])
        yield from decode_profiles(model, device, [m for m in modes if m != "compiled"])


def sampled_decoding(model, device, n, modes):
    """Batch 1 at sample.py's temperature 0.8 and top-k 200, seeded: tokens/s, and whether the first 64 tokens
    equal the first mode's (the graph's sampler draws from the same generator)."""
    prompt = torch.randint(50304, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    sampling, first = dict(temperature=0.8, top_k=200, seed=1), None
    for mode in modes:
        kw = DECODE_MODES[mode][0]
        try:
            torch._dynamo.reset()
            short, _ = timed_generate(model, prompt, 64, device, **sampling, **kw)
            first = short if first is None else first
            _, dt = timed_generate(model, prompt, n, device, **sampling, **kw)
            yield f"decode_sampled_b1_{mode}", dict(batch=1, new_tokens=n, tokens_per_s=n / dt, keywords=kw,
                                                    same_64_tokens_as_first_mode=bool(torch.equal(short, first)))
        except (Exception, SystemExit) as e:
            yield f"decode_sampled_b1_{mode}", error_record(e)


def decode_profiles(model, device, modes, tokens=32):
    """Each mode's decode step under torch.profiler at batch 1: CUDA kernels per token, their summed GPU time per
    token (against the wall time per token: the gap is the device idling on the host), the top kernels."""
    from torch.profiler import ProfilerActivity, profile
    if device.type != "cuda":
        return
    prompt = torch.randint(50304, (1, 16), generator=torch.Generator().manual_seed(2)).to(device)
    for mode in modes:
        kw = DECODE_MODES[mode][0]
        try:
            torch._dynamo.reset()
            model.generate(prompt, tokens, temperature=0.0, **kw)  # compiles, plans, captures: outside the profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                _, dt = timed_generate(model, prompt, tokens, device, temperature=0.0, **kw)
            kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0
                       and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
            busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3
            top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:10]
            yield f"decode_profile_b1_{mode}", dict(
                tokens=tokens, kernels_per_token=sum(e.count for e in kernels) / tokens,
                gpu_busy_ms_per_token=busy_ms / tokens, wall_ms_per_token=dt * 1e3 / tokens,
                top=[dict(name=e.key[:120], us_per_token=e.self_device_time_total / tokens,
                          calls_per_token=e.count / tokens) for e in top])
        except (Exception, SystemExit) as e:
            yield f"decode_profile_b1_{mode}", error_record(e)


SAMPLE_PY_ARGS = ["--start=Once upon a time", "--temperature=0", "--stop_at_eot=False", "--num_samples=2"]


def random_checkpoint(cfg, device, path):
    """A checkpoint of the config's shape with random weights, as sample.py reads it: GPT-2's tokenizer on a GPU
    (gpu_124m), shakespeare_char's characters on a CPU (cpu_quick's size)."""
    from checkpoint import save_checkpoint
    if device.type == "cuda":
        tokenizer, vocab = {"tokenizer": "gpt2"}, 50304
    else:
        chars = sorted("\n !$&',-.3:;?" + string.ascii_letters)  # shakespeare_char's 65 characters
        tokenizer, vocab = {"tokenizer": "char", "chars": chars}, len(chars) + 1
    torch.manual_seed(0)
    # only the options set away from their defaults: a checkout from before an option was added reads it too
    args = {k: v for k, v in model_args(cfg, vocab).items() if k == "vocab_size" or v != MODEL_DEFAULTS[k]}
    save_checkpoint(path, {"model_args": args, "model": build_model(args).state_dict(), "tokenizer": tokenizer,
                           "config": {}, "step": 0, "val_loss": None})


def sample_py_speed(tree, ckpt, device, new_tokens, extra):
    """The tokens/s that sample.py in `tree` prints for each of its two samples of new_tokens from ckpt: the first
    pays for planning, capturing or compiling the step, the second is the steady state."""
    argv = [sys.executable, "sample.py", f"--ckpt={ckpt}", f"--device={device}", f"--max_new_tokens={new_tokens}",
            *SAMPLE_PY_ARGS, *extra]
    done = subprocess.run(argv, cwd=tree, capture_output=True, text=True, timeout=600)
    speeds = [float(l.split(" tokens, ")[1].split(" tokens/s")[0]) for l in done.stderr.splitlines() if " tokens/s" in l]
    if done.returncode or len(speeds) != 2:
        raise SystemExit(f"sample.py in {tree} failed (exit {done.returncode}): {done.stderr[-800:]}")
    return speeds


def part_sample_py(cfg, bench, device):
    """sample.py itself, the path a user runs, on a random checkpoint of the config's shape: its tokens/s as it
    prints them (two samples: the first pays for capturing or compiling), in --sample_rounds rounds; with
    --before_tree also that checkout's sample.py, the trees alternating (the ratio holds on a shared CPU). The
    decode part measures the paths before and after on a GPU; this one what a user of sample.py sees."""
    ckpt = os.path.join(os.path.abspath(bench["out_dir"]), "sample_py", "ckpt.pt")
    random_checkpoint(cfg, device, ckpt)
    here = os.path.dirname(os.path.abspath(__file__))
    runs = {"sample_py": (here, [])}
    if bench["before_tree"]:
        runs["sample_py_before_tree"] = (os.path.abspath(bench["before_tree"]), [])
    speeds = {name: [] for name in runs}  # per round: [first sample, second sample]
    for _ in range(bench["sample_rounds"]):
        for name, (tree, extra) in runs.items():
            speeds[name].append(sample_py_speed(tree, ckpt, device, bench["new_tokens"], extra))
    median = {name: statistics.median(second for _, second in v) for name, v in speeds.items()}
    for name, (tree, extra) in runs.items():
        ratio = {"ratio_to_sample_py": median[name] / median["sample_py"]} if name != "sample_py" else {}
        first = statistics.median(f for f, _ in speeds[name])
        yield name, dict(tokens_per_s=median[name], first_sample_tokens_per_s=first, rounds=speeds[name], tree=tree,
                         args=extra, new_tokens=bench["new_tokens"],
                         commit=code_version(os.path.join(tree, "sample.py"))["commit"], **ratio)


def kernel_cases(rows, C, V, device):
    """(name, make, reference): make() returns (inputs needing gradients, target or None, the op as measured);
    reference is the plain op, run in fp32 to check it. Ours as the compiler makes them, and Liger Kernel's."""
    import torch.nn.functional as F
    from model import Rotary
    hs, T = 64, min(1024, rows)
    fused = device.type == "cuda"  # compiled on a GPU; eager elsewhere (a smoke run)
    compiled = torch.compile if fused else (lambda f: f)
    rotary, positions = Rotary(hs, T, 10000.0).to(device), torch.arange(T, device=device)

    def head():
        w = (torch.randn(V, C, device=device) * 0.02).requires_grad_()
        return [torch.randn(rows, C, device=device, requires_grad=True), w], torch.randint(V, (rows,), device=device)

    def full(h, w, t):
        return F.cross_entropy((h @ w.t()).float(), t)

    def norm(x):
        return F.rms_norm(x, (C,))

    def liger_norm(x):
        from liger_kernel.transformers.functional import liger_rms_norm
        return liger_rms_norm(x, torch.ones(C, device=device), torch.finfo(x.dtype).eps, 0.0, "llama", False)

    def qk():
        q = torch.randn(rows // T, C // hs, T, hs, device=device, dtype=torch.bfloat16, requires_grad=True)
        return [q, torch.randn_like(q).requires_grad_()], None

    def rope(q, k):
        return rotary(q, positions), rotary(k, positions)

    def liger_rope(q, k):
        from liger_kernel.transformers.functional import liger_rope
        return liger_rope(q, k, rotary.cos.to(q.dtype), rotary.sin.to(q.dtype), rotary_dim=hs)
    return [
        ("head_ce_full", lambda: (*head(), compiled(full)), full),
        ("head_ce_chunks8", lambda: (*head(), compiled(lambda h, w, t: speed.chunked_cross_entropy(
            h[None], w, t[None], 8))), full),
        ("head_ce_liger", lambda: (*head(), lambda h, w, t: speed.liger_cross_entropy(h[None], w, t[None])), full),
        ("rms_norm", lambda: ([torch.randn(rows, C, device=device, requires_grad=True)], None, compiled(norm)), norm),
        ("rms_norm_liger", lambda: ([torch.randn(rows, C, device=device, requires_grad=True)], None, liger_norm), norm),
        ("rope", lambda: (*qk(), compiled(rope)), rope),
        ("rope_liger", lambda: (*qk(), liger_rope), rope),
    ]


def op_loss(fn, inputs, target):
    """A scalar of one op's output(s), so its backward runs: the loss itself, or a fixed projection of the outputs."""
    if target is not None:
        return fn(*inputs, target)
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    return sum((o.float() * torch.linspace(-1, 1, o.size(-1), device=o.device)).sum() for o in outs)


def loss_and_grads(fn, inputs, target, autocast):
    for x in inputs:
        x.grad = None
    with autocast:
        loss = op_loss(fn, inputs, target)
    loss.backward()
    return loss, [x.grad for x in inputs]


def time_op(fn, device, repeats=20):
    """Median ms of fn(): triton's do_bench on a GPU (CUDA events, its own warm-up), else a few timed calls."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def part_kernels(cfg, bench, device):
    """Liger Kernel's Triton kernels against the compiled ops they would replace, at gpu_124m's training shapes (12 x
    1024 rows, 768 wide, 50,304 vocabulary, bf16 autocast): forward + backward ms, and the relative error of loss and
    gradients against the plain op in fp32 (bf16 operands land between 1e-3 and 1e-2)."""
    rows, C, V = (64, 64, 512) if bench["smoke"] else (12 * 1024, 768, 50304)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    for name, make, plain in kernel_cases(rows, C, V, device):
        try:
            torch.manual_seed(0)
            inputs, target, fn = make()
            loss, grads = loss_and_grads(fn, inputs, target, autocast)
            if bench["warm_only"]:
                yield f"kernel_{name}", dict(warm_only=True)
                continue
            loss, grads = loss.detach(), [g.float() for g in grads]
            set_matmul_precision(False)  # the reference in true fp32
            exact = [x.detach().float().requires_grad_() for x in inputs]
            ref_loss, ref_grads = loss_and_grads(plain, exact, target, contextlib.nullcontext())
            set_matmul_precision(True)
            ms = time_op(lambda: loss_and_grads(fn, inputs, target, autocast), device)
            ref_loss = ref_loss.detach()
            yield f"kernel_{name}", dict(
                ms_fwd_bwd=ms, loss_rel_error=float((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-12)),
                grad_rel_errors=[float((g - r).norm() / r.norm()) for g, r in zip(grads, ref_grads)],
                shapes=[list(x.shape) for x in inputs])
        except (Exception, SystemExit) as e:  # liger missing, or no GPU: the other ops still run
            yield f"kernel_{name}", error_record(e)


def part_muon(cfg, bench, device):
    """Is torch.optim.Muon here, and does it match muon.py's Muon? One step of each from the same weights and
    gradients (4 of gpu_1b's 36 layers of block matrices: q, kv, out, MLP in and out; 2 small layers in a smoke run), the
    largest relative difference of the updated weights (both orthogonalise in bf16 on a GPU), and each one's
    optimizer step in ms (median of 5)."""
    from muon import Muon
    if not hasattr(torch.optim, "Muon"):
        return {"muon": dict(torch_has_muon=False, torch=torch.__version__)}
    layers, C = (2, 64) if bench["smoke"] else (4, 1536)
    shapes = [(C, C), (2 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * layers
    torch.manual_seed(0)
    weights = [torch.randn(s, device=device) * 0.02 for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    ours = [w.clone().requires_grad_() for w in weights]
    theirs = [w.clone().requires_grad_() for w in weights]
    for a, b, g in zip(ours, theirs, grads):
        a.grad, b.grad = g.clone(), g.clone()
    mine = Muon([{"params": ours, "muon": True, "lr": 0.02}], momentum=0.95)
    torch_muon = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True,
                                  ns_coefficients=(3.4445, -4.7750, 2.0315), ns_steps=5, adjust_lr_fn="original")
    mine.step()
    torch_muon.step()
    update_diff = max(float((a - w).sub(b - w).norm() / (a - w).norm()) for a, b, w in zip(ours, theirs, weights))
    return {"muon": dict(torch_has_muon=True, torch=torch.__version__, matrices=len(shapes),
                         max_update_rel_difference=update_diff,
                         ours_step_ms=time_op(mine.step, device, 5), torch_step_ms=time_op(torch_muon.step, device, 5))}


def part_memory(cfg, bench, device):
    """Peak memory of an eager bf16 train step (fused AdamW) for a sweep of shapes at the config's block
    and batch; compile lowers it (compare gpu_124m's peak in the train part with the first row here)."""
    results, largest = {}, None
    sweep = [(2, 2, 64), (2, 4, 128)] if bench["smoke"] else MEMORY_SWEEP
    for n_layer, n_head, n_embd in sweep:
        key = f"memory_{n_layer}x{n_embd}"
        try:
            before = reset_memory(device)
            set_matmul_precision(True)
            run = build(cfg, bench, device, True, compile_model=False, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
            params = run["raw"].num_params(False) / 1e6
            dt, _ = time_steps(run, 3, cfg["grad_clip"], device)
            peak = peak_memory_gb(device, before)
            results[key] = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, params_M=params, ms_per_step=dt * 1e3,
                                batch_size=run["batch_size"], block_size=cfg["block_size"], peak_memory_gb=peak)
            if peak is not None and peak <= 32:
                largest = key
        except torch.OutOfMemoryError as e:
            results[key] = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, error=f"out of memory: {str(e)[:200]}")
        except (Exception, SystemExit) as e:
            results[key] = error_record(e)
        finally:
            run = None
        print(f"  {key}: {results[key]}", flush=True)
    results["memory_largest_within_32gb"] = largest
    return results


def time_to_loss(config_path, bench, device, target, overrides=None, name=None):
    """Train with train.py's own loop; val loss against training seconds (compile and eval apart)."""
    name = name or os.path.splitext(os.path.basename(config_path))[0]
    out_dir = os.path.join(bench["out_dir"], name)
    # a fresh curve each time: an earlier run in out_dir is moved aside to out_dir/replaced-<time>/
    argv = [config_path, f"--out_dir={out_dir}", f"--data_dir={bench['data_dir']}", f"--device={device}",
            f"--threads={bench['threads']}", "--overwrite=True"]
    if bench["smoke"]:
        argv += ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=20",
                 "--eval_interval=10", "--eval_iters=2", "--log_interval=5"]
    t0 = time.perf_counter()
    run_script("train.py", overrides or {}, args=argv)  # its own process: train.py logs its peak memory
    wall = time.perf_counter() - t0
    rows = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    evals = [(r["step"], round(r["train_time"], 3), round(r["val_loss"], 4)) for r in rows if "val_loss" in r]
    compile_s = next((r["compile_time"] for r in rows if "compile_time" in r), 0.0)
    reached = next(((step, t) for step, t, val in evals if target is not None and val <= target), None)
    last = [r for r in rows if "tokens_per_s" in r]
    return {name: dict(config=config_path, overrides=overrides or {}, target_val=target,
                       time_to_target_s=reached[1] if reached else None, step_at_target=reached[0] if reached else None,
                       best_val=min(v for _, _, v in evals), train_time_s=evals[-1][1], compile_s=compile_s,
                       wall_s=wall, tokens_per_s=last[-1]["tokens_per_s"] if last else None,
                       peak_memory_gb=max((r.get("peak_memory_gb") or 0 for r in rows), default=None) or None,
                       curve=evals,
                       load_average=os.getloadavg() if device.type == "cpu" else None)}


def part_ttl_fast(cfg, bench, device):
    return time_to_loss("config/shakespeare_char_fast.py", bench, device, 1.47)


def part_ttl_best(cfg, bench, device):
    return time_to_loss("config/shakespeare_char_best.py", bench, device, 1.40)


# ----------------------------------------------------------------------------- cpu parts

def part_cpu_quick(cfg, bench, device):
    return time_to_loss("config/cpu_quick.py", bench, device, 1.886, dict(eval_interval=25, eval_iters=20))


def part_nanogpt_recipe(cfg, bench, device):
    # our model under nanoGPT's CPU recipe, in the same run: the ratio baseline for cpu_quick
    return time_to_loss("config/cpu_quick.py", bench, device, 1.886,
                        NANOGPT_CPU_RECIPE | dict(eval_interval=50, eval_iters=20), name="nanogpt_cpu_recipe")


PARTS = dict(train=part_train, plain=part_plain, ttl_fast=part_ttl_fast, sample=part_sample, memory=part_memory,
             ttl_best=part_ttl_best, batch=part_batch, cpu_quick=part_cpu_quick, nanogpt_recipe=part_nanogpt_recipe,
             levers=part_levers, nanogpt=part_nanogpt, gpu_1b=part_gpu_1b, parity=part_parity, decode=part_decode,
             sample_py=part_sample_py, kernels=part_kernels, muon=part_muon)


# ----------------------------------------------------------------------------- the run

def error_record(e):
    return dict(error=f"{type(e).__name__}: {str(e)[:500]}", traceback=traceback.format_exc()[-3000:])


def environment(device):
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command=" ".join([sys.executable.split("/")[-1], *sys.argv]), torch=torch.__version__,
               python=platform.python_version(), device=str(device), cpu_count=os.cpu_count(),
               torch_threads=torch.get_num_threads())
    # the checkout holding this bench.py (the code measured), not the working directory's repository
    code = code_version(__file__)
    env |= dict(git_commit=code["commit"], git_dirty=code["dirty"], code_tree=code["tree"])
    if device.type == "cuda":
        env |= dict(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:
        env["load_average"] = os.getloadavg()  # the CPU may be shared: timings scale with contention
    return env


def show(name, r):
    if isinstance(r, dict) and "error" not in r:
        print(f"  {name}: " + json.dumps({k: v for k, v in r.items() if k not in ("curve", "profile")}, default=str)[:400],
              flush=True)
    elif isinstance(r, dict):
        print(f"  {name}: FAILED {r['error'].splitlines()[0]}", flush=True)


def summary_rows(results):
    """(name, numbers) lines of the final table."""
    rows = []
    for name, r in results.items():
        if not isinstance(r, dict):
            rows.append((name, str(r)))
        elif "error" in r:
            rows.append((name, "FAILED " + r["error"].splitlines()[0][:100]))
        elif "tokens_per_s" in r and "ms_per_step" in r:
            mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
            mem = f", peak {r['peak_memory_gb']:.1f} GB" if r.get("peak_memory_gb") is not None else ""
            ratios = "".join(f", {r[k]:.2f}x {k[9:]}" for k in ("ratio_to_default", "ratio_to_nanogpt") if k in r)
            rows.append((name, f"{r['tokens_per_s']:,.0f} tok/s, {r['ms_per_step']:.1f} ms per "
                               f"{r['batch_size']}x{r['block_size']} batch{mfu}{mem}, loss {r['loss']:.3f}{ratios}"))
        elif "target_val" in r:
            t = f"{r['time_to_target_s']:.1f} s" if r["time_to_target_s"] is not None else "not reached"
            t = f"val <= {r['target_val']}: {t}; " if r["target_val"] is not None else f"final val {r['curve'][-1][2]:.4f}; "
            rows.append((name, f"{t}best {r['best_val']:.4f} in {r['train_time_s']:.1f} s "
                               f"(+{r['compile_s']:.1f} s compile)"))
        elif "tokens_per_s" in r:
            rows.append((name, f"{r['tokens_per_s']:,.0f} tok/s"))
        elif "peak_memory_gb" in r:
            peak = f"{r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] is not None else "n/a on CPU"
            rows.append((name, f"{r['params_M']:.0f}M params, peak {peak}"))
        else:
            rows.append((name, json.dumps(r)[:100]))
    return rows


def main(argv):
    bench = configure(DEFAULTS, argv)
    device = resolve_device(bench["device"])
    bench["threads"] = set_threads(bench["threads"])
    suite = {"gpu": GPU_PARTS, "cpu": CPU_PARTS}.get(bench["suite"])
    if suite is None:
        raise SystemExit(f"suite must be gpu or cpu, got {bench['suite']!r}")
    parts = [p for p in bench["parts"].split(",") if p] or suite
    unknown = [p for p in parts if p not in suite]
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; the {bench['suite']} suite has {', '.join(suite)}")
    if bench["suite"] == "gpu" and device.type != "cuda" and not bench["smoke"]:
        raise SystemExit("the gpu suite needs a CUDA device (use --suite=cpu, or --smoke=True to check it runs)")
    cfg = script_config("train.py", [bench["config"]])
    if bench["smoke"]:
        cfg.update(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=4)
        cfg.update(gradient_accumulation_steps=2)
        bench.update(steps=2, warmup_steps=1, plain_steps=1, new_tokens=16, best_batch=8)
    report = dict(environment=environment(device), bench=bench, results={})

    def save():
        tmp = f"{bench['out']}.tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(tmp, bench["out"])

    os.makedirs(os.path.dirname(os.path.abspath(bench["out"])), exist_ok=True)
    save()
    start = time.perf_counter()
    for part in parts:
        print(f"== {part}", flush=True)
        t0 = time.perf_counter()
        if bench["budget_s"] and t0 - start > bench["budget_s"]:
            report["results"][part] = dict(error=f"skipped: past the {bench['budget_s']} s budget")
            save()
            continue
        try:
            # a part returns its results, or yields (name, result) pairs: each is saved as it comes, so a run
            # stopped mid-part (a time limit) keeps what that part measured
            out = PARTS[part](cfg, bench, device)
            for name, r in (out.items() if isinstance(out, dict) else out):
                report["results"][name] = r
                show(name, r)
                save()
        except (Exception, SystemExit) as e:  # one failure is reported; the other parts still run
            traceback.print_exc()
            report["results"][part] = error_record(e)
            show(part, report["results"][part])
        report.setdefault("part_seconds", {})[part] = time.perf_counter() - t0
        save()
    fast, plain = report["results"].get("gpu_124m", {}), report["results"].get("gpu_124m_plain", {})
    if fast.get("tokens_per_s") and plain.get("tokens_per_s"):
        report["results"]["gpu_124m_speedup_over_plain"] = fast["tokens_per_s"] / plain["tokens_per_s"]
    nanogpt = report["results"].get("nanogpt", {}).get("tokens_per_s")
    for name, r in report["results"].items():  # every training measurement against nanoGPT's in this run
        if nanogpt and isinstance(r, dict) and r.get("tokens_per_s") and "ms_per_step" in r:
            r["ratio_to_nanogpt"] = r["tokens_per_s"] / nanogpt
    ours, recipe = report["results"].get("cpu_quick", {}), report["results"].get("nanogpt_cpu_recipe", {})
    if ours.get("time_to_target_s") and recipe.get("time_to_target_s"):
        report["results"]["cpu_quick_speedup_over_recipe"] = recipe["time_to_target_s"] / ours["time_to_target_s"]
    save()
    env = report["environment"]
    print(f"\n{env['date']}  {env.get('gpu', env['device'])}  torch {env['torch']}  -> {bench['out']}")
    rows = summary_rows(report["results"])
    width = max(len(name) for name, _ in rows) if rows else 0
    for name, text in rows:
        print(f"{name:<{width}}  {text}")


if __name__ == "__main__":
    main(sys.argv[1:])
