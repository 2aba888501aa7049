"""
A text world where a µLM acts with tools, gets feedback and keeps learning.

    python world.py config/world_arith.py                 # imitate the teacher, then evaluate
    python world.py config/world_rooms_help.py            # imitation, then expert iteration + teacher help
    python world.py config/world_continual_names.py       # the tool is renamed mid-run
    python world.py config/world_rooms_help.py --init_from=resume

The story: the config -> the tasks and their transcripts (tasks.py; any Gymnasium text environment
too, as task gym:<env id>, see gym_envs.py) -> imitation (teacher transcripts, then prepare.py and
train.py run as commands, then behaviour cloning) -> the learning loop (expert iteration or REINFORCE
on the policy's own episodes, with teacher help and a replay buffer: policy.py; or the gradient through a
learned reward model: reward_model.py) -> held-out evaluations,
plots and checkpoints in out_dir: config.json, metrics.jsonl, world.png, episodes.jsonl (every episode's
transcript, training and held-out), policy.pt (the checkpoint layout of checkpoint.py, kind "world",
step = episodes) and the imitation run.
"""
import dataclasses
import os
import shlex
import sys
import time

import torch
from tqdm import tqdm

from checkpoint import load_checkpoint, write_json_atomic
from configurator import ConfigError, check_ranges, configure, print_config
from metrics import save_figure
from reward_model import check_mode, save_learner, start_learner
from policy import (IMITATION_TRAIN, Cloning, Learning, check_policy_fits, clone_actions, episode_item, evaluate, json_roundtrip,
                    learn, load_policy_checkpoint, make_optimizer, policy_file, policy_from_checkpoint, resume_progress,
                    reusable_policy, save_policy, teacher_items)
from runtime import StopRequest, append_jsonl, claim_out_dir, read_jsonl, set_threads, truncate_jsonl
from runtime import progress as progress_bar  # `progress` is the learning's state here
from scripts import run_script
from tasks import EVAL_SEED_BASE, make_env, play_episode, teacher_episodes, write_transcripts

DEFAULTS = dict(
    out_dir="out/world",
    overwrite=False,           # a fresh run into an out_dir that holds one moves the old run aside (else it refuses)
    tasks={"arith": {}},       # task name -> make_env options: the tasks the run starts with (gym:<env id>: a
                               # Gymnasium text environment, its options gymnasium.make's keywords; gym_envs.py)
    changes=[],                # [(episode, task, options)]: the world changes a rule, or adds a task, mid-run
    init_from="imitate",       # imitate (teacher transcripts -> prepare.py -> train.py) | resume | a checkpoint path
    mode="expert_iteration",   # evaluate (no learning after init_from) | expert_iteration | reinforce | reward_model
                               # (the policy's gradient through a learned reward model: reward_model.py)
    reward_model={},           # mode=reward_model's options (reward_model.RewardLearning): its shape, its fitting
    act="generate",            # generate: write each action token by token | choose: score every command the
                               # task lists (textworld) by its log-likelihood, take the best (sample when warm)
    choose_untried=False,      # act=choose never takes a command again in a game state where it took it before
                               # (a greedy policy's loops; textworld; act=generate ignores it)
    teacher_help=False,        # on a failed episode, the teacher's actions are shown and replayed
    choice_loss=False,         # act=choose: online updates are a cross-entropy over the commands the game listed
                               # in each trained state, scored as the actor scores them, not the action's likelihood
                               # (harder TextWorld, 384 episodes of expert iteration: 20 -> 35% held-out, against
                               # 20 -> 5% with the likelihood, which lowers the label's rank while raising its text)
    seed=1337,
    device="cpu",
    threads=0,                 # torch CPU threads (train.py's imitation run gets as many); 0: the cores the load
                               # average leaves idle (runtime.set_threads)
    # imitation: the policy's first weights
    imitation_episodes=1000,   # teacher transcripts per task
    teacher_noise=0.0,         # chance of a random action in a teacher transcript (noisy demonstrations)
    imitation_notes=0.0,       # share of teacher transcripts that show PEERS / HINT lines (swarm.py's messages)
    imitation_iters=1000,      # train.py steps on every token of the transcripts
    clone_iters=500,           # then behaviour-cloning steps on their action tokens only
    imitation_batch_size=16,
    imitation_lr=2e-3,
    n_layer=3,
    n_head=4,
    n_embd=128,
    block_size=384,
    # learning from the policy's own episodes
    episodes=1000,             # training episodes in the whole run, all tasks together
    episodes_per_update=16,
    updates_per_batch=2,       # gradient steps after each batch of episodes
    update_batch_size=16,      # replay items per gradient step
    learning_rate=3e-4,
    grad_clip=1.0,
    temperature_start=1.0,     # sampling temperature, linear from start to end over the run: exploration
    temperature_end=0.5,
    baseline_decay=0.9,        # running-mean reward baseline per task (reinforce)
    replay_size=4000,
    replay_recent_window=256,  # the newest items ...
    replay_recent_fraction=0.5,  # ... make up this share of every replay batch; the rest is drawn from all
    eval_interval=160,         # episodes between held-out evaluations (and checkpoints)
    eval_episodes=100,         # held-out seeds per task, played greedily
)
MODES = ("evaluate", "expert_iteration", "reinforce", "reward_model")
ACTS = ("generate", "choose")


