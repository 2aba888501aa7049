"""
Reinforcement learning through a learned reward model (issue 33, item 2): does a differentiable reward
beat the score-function gradient at equal episodes?

    OMP_NUM_THREADS=1 nice -n 10 python experiments/rl_reward_model.py config/rl_reward_model_arith.py
    OMP_NUM_THREADS=1 nice -n 10 python experiments/rl_reward_model.py config/rl_reward_model_rooms.py
    OMP_NUM_THREADS=1 nice -n 10 python experiments/rl_reward_model.py config/rl_reward_model_textworld.py
    python experiments/rl_reward_model.py --replot=experiments/results/rl_reward_model_arith.json

One command makes everything: an imitation policy (world.py's imitation, kept short so there is room to
learn), then world.py from that same policy with each learner for the same number of episodes and the
same run settings, per seed: expert iteration (imitate the successes), REINFORCE (reward minus a running
baseline, plus replayed successes) and reward_model (the gradient through a learned reward model,
reward_model.py). No teacher help for any of them: the reward is the only signal. Writes <name>.json
(held-out success per evaluation, learner and seed, the config and the commit) and <name>.png.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import read_json, write_json_atomic  # noqa: E402
from configurator import ConfigError, configure, print_config  # noqa: E402
from metrics import save_figure  # noqa: E402
from runtime import StopRequest, code_version, read_jsonl  # noqa: E402
from scripts import run_script  # noqa: E402

LEARNERS = ("expert_iteration", "reinforce", "reward_model")
DEFAULTS = dict(
    out="out/rl_reward_model",
    results="experiments/results/rl_reward_model.json",  # the JSON (the PNG beside it)
    task="arith",
    task_options={},
    learners=list(LEARNERS),
    seeds=[1337, 1, 2],
    # world.py's settings for the imitation policy (its seed is the first seed's)
    imitation=dict(n_layer=2, n_head=4, n_embd=64, block_size=192, imitation_episodes=500, imitation_iters=200,
                   clone_iters=500),
    # world.py's settings for every learning run
    run=dict(episodes=320, episodes_per_update=16, updates_per_batch=2, update_batch_size=16, learning_rate=3e-4,
             temperature_start=1.0, temperature_end=0.5, eval_interval=80, eval_episodes=100),
    reward_model={},           # mode=reward_model's options (reward_model.RewardLearning)
    replot="",                 # a results JSON: draw its PNG again, run nothing
)


def imitation_policy(out, task, task_options, imitation, seed, stop):
    """world.py's imitation (mode=evaluate) into <out>/imitation; returns its checkpoint. It trains again on every
    run (overwrite=True moves the earlier one aside first); the same recipe and seed give the same weights."""
    run_script("world.py", {"out_dir": os.path.join(out, "imitation"), "tasks": {task: task_options},
                            "mode": "evaluate", "eval_episodes": 1, "seed": seed, "overwrite": True} | imitation, stop)
    if stop.requested:
        raise SystemExit("stopped during imitation; the same command goes on")
    return read_json(os.path.join(out, "imitation", "imitation", "recipe.json"), "delete it to imitate again")["checkpoint"]


def learning_run(out_dir, start, task, task_options, learner, seed, run, reward_model, stop):
    """One world.py run from `start`; returns its held-out evaluations [(episode, success)]."""
    settings = {"out_dir": out_dir, "tasks": {task: task_options}, "init_from": start, "mode": learner,
                "teacher_help": False, "seed": seed, "overwrite": True} | run
    if learner == "reward_model" and reward_model:
        settings["reward_model"] = reward_model
    run_script("world.py", settings, stop)
    if stop.requested:  # world.py saved its policy and stopped: its curve is unfinished
        raise SystemExit(f"stopped during {out_dir}; the results JSON holds the runs that finished")
    rows = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    return [(r["episode"], r["eval"][task]["success"]) for r in rows if "eval" in r]


def summary(runs):
    """{learner: {start, end, gain: mean and std over seeds}} from {learner: {seed: [(episode, success)]}}."""
    out = {}
    for learner, by_seed in runs.items():
        curves = list(by_seed.values())
        start, end = [c[0][1] for c in curves], [c[-1][1] for c in curves]
        gain = [b - a for a, b in zip(start, end)]
        out[learner] = {name: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                        for name, v in (("start", start), ("end", end), ("gain", gain))} | {"seeds": len(curves)}
    return out


def plot(result, path):
    """Held-out success over training episodes: one line per learner and seed, the mean thick."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (learner, by_seed) in enumerate(result["runs"].items()):
        curves = list(by_seed.values())
        for curve in curves:
            ax.plot([e for e, _ in curve], [100 * s for _, s in curve], color=f"C{i}", alpha=0.3, lw=0.8)
        episodes = [e for e, _ in curves[0]]
        mean = [100 * statistics.mean(c[j][1] for c in curves if j < len(c)) for j in range(len(episodes))]
        ax.plot(episodes, mean, color=f"C{i}", lw=2.2, marker="o", ms=3, label=f"{learner} (mean of {len(curves)})")
    ax.set_xlabel("training episodes (all learners from the same imitation policy)")
    ax.set_ylabel(f"held-out success on {result['config']['task']} (%)")
    ax.set_title(f"{result['config']['task']}: reward model vs REINFORCE vs expert iteration")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    png = os.path.splitext(cfg["results"])[0] + ".png"
    if cfg["replot"]:
        plot(read_json(cfg["replot"], "run the experiment again"), os.path.splitext(cfg["replot"])[0] + ".png")
        return
    unknown = [name for name in cfg["learners"] if name not in LEARNERS]
    if unknown or not cfg["seeds"]:
        raise ConfigError(f"learners are some of {', '.join(LEARNERS)} and seeds at least one; got {cfg['learners']}, "
                          f"{cfg['seeds']}")
    version = code_version(__file__)
    result = {"config": cfg, "code": version, "runs": {}}
    with StopRequest(print) as stop:
        start = imitation_policy(cfg["out"], cfg["task"], cfg["task_options"], cfg["imitation"], cfg["seeds"][0], stop)
        for seed in cfg["seeds"]:
            for learner in cfg["learners"]:
                if stop.requested:
                    break
                out_dir = os.path.join(cfg["out"], f"{learner}_s{seed}")
                curve = learning_run(out_dir, start, cfg["task"], cfg["task_options"], learner, seed, cfg["run"],
                                     cfg["reward_model"], stop)
                result["runs"].setdefault(learner, {})[str(seed)] = curve
                result["summary"] = summary(result["runs"])
                write_json_atomic(cfg["results"], result)  # after every run: a stop keeps what finished
                plot(result, png)
    for learner, s in result.get("summary", {}).items():
        print(f"{learner}: held-out success {100 * s['start']['mean']:.1f}% -> {100 * s['end']['mean']:.1f}% "
              f"(gain {100 * s['gain']['mean']:+.1f} ± {100 * s['gain']['std']:.1f} points, {s['seeds']} seeds)")
    print(f"wrote {cfg['results']} and {png}")


if __name__ == "__main__":
    main(sys.argv[1:])
