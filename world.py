"""
A text world where a µLM acts with tools, gets feedback and keeps learning.

    python world.py config/world_arith.py                 # imitate the teacher, then evaluate
    python world.py config/world_rooms_help.py            # imitation, then expert iteration + teacher help
    python world.py config/world_continual_names.py       # the tool is renamed mid-run
    python world.py config/world_rooms_help.py --init_from=resume

The story: the tasks and their transcripts (tasks.py) -> a policy (a character-level GPT that writes
one action line per turn) -> the learning loop (imitation through prepare.py and train.py, then
expert iteration or REINFORCE on the policy's own episodes, with teacher help and a replay buffer)
-> metrics, plots and checkpoints in out_dir: config.json, metrics.jsonl, world.png, policy.pt
(the checkpoint layout of checkpoint.py, kind "world", step = episodes) and the imitation run.
"""
import dataclasses
import json
import math
import os
import random
import sys
import time

import torch
from tqdm import tqdm

import prepare
import train
from checkpoint import load_checkpoint, load_model, read_json, save_checkpoint, write_json_atomic
from configurator import ConfigError, check_ranges, configure, print_config
from plot import save_figure
from runtime import StopRequest, append_jsonl, claim_out_dir, read_jsonl, truncate_jsonl
from tasks import (ACTION_PREFIX, EVAL_SEED_BASE, MAX_ACTION_CHARS, make_env, play_episode, teacher_act,
                   teacher_episodes, turn_by_turn, write_transcripts)
from tokenizer import tokenizer_from_meta