# ----------------------------------------------------------------------------- imitation (prepare.py + train.py)

def imitation_recipe(cfg):
    """Every setting that shapes the imitation policy, stage by stage; imitate runs from this dict and
    reuses an earlier policy only when all of it is the same. prepare and train hold the command-line
    overrides of prepare.py and train.py (their other settings are those scripts' defaults)."""
    out_dir = cfg["out_dir"]
    corpus = os.path.join(out_dir, "teacher", "transcripts.jsonl")
    train = IMITATION_TRAIN | {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "device", "seed")} | {
        "out_dir": os.path.join(out_dir, "imitation"), "data_dir": out_dir, "dataset": "teacher",
        "max_iters": cfg["imitation_iters"], "batch_size": cfg["imitation_batch_size"],
        "learning_rate": cfg["imitation_lr"], "min_lr": cfg["imitation_lr"] / 10,
        "eval_interval": max(1, cfg["imitation_iters"] // 4),
        "overwrite": True}  # reached only when the recipe changed: the old imitation run is moved aside
    clone = Cloning(iters=cfg["clone_iters"], batch_size=cfg["imitation_batch_size"], learning_rate=cfg["imitation_lr"],
                    seed=cfg["seed"], device=cfg["device"], grad_clip=cfg["grad_clip"],
                    path=os.path.join(out_dir, "imitation", "cloned.pt"))
    return json_roundtrip({
        "teacher": {"tasks": cfg["tasks"], "episodes_per_task": cfg["imitation_episodes"],
                    "noise": cfg["teacher_noise"], "notes": cfg["imitation_notes"], "seed": cfg["seed"],
                    "corpus": corpus},
        "prepare": {"dataset": corpus, "name": "teacher", "tokenizer": "char", "data_dir": out_dir, "force": True},
        "train": train,
        "clone": dataclasses.asdict(clone)})


STOPPED_IMITATING = "stopped during imitation: the imitation policy is unfinished; the same command starts it again"


def imitate(cfg, stop, threads=0):
    """A policy from teacher transcripts; returns its checkpoint path.

    Two stages: train.py learns the language of the world from every token of the transcripts (the
    observations too), then behaviour cloning trains on the action tokens alone, which is what makes
    the policy copy an expression into a tool call (measured: train.py alone, 800 steps, never copied).
    prepare.py and train.py run as commands, as a user would type them (scripts.run_script)."""
    recipe = imitation_recipe(cfg)
    recipe_path = os.path.join(cfg["out_dir"], "imitation", "recipe.json")
    path = reusable_policy(recipe_path, recipe)
    if path:
        return path
    teacher = recipe["teacher"]
    episodes = teacher_episodes(teacher["tasks"], teacher["episodes_per_task"], teacher["noise"], teacher["seed"],
                                teacher["notes"])
    write_transcripts(teacher["corpus"], episodes)
    rate = sum(e["success"] for e in episodes) / len(episodes)
    print(f"wrote {len(episodes)} teacher transcripts to {teacher['corpus']} (noise {teacher['noise']}: {rate:.0%} succeed)")
    for script in ("prepare.py", "train.py"):  # with our threads: the recipe leaves the machine's choices out
        run_script(script, recipe[script.removesuffix(".py")], stop, env={"OMP_NUM_THREADS": str(threads)})
        if stop.requested:  # the child saved what it had and stopped
            raise SystemExit(STOPPED_IMITATING)
    path = os.path.join(recipe["train"]["out_dir"], "ckpt.pt")
    if load_checkpoint(path)["step"] < recipe["train"]["max_iters"]:  # train.py was stopped by someone else
        raise SystemExit(STOPPED_IMITATING)
    if recipe["clone"]["iters"]:
        path = clone_actions(path, episodes, Cloning(**recipe["clone"]), stop)
    write_json_atomic(recipe_path, {"recipe": recipe, "checkpoint": path})
    return path


# ----------------------------------------------------------------------------- the learning loop

def temperature_at(episode, start, end, episodes):
    """The sampling temperature at an episode: linear from start to end over the run's episodes."""
    return start + (end - start) * min(1.0, episode / max(1, episodes))


def task_options_at(episode, tasks, changes):
    """The tasks and their options after every change due by this episode."""
    tasks = {name: dict(options) for name, options in tasks.items()}
    for when, name, options in sorted(changes, key=lambda c: c[0]):
        if when <= episode:
            tasks[name] = dict(options)
    return tasks


def play_batch(policy, envs, progress, temperature, count, act, teacher_help):
    """`count` training episodes; successes, and teacher labels of failures, go into the replay buffer.
    act: (how, untried) as Policy.actor takes them. Returns (episodes, teacher labels added)."""
    batch, labels, rng = [], 0, progress.rng
    for _ in range(count):
        env = envs[rng.choice(sorted(envs))]
        actor = policy.actor(temperature, rng.randrange(2 ** 31), env, *act)
        episode = play_episode(env, actor, rng.randrange(EVAL_SEED_BASE))
        batch.append(episode)
        if episode["success"]:
            progress.replay.add(episode_item(episode, progress.episode), rng)
        elif teacher_help:
            for item in teacher_items(episode, progress.episode):
                progress.replay.add(item, rng)
                labels += 1
        progress.episode += 1
    return batch, labels


def plot_world(out_dir, changes=()):
    """Success rate and reward per task over episodes (thick: held-out evals, thin: training) into world.png;
    a run that never trained (mode=evaluate) gets bars of what its evaluation measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    if not any("train" in r for r in rows):
        return plot_evaluation(out_dir, [r for r in rows if "eval" in r])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    tasks = sorted({t for r in rows for t in r.get("eval", r.get("train", {}))})
    for i, task in enumerate(tasks):
        for key, ax in zip(("success", "reward"), axes):
            train_rows = [r for r in rows if task in r.get("train", {})]
            eval_rows = [r for r in rows if task in r.get("eval", {})]
            ax.plot([r["episode"] for r in train_rows], [r["train"][task][key] for r in train_rows],
                    color=f"C{i}", alpha=0.25, lw=0.8)
            ax.plot([r["episode"] for r in eval_rows], [r["eval"][task][key] for r in eval_rows],
                    color=f"C{i}", lw=2, marker="o", ms=3, label=task)
    for ax, label in zip(axes, ("success rate", "reward per episode")):
        for when, name, _ in changes:
            ax.axvline(when, color="gray", ls="--", lw=1)
        ax.set_xlabel("training episodes")
        ax.set_ylabel(f"{label} (thick: held-out, thin: training)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, os.path.join(out_dir, "world.png"), dpi=90)


def plot_evaluation(out_dir, evals):
    """world.png of a run without training: each task's held-out success rate and reward per episode, as bars
    labelled with their values, from the last evaluation."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    last = evals[-1]["eval"] if evals else {}
    tasks = sorted(last)
    for key, ax, label in zip(("success", "reward"), axes, ("held-out success rate", "held-out reward per episode")):
        values = [last[t][key] for t in tasks]
        bars = ax.bar(tasks, values, color=[f"C{i}" for i in range(len(tasks))])
        ax.bar_label(bars, labels=[f"{v:.0%}" if key == "success" else f"{v:.2f}" for v in values])
        ax.set_ylabel(label)
        ax.axhline(0, color="gray", lw=0.8)
        if key == "success":
            ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3, axis="y")
    episode = evals[-1]["episode"] if evals else 0
    fig.suptitle(f"evaluation only, at episode {episode} (no learning in this run)")
    fig.tight_layout()
    save_figure(fig, os.path.join(out_dir, "world.png"), dpi=90)


