"""
Loss curves of one or several runs, from their metrics.jsonl.

    python plot.py out/cpu_quick                                   # -> loss.png
    python plot.py out/a out/b --out=compare.png --x=train_time --logy=True --ymax=2.5

Thin lines are the training batches' loss, thick ones the validation loss. The step-0 evaluation (about
ln(vocab), far above the rest) is left out unless --from_step=0. The plotting lives in metrics.py, which
train.py calls at every evaluation to refresh <out_dir>/loss.png.
"""
import sys

from configurator import configure
from metrics import plot_runs

USAGE = "python plot.py RUN_DIR [RUN_DIR ...] [--key=value ...]"
DEFAULTS = dict(
    out="loss.png",  # the PNG to write
    x="step",        # step | train_time (training seconds, evaluation and compilation left out)
    logy=False,      # a log y axis
    ymin=None,       # the y axis' bottom; None: automatic
    ymax=None,       # its top; None: automatic
    from_step=1,     # rows before this step are left out (0 keeps the step-0 loss)
)


def main(argv):
    runs = [a for a in argv if not a.startswith("-")]
    cfg = configure(DEFAULTS, [a for a in argv if a.startswith("-")], usage=USAGE)
    if not runs:
        raise SystemExit(f"usage: {USAGE} (the run folders: out_dir of train.py runs)")
    if cfg["x"] not in ("step", "train_time"):
        raise SystemExit(f"x must be step or train_time, got {cfg['x']!r}")
    for key in ("ymin", "ymax"):
        if cfg[key] is not None and (isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float))):
            raise SystemExit(f"{key} must be a number (or None), got {cfg[key]!r}")
    if cfg["logy"] and any(v is not None and v <= 0 for v in (cfg["ymin"], cfg["ymax"])):
        raise SystemExit("with logy=True, ymin and ymax must be positive")
    plot_runs(runs, cfg["out"], cfg["x"], cfg["logy"], (cfg["ymin"], cfg["ymax"]), cfg["from_step"])
    print(f"wrote {cfg['out']}")


if __name__ == "__main__":
    main(sys.argv[1:])