DEFAULTS = dict(
    out_dir="out/world",
    overwrite=False,           # a fresh run into an out_dir that holds one moves the old run aside (else it refuses)
    tasks={"arith": {}},       # task name -> make_env options: the tasks the run starts with
    changes=[],                # [(episode, task, options)]: the world changes a rule, or adds a task, mid-run
    init_from="imitate",       # imitate (teacher transcripts -> prepare.py -> train.py) | resume | a checkpoint path
    mode="expert_iteration",   # evaluate (no learning after init_from) | expert_iteration | reinforce
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
MODES = ("evaluate", "expert_iteration", "reinforce")
ACTS = ("generate", "choose")
BETAS = (0.9, 0.99)  # the policy's AdamW, in imitation and online learning: few, noisy updates


# ----------------------------------------------------------------------------- the policy

class Policy:
    """A GPT that writes one action line per turn, or chooses one of the commands a task lists.
    Any tokenizer: the transcript is encoded with the model's own (characters or GPT-2 BPE)."""

    def __init__(self, model, tokenizer, device="cpu"):
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)

    @torch.no_grad()
    def act(self, transcript, temperature=0.0, seed=None):
        """The next action for a transcript that ends after an observation line: tokens until a newline."""
        was_training = self.model.training
        self.model.eval()
        prompt = self.tokenizer.encode(transcript + ACTION_PREFIX)
        # a long transcript keeps its end (generate_stream slides the window as the action grows), as in training
        idx = torch.tensor([prompt[-self.model.config.block_size:]], dtype=torch.long, device=self.device)
        ids, text = [], ""
        for token in self.model.generate_stream(idx, MAX_ACTION_CHARS + 1, temperature=temperature,
                                                stop_token=self.tokenizer.eot, seed=seed):
            if token.item() == self.tokenizer.eot:  # the end of a document is the end of the action
                break
            ids.append(token.item())
            text = self.tokenizer.decode(ids)  # a BPE token may hold the newline with other characters
            if "\n" in text:
                break
        self.model.train(was_training)
        return text.split("\n", 1)[0]

    @torch.no_grad()
    def choose(self, transcript, commands, temperature=0.0, seed=None):
        """The command whose line (and its newline) the model finds likeliest per token after the transcript;
        with temperature > 0 a sample from softmax(mean log-likelihood / temperature). Tiny models that cannot yet
        spell a 60-character command can still tell which of a game's commands fits (He et al. 2016, DRRN)."""
        if not commands:
            return ""
        score = self.command_scores(transcript, commands)
        if temperature <= 0:
            return commands[int(score.argmax())]
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        probs = torch.softmax(score.float().cpu() / temperature, 0)
        return commands[int(torch.multinomial(probs, 1, generator=generator))]

    def command_scores(self, transcript, commands):
        """Each command's mean log-likelihood per token as the next action line (its newline included): (len(commands),).
        Scored in eval mode, as act=choose plays; gradients flow unless the caller turns them off (choice_loss)."""
        was_training = self.model.training
        self.model.eval()
        start = len(transcript) + len(ACTION_PREFIX)
        items = [{"text": f"{transcript}{ACTION_PREFIX}{c}\n", "spans": [[start, start + len(c) + 1]]} for c in commands]
        log_likelihood, count = self.action_log_likelihood(items)
        self.model.train(was_training)
        # per token: the summed log-likelihood favours the shortest command ('look'), measured: 0/100
        # held-out easy games summed against 5/15 per token, same policy (EXPERIMENTS.md, TextWorld)
        return log_likelihood / count.clamp(min=1)

    def actor(self, temperature, seed, env=None, how="generate", untried=False):
        """An act function for play_episode that samples turn t with seed * 1009 + t + 1: an episode
        replays exactly from (temperature, seed), in a resumed run or in a swarm worker. how=choose picks
        among env.admissible_actions(); with untried, among those it has not taken in this state before."""
        if how != "choose":
            return turn_by_turn(lambda transcript, turn: self.act(transcript, temperature, seed * 1009 + turn + 1))
        taken = {}  # env.state_key() -> commands taken in that state this episode

        def choose_at(transcript, turn):
            commands = env.admissible_actions()
            if untried:
                # the game is deterministic, so the same command in the same state comes back to it: a greedy
                # policy loops there until it runs out of steps (184 of 190 failures of two CPU policies on
                # held-out easy games, e.g. close cabinet / open cabinet; EXPERIMENTS.md, TextWorld failures)
                tried = taken.setdefault(env.state_key(), set())
                commands = [c for c in commands if c not in tried] or commands
            command = self.choose(transcript, commands, temperature, seed * 1009 + turn + 1)
            if untried:
                tried.add(command)
            return command
        return turn_by_turn(choose_at)

    def action_log_likelihood(self, items):
        """The log-likelihood of each item's action tokens, summed, and how many there are: two (B,) tensors.

        An item is {"text": a transcript, "spans": [[start, end], ...], the characters of its actions};
        each action token is scored given the text before it. Gradients flow unless the caller turns them off."""
        x, y = action_batch(self, items)
        _, nll = self.model(x, y, reduction="none")  # (B, T), 0 where the target is -1
        return -nll.sum(1), (y != -1).sum(1)

    def tokenizer_meta(self):
        return {**self.tokenizer.meta(), "vocab_size": self.tokenizer.n_vocab, "eot": self.tokenizer.eot}


def policy_file(path_or_run_dir):
    """A checkpoint path from a path or a run folder (its policy.pt, else the ckpt.pt of train.py or of an imitation)."""
    if not os.path.isdir(path_or_run_dir):
        return path_or_run_dir
    candidates = [os.path.join(path_or_run_dir, name) for name in ("policy.pt", "ckpt.pt", "imitation/ckpt.pt")]
    return next((p for p in candidates if os.path.exists(p)), candidates[0])


def load_policy_checkpoint(path):
    """The checkpoint dict of a world policy, or SystemExit saying how to make one."""
    if not os.path.exists(path):
        raise SystemExit(f"no policy at {path}: make one with python world.py config/world_arith.py "
                         f"--out_dir={os.path.dirname(path) or '.'}, or give init_from a checkpoint path")
    return load_checkpoint(path)