def recovery(rows, when, task, fraction=0.9):
    """After the change at episode `when` to `task`: the evaluation levels just before it, and the first
    evaluation after it where the changed task and every old task are back to `fraction` of those levels
    (None if that never happened)."""
    evals = [r for r in rows if "eval" in r]
    before = [r for r in evals if r["episode"] < when]
    if not before:
        return None
    levels = {t: v["success"] for t, v in before[-1]["eval"].items()}
    for r in evals:
        if r["episode"] < when:
            continue
        ok = all(r["eval"][t]["success"] >= fraction * level for t, level in levels.items() if t in r["eval"])
        if ok and task in r["eval"] and task in levels:
            return {"before": levels, "recovered_at": r["episode"], "episodes_after_change": r["episode"] - when,
                    "after": {t: v["success"] for t, v in r["eval"].items()}}
    return {"before": levels, "recovered_at": None}


MAX_TRANSCRIPT_CHARS = 8000  # a transcript kept in episodes.jsonl (a long TextWorld game's end is cut)


def keep_episode(out_dir, episode, at, split):
    """One episode's transcript and outcome into episodes.jsonl (the web page's world view reads it); `at` is
    the metrics row's episode count it belongs to, so a resumed run truncates both alike."""
    append_jsonl(os.path.join(out_dir, "episodes.jsonl"),
                 {"episode": at, "split": split, "task": episode["task"], "seed": episode["seed"],
                  "success": bool(episode["success"]), "reward": episode["reward"],
                  "transcript": episode["transcript"][:MAX_TRANSCRIPT_CHARS]})


