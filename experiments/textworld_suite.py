"""
Issue 11's four TextWorld experiments in one command: one JSON and one PNG.

    python experiments/textworld_suite.py --out=out/textworld_suite                      # CPU, small
    python experiments/textworld_suite.py config/textworld_suite_gpu.py --out=out/tw     # one GPU + 16 cores, ~8 min

1. Easy games: imitate the walkthroughs of N training games; held-out success with act=choose and act=generate.
2. Harder games: the imitation policy, then online learning (expert iteration with teacher help, and
   REINFORCE) from it: held-out success over episodes.
3. Does language pretraining help acting? Behaviour cloning of N walkthroughs from a random model and
   from one pretrained (train.py) on the observations of training games, with every action line removed.
4. Continual learning: from the easy imitation policy, online learning on easy games, then the games
   shift to the harder ones, with and without replay (a replay buffer holding only the newest items);
   against the same policy trained on the harder games alone for as many episodes. Old (easy) held-out
   games are played again at the end: forgetting.

Every run is a world.py run (or a cloning run) in a worker process of its own, several at once (the game
engine is CPU-bound; a GPU serves all workers); runs wait only for the run they start from. Games are
generated first, in parallel. A finished run is read back, not redone, and the JSON and PNG are rewritten
after every run, so a suite killed midway keeps what it finished. Logs: <out>/<run>.log.
"""
import concurrent.futures as futures
import multiprocessing
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import textworld_env  # noqa: E402
from checkpoint import load_checkpoint, read_json, write_json_atomic  # noqa: E402
from configurator import configure, print_config  # noqa: E402
from metrics import save_figure  # noqa: E402
from policy import IMITATION_TRAIN, Cloning, clone_actions, evaluate, load_policy  # noqa: E402
from runtime import StopRequest, read_jsonl  # noqa: E402
from scripts import run_script  # noqa: E402
from tasks import ACTION_PREFIX, EVAL_SEED_BASE, teacher_episodes, write_transcripts  # noqa: E402

DEFAULTS = dict(
    out="out/textworld_suite",
    device="cpu",              # the policies' device; games are made and played on the CPU cores
    workers=0,                 # runs at once (0: one per CPU core, at most 12)
    budget_s=0,                # stop every run after this many seconds (0: no limit) and report what is done
    experiments=[1, 2, 3, 4],  # which of the four to run (e.g. [2, 4]: only the runs those need, and their games)
    choose_untried=False,      # act=choose never repeats a command in the same game state (world.py's option)
    choice_loss=False,         # 2, 4: online updates train the ranking act=choose uses (world.py's option)
    temperature_start=1.0,     # 2, 4: online sampling temperature, from start to end over a run (world.py's options)
    temperature_end=0.5,
    seed=1337,
    easy={"challenge": "custom", "world_size": 3, "nb_objects": 4, "quest_length": 2, "max_steps": 8},
    hard={"challenge": "custom", "world_size": 6, "nb_objects": 6, "quest_length": 4, "max_steps": 10},
    easy_games=[20, 60],       # 1: training games imitated (N)
    held_out=30,               # 1, 3: unseen easy games played
    generate_held_out=0,       # 1: of those, how many act=generate plays (0: all); it writes each command a character
                               # at a time, 4-20x slower than choose (200 games ran past 390 s on the GPU)
    hard_games=40,             # 2: harder training games imitated, and the pool online learning plays
    online_episodes=96,        # 2: online episodes; 4: episodes before the shift, and again after it
    learners=["expert_iteration", "reinforce"],  # 2: the online learners run from the imitation policy (or one)
    walkthroughs=[0, 10, 30],  # 3: walkthroughs cloned (N games; 0: the start as it is)
    pretrain_games=60,         # 3: training games whose observations the pretrained model reads
    pretrain_iters=100,        # 3: train.py steps of pretraining
    start_games=60,            # 4: experiment 1's policy at this N starts the continual runs
    replay_recent_window=16,   # 2, 4: the newest replay items, half of every replay batch (the rest: all history)
    no_replay_size=16,         # 4: without replay the buffer keeps only the newest items
    eval_episodes=20,          # 2, 4: held-out games per evaluation
    eval_interval=32,          # 2, 4: episodes between evaluations
    imitation_per_game=2,      # walkthrough episodes per training game
    imitation_iters=60,        # train.py steps on whole transcripts, then ...
    clone_iters=60,            # ... behaviour-cloning steps on their actions (3: cloning only)
    imitation_batch_size=8,
    imitation_lr=2e-3,         # imitation's and cloning's learning rate (world.py's default)
    n_layer=2,
    n_head=4,
    n_embd=64,
    block_size=1024,
)
MAX_WORKERS = 12
LEARNERS = {"expert_iteration": dict(mode="expert_iteration", teacher_help=True),  # 2: name -> world.py options
            "reinforce": dict(mode="reinforce")}