def policy_from_checkpoint(state, device, path):
    """The Policy a checkpoint dict holds: the one place a Policy is built from a checkpoint. Any model
    trained by train.py or world.py (characters or GPT-2 BPE); check_policy_fits says if it can play a task."""
    meta = state.get("tokenizer")
    if not meta:
        raise SystemExit(f"{path} has no tokenizer: it was not trained by train.py or world.py")
    tokenizer, model = tokenizer_from_meta(meta), load_model(state, device)
    if tokenizer.n_vocab > model.config.vocab_size:
        raise SystemExit(f"{path} is broken: its {meta['tokenizer']!r} tokenizer has {tokenizer.n_vocab} tokens, its "
                         f"model only {model.config.vocab_size}")
    return Policy(model, tokenizer, device)


def check_policy_fits(policy, tasks, path):
    """A teacher episode of each task must encode with the policy's tokenizer, and its first turn (the
    first observation and action) must fit in the policy's block; else a clear error before any play."""
    for name, options in tasks.items():
        env = make_env(name, **options)
        episode = play_episode(env, teacher_act(env), 0)
        text = episode["transcript"]
        if policy.tokenizer.name == "char":
            missing = "".join(sorted(set(text) - set(policy.tokenizer.chars)))
            if missing:
                raise SystemExit(f"{path} cannot play {name}: its character vocabulary lacks {missing!r}, which "
                                 f"{name} transcripts use; start from a model whose data held them, or from "
                                 f"--init_from=imitate")
        first_turn = len(policy.tokenizer.encode(text[:episode["action_spans"][0][1]]))
        if first_turn > policy.model.config.block_size:
            raise SystemExit(f"{path} cannot play {name}: its block_size {policy.model.config.block_size} is "
                             f"smaller than one turn ({first_turn} {policy.tokenizer.name} tokens); use a model "
                             f"with a longer block (--block_size with --init_from=imitate)")


def load_policy(path_or_run_dir, device="cpu"):
    """A Policy from a checkpoint file or a run folder."""
    path = policy_file(path_or_run_dir)
    return policy_from_checkpoint(load_policy_checkpoint(path), device, path)


def make_optimizer(policy, learning_rate):
    return policy.model.configure_optimizers(0.0, learning_rate, BETAS, policy.device.type)


# ----------------------------------------------------------------------------- learning from episodes

def encode_item(tokenizer, item):
    """An item's tokens and which of them are action tokens: the text is encoded piece by piece at the
    span edges, so a BPE token never straddles an action's start or end (for characters it is the same)."""
    edges = sorted({0, len(item["text"])} | {i for span in item["spans"] for i in span})
    ids, trained = [], []
    for start, end in zip(edges, edges[1:]):
        piece = tokenizer.encode(item["text"][start:end])
        ids += piece
        trained += [any(s <= start and end <= e for s, e in item["spans"])] * len(piece)
    return ids, trained


def action_batch(policy, items):
    """Inputs x and targets y (B, T): targets only on the items' action tokens, -1 elsewhere.

    A text longer than the context keeps its end, where the latest actions are."""
    block = policy.model.config.block_size
    rows = []
    for item in items:
        ids, trained = encode_item(policy.tokenizer, item)
        ids, trained = ids[-(block + 1):], trained[-(block + 1):]
        rows.append((ids[:-1], [t if keep else -1 for t, keep in zip(ids[1:], trained[1:])]))
    T = max(len(x) for x, _ in rows)
    x = torch.tensor([x + [0] * (T - len(x)) for x, _ in rows], dtype=torch.long)
    y = torch.tensor([y + [-1] * (T - len(y)) for _, y in rows], dtype=torch.long)
    return x.to(policy.device), y.to(policy.device)


def update(policy, optimizer, items, weights, grad_clip=1.0):
    """One gradient step on weight * (mean negative log-likelihood of each item's action tokens).

    Weight 1 is imitation of a good episode or a teacher label (expert iteration, teacher help);
    weight = reward - baseline is REINFORCE (Williams 1992) with a running-mean baseline."""
    policy.model.train()
    log_likelihood, count = policy.action_log_likelihood(items)
    per_item = -log_likelihood / count.clamp(min=1)
    loss = (torch.tensor(weights, dtype=per_item.dtype, device=per_item.device) * per_item).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def require_listed_commands(items):
    """choice_loss trains on the commands listed in each state: refuse replay items that do not carry them."""
    unlisted = sum("choices" not in item for item in items)
    if unlisted:  # e.g. a replay buffer resumed from a run that did not record the listed commands
        raise SystemExit(f"choice_loss needs the commands listed in each trained state, and {unlisted} replay "
                         f"items have none (kept by a run before choice_loss, or from a task that lists no "
                         f"commands): start a fresh run, or set choice_loss=False")


