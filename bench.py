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
import subprocess
import sys
import time
import traceback

import torch

import train
from training import StepOptions, train_step
from configurator import configure
from data import get_batch, open_dataset
from architecture import MODEL_KEYS, build_model
from plot import plot_runs
from runtime import code_version, float8_training, read_jsonl, resolve_device

DEFAULTS = dict(
    suite="gpu",          # gpu | cpu
    parts="",             # comma-separated parts of the suite; empty = all
    out="bench.json",
    out_dir="out/bench",  # training runs of the time-to-loss parts
    data_dir="data",
    device="auto",
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
)
GPU_PARTS = ["train", "plain", "ttl_fast", "sample", "memory", "ttl_best", "batch", "levers", "nanogpt", "gpu_1b", "parity"]
CPU_PARTS = ["cpu_quick", "nanogpt_recipe"]
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
    speed options to try (fp8, fp8_head, compile_options, optimizer), see LEVERS."""
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
        float8_training(raw, head=lever.get("fp8_head", True))
    use_bf16 = fast and device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    compile_model = fast if compile_model is None else compile_model
    options = lever.get("compile_options", {})
    model = torch.compile(raw, options=options or None) if compile_model else raw
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

def measure_training(cfg, bench, device, fast, steps, batch_size=None, lever=None, **shape):
    """Steady-state tokens/s, ms per micro-batch, MFU and peak memory of the config's train step, with
    its gradient accumulation (which spreads the optimizer's cost over the micro-batches)."""
    before = reset_memory(device)
    set_matmul_precision(fast)
    batch_size = batch_size or cfg["batch_size"]
    # the same tokens per optimizer step as the config, whatever the micro-batch
    accum = max(1, cfg["gradient_accumulation_steps"] * cfg["batch_size"] // batch_size)
    run = build(cfg, bench, device, fast, batch_size, accum, lever=lever, **shape)
    t0 = time.perf_counter()
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
    if bench["profile_run"]:
        try:
            result["profile"] = profile_steps(run, cfg, device)
        except (Exception, SystemExit) as e:  # the throughput above still counts
            result["profile"] = error_record(e)
    return result


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
    "best": None,  # the levers measured before it that beat default by MIN_GAIN, together
}
MODEL_LEVERS = ("ce_chunks", "attention", "bf16_residual")
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
    `best` then measures the winners together."""
    names = [n for n in bench["levers"].split(",") if n] or [n for n in LEVERS if n != "max_autotune"]
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise SystemExit(f"unknown levers {unknown}; known: {', '.join(LEVERS)}")
    results, start = {}, time.perf_counter()
    for name in ["default"] + [n for n in names if n != "default"]:
        lever = LEVERS[name] if name != "best" else combine_winners(results)
        if name != "best" and bench["lever_budget_s"] and time.perf_counter() - start > bench["lever_budget_s"]:
            results[f"lever_{name}"] = dict(error=f"skipped: past lever_budget_s={bench['lever_budget_s']}")
            continue
        try:
            if name == "best" and not lever:
                raise SystemExit(f"no lever beat default by {MIN_GAIN:.2f}x: nothing to combine")
            results[f"lever_{name}"] = measure_lever(cfg, bench, device, lever) | {"lever": lever}
        except (Exception, SystemExit) as e:
            results[f"lever_{name}"] = error_record(e) | {"lever": lever}
        result = results[f"lever_{name}"]
        print(f"  lever_{name}: {result.get('tokens_per_s', result.get('error'))}", flush=True)
        base = results["lever_default"].get("tokens_per_s")
        if base and result.get("tokens_per_s"):
            result["ratio_to_default"] = result["tokens_per_s"] / base
    return results


def part_parity(cfg, bench, device):
    """Does a lever leave the loss unchanged? gpu_124m trained parity_steps steps on BPE shakespeare (the same
    seed, data and tokens per step) with the default step and with parity_lever; both curves in parity.png
    beside --out. The runs differ only by rounding, so their val curves should agree within bf16 noise."""
    lever = dict(bench["parity_lever"])
    if not lever:
        return {"parity": dict(error="skipped: pass --parity_lever={...}, e.g. {'ce_chunks': 8}")}
    unknown = [k for k in lever if k not in train.DEFAULTS]
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
    """config/gpu_1b.py's train step: peak memory (budget 32 GB) and MFU, with its own accumulation."""
    big = configure(train.DEFAULTS, ["config/gpu_1b.py"])
    if bench["smoke"]:
        big.update(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=2, gradient_accumulation_steps=2)
    shape = {k: big[k] for k in ("n_layer", "n_head", "n_embd", "checkpoint_activations")}
    return {"gpu_1b": measure_training(big, bench | {"profile_run": False}, device, True, 1,
                                       lever=dict(optimizer=big["optimizer"]), **shape)}


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
            "--overwrite=True"]
    if bench["smoke"]:
        argv += ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=20",
                 "--eval_interval=10", "--eval_iters=2", "--log_interval=5"]
    cfg = configure(train.DEFAULTS, argv)
    cfg.update(overrides or {})
    before = reset_memory(device)
    t0 = time.perf_counter()
    train.train(cfg)
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
                       peak_memory_gb=peak_memory_gb(device, before), curve=evals,
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
             levers=part_levers, nanogpt=part_nanogpt, gpu_1b=part_gpu_1b, parity=part_parity)


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
    suite = {"gpu": GPU_PARTS, "cpu": CPU_PARTS}.get(bench["suite"])
    if suite is None:
        raise SystemExit(f"suite must be gpu or cpu, got {bench['suite']!r}")
    parts = [p for p in bench["parts"].split(",") if p] or suite
    unknown = [p for p in parts if p not in suite]
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; the {bench['suite']} suite has {', '.join(suite)}")
    if bench["suite"] == "gpu" and device.type != "cuda" and not bench["smoke"]:
        raise SystemExit("the gpu suite needs a CUDA device (use --suite=cpu, or --smoke=True to check it runs)")
    cfg = configure(train.DEFAULTS, [bench["config"]])
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
            results = PARTS[part](cfg, bench, device)
        except (Exception, SystemExit) as e:  # one failure is reported; the other parts still run
            traceback.print_exc()
            results = {part: error_record(e)}
        report["results"].update(results)
        report.setdefault("part_seconds", {})[part] = time.perf_counter() - t0
        for name, r in results.items():
            if isinstance(r, dict) and "error" not in r:
                print(f"  {name}: " + json.dumps({k: v for k, v in r.items() if k not in ("curve", "profile")}, default=str)[:400])
            elif isinstance(r, dict):
                print(f"  {name}: FAILED {r['error'].splitlines()[0]}")
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
