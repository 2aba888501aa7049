"""
Issue 11's TextWorld numbers over several seeds: reads the JSONs of textworld_suite.py runs (one seed each, any
of the experiments 1, 2, 4) and writes one JSON of means and spreads and one PNG.

    python experiments/textworld_seeds.py --runs="['out/tw_s1/textworld_suite.json', 'out/tw_s2/textworld_suite.json']" \
        --out=experiments/results/textworld_gpu_seeds

A held-out success rate on 60-200 games moves by 3-6 points from one run to the next, and a GPU run of the same
seed is not bit-exact (the same config and seed gave 96.0, 89.5 and 86.0% on experiment 1), so a target is judged
on the mean. Spread is the sample standard deviation (n - 1) over the runs that have the number.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import read_json, write_json_atomic  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from metrics import save_figure  # noqa: E402

DEFAULTS = dict(
    runs=[],                   # textworld_suite.py JSONs, one seed each
    out="out/textworld_seeds",  # <out>.json and <out>.png
)


def spread(values):
    """{"mean", "std", "n", "values"} of the numbers that are there (a run cut by its budget has None)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def last(points):
    return points[-1][1] if points else None


def easy_games(runs):
    """Experiment 1: held-out success at each N, choose and generate."""
    by_n = {}
    for run in runs:
        for row in run["summary"].get("1_easy", []):
            by_n.setdefault(row["games"], []).append(row)
    return {n: {act: spread([r[act] for r in rows]) for act in ("choose", "generate")} for n, rows in sorted(by_n.items())}


def harder_games(runs):
    """Experiment 2, grouped by the episode budget: the imitation policy, and each learner's lift over it at the
    end of its run and at its best evaluation."""
    by_budget = {}
    for run in runs:
        hard = run["summary"].get("2_hard")
        if hard and hard["imitation"] is not None:
            by_budget.setdefault(hard["episodes"], []).append(hard)
    out = {}
    for budget, rows in sorted(by_budget.items()):
        out[budget] = {"imitation": spread([r["imitation"] for r in rows])}
        for learner in ("expert_iteration", "reinforce"):
            ended = [r for r in rows if r[learner] and r[learner][-1][0] == budget]  # ran its whole budget
            out[budget][learner] = {
                "lift_at_end": spread([last(r[learner]) - r["imitation"] for r in ended]),
                "lift_at_best": spread([max(v for _, v in r[learner]) - r["imitation"] for r in rows if r[learner]]),
                "last_episode": [r[learner][-1][0] if r[learner] else 0 for r in rows]}
    return out


def shifting_world(runs):
    """Experiment 4: forgetting of the old games (before the shift -> at the end) with and without replay, and
    new-game success at the end against the policy given only the new games."""
    rows = [run["summary"]["4_shift"] for run in runs if "4_shift" in run["summary"]]

    def drop(side):  # old-game success lost from the shift to the end (None where a run was cut)
        if side["old_at_end"] is None or side["old_before_shift"] is None:
            return None
        return side["old_before_shift"] - side["old_at_end"]
    hard_only = [last(r["hard_only"]["new"]) for r in rows]
    out = {"hard_only_new_at_end": spread(hard_only)}
    for name in ("shift_replay", "shift_no_replay"):
        new = [last(r[name]["new"]) for r in rows]
        out[name] = {"old_drop": spread([drop(r[name]) for r in rows]), "new_at_end": spread(new),
                     "new_over_hard_only": spread([a / b if a is not None and b else None for a, b in zip(new, hard_only)])}
    return out


