"""
A µLM acting in text tasks: the policy, how it learns from episodes, and its replay.

    policy = load_policy("out/world_arith")                 # a policy.pt, ckpt.pt or a run folder
    episode = play_episode(make_env("arith"), policy.actor(0.0, seed=0), seed=7)
    update(policy, optimizer, [episode_item(episode, 0)], [1.0])

A policy is a GPT (any tokenizer: characters or GPT-2 BPE) that writes one action line per turn
after a transcript (tasks.py's format), or chooses among the commands a task lists by their
likelihood. It learns from replay items: a transcript and the character spans of the actions to
train. world.py's learning loop and swarm.py's learning workers share everything here: the updates
(expert iteration, REINFORCE, the choice loss), teacher help, the replay buffer, the loop's
progress, and policy.pt (checkpoint.py's layout, kind "world", step = episodes).
"""
import dataclasses
import json
import math
import os
import random

import torch

from checkpoint import load_checkpoint, load_model, read_json, save_checkpoint
from runtime import progress
from tasks import (ACTION_PREFIX, EVAL_SEED_BASE, MAX_ACTION_CHARS, make_env, play_episode, teacher_act,
                   turn_by_turn)
from tokenizer import tokenizer_from_meta

BETAS = (0.9, 0.99)  # the policy's AdamW, in imitation and online learning: few, noisy updates
# train.py's settings (command-line overrides) for a policy's first weights, besides its shape and length:
# a short run on a small corpus of transcripts (world.py's imitation, the TextWorld suite's pretraining)
IMITATION_TRAIN = {"warmup_iters": 50, "eval_iters": 10, "log_interval": 25, "dropout": 0.0, "beta1": BETAS[0],
                   "beta2": BETAS[1], "compile": False}


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


def action_loss(policy, items, weights):
    """The mean over items of weight * (mean negative log-likelihood of the item's action tokens): a scalar tensor.

    Weight 1 is imitation of a good episode or a teacher label (expert iteration, teacher help, the reward
    model's anchor); weight = reward - baseline is REINFORCE (Williams 1992) with a running-mean baseline."""
    log_likelihood, count = policy.action_log_likelihood(items)
    per_item = -log_likelihood / count.clamp(min=1)
    return (torch.tensor(weights, dtype=per_item.dtype, device=per_item.device) * per_item).mean()


def update(policy, optimizer, items, weights, grad_clip=1.0):
    """One gradient step on action_loss(policy, items, weights)."""
    policy.model.train()
    loss = action_loss(policy, items, weights)
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
    policy.model.train()
    optimizer.zero_grad(set_to_none=True)
    total = choice_backward(policy, items, weights)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), grad_clip)
    optimizer.step()
    return total


def choice_backward(policy, items, weights):
    """Accumulate the gradient of choice_update's loss (no step): also the reward model's anchor with act=choose.
    Returns the loss. One state's backward at a time, so only one state's commands are held at once."""
    require_listed_commands(items)
    # each trained action's transcript before its ACTION_PREFIX, the action, and the commands listed there
    states = [(item["text"][:start - len(ACTION_PREFIX)], item["text"][start:end - 1], listed, weight)
              for item, weight in zip(items, weights) for (start, end), listed in zip(item["spans"], item["choices"])]
    total = 0.0
    for transcript, action, listed, weight in states:
        commands = list(dict.fromkeys([action, *listed]))  # the trained action first, once, listed or not
        loss = -weight * torch.log_softmax(policy.command_scores(transcript, commands), 0)[0] / len(states)
        loss.backward()
        total += loss.item()
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




# ----------------------------------------------------------------------------- learning from the policy's own episodes

