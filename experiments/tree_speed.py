"""
Is one tree's training step as fast as another's? Runs train.py itself (its command line is the one
interface every tree shares) in each tree in turn, rounds alternating, and compares the tokens/s that
train.py logs: the median ratio of each tree to the first. For a refactor that must leave the default path
exactly as fast (issue 26): the tree before and after, on the same machine in the same run.

    git worktree add /tmp/before bb63247
    python experiments/tree_speed.py --trees="['/tmp/before', '.']" --out=experiments/results/tree_speed_cpu

Writes <out>.json (every round's tokens/s, the commit of each tree, the ratios) and <out>.png.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configurator import configure, print_config  # noqa: E402
from runtime import read_jsonl  # noqa: E402

DEFAULTS = dict(
    trees=[".", "."],          # repository roots, each with its own train.py; ratios are to the first
    config="config/cpu_quick.py",  # the train.py config each tree runs (read from each tree)
    max_iters=60,
    skip_steps=10,             # log rows before this step are warm-up and not counted
    rounds=3,                  # each tree runs once per round, in turn
    threads=1,                 # OMP_NUM_THREADS of every run (a busy 2-core machine: 1 keeps runs comparable)
    device="cpu",
    extra=[],                  # more train.py arguments, e.g. ["--compile=True"]
    out="out/tree_speed",
)


def commit_of(tree):
    """The commit a tree has checked out, with '+dirty' when its tracked files differ from it."""
    head = subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (head or "unknown") + ("+dirty" if dirty else "")


def run_tree(tree, cfg, scratch):
    """tokens/s of one train.py run in tree: the median of its logged windows after skip_steps."""
    out_dir = os.path.join(scratch, "run")
    argv = [sys.executable, "train.py", cfg["config"], f"--out_dir={out_dir}", f"--max_iters={cfg['max_iters']}",
            f"--device={cfg['device']}", "--overwrite=True", f"--eval_interval={cfg['max_iters']}", "--log_interval=5",
            "--eval_iters=1", f"--data_dir={os.path.join(os.path.abspath(tree), 'data')}", *cfg["extra"]]
    env = os.environ | {"OMP_NUM_THREADS": str(cfg["threads"])}
    done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"train.py failed in {tree}:\n{done.stderr[-2000:]}")
    rows = [r for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if "tokens_per_s" in r]
    return statistics.median(r["tokens_per_s"] for r in rows if r["step"] > cfg["skip_steps"])


def plot(result, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for tree, speeds in result["tokens_per_s"].items():
        ax.plot(range(1, len(speeds) + 1), speeds, marker="o", label=f"{tree} ({result['commits'][tree][:10]})")
    ax.set_xlabel("round")
    ax.set_ylabel("training tokens/s (median of logged windows)")
    ax.set_title(f"{result['config']}: ratio to the first tree {result['ratios']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    trees = [os.path.abspath(t) for t in cfg["trees"]]
    speeds = {t: [] for t in trees}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(cfg["rounds"]):
            for tree in trees:
                speeds[tree].append(run_tree(tree, cfg, scratch))
                print(f"round {r + 1}: {tree}: {speeds[tree][-1]:,.0f} tokens/s", flush=True)
    first = statistics.median(speeds[trees[0]])
    result = {"config": cfg["config"], "max_iters": cfg["max_iters"], "threads": cfg["threads"],
              "device": cfg["device"], "commits": {t: commit_of(t) for t in trees}, "tokens_per_s": speeds,
              "ratios": {t: round(statistics.median(speeds[t]) / first, 3) for t in trees}}
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out"])), exist_ok=True)
    with open(cfg["out"] + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result, cfg["out"] + ".png")
    print(json.dumps(result["ratios"]))


if __name__ == "__main__":
    main(sys.argv[1:])