def evaluate_and_save(policy, optimizer, cfg, progress, learner=None):
    """A held-out evaluation into metrics.jsonl, then policy.pt (and the reward model's learner, if any) and
    world.png; returns the evaluation."""
    tasks = task_options_at(progress.episode, cfg["tasks"], cfg["changes"])
    bar = progress_bar(cfg["eval_episodes"] * len(tasks), f"held-out at episode {progress.episode}", "episode")

    def seen(episode):
        keep_episode(cfg["out_dir"], episode, progress.episode, "eval")
        bar.update()
    result = evaluate(policy, tasks, cfg["eval_episodes"], cfg["act"], cfg["choose_untried"], on_episode=seen)
    bar.close()
    append_jsonl(os.path.join(cfg["out_dir"], "metrics.jsonl"), {"episode": progress.episode, "eval": result})
    tqdm.write(f"episode {progress.episode}: held-out success " +
               ", ".join(f"{t} {r['success']:.0%}" for t, r in result.items()))
    if learner:  # first, so a policy.pt on disk always has its reward model's state beside it
        save_learner(os.path.join(cfg["out_dir"], "reward_model.pt"), learner)
    save_policy(os.path.join(cfg["out_dir"], "policy.pt"), policy, optimizer, cfg, progress)
    plot_world(cfg["out_dir"], cfg["changes"])
    return result