def tw(options, games):
    """A textworld task entry: the distribution's options and its training pool size."""
    return {"textworld": {**options, "games": games}}


WORLD_KEYS = ("device", "seed", "eval_episodes", "eval_interval", "imitation_iters", "clone_iters", "imitation_batch_size",
              "imitation_lr", "n_layer", "n_head", "n_embd", "block_size", "replay_recent_window", "choose_untried",
              "choice_loss", "temperature_start", "temperature_end")  # the suite's keys that are world.py's too


def world_config(cfg, out_dir, **overrides):
    """A world.py run's command-line overrides: the suite's shape and imitation settings, act=choose."""
    return {k: cfg[k] for k in WORLD_KEYS} | {"out_dir": out_dir, "act": "choose", "overwrite": True} | overrides


def evals(out_dir):
    """[(episode, {task: success})] of a world run's held-out evaluations."""
    path = os.path.join(out_dir, "metrics.jsonl")
    rows = read_jsonl(path) if os.path.exists(path) else []
    return [(r["episode"], {t: v["success"] for t, v in r["eval"].items()}) for r in rows if "eval" in r]


def cloned(out_dir):
    return os.path.join(out_dir, "imitation", "cloned.pt")


# ----------------------------------------------------------------------------- the runs

def world_run(cfg, wcfg, old=None):
    """A world.py run, python world.py --key=value ... with the overrides wcfg (its curve stays in its
    metrics.jsonl). old: a task it left behind, played again at the end."""
    run_script("world.py", wcfg, env={"OMP_NUM_THREADS": str(torch_threads())})
    result = {}
    if old:
        policy = load_policy(wcfg["out_dir"], cfg["device"])
        result["old_at_end"] = evaluate(policy, old, cfg["eval_episodes"], "choose",
                                        cfg["choose_untried"])["textworld"]["success"]
    return result


def torch_threads():
    """The threads this worker process was given (run_job): its children get as many."""
    import torch
    return torch.get_num_threads()


