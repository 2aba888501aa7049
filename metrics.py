"""
A run's files read back as numbers and pictures: metrics.jsonl rows, the loss curves of one or several runs,
a figure written whole, and what kind of run a folder holds. plot.py (the command), train.py (its loss.png),
bench.py, serve.py (the web page's runs) and the experiments share these; no script imports another script.
"""
import json
import os

from runtime import read_jsonl


def read_metrics(run_dir):
    """The rows of a run's metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"no metrics at {path}: is {run_dir} a µLM run folder?")
    return read_jsonl(path)


def save_figure(fig, path, dpi=100):
    """Write a matplotlib figure to path through a temp file (a crash never leaves a torn PNG), then close it."""
    import matplotlib.pyplot as plt
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def best_val(rows):
    """(best val loss, its step) of a train.py run's rows, or (None, None) before its first evaluation."""
    evals = [r for r in rows if isinstance(r.get("val_loss"), (int, float))]
    if not evals:
        return None, None
    best = min(evals, key=lambda r: r["val_loss"])
    return best["val_loss"], best["step"]


def curve_rows(rows, from_step=1):
    """The rows a loss plot shows: from `from_step` on (the step-0 loss, ~ln(vocab), dwarfs the part that
    matters), unless that would leave nothing."""
    later = [r for r in rows if r.get("step", 0) >= from_step]
    return later or rows


def plot_runs(run_dirs, out_png, x="step", logy=False, ylim=(None, None), from_step=1):
    """Train (thin) and val (thick) loss against step or train_time for each run, into out_png. Rows before
    from_step are left out (0 keeps them all); ylim = (bottom, top), None for automatic; logy: a log y axis."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run_dir in enumerate(run_dirs):
        rows = read_metrics(run_dir)
        color, label = f"C{i}", os.path.basename(os.path.normpath(run_dir))
        shown = curve_rows(rows, from_step)
        train = [r for r in shown if "loss" in r and x in r]
        evals = [r for r in shown if "val_loss" in r and x in r]
        best, _ = best_val(rows)
        ax.plot([r[x] for r in train], [r["loss"] for r in train], color=color, alpha=0.3, lw=0.8)
        ax.plot([r[x] for r in evals], [r["val_loss"] for r in evals], color=color, lw=2, marker="o",
                ms=3, label=f"{label} val (best {best if best is not None else float('nan'):.4f})")
    if logy:
        ax.set_yscale("log")
    ax.set_ylim(*ylim)
    ax.set_xlabel("training seconds" if x == "train_time" else x)
    ax.set_ylabel("loss (thin: train batches, thick: val)")
    ax.grid(alpha=0.3, which="both" if logy else "major")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out_png)


# ----------------------------------------------------------------------------- what a run folder holds

def run_kind(folder):
    """train | world | swarm for a run folder, by the files its script writes; None for any other folder."""
    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    if has("swarm.jsonl"):
        return "swarm"
    if has("policy.pt"):
        return "world"
    if has("metrics.jsonl") or has("ckpt.pt"):
        return "train"
    return None


def read_json_file(path):
    """A JSON file's object, or None when it is missing or unreadable (a run being written, or another tool's)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def first_json_line(path):
    """The first JSON line of a file (swarm.jsonl's config event), or None."""
    try:
        with open(path) as f:
            return json.loads(f.readline())
    except (OSError, ValueError):
        return None


def train_overview(rows):
    """What the web page shows of a train.py run from its metrics rows: best val and its step, the last step and
    its training seconds."""
    best, at = best_val(rows)
    steps = [r for r in rows if "step" in r and "train_time" in r]
    return {"best_val": best, "best_step": at, "step": steps[-1]["step"] if steps else 0,
            "train_time": steps[-1]["train_time"] if steps else 0.0}


def world_overview(rows):
    """A world.py run's held-out success per task: the last evaluation, the best one, and the episodes trained."""
    evals = [r for r in rows if isinstance(r.get("eval"), dict)]
    last = evals[-1]["eval"] if evals else {}
    best = {task: max(r["eval"].get(task, {}).get("success", 0.0) for r in evals) for task in last}
    return {"success": {task: v.get("success") for task, v in last.items()}, "best_success": best,
            "episode": max((r.get("episode", 0) for r in rows), default=0), "evaluations": len(evals)}


def swarm_view(events):
    """A swarm.py run from its swarm.jsonl events: its config, every decided goal (proposals, each aggregator's
    choice, the decision), the goal being decided now, whether it waits for a person or is paused, the person's
    actions and the summary once written."""
    view = {"config": None, "goals": [], "current": None, "waiting": False, "paused": False, "human": [],
            "summary": None}
    for e in events:
        kind = e.get("event")
        if kind == "config":
            view["config"] = e.get("config")
        elif kind == "goal":
            view["current"] = {"goal": e.get("goal"), "proposals": [], "choices": None}
        elif kind == "proposals" and view["current"] is not None:
            view["current"]["proposals"] = [shown_proposal(p) for p in e.get("proposals", [])]
        elif kind == "aggregate" and view["current"] is not None:
            view["current"]["choices"] = e.get("choices")
        elif kind == "awaiting_human":
            view["waiting"] = True
        elif kind == "human":
            view["human"].append({k: e.get(k) for k in ("time", "action", "text", "goal")})
            view["paused"] = e.get("action") == "pause"
        elif kind == "result" and isinstance(e.get("record"), dict):
            record = e["record"]
            view["goals"].append({"goal": record.get("goal"), "decision": record.get("decision"),
                                  "choices": record.get("choices"), "early_stop": record.get("early_stop"),
                                  "proposals": [shown_proposal(p) for p in record.get("proposals", [])]})
            view["current"], view["waiting"], view["paused"] = None, False, False
        elif kind == "summary":
            view["summary"] = {k: v for k, v in e.items() if k not in ("event", "time")}
    return view


def shown_proposal(p):
    """A proposal as the page shows it (its actions, not the notes it read)."""
    return {k: p.get(k) for k in ("worker", "answer", "actions", "success", "reward", "guide_score", "adopted_from")}