AT_LEAST_ONE = ("episodes_per_update", "updates_per_batch", "update_batch_size", "eval_interval", "eval_episodes",
                "replay_size", "replay_recent_window", "imitation_episodes", "imitation_batch_size")
NOT_NEGATIVE = ("episodes", "imitation_iters", "clone_iters", "learning_rate", "imitation_lr", "grad_clip",
                "temperature_start", "temperature_end")
FRACTIONS = ("teacher_noise", "imitation_notes", "baseline_decay", "replay_recent_fraction")


def check_config(cfg):
    """Stop before anything is read or written when the config cannot work."""
    if cfg["mode"] not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {cfg['mode']!r}")
    check_ranges(cfg, AT_LEAST_ONE, NOT_NEGATIVE, FRACTIONS)
    if cfg["replay_recent_window"] > cfg["replay_size"]:
        raise ConfigError(f"replay_recent_window={cfg['replay_recent_window']} is larger than "
                          f"replay_size={cfg['replay_size']}")
    if cfg["act"] not in ACTS:
        raise ConfigError(f"act must be one of {', '.join(ACTS)}, got {cfg['act']!r}")
    if cfg["choice_loss"] and cfg["act"] != "choose":
        raise ConfigError("choice_loss trains the ranking act=choose uses; set act=choose, or choice_loss=False")
    check_mode(cfg)
    check_task_shapes(cfg["tasks"], cfg["changes"])
    for name, options in run_tasks(cfg):
        try:
            env = make_env(name, **options)
        except ValueError as e:
            raise ConfigError(f"tasks/changes: {e}")
        if cfg["act"] == "choose" and not hasattr(env, "admissible_actions"):
            raise ConfigError(f"act=choose picks among the commands a task lists, and {name} lists none; "
                              f"use act=generate, or a task that lists them (textworld)")
        if not getattr(env, "teaches", True) and (cfg["init_from"] == "imitate" or cfg["teacher_help"]):
            raise ConfigError(f"{name} has no teacher (its info gives no teacher_action), so it cannot be imitated "
                              f"or help: start from a policy with --init_from=<checkpoint>, and teacher_help=False")


def check_task_shapes(tasks, changes):
    """tasks: {name: {option: value}} with at least one task; changes: [(episode, name, {option: value})]."""
    example = "e.g. --tasks=\"{'arith': {}}\" (a task name and its options)"
    if not isinstance(tasks, dict) or not tasks:
        raise ConfigError(f"tasks must name at least one task, {example}; got {tasks!r}")
    for name, options in tasks.items():
        if not isinstance(name, str) or not isinstance(options, dict):
            raise ConfigError(f"tasks maps each task name to a dict of its options, {example}; "
                              f"got {name!r}: {options!r}")
    for change in changes:
        if not (isinstance(change, (list, tuple)) and len(change) == 3 and type(change[0]) is int and change[0] >= 0
                and isinstance(change[1], str) and isinstance(change[2], dict)):
            raise ConfigError(f"each change is (episode, task, options), e.g. (500, 'arith', {{'tool': 'compute'}}) "
                              f"renames the tool at episode 500; got {change!r}")


def run_tasks(cfg):
    """Every (task, options) the run meets: the tasks it starts with, then each change."""
    return list(cfg["tasks"].items()) + [(name, options) for _, name, options in cfg["changes"]]


