"""
The ~1B µLM in about 1 GB: bf16 / int8 / int4 exports of the 1B and 354M shapes, int8 decode paths, 2:4 speed.

    python experiments/compress_gpu.py --out=out/compress_gpu       # one H100, ~6 min, random weights -> .json, .png
    python prepare.py --dataset=shakespeare
    python experiments/compress_gpu.py --parts='["train","big"]' --gen_tokens=16 --compile=False \
        --time_limit_s=480 --out=out/compress_loss_1b     # loss deltas of a briefly trained 1B (one H100, ~6 min)
    python experiments/compress_gpu.py --parts='["train_mid","mid"]' --gen_tokens=16 --compile=False \
        --time_limit_s=480 --out=out/compress_loss_354m   # the same for the 354M shape (~3 min)
    python experiments/compress_gpu.py --device=cpu --big="(2, 64, 4)" --mid="(2, 64, 4)" --decode_layers=1 \
        --block_size=32 --gen_tokens=8 --group_size=32 --parts='["big","decode","mid","cpu"]' --compile=False \
        --formats='["float32","int4","int8"]' --out=/tmp/cg      # a smoke test (CPU: float32)
    python experiments/compress_gpu.py --device=cpu --parts='["cpu"]' --out=out/compress_cpu   # the 1B int4 on a CPU
    python experiments/compress_gpu.py --replot=experiments/results/compress_gpu.json   # its PNG again, from the JSON

parts (each runs on its own; one that fails is recorded with its error and the rest still run; the JSON
is rewritten after each; no part, export or decode path starts after time_limit_s: it is recorded as skipped):
  big      the 1B shape (36 layers x 1536, 12 heads, as config/gpu_1b.py): the trained checkpoint of the
           train part if there is one, else random weights (memory and speed do not depend on them).
           Exported as bf16, int4 and int8 (compress.py); each export loaded and run in a fresh process:
           file size, peak GPU memory to load it and generate gen_tokens greedy tokens at batch 1
           (torch.cuda.max_memory_allocated and _reserved), peak host RSS, decode tokens/s (compiled decode
           step, CUDA graphs), and, when the source was trained, val loss on the training data (eval_iters
           fixed batches) and each quantized format's val_loss_increase over the float export
  decode   int8 decode paths against the float model (bf16 on a GPU, float32 on a CPU) at batch 1, compiled,
           in one process, on the big width with decode_layers layers: cast-then-matmul (the old
           Int8Linear), the fused matvec (shrink.Int8Linear), on a GPU the matvec with inductor's
           coordinate-descent tuning, and torchao's int8 weight-only (if installed)
  mid      the 354M shape (24 x 1024, 16 heads): the same as big (trained by train_mid, else random weights)
  cpu      (not by default) the big int4 export on the host CPU: peak RSS to load it and generate
           cpu_gen_tokens (a CUDA build of torch starts at ~0.5 GiB RSS: measure CPU RSS on a CPU build)
  train    (not by default) the big shape trained briefly on BPE shakespeare through train.py (bf16,
           compiled on a GPU, Muon): real weights for the loss deltas, far from converged
  train_mid  (not by default) the same for the mid shape
  sparse   (not by default) 2:4 sparsity against dense (bf16) on each big-shape linear layer at several
           token counts, torch.sparse.to_sparse_semi_structured (cuSPARSELt) against F.linear
"""
import datetime
import json
import os
import sys
import time
import traceback

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch._inductor.config  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import load_checkpoint, load_model, read_json, save_checkpoint, write_json_atomic  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from data import open_dataset  # noqa: E402
from generation import decode_speed  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402 (a plain core model)
from metrics import save_figure  # noqa: E402
from runtime import resolve_device  # noqa: E402
from scripts import run_script  # noqa: E402
from shrink import Int8Linear, two_four_mask  # noqa: E402
from training import last_evaluation  # noqa: E402