@dataclasses.dataclass
class Learning:
    """How a policy learns from its episodes: world.py's learning loop and swarm.py's learning workers."""
    mode: str                      # expert_iteration (imitate successes and teacher labels) | reinforce
    learning_rate: float
    updates_per_batch: int         # gradient steps after each batch of episodes (expert iteration)
    update_batch_size: int         # replay items per gradient step
    grad_clip: float
    replay_size: int
    replay_recent_window: int      # the newest items ...
    replay_recent_fraction: float  # ... make up this share of every replay batch
    seed: int                      # the loop's random choices
    choice_loss: bool = False      # train the ranking act=choose uses (choice_update), not the action's likelihood
    baseline_decay: float = 0.9    # reinforce's running-mean reward baseline per task

    @classmethod
    def from_config(cls, cfg):
        """The fields a config dict holds (world.py's or swarm.py's keys are these names); a missing one is named."""
        fields = [f for f in dataclasses.fields(cls)]
        missing = [f.name for f in fields if f.name not in cfg and f.default is dataclasses.MISSING]
        assert not missing, f"a learning config needs {missing}"  # a caller's bug, not a user's
        return cls(**{f.name: cfg[f.name] for f in fields if f.name in cfg})

    def new_progress(self):
        """The progress of a run that starts now: no episodes, an empty replay buffer."""
        return Progress(0, {}, ReplayBuffer(self.replay_size, self.replay_recent_window, self.replay_recent_fraction),
                        random.Random(self.seed))


@dataclasses.dataclass
class Progress:
    """What a learning loop carries from batch to batch; policy.pt keeps it, a resumed run restores it."""
    episode: int
    baselines: dict        # task -> running-mean reward (reinforce)
    replay: ReplayBuffer
    rng: random.Random     # every random choice of the loop: a resumed run replays exactly


def learn(policy, optimizer, episodes, progress, learning):
    """The gradient steps after a batch of episodes (already added to the replay buffer as the mode wants);
    returns the mean loss, NaN when there was nothing to learn from yet."""
    replay, baselines, rng = progress.replay, progress.baselines, progress.rng
    step = choice_update if learning.choice_loss else update
    losses = []
    if learning.mode == "reinforce":
        weights = []
        for e in episodes:
            weights.append(e["reward"] - baselines.get(e["task"], 0.0))
            baselines[e["task"]] = learning.baseline_decay * baselines.get(e["task"], e["reward"]) + \
                (1 - learning.baseline_decay) * e["reward"]
        items = [episode_item(e, 0) for e in episodes]
        extra = replay.sample(learning.update_batch_size, rng)
        losses.append(step(policy, optimizer, items + extra, weights + [1.0] * len(extra), learning.grad_clip))
    else:
        for _ in range(learning.updates_per_batch):
            items = replay.sample(learning.update_batch_size, rng)
            if items:
                losses.append(step(policy, optimizer, items, [1.0] * len(items), learning.grad_clip))
    return sum(losses) / len(losses) if losses else float("nan")


def save_policy(path, policy, optimizer, config, progress):
    """policy.pt: the checkpoint layout of checkpoint.py (kind world, step = episodes) plus what resuming needs.
    `config` is the run's settings, kept for a person (and sample.py) to read."""
    save_checkpoint(path, {"model_args": dataclasses.asdict(policy.model.config), "model": policy.model.state_dict(),
                           "tokenizer": policy.tokenizer_meta(), "config": config, "step": progress.episode,
                           "val_loss": None, "optimizer": optimizer.state_dict(), "baselines": progress.baselines,
                           "replay": progress.replay.items, "rng": progress.rng.getstate(),
                           "torch_rng": torch.get_rng_state()}, kind="world")


RESUME_KEYS = ("optimizer", "baselines", "replay", "rng", "torch_rng")


def resume_progress(state, optimizer, learning, path):
    """The loop's progress and the optimizer's state from the policy.pt at path, so the run continues exactly."""
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:  # an imitation's cloned.pt, a train.py ckpt.pt, an export: weights without a learning loop
        raise SystemExit(f"{path} cannot be resumed: it holds no learning state (no {', '.join(missing)}), so it was "
                         f"not saved by a world.py learning run; start a fresh run from its weights with "
                         f"--init_from={path} --out_dir=<a new folder>")
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"{path} cannot be resumed by this code ({e}); start a fresh run "
                         f"with --init_from={path} --out_dir=<a new folder>")
    torch.set_rng_state(state["torch_rng"])
    rng = random.Random()
    rng.setstate(state["rng"])
    if learning.choice_loss:  # here, before anything is played or written, not at the first update
        require_listed_commands(state["replay"])
    replay = ReplayBuffer(learning.replay_size, learning.replay_recent_window, learning.replay_recent_fraction,
                          state["replay"])
    return Progress(state["step"], state["baselines"], replay, rng)


