"""
Easy TextWorld games: how well does a tiny policy play unseen games after imitating N walkthroughs?

    python experiments/textworld_easy.py --games=[100,300] --out=out/textworld_easy
    python experiments/textworld_easy.py --games=[100,300,1000] --device=cuda   # a GPU machine, ~16 cores for games

For each N: world.py with config/world_textworld_easy.py imitates the walkthroughs of a pool of N
training games, then plays the held-out games with act=choose (score each admissible command, take the
likeliest); the same policy then plays them with act=generate (write the command character by character).
A run already in out/ is read back, not redone. Writes textworld_easy.json and textworld_easy.png.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import read_json, write_json_atomic  # noqa: E402
from configurator import configure, print_config, read_config_file  # noqa: E402
from metrics import save_figure  # noqa: E402
from runtime import read_jsonl  # noqa: E402
from scripts import run_script  # noqa: E402

DEFAULTS = dict(
    out="out/textworld_easy",
    config="config/world_textworld_easy.py",
    games=[100, 300],        # training pool sizes N
    imitation_per_game=2,    # walkthrough episodes per training game
    device="cpu",            # the policy's device (cuda on a GPU machine); games are made on the CPU cores
    world_args=[],           # more world.py settings, e.g. ["--clone_iters=1000"] (not tasks: the config's, with games=N)
)


def final_success(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    rows = [r for r in read_jsonl(path) if "eval" in r] if os.path.exists(path) else []
    return rows[-1]["eval"]["textworld"]["success"] if rows else None


def play(args, overrides, out_dir):
    """One world.py run (python world.py ARGS --key=value ...), or the one already in out_dir; returns its
    held-out success."""
    if final_success(out_dir) is None:
        run_script("world.py", overrides | {"out_dir": out_dir}, args=args)
    return final_success(out_dir)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for act in ("choose", "generate"):
        ax.plot([r["games"] for r in results], [r[act] for r in results], marker="o", label=f"act={act}")
    ax.set_xscale("log")
    ax.set_xlabel("training games imitated (N)")
    ax.set_ylabel("held-out success")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    args, textworld = [cfg["config"], *cfg["world_args"]], read_config_file(cfg["config"])["tasks"]["textworld"]
    results = []
    for n in cfg["games"]:
        run = {"tasks": {"textworld": {**textworld, "games": n}}, "imitation_episodes": cfg["imitation_per_game"] * n,
               "device": cfg["device"]}
        folder = os.path.join(cfg["out"], f"games{n}")
        chosen = play(args, run | {"act": "choose"}, folder + "_choose")
        generated = play(args, run | {"act": "generate", "init_from": os.path.join(folder + "_choose", "imitation",
                                                                                    "cloned.pt")}, folder + "_generate")
        results.append({"games": n, "choose": chosen, "generate": generated})
        print(f"N={n}: held-out success {chosen:.0%} with act=choose, {generated:.0%} with act=generate")
    os.makedirs(cfg["out"], exist_ok=True)
    first = [os.path.join(cfg["out"], f"games{n}_choose", "config.json") for n in cfg["games"][:1]]
    world = read_json(first[0], "run the experiment again") if first else None  # the first run's whole world.py config
    write_json_atomic(os.path.join(cfg["out"], "textworld_easy.json"), {"config": cfg, "world": world, "results": results})
    plot(results, os.path.join(cfg["out"], "textworld_easy.png"))


if __name__ == "__main__":
    main(sys.argv[1:])