def load_start(path, cfg):
    """The checkpoint a run starts from (loaded once) and the Policy it holds, checked against the run's tasks."""
    state = load_policy_checkpoint(path)
    if state.get("kind") == "export":  # even mode=evaluate saves policy.pt with an optimizer's state
        quantized = (state.get("quantization") or {}).get("format", "?")
        raise SystemExit(f"{path} is an inference export ({quantized}, compress.py): world.py trains and saves its "
                         f"policy, which an export's weights cannot do; start from the checkpoint it was exported "
                         f"from (its ckpt.pt or policy.pt), or play it in swarm.py")
    policy = policy_from_checkpoint(state, cfg["device"], path)
    check_policy_fits(policy, dict(run_tasks(cfg)), path)
    return state, policy


def prepare_tasks(cfg):
    """A task whose episodes need files (textworld's games) makes them all now, in parallel, before play."""
    for name, options in run_tasks(cfg):
        env = make_env(name, **options)
        if hasattr(env, "prepare"):
            env.prepare(cfg["eval_episodes"])


def run(cfg):
    """A whole run from a resolved config; returns the last held-out evaluation."""
    check_config(cfg)
    out_dir, resuming = cfg["out_dir"], cfg["init_from"] == "resume"
    start = None  # checked before out_dir is touched, unless the policy is yet to be made by imitation
    if resuming:
        path = os.path.join(out_dir, "policy.pt")
        if not os.path.exists(path):
            raise SystemExit(f"nothing to resume: {path} does not exist; start the run without --init_from=resume")
        start = load_start(path, cfg)
    elif cfg["init_from"] != "imitate":
        start = load_start(policy_file(cfg["init_from"]), cfg)
    lock = claim_out_dir(out_dir, resuming, cfg["overwrite"], run_files=("policy.pt", "metrics.jsonl"))
    try:
        with StopRequest(tqdm.write) as stop:
            threads = set_threads(cfg["threads"])
            prepare_tasks(cfg)
            state, policy = start or load_start(imitate(cfg, stop, threads), cfg)
            return learning_loop(cfg, state, policy, stop)
    finally:
        lock.close()


def learning_loop(cfg, state, policy, stop):
    """Evaluate, then learn from batches of episodes until cfg["episodes"] (or a stop request), from the
    start checkpoint `state` and its `policy`; returns the last held-out evaluation."""
    out_dir, resuming = cfg["out_dir"], cfg["init_from"] == "resume"
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    learning = Learning.from_config(cfg)
    torch.manual_seed(cfg["seed"])
    optimizer = make_optimizer(policy, learning.learning_rate)
    learner = start_learner(policy, cfg["reward_model"], cfg["seed"], os.path.join(out_dir, "reward_model.pt"),
                            resuming, cfg["act"] == "choose") if cfg["mode"] == "reward_model" else None
    if resuming:
        progress = resume_progress(state, optimizer, learning, os.path.join(out_dir, "policy.pt"))
        for path in (metrics_path, os.path.join(out_dir, "episodes.jsonl")):
            truncate_jsonl(path, progress.episode, key="episode")
    else:
        progress = learning.new_progress()
    write_json_atomic(os.path.join(out_dir, "config.json"), cfg)
    start, first_episode, evaluated = time.perf_counter(), progress.episode, 0
    tasks_at = lambda episode: task_options_at(episode, cfg["tasks"], cfg["changes"])  # noqa: E731

    total = cfg["episodes"] if cfg["mode"] != "evaluate" else 0
    result = None
    if not resuming or not os.path.exists(metrics_path):
        result = evaluate_and_save(policy, optimizer, cfg, progress, learner)
        evaluated += cfg["eval_episodes"] * len(tasks_at(progress.episode))
    bar = progress_bar(total, "training episodes", "episode", initial=progress.episode, disable=not total)
    while progress.episode < total and not stop.requested:
        envs = {name: make_env(name, **options) for name, options in tasks_at(progress.episode).items()}
        temperature = temperature_at(progress.episode, cfg["temperature_start"], cfg["temperature_end"], total)
        t0 = time.perf_counter()
        batch, labels = play_batch(policy, envs, progress, temperature, cfg["episodes_per_update"],
                                   (cfg["act"], cfg["choose_untried"]), cfg["teacher_help"])
        if learner:
            losses = learner.learn(policy, optimizer, batch, progress.replay, cfg["updates_per_batch"],
                                   cfg["update_batch_size"], cfg["grad_clip"])
        else:
            losses = {"loss": learn(policy, optimizer, batch, progress, learning)}
        loss = losses["loss"]
        for e in batch:
            keep_episode(out_dir, e, progress.episode, "train")
        append_jsonl(metrics_path, {"episode": progress.episode, "train": per_task(batch), **losses,
                                    "temperature": temperature, "teacher_labels": labels,
                                    "replay": len(progress.replay.items), "seconds": time.perf_counter() - t0})
        bar.update(len(batch))
        bar.set_postfix(loss=f"{loss:.3f}", success=f"{sum(e['success'] for e in batch) / len(batch):.0%}")
        episode = progress.episode
        crossed = episode // cfg["eval_interval"] > (episode - len(batch)) // cfg["eval_interval"]
        if crossed or episode >= total or stop.requested:
            result = evaluate_and_save(policy, optimizer, cfg, progress, learner)
            evaluated += cfg["eval_episodes"] * len(tasks_at(progress.episode))
    bar.close()
    played, seconds = progress.episode - first_episode + evaluated, time.perf_counter() - start
    print(f"played {played} episodes ({progress.episode - first_episode} training, {evaluated} held-out) in "
          f"{seconds:.0f} s: {60 * played / max(seconds, 1e-9):.1f} episodes/min with act={cfg['act']}")
    rows = read_jsonl(metrics_path)
    for when, name, options in cfg["changes"]:
        if when <= progress.episode:
            print(f"change at episode {when} ({name} {options}): {recovery(rows, when, name)}")
    print(run_summary(cfg, rows, progress.episode, seconds, stop.requested))
    return result


