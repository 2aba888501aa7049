"""
The ~1B µLM in about 1 GB: bf16 / int8 / int4 exports of the 1B and 354M shapes, and 2:4 sparsity speed.

    python prepare.py --dataset=shakespeare
    python experiments/compress_gpu.py --out=out/compress_gpu          # one H100, ~8 min -> .json, .png
    python experiments/compress_gpu.py --parts='["mid","sparse"]' --out=out/compress_gpu   # adds to its JSON
    python experiments/compress_gpu.py --device=cpu --big="(2, 64, 4)" --mid="(2, 64, 4)" --train_iters=4 \\
        --block_size=32 --batch_size=2 --gen_tokens=8 --eval_iters=2 --group_size=32 --out=/tmp/cg   # smoke test

parts (each runs on its own; one that fails is recorded with its error and the rest still run; the JSON
is rewritten after each):
  train    the 1B shape (big: 36 layers x 1536, 12 heads, as config/gpu_1b.py) trained briefly on BPE
           shakespeare through train.py (bf16, compile, Muon): real weights, so the loss deltas mean
           something. It is brief (train_iters steps, ~1M tokens), far from converged: the deltas are
           those of an early model, measured on shakespeare's val split.
  big      export it as bf16, int8 and int4 (compress.py), then for each, in a fresh process: file size,
           peak GPU memory to load it and generate gen_tokens greedy tokens at batch 1
           (torch.cuda.max_memory_allocated), peak CPU RSS, decode tokens/s (compiled decode step, CUDA
           graphs), val loss on shakespeare
  cpu      the big int4 export on the CPU: peak RSS to load it and generate cpu_gen_tokens
  mid      the 354M shape (24 x 1024, 16 heads), random weights: bf16 / int8 / int4 peak memory and speed
  sparse   2:4 sparsity against dense (bf16) on the GPU: each of the big shape's linear layers at several
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
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import compress  # noqa: E402
import train  # noqa: E402
from checkpoint import save_checkpoint, write_json_atomic  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from data import open_dataset  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from runtime import resolve_device  # noqa: E402

DEFAULTS = dict(
    out="out/compress_gpu",
    parts=["train", "big", "cpu", "mid", "sparse"],
    device="auto",
    big=(36, 1536, 12),       # (n_layer, n_embd, n_head) of the ~1B shape
    mid=(24, 1024, 16),       # the 354M shape
    dataset="shakespeare",
    block_size=1024,
    batch_size=8,
    train_iters=120,          # ~1M tokens: about three passes over BPE shakespeare's train split
    learning_rate=3e-4,
    formats=["bfloat16", "int8", "int4"],  # the big and mid parts' exports (on a CPU: float32 for the baseline)
    group_size=128,
    gen_tokens=512,
    cpu_gen_tokens=16,
    eval_iters=20,
    compile=True,             # compiled decode (CUDA graphs) for the speed numbers
    token_counts=[1, 16, 256, 4096, 16384],  # 2:4 part: rows of the activation
)


def train_big(cfg, run_dir):
    n_layer, n_embd, n_head = cfg["big"]
    train_cfg = configure(train.DEFAULTS, [])
    train_cfg.update(out_dir=run_dir, dataset=cfg["dataset"], device=cfg["device"], n_layer=n_layer, n_embd=n_embd,
                     n_head=n_head, block_size=cfg["block_size"], batch_size=cfg["batch_size"],
                     max_iters=cfg["train_iters"], eval_interval=cfg["train_iters"], eval_iters=cfg["eval_iters"],
                     warmup_iters=max(1, cfg["train_iters"] // 10), learning_rate=cfg["learning_rate"],
                     min_lr=cfg["learning_rate"] / 10, compile=cfg["device"] != "cpu" and cfg["compile"], dropout=0.0,
                     optimizer="muon", muon_lr=0.02)  # config/gpu_1b.py's optimizer: one buffer per matrix
    t0 = time.perf_counter()
    losses = train.train(train_cfg)
    return {"val_loss": losses["val"], "train_loss": losses["train"], "seconds": time.perf_counter() - t0,
            "shape": cfg["big"], "iters": cfg["train_iters"], "tokens": cfg["train_iters"] * cfg["batch_size"] * cfg["block_size"]}


def random_checkpoint(cfg, shape, path):
    """A µLM checkpoint of the given shape with random (initial) weights and the GPT-2 tokenizer."""
    n_layer, n_embd, n_head = shape
    model_args = {"vocab_size": 50257, "block_size": cfg["block_size"], "n_layer": n_layer, "n_embd": n_embd,
                  "n_head": n_head}
    model = GPT(GPTConfig(**model_args))
    save_checkpoint(path, {"model_args": model_args, "model": model.state_dict(), "tokenizer": {"tokenizer": "gpt2"},
                           "config": {}, "step": 0, "val_loss": float("nan")}, kind="random")
    return path


def export_and_measure(cfg, src, device, formats=None, gen_tokens=None, compile=None, eval_iters=None):
    """{format: measure() result} for exports of src, each loaded and run in a fresh process."""
    results = {}
    for fmt in formats or cfg["formats"]:
        out = f"{os.path.splitext(src)[0]}_{fmt}.pt"
        ccfg = {**configure(compress.DEFAULTS, []), "ckpt": src, "format": fmt, "group_size": cfg["group_size"],
                "out": out, "device": device, "measure": False, "eval_batch_size": 8,
                "eval_iters": cfg["eval_iters"] if eval_iters is None else eval_iters,
                "gen_tokens": gen_tokens or cfg["gen_tokens"], "compile": cfg["compile"] if compile is None else compile}
        if not os.path.exists(out):
            compress.export(ccfg)
        try:
            results[fmt] = compress.measure_in_subprocess(out, ccfg)
        except SystemExit as e:  # e.g. compiling a kernel fails: measure it eager, and say so
            if not ccfg["compile"]:
                raise
            results[fmt] = {**compress.measure_in_subprocess(out, {**ccfg, "compile": False}),
                            "compile_failed": str(e)[-500:]}
        results[fmt].pop("tokens")
        print(fmt, json.dumps(results[fmt]))
    return results


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
        w = w * compress.two_four_mask(w)
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


def plot(results, path):
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for shape_key, offset, color in (("big", -0.2, "C0"), ("mid", 0.2, "C1")):
        r = results.get(shape_key)
        if not isinstance(r, dict) or "error" in r:
            continue
        fmts = list(r)
        for ax, key, label in ((axes[0], "peak_gpu_gib", "peak GPU GiB, load + generate"),
                               (axes[1], "decode_tokens_per_s", "decode tokens/s, batch 1")):
            ax.bar([i + offset for i in range(len(fmts))], [r[f].get(key, 0) for f in fmts], width=0.4,
                   color=color, label=shape_key)
            ax.set_xticks(range(len(fmts)), fmts)
            ax.set_title(label)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].legend()
    sparse = results.get("sparse")
    if isinstance(sparse, list):
        for layer in dict.fromkeys(row["layer"] for row in sparse):
            pts = [row for row in sparse if row["layer"] == layer and "speedup" in row]
            axes[2].plot([p["tokens"] for p in pts], [p["speedup"] for p in pts], "-o", label=layer)
        axes[2].set_xscale("log")
        axes[2].axhline(1.0, color="gray", lw=0.8)
        axes[2].set_xlabel("tokens (activation rows)")
        axes[2].set_title("2:4 sparse / dense speed-up (bf16)")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    cfg = configure(DEFAULTS, argv)
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
    big_src = os.path.join(cfg["out"], "big", "ckpt.pt")
    parts = {
        "train": lambda: train_big(cfg, os.path.dirname(big_src)),
        "big": lambda: export_and_measure(cfg, big_src, device.type),
        "cpu": lambda: export_and_measure(cfg, big_src, "cpu", ("int4",), cfg["cpu_gen_tokens"], False, 0),
        "mid": lambda: export_and_measure(cfg, random_checkpoint(cfg, cfg["mid"], os.path.join(cfg["out"], "mid.pt")),
                                          device.type),
        "sparse": lambda: sparse_two_four(cfg) if device.type == "cuda" else {"error": "2:4 sparsity needs a CUDA GPU"},
    }
    if "train" in cfg["parts"]:
        open_dataset("data", cfg["dataset"], cfg["block_size"])  # a missing dataset stops here, not mid-run
    for name in cfg["parts"]:
        t0 = time.perf_counter()
        try:
            results[name] = parts[name]()
        except (Exception, SystemExit) as e:
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            print(f"part {name} failed: {e}")
        print(f"part {name}: {time.perf_counter() - t0:.1f} s")
        write_json_atomic(json_path, results)
        plot(results, os.path.join(cfg["out"], "compress_gpu.png"))
    print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
