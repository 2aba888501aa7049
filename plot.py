"""
Loss curves of one or several runs, from their metrics.jsonl.

    python plot.py out/shakespeare_char out/other_run --out=compare.png [--x=train_time]

`train.py` calls `plot_runs` at every evaluation to refresh <out_dir>/loss.png.
"""
import os
import sys

from configurator import configure
from runtime import read_jsonl

DEFAULTS = dict(
    out="loss.png",  # the PNG to write
    x="step",        # step | train_time (training seconds, evaluation and compilation left out)
)


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"no metrics at {path}: is {run_dir} a µLM run folder?")
    return read_jsonl(path)  # a torn last line (a run killed mid-write) is skipped


def save_figure(fig, path, dpi=100):
    """Write a matplotlib figure to path through a temp file (a crash never leaves a torn PNG), then close it."""
    import matplotlib.pyplot as plt
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def plot_runs(run_dirs, out_png, x="step"):
    """Train (thin) and val (thick) loss against step or train_time for each run, into out_png."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run_dir in enumerate(run_dirs):
        rows, color, label = read_metrics(run_dir), f"C{i}", os.path.basename(os.path.normpath(run_dir))
        train = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "val_loss" in r]
        ax.plot([r[x] for r in train], [r["loss"] for r in train], color=color, alpha=0.3, lw=0.8)
        ax.plot([r[x] for r in evals], [r["val_loss"] for r in evals], color=color, lw=2, marker="o",
                ms=3, label=f"{label} val (best {min((r['val_loss'] for r in evals), default=float('nan')):.4f})")
    ax.set_xlabel("training seconds" if x == "train_time" else x)
    ax.set_ylabel("loss (thin: train batches, thick: val)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out_png)


def main(argv):
    runs = [a for a in argv if not a.startswith("-")]
    cfg = configure(DEFAULTS, [a for a in argv if a.startswith("-")])
    if not runs:
        raise SystemExit("usage: python plot.py RUN_DIR [RUN_DIR ...] [--out=loss.png] [--x=step|train_time]")
    if cfg["x"] not in ("step", "train_time"):
        raise SystemExit(f"x must be step or train_time, got {cfg['x']!r}")
    plot_runs(runs, cfg["out"], cfg["x"])
    print(f"wrote {cfg['out']}")


if __name__ == "__main__":
    main(sys.argv[1:])