def run_summary(cfg, rows, episode, seconds, stopped):
    """The lines a run ends with: held-out success (last and best), its time, its files, what to run next."""
    out_dir, quoted = cfg["out_dir"], shlex.quote(cfg["out_dir"])
    evals = [r for r in rows if "eval" in r]
    tasks = sorted(evals[-1]["eval"]) if evals else []
    scores = []
    for task in tasks:
        best = max((r for r in evals if task in r["eval"]), key=lambda r: r["eval"][task]["success"])
        scores.append(f"{task} {evals[-1]['eval'][task]['success']:.0%}" +
                      (f" (best {best['eval'][task]['success']:.0%} at episode {best['episode']})" if len(evals) > 1 else ""))
    what = "evaluated" if cfg["mode"] == "evaluate" else f"{'stopped' if stopped else 'done'} at episode {episode}"
    lines = [f"{what} in {seconds:.0f} s: held-out success {', '.join(scores) or 'not measured'} "
             f"({cfg['eval_episodes']} episodes per task)",
             f"{out_dir}: policy.pt, world.png, metrics.jsonl, episodes.jsonl (transcripts), config.json"]
    if stopped:
        lines.append(f"resume with --init_from=resume --out_dir={quoted} (and the same config and options)")
    lines.append(f"next: python swarm.py --task={tasks[0] if tasks else 'arith'} --checkpoints=\"['{out_dir}/policy.pt']\""
                 f"   or   python serve.py (its page shows this run and its episodes)")
    return "\n".join(lines)


def per_task(episodes):
    """{task: {success, reward}}: the means over a batch's episodes of each task."""
    tasks = sorted({e["task"] for e in episodes})
    mine = {name: [e for e in episodes if e["task"] == name] for name in tasks}
    return {name: {"success": sum(e["success"] for e in mine[name]) / len(mine[name]),
                   "reward": sum(e["reward"] for e in mine[name]) / len(mine[name])} for name in tasks}


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    run(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