def evaluate(policy, tasks, n, how="generate", untried=False, on_episode=None):
    """Greedy play on the held-out seeds of each task: {task: {success, reward}}. on_episode(episode), if given,
    sees each episode as it ends (world.py keeps their transcripts and moves its progress bar)."""
    result = {}
    for name, options in tasks.items():
        env = make_env(name, **options)
        episodes = []
        for i in range(n):
            episodes.append(play_episode(env, policy.actor(0.0, 0, env, how, untried), EVAL_SEED_BASE + i))
            if on_episode is not None:
                on_episode(episodes[-1])
        result[name] = {"success": sum(e["success"] for e in episodes) / n,
                        "reward": sum(e["reward"] for e in episodes) / n}
    return result


# ----------------------------------------------------------------------------- behaviour cloning

@dataclasses.dataclass
class Cloning:
    """Behaviour cloning's settings: steps on the action tokens of teacher episodes."""
    iters: int
    batch_size: int
    learning_rate: float
    seed: int
    device: str
    path: str                       # where the cloned policy is written
    grad_clip: float = 1.0
    final_lr_fraction: float = 0.1  # cosine decay to this share of the learning rate
    weight_decay: float = 0.0
    betas: tuple = BETAS


def clone_actions(path, episodes, clone, stop):
    """Behaviour cloning: gradient steps on the action tokens of teacher episodes, from the checkpoint at
    path, with the settings of `clone` (a Cloning). Returns the cloned checkpoint's path. stop: a
    runtime.StopRequest; a stop before the end leaves no cloned checkpoint."""
    policy = load_policy(path, clone.device)
    optimizer = policy.model.configure_optimizers(clone.weight_decay, clone.learning_rate, tuple(clone.betas),
                                                  policy.device.type)
    rng = random.Random(clone.seed)
    items = [episode_item(e, 0) for e in episodes]
    low = clone.final_lr_fraction
    bar = progress(clone.iters, "cloning actions", "step")
    for step in range(clone.iters):
        if stop.requested:
            raise SystemExit("stopped during behaviour cloning: the policy is unfinished; the same command starts "
                             "it again")
        for group in optimizer.param_groups:
            group["lr"] = clone.learning_rate * (low + (1 - low) * (1 + math.cos(math.pi * step / clone.iters)) / 2)
        update(policy, optimizer, [rng.choice(items) for _ in range(clone.batch_size)], [1.0] * clone.batch_size,
               clone.grad_clip)
        bar.update()
    bar.close()
    save_checkpoint(clone.path, {"model_args": dataclasses.asdict(policy.model.config),
                                 "model": policy.model.state_dict(), "tokenizer": policy.tokenizer_meta(),
                                 "config": dataclasses.asdict(clone), "step": 0, "val_loss": None}, kind="world")
    return clone.path


def json_roundtrip(obj):
    """obj as it reads back from JSON (tuples become lists), so a recipe compares equal to its saved copy."""
    return json.loads(json.dumps(obj))


def reusable_policy(recipe_path, recipe):
    """The checkpoint of an earlier policy made by the same recipe (recipe_path holds {"recipe", "checkpoint"})
    with a model this code still loads, or None: imitation and cloning are redone only when a setting changed."""
    if not os.path.exists(recipe_path):
        return None
    done = read_json(recipe_path, "delete it to make the policy again")
    if done.get("recipe") != json_roundtrip(recipe) or not os.path.exists(done.get("checkpoint", "")):
        return None
    try:
        load_model(load_checkpoint(done["checkpoint"]))
    except (RuntimeError, SystemExit) as e:  # the model code changed since: its weights no longer fit
        print(f"cannot reuse {done['checkpoint']} ({str(e).splitlines()[0]}); making it again")
        return None
    print(f"reusing the policy {done['checkpoint']} (same recipe); delete {recipe_path} to make it again")
    return done["checkpoint"]