def plot(runs, numbers, path):
    """One panel per experiment the runs have: 1's success by N, 2's lift over imitation, 4's new games.
    Returns the figure, or None when there was nothing to draw."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [name for name, has in (("1", numbers["1_easy"]), ("2", numbers["2_hard"]),
                                     ("4", any(run["summary"].get("4_shift") for run in runs))) if has]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.5), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    if "1" in axes:
        ax, labelled = axes["1"], set()
        for i, act in enumerate(("choose", "generate")):
            for n, row in numbers["1_easy"].items():
                values = row[act]["values"]
                ax.plot([n] * len(values), values, "o", alpha=0.5, color=f"C{i}",
                        label=f"act={act}: a run" if values and act not in labelled else None)
                labelled |= {act} if values else set()
                if len(values) > 1:  # one run has no spread: its dot is all there is
                    ax.errorbar([n], [row[act]["mean"]], yerr=[row[act]["std"]], fmt="s", ms=9, capsize=6,
                                color=f"C{i}", label=f"act={act}: mean ± std" if f"{act} spread" not in labelled else None)
                    labelled.add(f"{act} spread")
        ax.axhline(0.9, color="gray", ls=":", lw=1)
        ax.set(xscale="log", xlabel="easy training games imitated (N)", ylabel="held-out success",
               title="1. easy games (dots: runs; squares: mean ± std of 2 or more)")
    if "2" in axes:
        ax, labelled, max_budget = axes["2"], set(), max(numbers["2_hard"])
        for run in sorted(runs, key=lambda r: -r["summary"].get("2_hard", {}).get("episodes", 0)):  # labels: full budget
            hard = run["summary"].get("2_hard")
            if not hard or hard["imitation"] is None:
                continue
            for i, learner in enumerate(("expert_iteration", "reinforce")):
                points = hard[learner]
                if not points:  # a run of one learner
                    continue
                label = learner.replace("_", " ") if learner not in labelled else None
                labelled.add(learner)
                ax.plot([e for e, _ in points], [v - hard["imitation"] for _, v in points], marker="o", ms=3,
                        alpha=0.7, color=f"C{i}", ls="-" if hard["episodes"] == max_budget else "--", label=label)
        ax.axhline(0.2, color="gray", ls=":", lw=1)
        ax.set(xlabel="online episodes", ylabel="held-out success minus imitation's",
               title="2. harder games: lift\n(lines: seeds; dashed: shorter budgets)")
    if "4" in axes:
        ax, labelled = axes["4"], set()
        for run in runs:
            shift = run["summary"].get("4_shift")
            if not shift:
                continue
            for i, name in enumerate(("shift_replay", "shift_no_replay", "hard_only")):
                points = shift[name]["new"]
                ax.plot([e for e, _ in points], [v for _, v in points], marker="o", ms=3, alpha=0.7, color=f"C{i}",
                        label=name.replace("_", " ") if name not in labelled else None)
                labelled.add(name)
        text = ", ".join(f"{name.replace('shift_', '')}: {numbers['4_shift'][name]['old_drop']['mean'] * 100:.1f} "
                         f"± {numbers['4_shift'][name]['old_drop']['std'] * 100:.1f}"
                         for name in ("shift_replay", "shift_no_replay") if numbers["4_shift"][name]["old_drop"]["n"])
        ax.set(xlabel="online episodes (the shift at the first point)", ylabel="held-out success",
               title="4. new games after the shift (lines: seeds)")
        if text:
            ax.text(0.02, 0.97, f"old games' drop (points): {text}", transform=ax.transAxes, va="top", fontsize=8)
    for ax in axes.values():
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    if not cfg["runs"]:
        raise SystemExit("--runs is empty: name the textworld_suite.py JSONs to combine")
    runs = [read_json(path, "a textworld_suite.py JSON") | {"path": path} for path in cfg["runs"]]
    numbers = {"runs": [{"path": r["path"], "seed": r["config"]["seed"], "experiments": r["config"]["experiments"]}
                        for r in runs],
               "1_easy": easy_games(runs), "2_hard": harder_games(runs), "4_shift": shifting_world(runs)}
    os.makedirs(os.path.dirname(cfg["out"]) or ".", exist_ok=True)
    write_json_atomic(cfg["out"] + ".json", numbers)
    drawn = plot(runs, numbers, cfg["out"] + ".png") is not None
    for key in ("1_easy", "2_hard", "4_shift"):
        print(key, numbers[key])
    print(f"wrote {cfg['out']}.json" + (f" and {cfg['out']}.png" if drawn else
                                        " (no plot: these runs hold no numbers of experiments 1, 2 or 4)"))


if __name__ == "__main__":
    main(sys.argv[1:])
