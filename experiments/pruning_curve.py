"""
Val loss against sparsity for magnitude and structured pruning, before and after retraining.

    python train.py config/cpu_quick.py                                    # the dense model (CPU, ~20 s idle)
    python experiments/pruning_curve.py --ckpt=out/cpu_quick/ckpt.pt --train_config=config/cpu_quick.py \\
        --retrain_iters=100 --out=out/pruning_curve                         # -> pruning_curve.json, .png

Each point prunes the dense checkpoint with compress.py's functions (magnitude: each matrix's smallest
weights; structured: whole heads and MLP neurons, removed), then retrains it through train.py (resume
with the masks fixed) for the same budget of retrain_iters steps at the run's own schedule. Sparsity 0
retrains the dense model for the same budget: the control, so "within x nats of dense" compares equal
training. The question: how much of the loss that pruning costs does a short retraining win back?
"""
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import load_checkpoint, write_json_atomic  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from scripts import run_script  # noqa: E402
from training import last_evaluation  # noqa: E402

DEFAULTS = dict(
    ckpt="out/cpu_quick/ckpt.pt",
    train_config="config/cpu_quick.py",   # the dense run's config (retraining uses its optimizer and schedule)
    methods=["magnitude", "structured"],
    sparsities=[0.0, 0.25, 0.5, 0.75],
    retrain_iters=100,
    warmup_iters=10,
    out="out/pruning_curve",
)


def run_point(cfg, method, sparsity):
    """(val loss right after pruning, after retraining) for one method and sparsity."""
    out_dir = os.path.join(cfg["out"], f"{method}_{sparsity:g}")
    if not os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        run_script("compress.py", dict(mode="prune", ckpt=cfg["ckpt"], method=method, sparsity=sparsity,
                                       out_dir=out_dir, device="cpu", measure=False))
    pruned = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    before_path = os.path.join(out_dir, "pruned_val.json")
    if pruned["step"] == 0:  # not retrained yet: its val_loss is the pruned model's
        write_json_atomic(before_path, {"val_loss": pruned["val_loss"]})
    before = json.load(open(before_path))["val_loss"]
    if pruned["step"] >= cfg["retrain_iters"]:  # retrained by an earlier run of this script
        return before, pruned["val_loss"]
    run_script("train.py", dict(out_dir=out_dir, init_from="resume", max_iters=cfg["retrain_iters"],
                                warmup_iters=cfg["warmup_iters"], eval_interval=cfg["retrain_iters"]),
               args=[cfg["train_config"]])
    after = last_evaluation(out_dir)["val"]
    return before, after


def plot(results, path):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, color in zip(results["methods"], ("C0", "C1")):
        points = results["points"][method]
        xs = [p["sparsity"] for p in points]
        ax.plot(xs, [p["pruned"] for p in points], "--o", color=color, label=f"{method}, pruned")
        ax.plot(xs, [p["retrained"] for p in points], "-o", color=color, label=f"{method}, retrained")
    ax.axhline(results["dense_retrained"], color="gray", lw=0.8, label="dense, same retraining")
    ax.set_xlabel("sparsity (fraction of the blocks' weights, heads and neurons removed)")
    ax.set_ylabel("val loss (nats)")
    ax.set_title(f"pruning then {results['retrain_iters']} retraining steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    results = {"config": cfg, "methods": cfg["methods"], "retrain_iters": cfg["retrain_iters"],
               "points": {m: [] for m in cfg["methods"]}}
    dense = run_point(cfg, "magnitude", 0.0)  # sparsity 0 is the same dense run for every method
    for method in cfg["methods"]:
        for sparsity in cfg["sparsities"]:
            pruned, retrained = dense if sparsity == 0 else run_point(cfg, method, sparsity)
            results["points"][method].append({"sparsity": sparsity, "pruned": pruned, "retrained": retrained})
            write_json_atomic(os.path.join(cfg["out"], "pruning_curve.json"), results)
    results["dense_retrained"] = dense[1]
    write_json_atomic(os.path.join(cfg["out"], "pruning_curve.json"), results)
    plot(results, os.path.join(cfg["out"], "pruning_curve.png"))
    for method in cfg["methods"]:
        for p in results["points"][method]:
            print(f"{method:10s} {p['sparsity']:.2f}: pruned {p['pruned']:.4f}, retrained {p['retrained']:.4f} "
                  f"({p['retrained'] - results['dense_retrained']:+.4f} against dense)")


if __name__ == "__main__":
    main(sys.argv[1:])