def choice_update(policy, optimizer, items, weights, grad_clip=1.0):
    """One gradient step on weight * (cross-entropy of each trained action among the commands listed in its
    state), every command scored by Policy.command_scores, as act=choose scores it: its ranking, trained directly.

    update() raises the action's text likelihood, which moves every command that shares its characters
    and need not lift the action above its rivals in that state. One state at a time: a state's commands
    share its context, and a batch of all of them would hold every state's copies at once."""
    require_listed_commands(items)
    policy.model.train()
    optimizer.zero_grad(set_to_none=True)
    # each trained action's transcript before its ACTION_PREFIX, the action, and the commands listed there
    states = [(item["text"][:start - len(ACTION_PREFIX)], item["text"][start:end - 1], listed, weight)
              for item, weight in zip(items, weights) for (start, end), listed in zip(item["spans"], item["choices"])]
    total = 0.0
    for transcript, action, listed, weight in states:
        commands = list(dict.fromkeys([action, *listed]))  # the trained action first, once, listed or not
        loss = -weight * torch.log_softmax(policy.command_scores(transcript, commands), 0)[0] / len(states)
        loss.backward()
        total += loss.item()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), grad_clip)
    optimizer.step()
    return total


def episode_item(episode, number):
    """A replay item that trains every action of an episode (with the commands listed at each, if any)."""
    item = {"text": episode["transcript"], "spans": [list(s) for s in episode["action_spans"]],
            "task": episode["task"], "episode": number}
    return item | ({"choices": episode["choices"]} if "choices" in episode else {})


def teacher_items(episode, number):
    """Teacher help: at the first state where the policy's action differed from the teacher's, the
    teacher's action is shown after the same context (DAgger, Ross et al. 2011, first step only).

    Only the first: later states of a failed episode are far from what the policy will meet once it
    learns, and in a long episode their context no longer fits the window, so the teacher's choice
    looks arbitrary there (measured on rooms: labelling every step collapsed success to 0%)."""
    for step, ((start, _), mine, right) in enumerate(zip(episode["action_spans"], episode["actions"],
                                                         episode["teacher_actions"])):
        if mine != right:
            text = episode["transcript"][:start] + right + "\n"
            item = {"text": text, "spans": [[start, len(text)]], "task": episode["task"], "episode": number}
            return [item | ({"choices": [episode["choices"][step]]} if "choices" in episode else {})]
    return []


class ReplayBuffer:
    """Episodes worth learning from. A batch mixes the most recent items with items from the whole
    history, so a new task or a changed rule is learnt without erasing older skills."""

    def __init__(self, size, recent_window, recent_fraction, items=None):
        self.size, self.recent_window, self.recent_fraction = size, recent_window, recent_fraction
        self.items = list(items or [])

    def add(self, item, rng):
        self.items.append(item)
        if len(self.items) > self.size:  # forget a random old item, never a recent one
            del self.items[rng.randrange(len(self.items) - self.recent_window)]

    def sample(self, n, rng):
        if not self.items:
            return []
        n_recent = round(n * self.recent_fraction)
        recent = self.items[-self.recent_window:]
        return [rng.choice(recent) for _ in range(n_recent)] + [rng.choice(self.items) for _ in range(n - n_recent)]


# ----------------------------------------------------------------------------- imitation (prepare.py + train.py)