def imitation_train(cfg, out_dir, data_dir, dataset, iters):
    """train.py's overrides for a model alike world.py's imitation policies (the suite's shape)."""
    return IMITATION_TRAIN | {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "device", "seed")} | {
        "out_dir": out_dir, "data_dir": data_dir, "dataset": dataset, "max_iters": iters,
        "batch_size": cfg["imitation_batch_size"], "learning_rate": cfg["imitation_lr"],
        "min_lr": cfg["imitation_lr"] / 10, "eval_interval": max(1, iters // 4), "overwrite": True}


def observation_corpus(cfg, folder):
    """Transcripts of training games' walkthroughs with every action line removed: game text, no acting."""
    episodes = teacher_episodes(tw(cfg["easy"], cfg["pretrain_games"]), cfg["pretrain_games"], 0.0, cfg["seed"] + 1)
    for e in episodes:
        e["transcript"] = "".join(line for line in e["transcript"].splitlines(True) if not line.startswith(ACTION_PREFIX))
    path = os.path.join(folder, "observations.jsonl")
    write_transcripts(path, episodes)
    return path


def pretrain(cfg, folder):
    """Experiment 3's two starting points, alike but for training: train.py on the observation corpus for
    pretrain_iters steps, and for 0 steps (its random initialisation, same vocabulary)."""
    corpus = observation_corpus(cfg, folder)
    threads = {"OMP_NUM_THREADS": str(torch_threads())}
    run_script("prepare.py", {"dataset": corpus, "name": "observations", "tokenizer": "char", "data_dir": folder,
                              "force": True}, env=threads)
    starts = {}
    for name, iters in (("scratch", 0), ("pretrained", cfg["pretrain_iters"])):
        run = imitation_train(cfg, os.path.join(folder, name), folder, "observations", iters)
        run_script("train.py", run, env=threads)
        checkpoint = os.path.join(run["out_dir"], "ckpt.pt")
        starts[name] = {"checkpoint": checkpoint, "val_loss": load_checkpoint(checkpoint)["val_loss"]}
    return starts


def clone_and_play(cfg, start, games, folder):
    """Behaviour cloning of `games` training games' walkthroughs from the checkpoint `start`, then held-out
    play; games=0 plays the start itself (what the pretraining alone knows)."""
    task, path = tw(cfg["easy"], max(1, games)), start
    if games:
        episodes = teacher_episodes(task, cfg["imitation_per_game"] * games, 0.0, cfg["seed"])
        clone = Cloning(iters=cfg["clone_iters"], batch_size=cfg["imitation_batch_size"], learning_rate=cfg["imitation_lr"],
                        seed=cfg["seed"], device=cfg["device"], path=os.path.join(folder, "imitation", "cloned.pt"))
        with StopRequest(print) as stop:
            path = clone_actions(start, episodes, clone, stop)
    policy = load_policy(path, cfg["device"])
    played = evaluate(policy, task, cfg["held_out"], "choose", cfg["choose_untried"])
    return {"success": played["textworld"]["success"]}


def easy_pools(cfg):
    """The easy training pools whose imitation runs: experiment 1's N, and experiment 4's start."""
    return set(cfg["easy_games"] if 1 in cfg["experiments"] else []) | \
        ({cfg["start_games"]} if 4 in cfg["experiments"] else set())


def jobs(cfg):
    """name -> (function, its arguments after cfg, the runs it waits for). Arguments naming a run's
    checkpoint are filled in when that run is done (its path is known from its name)."""
    out, easy, hard, episodes = cfg["out"], cfg["easy"], cfg["hard"], cfg["online_episodes"]
    folder = lambda name: os.path.join(out, name)  # noqa: E731
    plan = {}
    if 1 in cfg["experiments"] or 4 in cfg["experiments"]:
        for n in sorted(easy_pools(cfg)):
            experiment1 = 1 in cfg["experiments"] and n in cfg["easy_games"]
            imitation = dict(tasks=tw(easy, n), mode="evaluate", imitation_episodes=cfg["imitation_per_game"] * n,
                             eval_episodes=cfg["held_out"] if experiment1 else cfg["eval_episodes"])
            plan[f"easy{n}_choose"] = (world_run, [world_config(cfg, folder(f"easy{n}_choose"), **imitation)], [])
            if experiment1:
                # choice_loss trains act=choose's ranking, so world.py refuses it with act=generate (and this
                # run only plays: mode=evaluate)
                generate = imitation | dict(eval_episodes=cfg["generate_held_out"] or imitation["eval_episodes"])
                plan[f"easy{n}_generate"] = (world_run, [world_config(
                    cfg, folder(f"easy{n}_generate"), **generate, act="generate", choice_loss=False,
                    init_from=cloned(folder(f"easy{n}_choose")))], [f"easy{n}_choose"])
    if 2 in cfg["experiments"]:
        imitation = dict(tasks=tw(hard, cfg["hard_games"]), imitation_episodes=cfg["imitation_per_game"] * cfg["hard_games"])
        plan["hard_imitation"] = (world_run, [world_config(cfg, folder("hard_imitation"), **imitation, mode="evaluate")], [])
        for learner in cfg["learners"]:
            name = f"hard_{learner}"
            plan[name] = (world_run, [world_config(cfg, folder(name), **imitation, **LEARNERS[learner], episodes=episodes,
                                                   init_from=cloned(folder("hard_imitation")))], ["hard_imitation"])
    if 3 in cfg["experiments"]:
        plan["pretrain"] = (pretrain, [folder("pretrain")], [])
        for n in cfg["walkthroughs"]:
            for start in ("scratch", "pretrained"):
                plan[f"walk{n}_{start}"] = (clone_and_play, [os.path.join(folder("pretrain"), start, "ckpt.pt"), n,
                                                             folder(f"walk{n}_{start}")], ["pretrain"])
    if 4 in cfg["experiments"]:
        start = dict(init_from=cloned(folder(f"easy{cfg['start_games']}_choose")), mode="expert_iteration",
                     teacher_help=True)
        shift = dict(tasks=tw(easy, cfg["start_games"]), changes=[(episodes, "textworld", tw(hard, cfg["hard_games"])["textworld"])],
                     episodes=2 * episodes)
        old = tw(easy, cfg["start_games"])
        plan["shift_replay"] = (world_run, [world_config(cfg, folder("shift_replay"), **start, **shift), old],
                                [f"easy{cfg['start_games']}_choose"])
        plan["shift_no_replay"] = (world_run, [world_config(cfg, folder("shift_no_replay"), **start, **shift,
                                                            replay_size=cfg["no_replay_size"],
                                                            replay_recent_window=cfg["no_replay_size"]), old],
                                   [f"easy{cfg['start_games']}_choose"])
        plan["hard_only"] = (world_run, [world_config(cfg, folder("hard_only"), **start, tasks=tw(hard, cfg["hard_games"]),
                                                      episodes=episodes)], [f"easy{cfg['start_games']}_choose"])
    return plan


def run_job(name, function, args, cfg, threads):
    """One run in a worker process, its output into <out>/<name>.log; its result is kept in <out>/<name>.json,
    so a second suite reads it back. A run that fails returns {"error": ...}."""
    import torch
    torch.set_num_threads(threads)
    done = os.path.join(cfg["out"], f"{name}.json")
    if os.path.exists(done):
        return read_json(done, f"delete it to run {name} again")
    with open(os.path.join(cfg["out"], f"{name}.log"), "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        start = time.perf_counter()
        try:
            result = function(cfg, *args)
        except (SystemExit, Exception) as e:  # recorded; the other runs go on (the traceback is in the log)
            traceback.print_exc(file=log)
            return {"error": f"{type(e).__name__}: {e}"}
        finally:  # what print() holds goes to this run's log, not the next one's
            sys.stdout.flush()
            sys.stderr.flush()
        result["seconds"] = time.perf_counter() - start
    write_json_atomic(done, result)
    return result


def run_all(cfg, plan, report, deadline):
    """Runs in worker processes, each as soon as the runs it waits for are done; report(results, started) after each.
    At the deadline (time.monotonic(), or None) the runs still going are stopped: their curves so far stay on disk."""
    # the cores this process may use (taskset on Linux), not the machine's; macOS has no affinity call
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = cfg["workers"] or min(MAX_WORKERS, cores)
    threads = max(1, cores // workers)
    results, running, started = {}, {}, set()
    # spawn, not fork: a forked CUDA context does not work in the child
    pool = futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        while len(results) < len(plan):
            for name, (function, args, waits) in plan.items():
                if name not in results and name not in running.values() and all(w in results for w in waits):
                    failed = [w for w in waits if "error" in results[w]]
                    if failed:
                        results[name] = {"error": f"not run: {', '.join(failed)} failed"}
                        continue
                    running[pool.submit(run_job, name, function, args, cfg, threads)] = name
                    started.add(name)
            if not running:
                continue
            left = None if deadline is None else deadline - time.monotonic()
            finished, _ = futures.wait(running, timeout=left and max(0, left), return_when=futures.FIRST_COMPLETED)
            if not finished:
                print(f"out of time (budget_s={cfg['budget_s']}): stopping {', '.join(sorted(running.values()))}")
                break
            for future in finished:
                name = running.pop(future)
                results[name] = future.result()
                print(f"{name}: {results[name].get('error') or 'done'} ({results[name].get('seconds', 0):.0f} s)", flush=True)
            report(results, started)
    finally:
        if running:  # out of time or interrupted: the workers are ours, stopped by their ids
            for process in multiprocessing.active_children():
                process.kill()  # at once: a run's metrics.jsonl keeps its finished evaluations
        pool.shutdown(wait=not running, cancel_futures=True)
    return results, started


def make_games(cfg):
    """Every game the suite plays, generated now on all cores (cached in data/textworld/)."""
    held_out = lambda n: [EVAL_SEED_BASE + i for i in range(n)]  # noqa: E731
    chosen = cfg["experiments"]
    easy = max([*easy_pools(cfg), *([cfg["pretrain_games"], *cfg["walkthroughs"]] if 3 in chosen else [0])])
    easy_held_out = max(cfg["held_out"] if 1 in chosen or 3 in chosen else 0,
                        cfg["eval_episodes"] if 4 in chosen else 0)
    options = lambda o: {k: v for k, v in o.items() if k not in ("challenge", "max_steps")}  # noqa: E731
    if easy or easy_held_out:
        textworld_env.generate_games(cfg["easy"]["challenge"], options(cfg["easy"]),
                                     [*range(easy), *held_out(easy_held_out)])
    if 2 in cfg["experiments"] or 4 in cfg["experiments"]:
        textworld_env.generate_games(cfg["hard"]["challenge"], options(cfg["hard"]),
                                     [*range(cfg["hard_games"]), *held_out(cfg["eval_episodes"])])


# ----------------------------------------------------------------------------- the report

def summary(cfg, results, started):
    """The numbers each experiment's question needs. Curves are read from the folders of the runs this suite
    started, so a run stopped midway counts with what it finished (its name is not in "finished")."""
    curve = lambda name: evals(os.path.join(cfg["out"], name)) if name in started else []  # noqa: E731
    final = lambda name: curve(name)[-1][1]["textworld"] if curve(name) else None  # noqa: E731
    out = {"finished": sorted(name for name, r in results.items() if "error" not in r)}
    if 1 in cfg["experiments"]:
        out["1_easy"] = [{"games": n, "choose": final(f"easy{n}_choose"), "generate": final(f"easy{n}_generate")}
                         for n in cfg["easy_games"]]
    if 2 in cfg["experiments"]:
        out["2_hard"] = {"episodes": cfg["online_episodes"], "imitation": final("hard_imitation"),
                         **{name: [[e, s["textworld"]] for e, s in curve(f"hard_{name}")]
                            for name in ("expert_iteration", "reinforce")}}
    if 3 in cfg["experiments"]:
        out["3_pretraining"] = [{"walkthrough_games": n, **{s: results.get(f"walk{n}_{s}", {}).get("success")
                                                             for s in ("scratch", "pretrained")}}
                                for n in cfg["walkthroughs"]]
    if 4 in cfg["experiments"]:
        shift, rows = cfg["online_episodes"], {}
        for name in ("shift_replay", "shift_no_replay"):
            points = curve(name)
            before = [s["textworld"] for e, s in points if e < shift]
            rows[name] = {"old_before_shift": before[-1] if before else None,
                          "old_at_end": results.get(name, {}).get("old_at_end"),
                          "new": [[e, s["textworld"]] for e, s in points if e >= shift]}
        rows["hard_only"] = {"new": [[e + shift, s["textworld"]] for e, s in curve("hard_only")]}
        out["4_shift"] = rows
    return out


def plot_easy(ax, cfg, s, results, started):
    for act in ("choose", "generate"):
        rows = [r for r in s["1_easy"] if r[act] is not None]
        ax.plot([r["games"] for r in rows], [r[act] for r in rows], marker="o", label=f"act={act}")
    ax.set(xscale="log", xlabel="easy training games imitated (N)", title="1. easy games: imitation")


def plot_hard(ax, cfg, s, results, started):
    for name in ("expert_iteration", "reinforce"):
        points = s["2_hard"][name]
        ax.plot([e for e, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set(xlabel="online episodes", title="2. harder games: online learning from imitation")


def plot_pretraining(ax, cfg, s, results, started):
    for start in ("scratch", "pretrained"):
        rows = [r for r in s["3_pretraining"] if r[start] is not None]
        ax.plot([r["walkthrough_games"] for r in rows], [r[start] for r in rows], marker="o", label=f"cloned from {start}")
    ax.set_xscale("symlog", linthresh=10)  # N = 0 (no cloning) shows too
    ax.set(xlabel="walkthrough games cloned (N)", title="3. does pretraining on observations help?")


def plot_shift(ax, cfg, s, results, started):
    for i, name in enumerate(("shift_replay", "shift_no_replay", "hard_only")):
        points = evals(os.path.join(cfg["out"], name)) if name in started else []
        offset = cfg["online_episodes"] if name == "hard_only" else 0  # drawn from the shift on
        ax.plot([e + offset for e, _ in points], [v["textworld"] for _, v in points], marker="o", color=f"C{i}",
                label=name.replace("_", " "))
        old = results.get(name, {}).get("old_at_end")
        if old is not None:
            ax.plot([2 * cfg["online_episodes"]], [old], marker="x", ms=10, color=f"C{i}", ls="none")
    ax.axvline(cfg["online_episodes"], color="gray", ls="--", lw=1)
    ax.set(xlabel="online episodes (x: old easy games at the end)", title="4. easy -> harder games at the dashed line")


PANELS = {1: plot_easy, 2: plot_hard, 3: plot_pretraining, 4: plot_shift}


def plot(cfg, results, started, path):
    """One panel per experiment run: held-out success."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [n for n in sorted(PANELS) if n in cfg["experiments"]]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), squeeze=False)
    s = summary(cfg, results, started)
    for n, ax in zip(shown, axes[0]):
        PANELS[n](ax, cfg, s, results, started)
        ax.set(ylabel="held-out success", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    unknown = sorted(set(cfg["learners"]) - set(LEARNERS))  # before any game is made
    if unknown:
        raise SystemExit(f"learners: unknown {unknown}; choose from {list(LEARNERS)}")
    os.makedirs(cfg["out"], exist_ok=True)
    start = time.perf_counter()
    make_games(cfg)
    print(f"games ready in {time.perf_counter() - start:.0f} s", flush=True)

    def report(results, started):
        write_json_atomic(os.path.join(cfg["out"], "textworld_suite.json"),
                          {"config": cfg, "summary": summary(cfg, results, started), "runs": results,
                           "seconds": time.perf_counter() - start})
        plot(cfg, results, started, os.path.join(cfg["out"], "textworld_suite.png"))

    deadline = time.monotonic() + cfg["budget_s"] - (time.perf_counter() - start) if cfg["budget_s"] else None
    results, started = run_all(cfg, jobs(cfg), report, deadline)
    report(results, started)
    print(f"suite done in {time.perf_counter() - start:.0f} s")
    for key, value in summary(cfg, results, started).items():
        print(key, value)


if __name__ == "__main__":
    main(sys.argv[1:])
