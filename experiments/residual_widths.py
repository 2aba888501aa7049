"""
Does the residual stream want a learned root, and a width that changes with depth (issue 33, item 4; research
notes 002: "smaller dimensions in the beginning as the sentence is parsed, larger in the middle, smaller at the
end")? Uniform against small-large-small widths, each with and without the learned root (widths.py), at about
equal parameters and equal training time.

    python prepare.py
    OMP_NUM_THREADS=1 nice -n 10 python experiments/residual_widths.py config/residual_widths.py   # ~20 min on a busy CPU

Equal training time is counted in CPU seconds of this process (one thread), not wall time: on a CPU shared with
other jobs the wall clock measures the neighbours. Each variant's CPU seconds per step are timed over a few steps
first, then it trains cpu_seconds / that many steps (AdamW, warmup then cosine decay over exactly those steps)
and its val loss is measured on fixed batches. Tokens/s are tokens per CPU second of the same runs. Writes
<out_dir>/residual_widths.json and .png (val loss and tokens/s per variant, one point per seed).
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from architecture import build_model  # noqa: E402
from checkpoint import write_json_atomic  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from data import get_batch, open_dataset  # noqa: E402
from metrics import save_figure  # noqa: E402
from runtime import code_version  # noqa: E402
from training import estimate_loss, fit  # noqa: E402

DEFAULTS = dict(
    out_dir="out/residual_widths",
    dataset="shakespeare_char",
    data_dir="data",
    model={"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64},
    variants={"uniform": {},
              "uniform + root": {"residual_root": True},
              "small-large-small": {"residual_widths": [64, 160, 160, 64]},
              "small-large-small + root": {"residual_widths": [64, 160, 160, 64], "residual_root": True}},
    cpu_seconds=30.0,             # CPU time each variant trains, per seed
    calibration_steps=6,          # steps timed (after two untimed) to find a variant's CPU seconds per step
    batch_size=16,
    learning_rate=3e-3,
    eval_iters=40,
    seeds=[1337],
)


def cpu_seconds_per_step(model_args, next_batch, cfg):
    """A variant's CPU seconds per training step, timed on a throwaway copy after two untimed steps."""
    model, device = build_model(model_args), torch.device("cpu")
    fit(model, next_batch, 2, cfg["learning_rate"], device)
    t0 = time.process_time()
    fit(model, next_batch, cfg["calibration_steps"], cfg["learning_rate"], device)
    return (time.process_time() - t0) / cfg["calibration_steps"]


def train_variant(model_args, meta, cfg, seed):
    """Train one variant for cfg's CPU seconds; its row: parameters, steps, tokens per CPU second, val loss."""
    device = torch.device("cpu")
    block = model_args["block_size"]
    generator = torch.Generator().manual_seed(seed)

    def next_batch(step):
        return get_batch(meta, "train", cfg["batch_size"], block, generator, device)
    per_step = cpu_seconds_per_step(model_args, next_batch, cfg)
    steps = max(1, round(cfg["cpu_seconds"] / per_step))
    torch.manual_seed(seed)
    generator.manual_seed(seed)
    model = build_model(model_args)
    t0 = time.process_time()
    loss, _, tokens = fit(model, next_batch, steps, cfg["learning_rate"], device, warmup=min(50, steps // 10))
    cpu = time.process_time() - t0
    val = estimate_loss(model, meta, cfg["batch_size"], block, cfg["eval_iters"], device, splits=("val",))["val"]
    return {"seed": seed, "params": model.num_params(), "steps": steps, "tokens": tokens, "cpu_seconds": cpu,
            "tokens_per_s": tokens / cpu, "train_loss": loss, "val_loss": val}


def summarise(rows):
    vals = np.array([r["val_loss"] for r in rows])
    return {"val_mean": float(vals.mean()), "val_std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
            "tokens_per_s_mean": float(np.mean([r["tokens_per_s"] for r in rows])), "params": rows[0]["params"]}


def plot(result, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(result["runs"])
    for i, name in enumerate(names):
        rows = result["runs"][name]
        ax_loss.scatter([i] * len(rows), [r["val_loss"] for r in rows], color=f"C{i}")
        ax_loss.errorbar(i, result["summary"][name]["val_mean"], yerr=result["summary"][name]["val_std"], fmt="_",
                         color="k", capsize=6)
        ax_speed.scatter([i] * len(rows), [r["tokens_per_s"] for r in rows], color=f"C{i}")
    for ax, ylabel in ((ax_loss, f"val loss after {result['config']['cpu_seconds']} CPU s (nats/char)"),
                       (ax_speed, "training tokens per CPU second (one thread)")):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([f"{n}\n{result['summary'][n]['params'] / 1e6:.3f}M" for n in names], fontsize=8)
        ax.set_xlabel("variant (parameters)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_loss.set_title("equal CPU time: a point per seed, mean ± std")
    fig.tight_layout()
    save_figure(fig, png)
    return fig


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    meta = open_dataset(cfg["data_dir"], cfg["dataset"], cfg["model"]["block_size"])
    base = cfg["model"] | {"vocab_size": meta["vocab_size"]}
    for name, options in cfg["variants"].items():  # a bad variant fails before an hour of training
        build_model(base | options)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    path = os.path.join(cfg["out_dir"], "residual_widths.json")
    result = {"config": cfg, "code": code_version(__file__), "runs": {name: [] for name in cfg["variants"]}}
    for seed in cfg["seeds"]:  # seeds outermost: a run cut short still has every variant at the first seeds
        for name, options in cfg["variants"].items():
            row = train_variant(base | options, meta, cfg, seed)
            result["runs"][name].append(row)
            print(f"seed {seed} {name}: {row['params']:,} params, {row['steps']} steps, "
                  f"{row['tokens_per_s']:,.0f} tok per CPU s, val {row['val_loss']:.4f}", flush=True)
            result["summary"] = {n: summarise(rows) for n, rows in result["runs"].items() if rows}
            write_json_atomic(path, result)
    plot(result, os.path.join(cfg["out_dir"], "residual_widths.png"))
    for name, s in result["summary"].items():
        print(f"{name}: val {s['val_mean']:.4f} ± {s['val_std']:.4f}, {s['tokens_per_s_mean']:,.0f} tok/s, "
              f"{s['params']:,} params")


if __name__ == "__main__":
    main(sys.argv[1:])