def imitation_recipe(cfg):
    """Every setting that shapes the imitation policy, stage by stage; imitate runs from this dict and
    reuses an earlier policy only when all of it is the same."""
    out_dir = cfg["out_dir"]
    corpus = os.path.join(out_dir, "teacher", "transcripts.jsonl")
    run = configure(train.DEFAULTS, []) | {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "device", "seed")}
    run |= {"out_dir": os.path.join(out_dir, "imitation"), "data_dir": out_dir, "dataset": "teacher",
            "max_iters": cfg["imitation_iters"], "batch_size": cfg["imitation_batch_size"],
            "learning_rate": cfg["imitation_lr"], "min_lr": cfg["imitation_lr"] / 10, "warmup_iters": 50,
            "eval_interval": max(1, cfg["imitation_iters"] // 4), "eval_iters": 10, "log_interval": 25,
            "dropout": 0.0, "beta1": BETAS[0], "beta2": BETAS[1], "compile": False,
            "overwrite": True}  # reached only when the recipe changed: the old imitation run is moved aside
    return {"teacher": {"tasks": cfg["tasks"], "episodes_per_task": cfg["imitation_episodes"],
                        "noise": cfg["teacher_noise"], "notes": cfg["imitation_notes"], "seed": cfg["seed"],
                        "corpus": corpus},
            "prepare": configure(prepare.DEFAULTS, []) | {"dataset": corpus, "name": "teacher", "tokenizer": "char",
                                                          "data_dir": out_dir, "force": True},
            "train": run,
            "clone": {"iters": cfg["clone_iters"], "batch_size": cfg["imitation_batch_size"],
                      "learning_rate": cfg["imitation_lr"], "final_lr_fraction": 0.1, "betas": BETAS,
                      "weight_decay": 0.0, "grad_clip": cfg["grad_clip"], "seed": cfg["seed"], "device": cfg["device"],
                      "path": os.path.join(out_dir, "imitation", "cloned.pt")}}


def reusable_imitation(recipe_path, recipe):
    """The checkpoint of an earlier imitation made by the same recipe with a model this code still loads, or None."""
    if not os.path.exists(recipe_path):
        return None
    done = read_json(recipe_path, "delete it to imitate again")
    if done.get("recipe") != recipe or not os.path.exists(done.get("checkpoint", "")):
        return None
    try:
        load_model(load_checkpoint(done["checkpoint"]))
    except (RuntimeError, SystemExit) as e:  # the model code changed since: its weights no longer fit
        print(f"cannot reuse {done['checkpoint']} ({str(e).splitlines()[0]}); imitating again")
        return None
    print(f"reusing the imitation policy {done['checkpoint']} (same recipe); delete {recipe_path} to redo it")
    return done["checkpoint"]


def clone_actions(path, episodes, clone, stop):
    """Behaviour cloning: gradient steps on the action tokens of teacher episodes, from the checkpoint at
    path; cosine decay to final_lr_fraction of the learning rate. Returns the cloned checkpoint's path."""
    policy = load_policy(path, clone["device"])
    optimizer = policy.model.configure_optimizers(clone["weight_decay"], clone["learning_rate"], clone["betas"],
                                                  policy.device.type)
    rng = random.Random(clone["seed"])
    items = [episode_item(e, 0) for e in episodes]
    low = clone["final_lr_fraction"]
    for step in tqdm(range(clone["iters"]), desc="cloning actions", disable=None):
        if stop.requested:
            raise SystemExit("stopped during behaviour cloning: the imitation policy is unfinished; the same "
                             "command starts it again")
        for group in optimizer.param_groups:
            group["lr"] = clone["learning_rate"] * (low + (1 - low) * (1 + math.cos(math.pi * step / clone["iters"])) / 2)
        update(policy, optimizer, [rng.choice(items) for _ in range(clone["batch_size"])], [1.0] * clone["batch_size"],
               clone["grad_clip"])
    save_checkpoint(clone["path"], {"model_args": dataclasses.asdict(policy.model.config),
                                    "model": policy.model.state_dict(), "tokenizer": policy.tokenizer_meta(),
                                    "config": clone, "step": 0, "val_loss": None}, kind="world")
    return clone["path"]


def imitate(cfg, stop):
    """A policy from teacher transcripts; returns its checkpoint path.

    Two stages: train.py learns the language of the world from every token of the transcripts (the
    observations too), then behaviour cloning trains on the action tokens alone, which is what makes
    the policy copy an expression into a tool call (measured: train.py alone, 800 steps, never copied)."""
    recipe = json_roundtrip(imitation_recipe(cfg))
    recipe_path = os.path.join(cfg["out_dir"], "imitation", "recipe.json")
    path = reusable_imitation(recipe_path, recipe)
    if path:
        return path
    teacher = recipe["teacher"]
    episodes = teacher_episodes(teacher["tasks"], teacher["episodes_per_task"], teacher["noise"], teacher["seed"],
                                teacher["notes"])
    write_transcripts(teacher["corpus"], episodes)
    rate = sum(e["success"] for e in episodes) / len(episodes)
    print(f"wrote {len(episodes)} teacher transcripts to {teacher['corpus']} (noise {teacher['noise']}: {rate:.0%} succeed)")
    prepare.prepare(recipe["prepare"])
    train.train(recipe["train"])
    path = os.path.join(recipe["train"]["out_dir"], "ckpt.pt")
    if load_checkpoint(path)["step"] < recipe["train"]["max_iters"]:  # train.py saved and stopped on Ctrl-C / SIGTERM
        raise SystemExit("stopped during imitation: the imitation policy is unfinished; the same command starts it again")
    if recipe["clone"]["iters"]:
        path = clone_actions(path, episodes, recipe["clone"], stop)
    write_json_atomic(recipe_path, {"recipe": recipe, "checkpoint": path})
    return path


def json_roundtrip(obj):
    """obj as it reads back from JSON (tuples become lists), so a recipe compares equal to its saved copy."""
    return json.loads(json.dumps(obj))


# ----------------------------------------------------------------------------- the learning loop

def temperature_at(episode, cfg):
    progress = min(1.0, episode / max(1, cfg["episodes"]))
    return cfg["temperature_start"] + (cfg["temperature_end"] - cfg["temperature_start"]) * progress


def task_options_at(episode, cfg):
    """The tasks and their options after every change due by this episode."""
    tasks = {name: dict(options) for name, options in cfg["tasks"].items()}
    for when, name, options in sorted(cfg["changes"], key=lambda c: c[0]):
        if when <= episode:
            tasks[name] = dict(options)
    return tasks


def evaluate(policy, tasks, n, how="generate", untried=False):
    """Greedy play on the held-out seeds of each task: {task: {success, reward}}."""
    result = {}
    for name, options in tasks.items():
        env = make_env(name, **options)
        episodes = [play_episode(env, policy.actor(0.0, 0, env, how, untried), EVAL_SEED_BASE + i) for i in range(n)]
        result[name] = {"success": sum(e["success"] for e in episodes) / n,
                        "reward": sum(e["reward"] for e in episodes) / n}
    return result


@dataclasses.dataclass
class Progress:
    """What the learning loop carries from batch to batch; policy.pt keeps it, a resumed run restores it."""
    episode: int
    baselines: dict        # task -> running-mean reward (reinforce)
    replay: ReplayBuffer
    rng: random.Random     # every random choice of the loop: a resumed run replays exactly


def play_batch(policy, envs, cfg, progress, temperature):
    """A batch of training episodes; successes, and teacher labels of failures, go into the replay buffer.
    Returns (episodes, teacher labels added)."""
    batch, labels, rng = [], 0, progress.rng
    for _ in range(cfg["episodes_per_update"]):
        env = envs[rng.choice(sorted(envs))]
        act = policy.actor(temperature, rng.randrange(2 ** 31), env, cfg["act"], cfg["choose_untried"])
        episode = play_episode(env, act, rng.randrange(EVAL_SEED_BASE))
        batch.append(episode)
        if episode["success"]:
            progress.replay.add(episode_item(episode, progress.episode), rng)
        elif cfg["teacher_help"]:
            for item in teacher_items(episode, progress.episode):
                progress.replay.add(item, rng)
                labels += 1
        progress.episode += 1
    return batch, labels


def learn(policy, optimizer, episodes, progress, cfg):
    """The gradient steps after a batch of episodes; returns the mean loss."""
    replay, baselines, rng = progress.replay, progress.baselines, progress.rng
    step = choice_update if cfg["choice_loss"] else update
    losses = []
    if cfg["mode"] == "reinforce":
        weights = []
        for e in episodes:
            weights.append(e["reward"] - baselines.get(e["task"], 0.0))
            baselines[e["task"]] = cfg["baseline_decay"] * baselines.get(e["task"], e["reward"]) + \
                (1 - cfg["baseline_decay"]) * e["reward"]
        items = [episode_item(e, 0) for e in episodes]
        extra = replay.sample(cfg["update_batch_size"], rng)
        losses.append(step(policy, optimizer, items + extra, weights + [1.0] * len(extra), cfg["grad_clip"]))
    else:
        for _ in range(cfg["updates_per_batch"]):
            items = replay.sample(cfg["update_batch_size"], rng)
            if items:
                losses.append(step(policy, optimizer, items, [1.0] * len(items), cfg["grad_clip"]))
    return sum(losses) / len(losses) if losses else float("nan")


def plot_world(out_dir, changes=()):
    """Success rate and reward per task over episodes (thick: held-out evals, thin: training) into world.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
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


def save_policy(path, policy, optimizer, cfg, progress):
    """policy.pt: the checkpoint layout of checkpoint.py (kind world, step = episodes) plus what resuming needs."""
    save_checkpoint(path, {"model_args": dataclasses.asdict(policy.model.config), "model": policy.model.state_dict(),
                           "tokenizer": policy.tokenizer_meta(), "config": cfg, "step": progress.episode,
                           "val_loss": None, "optimizer": optimizer.state_dict(), "baselines": progress.baselines,
                           "replay": progress.replay.items, "rng": progress.rng.getstate(),
                           "torch_rng": torch.get_rng_state()}, kind="world")


def resume_progress(state, optimizer, cfg):
    """The loop's progress and the optimizer's state from a policy.pt, so the run continues exactly."""
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"{cfg['out_dir']}/policy.pt cannot be resumed by this code ({e}); start a fresh run "
                         f"with --init_from={cfg['out_dir']}/policy.pt --out_dir=<a new folder>")
    torch.set_rng_state(state["torch_rng"])
    rng = random.Random()
    rng.setstate(state["rng"])
    if cfg["choice_loss"]:  # here, before anything is played or written, not at the first update
        require_listed_commands(state["replay"])
    replay = ReplayBuffer(cfg["replay_size"], cfg["replay_recent_window"], cfg["replay_recent_fraction"], state["replay"])
    return Progress(state["step"], state["baselines"], replay, rng)


def evaluate_and_save(policy, optimizer, cfg, progress):
    """A held-out evaluation into metrics.jsonl, then policy.pt and world.png; returns the evaluation."""
    result = evaluate(policy, task_options_at(progress.episode, cfg), cfg["eval_episodes"], cfg["act"],
                      cfg["choose_untried"])
    append_jsonl(os.path.join(cfg["out_dir"], "metrics.jsonl"), {"episode": progress.episode, "eval": result})
    tqdm.write(f"episode {progress.episode}: held-out success " +
               ", ".join(f"{t} {r['success']:.0%}" for t, r in result.items()))
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
    for name, options in run_tasks(cfg):
        try:
            env = make_env(name, **options)
        except ValueError as e:
            raise ConfigError(f"tasks/changes: {e}")
        if cfg["act"] == "choose" and not hasattr(env, "admissible_actions"):
            raise ConfigError(f"act=choose picks among the commands a task lists, and {name} lists none; "
                              f"use act=generate, or a task that lists them (textworld)")


def run_tasks(cfg):
    """Every (task, options) the run meets: the tasks it starts with, then each change."""
    return list(cfg["tasks"].items()) + [(name, options) for _, name, options in cfg["changes"]]


def load_start(path, cfg):
    """The checkpoint a run starts from (loaded once) and the Policy it holds, checked against the run's tasks."""
    state = load_policy_checkpoint(path)
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
            prepare_tasks(cfg)
            state, policy = start or load_start(imitate(cfg, stop), cfg)
            return learning_loop(cfg, state, policy, stop)
    finally:
        lock.close()


def learning_loop(cfg, state, policy, stop):
    """Evaluate, then learn from batches of episodes until cfg["episodes"] (or a stop request), from the
    start checkpoint `state` and its `policy`; returns the last held-out evaluation."""
    out_dir, resuming = cfg["out_dir"], cfg["init_from"] == "resume"
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    torch.manual_seed(cfg["seed"])
    optimizer = make_optimizer(policy, cfg["learning_rate"])
    if resuming:
        progress = resume_progress(state, optimizer, cfg)
        truncate_jsonl(metrics_path, progress.episode, key="episode")
    else:
        progress = Progress(0, {}, ReplayBuffer(cfg["replay_size"], cfg["replay_recent_window"],
                                                cfg["replay_recent_fraction"]), random.Random(cfg["seed"]))
    write_json_atomic(os.path.join(out_dir, "config.json"), cfg)
    start, first_episode, evaluated = time.perf_counter(), progress.episode, 0

    total = cfg["episodes"] if cfg["mode"] != "evaluate" else 0
    result = None
    if not resuming or not os.path.exists(metrics_path):
        result = evaluate_and_save(policy, optimizer, cfg, progress)
        evaluated += cfg["eval_episodes"] * len(task_options_at(progress.episode, cfg))
    bar = tqdm(total=total, initial=progress.episode, unit="episode", dynamic_ncols=True, disable=None)
    while progress.episode < total and not stop.requested:
        tasks = task_options_at(progress.episode, cfg)
        envs = {name: make_env(name, **options) for name, options in tasks.items()}
        temperature = temperature_at(progress.episode, cfg)
        t0 = time.perf_counter()
        batch, labels = play_batch(policy, envs, cfg, progress, temperature)
        loss = learn(policy, optimizer, batch, progress, cfg)
        per_task = {}
        for name in sorted({e["task"] for e in batch}):
            mine = [e for e in batch if e["task"] == name]
            per_task[name] = {"success": sum(e["success"] for e in mine) / len(mine),
                              "reward": sum(e["reward"] for e in mine) / len(mine)}
        append_jsonl(metrics_path, {"episode": progress.episode, "train": per_task, "loss": loss,
                                    "temperature": temperature, "teacher_labels": labels,
                                    "replay": len(progress.replay.items), "seconds": time.perf_counter() - t0})
        bar.update(len(batch))
        bar.set_postfix(loss=f"{loss:.3f}", success=f"{sum(e['success'] for e in batch) / len(batch):.0%}")
        episode = progress.episode
        crossed = episode // cfg["eval_interval"] > (episode - len(batch)) // cfg["eval_interval"]
        if crossed or episode >= total or stop.requested:
            result = evaluate_and_save(policy, optimizer, cfg, progress)
            evaluated += cfg["eval_episodes"] * len(task_options_at(progress.episode, cfg))
    bar.close()
    played, seconds = progress.episode - first_episode + evaluated, time.perf_counter() - start
    print(f"played {played} episodes ({progress.episode - first_episode} training, {evaluated} held-out) in "
          f"{seconds:.0f} s: {60 * played / max(seconds, 1e-9):.1f} episodes/min with act={cfg['act']}")
    rows = read_jsonl(metrics_path)
    for when, name, options in cfg["changes"]:
        if when <= progress.episode:
            print(f"change at episode {when} ({name} {options}): {recovery(rows, when, name)}")
    if stop.requested:
        print(f"stopped at episode {progress.episode}; resume with --init_from=resume --out_dir={out_dir}")
    return result


def main(argv):
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    run(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
