"""
Dense MLPs against product-key memory at equal compute: one process trains both, one after the other.

    python experiments/memory_vs_dense.py --out=out/memory_vs_dense.json                  # GPU, ~2.5 min
    python experiments/memory_vs_dense.py --device=cpu --budget_s=20 --n_layer=2 --n_embd=64 --n_head=2 \\
        --block_size=64 --batch_size=8 --memory_slots=4096 --eval_interval=20 --eval_iters=2 --out=/tmp/mvd.json

Each model trains for the same wall-clock budget (or, with --max_steps, the same number of steps), with
warmup then a constant lr and a linear decay over the last decay_frac of the budget, so both end
fully decayed. Validation loss is measured every eval_interval steps (not counted as training time).
Reported: val loss at equal wall time (each model's final), at equal tokens (the most tokens both
reached, read off the curves), tokens/s, and parameters. The first untimed_steps steps (CUDA start-up,
compilation) train but are not timed.
"""
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure, print_config  # noqa: E402
from architecture import build_model  # noqa: E402
from data import get_batch, open_dataset  # noqa: E402
from runtime import resolve_device, resolve_dtype  # noqa: E402
from training import StepOptions, estimate_loss, make_optimizers, set_lr, train_step  # noqa: E402

DEFAULTS = dict(
    out="out/memory_vs_dense.json",
    models=["dense", "pkm"],
    device="auto",
    dtype="auto",
    compile=False,
    seed=1337,
    dataset="shakespeare_char",
    data_dir="data",
    # the shape of config/shakespeare_char.py
    n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2,
    batch_size=64,
    optimizer="adamw", muon_lr=0.02,  # adamw | muon (for the blocks' matrices; the memory values stay on Adam)
    learning_rate=1e-3, min_lr=1e-4, warmup_steps=50, decay_frac=0.3, weight_decay=0.1, beta2=0.99,
    budget_s=60.0,          # training seconds per model; 2 x 60 s + evals + start-up fits in ~150 s on an H100
    max_steps=0,            # > 0: train both for this many steps instead (equal tokens exactly)
    untimed_steps=3,
    eval_interval=250,
    eval_iters=20,
    # the memory model: these layers' MLPs become product-key memories
    memory_layers=[3],
    memory_slots=512 ** 2,  # 262,144 rows x 384 = 101M value parameters, ~10x the dense model
    memory_heads=4,
    memory_topk=32,
    memory_key_dim=256,
    memory_gate=False,
    memory_sparse=False,    # dense value gradients + AdamW group; True: sparse gradients + SparseAdam
    memory_lr_scale=10.0,
)


def lr_at_fraction(step, fraction, cfg):
    """Warmup over steps, then constant, then linear decay to min_lr over the last decay_frac of the budget."""
    if step < cfg["warmup_steps"]:
        return cfg["learning_rate"] * (step + 1) / cfg["warmup_steps"]
    decay_start = 1 - cfg["decay_frac"]
    if fraction < decay_start:
        return cfg["learning_rate"]
    left = max(0.0, 1 - fraction) / cfg["decay_frac"]
    return cfg["min_lr"] + (cfg["learning_rate"] - cfg["min_lr"]) * left