DEFAULTS = dict(
    out="out/compress_gpu",
    parts=["big", "mid", "decode"],  # cpu, train and sparse on request
    time_limit_s=330,         # no part, export or decode path starts after this (a shared 10-minute device slot)
    device="auto",
    big=(36, 1536, 12),       # (n_layer, n_embd, n_head) of the ~1B shape
    mid=(24, 1024, 16),       # the 354M shape
    dataset="shakespeare",
    block_size=1024,
    batch_size=8,
    train_iters=120,          # ~1M tokens: about three passes over BPE shakespeare's train split
    learning_rate=3e-4,
    formats=["bfloat16", "int4", "int8"],  # the big and mid parts' exports (on a CPU: float32 for the baseline)
    group_size=128,
    gen_tokens=512,
    decode_layers=6,          # decode part: layers of the big width (each path compiles once)
    cpu_gen_tokens=8,
    eval_iters=20,
    compile=True,             # compiled decode (CUDA graphs on a GPU, inductor's C++ on a CPU) for the speed numbers
    token_counts=[1, 16, 256, 4096, 16384],  # 2:4 part: rows of the activation
    replot="",                # a compress_gpu JSON: redraw its PNG beside it from its numbers, measure nothing
)


def train_shape(cfg, shape, run_dir):
    """A run of shape (n_layer, n_embd, n_head) trained briefly on the dataset through train.py: real weights
    for the loss deltas, far from converged."""
    n_layer, n_embd, n_head = shape
    run = dict(out_dir=run_dir, dataset=cfg["dataset"], device=cfg["device"], n_layer=n_layer, n_embd=n_embd,
               n_head=n_head, block_size=cfg["block_size"], batch_size=cfg["batch_size"],
               max_iters=cfg["train_iters"], eval_interval=cfg["train_iters"], eval_iters=cfg["eval_iters"],
               warmup_iters=max(1, cfg["train_iters"] // 10), learning_rate=cfg["learning_rate"],
               min_lr=cfg["learning_rate"] / 10, compile=cfg["device"] == "cuda", dropout=0.0,
               optimizer="muon", muon_lr=0.02)  # config/gpu_1b.py's optimizer: one buffer per matrix
    t0 = time.perf_counter()
    run_script("train.py", run)
    losses = last_evaluation(run_dir)
    return {"val_loss": losses["val"], "train_loss": losses["train"], "seconds": time.perf_counter() - t0,
            "shape": shape, "iters": cfg["train_iters"], "tokens": cfg["train_iters"] * cfg["batch_size"] * cfg["block_size"]}


def random_checkpoint(cfg, shape, path, device):
    """A µLM checkpoint of the given shape with random (initial) weights in bf16 and the GPT-2 tokenizer."""
    if os.path.exists(path):
        return path
    n_layer, n_embd, n_head = shape
    model_args = {"vocab_size": 50257, "block_size": cfg["block_size"], "n_layer": n_layer, "n_embd": n_embd,
                  "n_head": n_head}
    with torch.device(device):  # initialised where it is fast; .cpu() and .to() keep the tied head one tensor
        model = GPT(GPTConfig(**model_args)).to(torch.bfloat16).cpu()
    save_checkpoint(path, {"model_args": model_args, "model": model.state_dict(), "tokenizer": {"tokenizer": "gpt2"},
                           "config": {}, "step": 0, "val_loss": None}, kind="random")
    return path


def export(cfg, src, fmt, device):
    """The fmt export of src beside it (made once)."""
    out = f"{os.path.splitext(src)[0]}_{fmt}.pt"
    if not os.path.exists(out):
        run_script("compress.py", compress_settings(cfg, device) | {"ckpt": src, "format": fmt, "out": out})
    return out


def compress_settings(cfg, device, **overrides):
    """compress.py's options for this experiment's exports and measurements."""
    return {"group_size": cfg["group_size"], "device": device, "measure": False, "eval_batch_size": 8,
            "eval_iters": cfg["eval_iters"], "gen_tokens": cfg["gen_tokens"], "compile": cfg["compile"], **overrides}


def measure(path, settings):
    """compress.py --mode=measure of one file, in a fresh process so its peak memory is that file's alone."""
    report = f"{path}.measure.json"
    run_script("compress.py", {k: v for k, v in settings.items() if k not in ("measure", "group_size")} |
               {"mode": "measure", "ckpt": path, "report": report})
    return read_json(report, fix="measure the file again")


def export_and_measure(cfg, src, device, deadline, formats=None, **overrides):
    """{format: compress.measure() result, with peak memory over file size} for exports of src, each
    loaded and run in a fresh process (none started after deadline)."""
    results = {}
    for fmt in formats or cfg["formats"]:
        if time.perf_counter() > deadline:
            results[fmt] = {"skipped": f"time_limit_s={cfg['time_limit_s']} passed"}
            continue
        path = export(cfg, src, fmt, device)
        settings = compress_settings(cfg, device, **overrides)
        try:
            results[fmt] = measure(path, settings)
        except SystemExit as e:  # e.g. compiling a kernel fails: measure it eager, and say so
            if not settings["compile"]:
                raise
            results[fmt] = {**measure(path, {**settings, "compile": False}), "compile_failed": str(e)[-500:]}
        r = results[fmt]
        r.pop("tokens")
        r["rss_over_file"] = (r["peak_rss_gib"] - r["rss_at_start_gib"]) * 1024 / r["file_mib"]
        if "peak_gpu_gib" in r:
            r["gpu_over_file"] = r["peak_gpu_gib"] * 1024 / r["file_mib"]
        print(fmt, json.dumps(r))
    loss_increases(results)
    return results


def loss_increases(results):
    """Each quantized format's val loss minus the float export's (bfloat16 or float32), where both were measured."""
    base = next((r.get("val_loss") for fmt, r in results.items() if fmt in ("bfloat16", "float32")), None)
    for fmt, r in results.items():
        if base is not None and r.get("val_loss") is not None and fmt not in ("bfloat16", "float32"):
            r["val_loss_increase"] = r["val_loss"] - base


class CastInt8Linear(Int8Linear):
    """The int8 GPU path before the matvec: cast the whole weight, then matmul (as gpt-fast writes it)."""

    def forward(self, x):
        return F.linear(x, self.q.to(x.dtype)) * self.scale.to(x.dtype)


def torchao_int8(model):
    """model (float) with torchao's int8 weight-only linear layers; the head untied so the embedding stays float."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    quantize_(model, Int8WeightOnlyConfig())
    return model


def decode_paths(cfg, device, deadline):
    """Decode tokens/s at batch 1 of the float model (bf16 on a GPU, float32 on a CPU) and of int8 through each
    matvec path, compiled, in this process (none started after deadline)."""
    _, n_embd, n_head = cfg["big"]
    src = random_checkpoint(cfg, (cfg["decode_layers"], n_embd, n_head), os.path.join(cfg["out"], "decode.pt"), device)
    base = "bfloat16" if device == "cuda" else "float32"
    files = {fmt: export(cfg, src, fmt, device) for fmt in (base, "int8")}
    compile = cfg["compile"]

    def load(fmt):
        return load_model(load_checkpoint(files[fmt], map_location=device), device)

    def cast_int8():
        model = load("int8")
        for module in model.modules():
            if type(module) is Int8Linear:
                module.__class__ = CastInt8Linear
        return model

    paths = {base: lambda: load(base), "int8 fused matvec": lambda: load("int8")}
    if device == "cuda":  # a Triton tuning: nothing to tune in inductor's C++
        paths["int8 fused matvec, coordinate descent"] = lambda: load("int8")
    # torchao last: quantize_ sets inductor options for the rest of the process
    paths |= {"int8 cast+matmul (before)": cast_int8, "torchao int8 weight-only": lambda: torchao_int8(load(base))}
    results = {}
    for name, build in paths.items():
        if time.perf_counter() > deadline:
            results[name] = {"skipped": f"time_limit_s={cfg['time_limit_s']} passed"}
            continue
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            model = build()
            with torch._inductor.config.patch(coordinate_descent_tuning="coordinate descent" in name):
                tokens, tokens_per_s = decode_speed(model, cfg["gen_tokens"], compile)
            results[name] = {"decode_tokens_per_s": tokens_per_s, "first_tokens": tokens[:16]}
            if device == "cuda":
                results[name]["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception as e:  # a path that does not run here (torchao missing, a kernel refused): say why
            results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        model = None
        print(name, results[name])
    base_speed = results[base].get("decode_tokens_per_s")
    for r in results.values():
        if base_speed and "decode_tokens_per_s" in r:
            r["speed_vs_float"] = r["decode_tokens_per_s"] / base_speed
    return {"layers": cfg["decode_layers"], "width": n_embd, "compiled": compile, "paths": results}


def bench(fn, iters=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def sparse_two_four(cfg):
    """Time of each big-shape linear layer, dense bf16 against 2:4 sparse, at several token counts."""
    from torch.sparse import to_sparse_semi_structured
    _, C, _ = cfg["big"]
    layers = {"q_proj/c_proj": (C, C), "kv_proj": (2 * C, C), "c_fc": (4 * C, C), "mlp c_proj": (C, 4 * C)}
    rows = []
    for name, (n_out, n_in) in layers.items():
        w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16)
        w = w * two_four_mask(w)
        w_sparse = to_sparse_semi_structured(w)
        for m in cfg["token_counts"]:
            x = torch.randn(m, n_in, device="cuda", dtype=torch.bfloat16)
            try:
                F.linear(x, w_sparse)
            except Exception as e:  # a shape the sparse kernels refuse: record it, keep going
                rows.append({"layer": name, "tokens": m, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            error = (F.linear(x, w_sparse) - F.linear(x, w)).abs().max().item()
            dense_s, sparse_s = bench(lambda: F.linear(x, w)), bench(lambda: F.linear(x, w_sparse))
            rows.append({"layer": name, "shape": [n_out, n_in], "tokens": m, "dense_us": dense_s * 1e6,
                         "sparse_us": sparse_s * 1e6, "speedup": dense_s / sparse_s, "max_abs_error": error})
            print(rows[-1])
    return rows


EXPORT_PANELS = (  # (key of each export's result, y label, title); a panel is drawn where some export has the key
    ("peak_gpu_gib", "peak GPU memory (GiB)", "load + generate"),
    ("decode_tokens_per_s", "decode tokens/s", "decode, batch 1"),
    ("val_loss_increase", "val loss increase over float (nats)", "loss of each quantized format"),
)


def measured_shapes(results):
    """{"big" / "mid": {format: result}} of the shapes whose export part ran (skipped or failed parts left out)."""
    shapes = {}
    for key in ("big", "mid"):
        r = results.get(key)
        if isinstance(r, dict) and "error" not in r and "skipped" not in r:
            shapes[key] = {fmt: m for fmt, m in r.items() if isinstance(m, dict) and "skipped" not in m}
    return shapes


def plot(results, path):
    """One panel per measurement the results hold (the exports' memory, speed and loss; the decode paths; 2:4
    speed-ups), so a skipped part leaves no empty panel. Returns the figure, or None when nothing was measured."""
    shapes = measured_shapes(results)
    shape_names = {key: f"{key} ({results['config'][key][0]} x {results['config'][key][1]})"
                   if key in results.get("config", {}) else key for key in shapes}
    exports = [p for p in EXPORT_PANELS if any(m.get(p[0]) is not None for r in shapes.values() for m in r.values())]
    decode = results.get("decode")
    paths = {n: r["decode_tokens_per_s"] for n, r in decode["paths"].items() if "decode_tokens_per_s" in r} \
        if isinstance(decode, dict) and "paths" in decode else {}
    sparse = [row for row in results.get("sparse", []) if "speedup" in row] if isinstance(results.get("sparse"), list) else []
    n = len(exports) + bool(paths) + bool(sparse)
    if not n:
        return None
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    axes = iter(axes[0])
    for key, ylabel, title in exports:
        ax = next(axes)
        fmts = list(dict.fromkeys(fmt for r in shapes.values() for fmt in r))
        for j, (shape, r) in enumerate(shapes.items()):
            offset = (j - (len(shapes) - 1) / 2) * 0.4
            drawn = [i for i, fmt in enumerate(fmts) if r.get(fmt, {}).get(key) is not None]
            bars = ax.bar([i + offset for i in drawn], [r[fmts[i]][key] for i in drawn], width=0.4, color=f"C{j}",
                          label=shape_names[shape])
            ax.bar_label(bars, fmt="%.3g", fontsize=7)  # a loss increase of 0.0002 is no visible bar
        ax.set_xticks(range(len(fmts)), fmts)
        ax.set(xlabel="export format", ylabel=ylabel, title=title)
        if key == "peak_gpu_gib":
            ax.axhline(1e9 / 2**30, color="gray", lw=0.8, label="1 GB")
        if key == "val_loss_increase":
            for target, fmt in ((0.02, "int8"), (0.10, "int4")):  # the bounds for the 1B
                ax.axhline(target, color="gray", lw=0.8, ls="--", label=f"{fmt} bound")
        ax.legend(fontsize=8)
    if paths:
        ax = next(axes)
        ax.barh(list(paths), list(paths.values()), color="C2")
        ax.set(xlabel="decode tokens/s, batch 1", ylabel="decode path",
               title=f"decode paths, {decode['layers']} layers x {decode['width']}")
    if sparse:
        ax = next(axes)
        for layer in dict.fromkeys(row["layer"] for row in sparse):
            pts = [row for row in sparse if row["layer"] == layer]
            ax.plot([p["tokens"] for p in pts], [p["speedup"] for p in pts], "-o", label=layer)
        ax.set_xscale("log")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xlabel="tokens (activation rows)", ylabel="dense time / 2:4 sparse time",
               title="2:4 sparse against dense (bf16)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return fig


def main(argv):
    cfg = configure(DEFAULTS, argv)
    if cfg["replot"]:
        png = os.path.splitext(cfg["replot"])[0] + ".png"
        drawn = plot(read_json(cfg["replot"], "give the JSON a compress_gpu.py run wrote"), png)
        print(f"wrote {png}" if drawn else f"no plot: {cfg['replot']} holds no measurement")
        return
    print_config(cfg)
    device = resolve_device(cfg["device"])
    cfg["device"] = device.type
    os.makedirs(cfg["out"], exist_ok=True)
    json_path = os.path.join(cfg["out"], "compress_gpu.json")
    # a run of some parts adds to an earlier run's JSON in the same folder
    results = json.load(open(json_path)) if os.path.exists(json_path) else {}
    results |= {"config": cfg, "date": datetime.date.today().isoformat(),
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__}
    trained = {key: os.path.join(cfg["out"], key, "ckpt.pt") for key in ("big", "mid")}

    def source(key):  # the shape's trained run if a train part made one, else random weights
        if os.path.exists(trained[key]):
            return trained[key]
        return random_checkpoint(cfg, cfg[key], os.path.join(cfg["out"], f"{key}.pt"), device)

    start = time.perf_counter()
    deadline = start + cfg["time_limit_s"]  # nothing new (part, export, decode path) starts after it
    parts = {
        "train": lambda: train_shape(cfg, cfg["big"], os.path.dirname(trained["big"])),
        "train_mid": lambda: train_shape(cfg, cfg["mid"], os.path.dirname(trained["mid"])),
        "big": lambda: export_and_measure(cfg, source("big"), device.type, deadline),
        "decode": lambda: decode_paths(cfg, device.type, deadline),
        "mid": lambda: export_and_measure(cfg, source("mid"), device.type, deadline),
        "cpu": lambda: export_and_measure(cfg, source("big"), "cpu", deadline, ("int4",), gen_tokens=cfg["cpu_gen_tokens"],
                                          compile=False, eval_iters=0),
        "sparse": lambda: sparse_two_four(cfg) if device.type == "cuda" else {"error": "2:4 sparsity needs a CUDA GPU"},
    }
    unknown = [name for name in cfg["parts"] if name not in parts]
    if unknown:
        raise SystemExit(f"unknown parts {unknown}: choose from {list(parts)}")
    if {"train", "train_mid"} & set(cfg["parts"]):
        open_dataset("data", cfg["dataset"], cfg["block_size"])  # a missing dataset stops here, not mid-run
    results["seconds"] = {}
    for name in cfg["parts"]:
        t0 = time.perf_counter()
        if t0 > deadline:
            results[name] = {"skipped": f"not started within time_limit_s={cfg['time_limit_s']}"}
            continue
        try:
            results[name] = parts[name]()
        except (Exception, SystemExit) as e:
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            print(f"part {name} failed: {e}")
        results["seconds"][name] = time.perf_counter() - t0
        print(f"part {name}: {results['seconds'][name]:.1f} s")
        write_json_atomic(json_path, results)
        plot(results, os.path.join(cfg["out"], "compress_gpu.png"))
    write_json_atomic(json_path, results)
    print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