def build(kind, cfg, vocab_size):
    shape = {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout")}
    if kind == "pkm":
        shape |= {k: cfg[k] for k in ("memory_layers", "memory_slots", "memory_heads", "memory_topk",
                                      "memory_key_dim", "memory_gate", "memory_sparse")}
    elif kind != "dense":
        raise SystemExit(f"models must be dense or pkm, got {kind!r}")
    return dict(vocab_size=vocab_size, **shape)


def run(kind, cfg, meta, device, dtype):
    torch.manual_seed(cfg["seed"])
    config = build(kind, cfg, meta["vocab_size"])
    raw = build_model(config).to(device)
    betas = (0.9, cfg["beta2"])
    optimizers = [o for o in make_optimizers(raw, cfg["weight_decay"], cfg["learning_rate"], betas, device.type,
                                             cfg["optimizer"], cfg["muon_lr"], cfg["memory_lr_scale"]) if o]
    model = torch.compile(raw) if cfg["compile"] else raw
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(cfg["seed"])
    tokens_per_step = cfg["batch_size"] * cfg["block_size"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step, train_time, curve = 0, 0.0, []

    def evaluate():
        losses = estimate_loss(model, meta, cfg["batch_size"], cfg["block_size"], cfg["eval_iters"], device, autocast)
        curve.append({"step": step, "tokens": step * tokens_per_step, "train_time": round(train_time, 3),
                      "val_loss": losses["val"], "train_loss": losses["train"]})
        print(f"  {kind} step {step}: val {losses['val']:.4f} ({train_time:.1f} s)", flush=True)

    def done():
        return step >= cfg["max_steps"] if cfg["max_steps"] else train_time >= cfg["budget_s"]

    def fetch():
        return get_batch(meta, "train", cfg["batch_size"], cfg["block_size"], generator, device)

    batch = fetch()
    model.train()
    while not done():
        if step % cfg["eval_interval"] == 0 and step > 0:
            evaluate()
        fraction = step / cfg["max_steps"] if cfg["max_steps"] else train_time / cfg["budget_s"]
        lr = lr_at_fraction(step, fraction, cfg)
        sync()
        t0 = time.perf_counter()
        set_lr(optimizers, lr)
        _, batch = train_step(model, optimizers, batch, fetch, StepOptions(autocast=autocast))  # train.py's own step
        sync()
        step += 1
        if step > cfg["untimed_steps"]:
            train_time += time.perf_counter() - t0
    evaluate()
    timed_tokens = (step - cfg["untimed_steps"]) * tokens_per_step
    return {"params": raw.num_params(False), "params_without_embeddings": raw.num_params(),
            "steps": step, "tokens": step * tokens_per_step, "train_time": train_time,
            "tokens_per_s": timed_tokens / train_time, "final_val_loss": curve[-1]["val_loss"], "curve": curve,
            "config": config}


def val_at_tokens(curve, tokens):
    """Val loss at a token count, linearly interpolated between evaluations."""
    points = [(0, None)] + [(c["tokens"], c["val_loss"]) for c in curve]
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if t0 <= tokens <= t1:
            return v1 if v0 is None else v0 + (v1 - v0) * (tokens - t0) / (t1 - t0)
    return None


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    device = resolve_device(cfg["device"])
    dtype = resolve_dtype(cfg["dtype"], device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    meta = open_dataset(cfg["data_dir"], cfg["dataset"], cfg["block_size"])
    results = {}
    for kind in cfg["models"]:
        print(f"{kind}: training for {cfg['max_steps'] or cfg['budget_s']} {'steps' if cfg['max_steps'] else 's'}")
        results[kind] = run(kind, cfg, meta, device, dtype)
    first_eval = min(r["curve"][0]["tokens"] for r in results.values())
    common = min(r["tokens"] for r in results.values())
    # equal tokens: the largest evaluated token count that every model reached
    common = max((c["tokens"] for r in results.values() for c in r["curve"] if c["tokens"] <= common), default=first_eval)
    for r in results.values():
        r["val_loss_at_common_tokens"] = val_at_tokens(r["curve"], common)
    print(f"\n{'model':6s} {'params':>10s} {'tokens/s':>10s} {'steps':>6s} {'val @ equal time':>17s} "
          f"{'val @ ' + format(common, ',') + ' tokens':>24s}")
    for kind, r in results.items():
        at_tokens = r["val_loss_at_common_tokens"]
        print(f"{kind:6s} {r['params'] / 1e6:9.1f}M {r['tokens_per_s']:10,.0f} {r['steps']:6d} "
              f"{r['final_val_loss']:17.4f} {at_tokens if at_tokens is None else format(at_tokens, '.4f'):>24}")
    summary = {"common_tokens": common, "device": str(device), "dtype": dtype, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "dense" in results and "pkm" in results:
        d, p = results["dense"], results["pkm"]
        summary |= {"tokens_per_s_ratio": p["tokens_per_s"] / d["tokens_per_s"], "param_ratio": p["params"] / d["params"],
                    "val_delta_equal_time": p["final_val_loss"] - d["final_val_loss"]}
        print(f"pkm/dense: {summary['param_ratio']:.1f}x parameters, {summary['tokens_per_s_ratio']:.2f}x tokens/s, "
              f"val at equal time {summary['val_delta_equal_time']:+.4f}")
    if device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(device)
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out"])), exist_ok=True)
    with open(cfg["out"], "w") as f:
        json.dump({"config": cfg, "command": "python experiments/memory_vs_dense.py " + " ".join(argv),
                   "summary": summary, "results": results}, f, indent=1)
    print(f"wrote {cfg['out']}")


if __name__ == "__main__":
    main(sys.argv[1:])
