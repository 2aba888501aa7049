"""
A text world where a µLM acts with tools, gets feedback and keeps learning.

    python world.py config/world_arith.py                 # imitate the teacher, then evaluate
    python world.py config/world_rooms_help.py            # imitation, then expert iteration + teacher help
    python world.py config/world_continual_names.py       # the tool is renamed mid-run
    python world.py config/world_rooms_help.py --init_from=resume

The story: tasks (small gym-style environments, each with a scripted teacher) -> transcripts (one
plain text format for every task) -> a policy (a character-level GPT that writes one action line per
turn) -> the learning loop (imitation through prepare.py and train.py, then expert iteration or
REINFORCE on the policy's own episodes, with teacher help and a replay buffer) -> metrics, plots and
checkpoints in out_dir.

A transcript reads like this; the policy sees everything up to `act ` and writes the rest of the line:

    task arith
    obs Compute 37*45+12. Tools: calc.
    act CALL calc 37*45+12
    tool 1677
    act ANSWER 1677
    obs Correct.
    reward +1
    done success
"""
import ast
import json
import math
import operator
import os
import random
import re
import string
import sys
import time

import torch
from tqdm import tqdm

from checkpoint import load_checkpoint, load_model, save_checkpoint
from configurator import configure, print_config
from runtime import StopRequest, truncate_jsonl
from tokenizer import tokenizer_from_meta

SUCCESS_REWARD = 1.0
BAD_ACTION_PENALTY = -0.1  # small: a malformed action costs a little, so trying things stays cheap
MAX_ACTION_CHARS = 48      # an action is one short line; anything longer is cut
ACTION_PREFIX = "act "
EVAL_SEED_BASE = 10 ** 9   # held-out seeds are EVAL_SEED_BASE + i; training seeds stay below it
# every character a transcript can hold: the policy's character vocabulary is built from this
ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"


# ----------------------------------------------------------------------------- environments

class Env:
    """The shared contract: reset(seed) -> observation; step(action) -> (observation, reward, done, info).

    A task subclass sets `name` and `max_steps` and writes `_reset`, `_act`, `teacher_action` and
    `random_action`. `_act` returns (kind, observation, reward, done, success) where kind is 'obs',
    'tool' or 'error'; this class counts steps, cuts runaway episodes and builds `info`.
    """
    name = ""
    max_steps = 10

    def __init__(self, max_steps=None):
        if max_steps is not None:
            self.max_steps = max_steps
        self.rng = None
        self.done = True

    def reset(self, seed):
        self.rng = random.Random(seed)
        self.seed, self.steps, self.done, self.success = seed, 0, False, False
        return self._reset()

    def step(self, action):
        if self.rng is None:
            raise RuntimeError(f"{self.name}: call reset(seed) before step()")
        if self.done:
            raise RuntimeError(f"{self.name}: the episode is over; call reset(seed) to start another")
        action = clean_action(action)
        kind, obs, reward, done, success = self._act(action)
        self.steps += 1
        truncated = not done and self.steps >= self.max_steps
        if truncated:
            obs, done = f"{obs} Out of steps.", True
        self.done, self.success = done, success
        return obs, reward, done, {"success": success, "kind": kind, "truncated": truncated, "steps": self.steps}

    def error(self, message):
        return "error", f"error: {message}", BAD_ACTION_PENALTY, False, False


def clean_action(action):
    """The first line of what the policy wrote, stripped and cut to MAX_ACTION_CHARS."""
    return action.strip().split("\n", 1)[0].strip()[:MAX_ACTION_CHARS]


def parse_int(text):
    return int(text) if re.fullmatch(r"-?\d{1,12}", text.strip()) else None


CALC_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calc(expression):
    """Integer + - * with parentheses; None for anything else (no eval of arbitrary code)."""
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) < 10 ** 12:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in CALC_OPS:
            return CALC_OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(expression)
    try:
        return value(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, RecursionError):
        return None


class Arith(Env):
    """Multi-digit arithmetic. With a tool, `CALL calc 37*45` answers 1665; `ANSWER n` ends the episode."""
    name, max_steps = "arith", 6

    def __init__(self, tool="calc", terms=(2, 3), max_steps=None):
        super().__init__(max_steps)
        # tool "" means no calculator (answer from memory); a list names the tool differently per episode,
        # so a policy must read the name from the observation rather than remember it
        self.tools, self.terms = [tool] if isinstance(tool, str) else list(tool), tuple(terms)

    def _reset(self):
        self.tool = self.rng.choice(self.tools)
        n = self.rng.randint(*self.terms)
        numbers = [self.rng.randint(10, 999) if i == 0 else self.rng.randint(10, 99) for i in range(n)]
        ops = [self.rng.choice("+-**") for _ in range(n - 1)]  # '*' twice as likely: it is the hard part
        self.expression = str(numbers[0]) + "".join(o + str(x) for o, x in zip(ops, numbers[1:]))
        self.answer, self.tool_results = calc(self.expression), []
        tools = f" Tools: {self.tool}." if self.tool else ""
        return f"Compute {self.expression}.{tools}"

    def _act(self, action):
        verb, _, rest = action.partition(" ")
        if verb == "CALL":
            name, _, args = rest.partition(" ")
            if not self.tool or name != self.tool:
                have = f"the tool is {self.tool}" if self.tool else "there are no tools here"
                return self.error(f"unknown tool '{name}'; {have}.")
            result = calc(args)
            if result is None:
                return self.error(f"{self.tool} reads integers with + - * and parentheses, not '{args}'.")
            self.tool_results.append(result)
            return "tool", str(result), 0.0, False, False
        if verb == "ANSWER":
            given = parse_int(rest)
            if given is None:
                return self.error(f"ANSWER needs an integer, not '{rest}'.")
            if given == self.answer:
                return "obs", "Correct.", SUCCESS_REWARD, True, True
            return "obs", f"Wrong, it was {self.answer}.", 0.0, True, False
        return self.error(f"unknown action '{verb}'; use CALL {self.tool or 'TOOL'} EXPR or ANSWER N.")

    def teacher_action(self):
        if self.tool and self.answer not in self.tool_results:
            return f"CALL {self.tool} {self.expression}"
        return f"ANSWER {self.answer}"

    def random_action(self, rng):
        if self.tool and rng.random() < 0.5:
            return f"CALL {self.tool} {rng.randint(10, 999)}*{rng.randint(10, 99)}"
        return f"ANSWER {rng.randint(0, 99999)}"


DIRECTIONS = {"north": (0, 1), "east": (1, 0), "south": (0, -1), "west": (-1, 0)}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
ROOM_NAMES = ["hall", "kitchen", "attic", "cellar", "garden", "study", "library", "bedroom", "pantry",
              "garage", "porch", "bathroom"]
GOAL_ITEMS = ["gem", "coin", "ring", "map"]
CLUTTER = ["lamp", "book", "cup", "rope", "sock"]


class Rooms(Env):
    """A small map of rooms joined by doors. Find the named item (it may sit in a box) and take it."""
    name, max_steps = "rooms", 16

    def __init__(self, rooms=(3, 5), box_chance=0.3, max_steps=None):
        super().__init__(max_steps)
        self.n_rooms, self.box_chance = tuple(rooms), box_chance

    def _reset(self):
        rng = self.rng
        # grow a tree of rooms on a grid, so that north then south always leads back
        cells, exits = [(0, 0)], {(0, 0): {}}
        target = rng.randint(*self.n_rooms)
        while len(cells) < target:
            cell = rng.choice(cells)
            direction = rng.choice(list(DIRECTIONS))
            dx, dy = DIRECTIONS[direction]
            new = (cell[0] + dx, cell[1] + dy)
            if new in exits:
                continue
            exits[cell][direction], exits[new] = new, {OPPOSITE[direction]: cell}
            cells.append(new)
        names = rng.sample(ROOM_NAMES, len(cells))
        self.room_of = dict(zip(cells, names))
        self.exits = {self.room_of[c]: {d: self.room_of[n] for d, n in e.items()} for c, e in exits.items()}
        self.goal = rng.choice(GOAL_ITEMS)
        self.items = {name: [] for name in names}
        for item in rng.sample(CLUTTER, rng.randint(0, 3)):
            self.items[rng.choice(names)].append(item)
        goal_room = rng.choice(names[1:])
        self.box = None  # (room, opened?)
        if rng.random() < self.box_chance:
            self.box = [goal_room, False]
            self.items[goal_room].append("box")
        else:
            self.items[goal_room].append(self.goal)
        self.here = names[0]
        self.seen_doors = set()  # (room, direction) pairs walked through either way: the teacher's memory
        self.visited = {self.here}
        return f"Find the {self.goal}. {self.describe()}"

    def describe(self):
        doors = [d for d in DIRECTIONS if d in self.exits[self.here]]
        items = self.items[self.here]
        seen = f" You see {', '.join('a ' + i for i in items)}." if items else ""
        return f"You are in the {self.here}. Exits: {', '.join(doors)}.{seen}"

    def _act(self, action):
        verb, _, obj = action.partition(" ")
        if verb == "look" and not obj:
            return "obs", self.describe(), 0.0, False, False
        if verb == "go":
            if obj not in DIRECTIONS:
                return self.error(f"go where? Directions are {', '.join(DIRECTIONS)}.")
            if obj not in self.exits[self.here]:
                return self.error(f"there is no exit {obj} from the {self.here}.")
            there = self.exits[self.here][obj]
            self.seen_doors |= {(self.here, obj), (there, OPPOSITE[obj])}
            self.here = there
            self.visited.add(there)
            return "obs", self.describe(), 0.0, False, False
        if verb == "take":
            if obj not in self.items[self.here]:
                return self.error(f"there is no {obj or 'such thing'} here.")
            if obj == "box":
                return self.error("the box is too heavy; open it.")
            self.items[self.here].remove(obj)
            if obj == self.goal:
                return "obs", f"You take the {obj}. Well done!", SUCCESS_REWARD, True, True
            return "obs", f"You take the {obj}.", 0.0, False, False
        if verb == "open":
            if obj != "box" or "box" not in self.items[self.here]:
                return self.error(f"there is no {obj or 'such thing'} to open here.")
            if self.box[1]:
                return "obs", "The box is already open.", 0.0, False, False
            self.box[1] = True
            self.items[self.here].append(self.goal)
            return "obs", f"You open the box. Inside is a {self.goal}.", 0.0, False, False
        return self.error(f"unknown action '{action}'; use go DIRECTION, take ITEM, open ITEM or look.")

    def teacher_action(self):
        """Take the goal if it is here, open a closed box, else walk to the nearest unexplored door."""
        if self.goal in self.items[self.here]:
            return f"take {self.goal}"
        if self.box and self.box[0] == self.here and not self.box[1]:
            return "open box"
        # breadth-first over rooms already known, to the nearest one with a door not yet walked through
        frontier, first_step = [self.here], {self.here: None}
        while frontier:
            room = frontier.pop(0)
            for d in DIRECTIONS:
                if d not in self.exits[room]:
                    continue
                if (room, d) not in self.seen_doors:
                    return f"go {first_step[room] or d}"
                nxt = self.exits[room][d]
                if nxt not in first_step:
                    first_step[nxt] = first_step[room] or d
                    frontier.append(nxt)
        return "look"  # everything explored: cannot happen, since the goal is always somewhere

    def random_action(self, rng):
        doors = list(self.exits[self.here])
        choices = [f"go {d}" for d in doors] + [f"take {i}" for i in self.items[self.here]] + ["look"]
        return rng.choice(choices)


class Guess(Env):
    """A hidden number from 1 to `high`; `GUESS n` is answered Higher, Lower or Correct."""
    name, max_steps = "guess", 10

    def __init__(self, high=100, max_steps=None):
        super().__init__(max_steps)
        self.high = high

    def _reset(self):
        self.number, self.low_bound, self.high_bound = self.rng.randint(1, self.high), 1, self.high
        return f"Guess my number from 1 to {self.high}."

    def _act(self, action):
        verb, _, rest = action.partition(" ")
        guess = parse_int(rest)
        if verb != "GUESS" or guess is None:
            return self.error("use GUESS N with an integer N.")
        if not 1 <= guess <= self.high:
            return self.error(f"the number is from 1 to {self.high}.")
        if guess == self.number:
            return "obs", "Correct.", SUCCESS_REWARD, True, True
        if guess < self.number:
            self.low_bound = max(self.low_bound, guess + 1)
            return "obs", "Higher.", 0.0, False, False
        self.high_bound = min(self.high_bound, guess - 1)
        return "obs", "Lower.", 0.0, False, False

    def teacher_action(self):
        return f"GUESS {(self.low_bound + self.high_bound) // 2}"

    def random_action(self, rng):
        return f"GUESS {rng.randint(1, self.high)}"


def made_up_name(rng):
    syllables = ["zor", "bi", "ka", "mu", "tel", "vo", "ri", "nax", "pel", "quo", "si", "dra", "fen", "lu"]
    return "".join(rng.choice(syllables) for _ in range(rng.randint(2, 3)))


class Lookup(Env):
    """Questions about made-up things whose facts live in a notebook tool and change every episode."""
    name, max_steps = "lookup", 6

    def __init__(self, tool="lookup", facts=4, max_steps=None):
        super().__init__(max_steps)
        self.tool, self.n_facts = tool, facts

    def _reset(self):
        names = set()
        while len(names) < self.n_facts:
            names.add(made_up_name(self.rng))
        self.notebook = {name: self.rng.randint(100, 999) for name in sorted(names)}
        self.subject = self.rng.choice(sorted(names))
        self.looked_up = set()
        return f"What is the code of {self.subject}? Tools: {self.tool}."

    def _act(self, action):
        verb, _, rest = action.partition(" ")
        if verb == "CALL":
            name, _, key = rest.partition(" ")
            if name != self.tool:
                return self.error(f"unknown tool '{name}'; the tool is {self.tool}.")
            key = key.strip()
            if key not in self.notebook:
                return "tool", f"no entry for '{key}'", 0.0, False, False
            self.looked_up.add(key)
            return "tool", f"{key}: {self.notebook[key]}", 0.0, False, False
        if verb == "ANSWER":
            given = parse_int(rest)
            if given is None:
                return self.error(f"ANSWER needs an integer, not '{rest}'.")
            if given == self.notebook[self.subject]:
                return "obs", "Correct.", SUCCESS_REWARD, True, True
            return "obs", f"Wrong, it was {self.notebook[self.subject]}.", 0.0, True, False
        return self.error(f"unknown action '{verb}'; use CALL {self.tool} NAME or ANSWER N.")

    def teacher_action(self):
        if self.subject not in self.looked_up:
            return f"CALL {self.tool} {self.subject}"
        return f"ANSWER {self.notebook[self.subject]}"

    def random_action(self, rng):
        if rng.random() < 0.5:
            return f"CALL {self.tool} {rng.choice(sorted(self.notebook))}"
        return f"ANSWER {rng.randint(100, 999)}"


TASKS = {"arith": Arith, "rooms": Rooms, "guess": Guess, "lookup": Lookup}


def make_env(name, **options):
    """The environment for a task name, built with its options (e.g. make_env('arith', tool='compute'))."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks are {', '.join(TASKS)}")
    try:
        return TASKS[name](**options)
    except TypeError as e:
        raise ValueError(f"bad options {options} for task {name!r}: {e}") from None


# ----------------------------------------------------------------------------- transcripts

def play_episode(env, act, seed):
    """One episode: act(transcript so far) -> action text, until done. Returns the episode dict.

    Besides the contract's keys it keeps `action_spans` (character ranges of each action line in the
    transcript, newline included: the tokens a policy is trained on) and `teacher_actions` (what the
    teacher would have done in each state the policy met: the labels of teacher help).
    """
    obs = env.reset(seed)
    transcript = f"task {env.name}\nobs {obs}\n"
    actions, spans, teacher_actions, total = [], [], [], 0.0
    done, info = False, {"success": False}
    while not done:
        teacher_actions.append(env.teacher_action())
        action = clean_action(act(transcript))
        start = len(transcript) + len(ACTION_PREFIX)
        transcript += f"{ACTION_PREFIX}{action}\n"
        spans.append((start, len(transcript)))
        obs, reward, done, info = env.step(action)
        transcript += f"{info['kind'] if info['kind'] == 'tool' else 'obs'} {obs}\n"
        if reward:
            transcript += f"reward {reward:+g}\n"
        actions.append(action)
        total += reward
    transcript += f"done {'success' if info['success'] else 'failure'}\n"
    return {"task": env.name, "seed": seed, "success": info["success"], "reward": total, "actions": actions,
            "transcript": transcript, "action_spans": spans, "teacher_actions": teacher_actions}


def teacher_act(env, noise=0.0, rng=None):
    """An act function for play_episode: the teacher, or with probability `noise` a random action."""
    def act(transcript):
        if noise and rng.random() < noise:
            return env.random_action(rng)
        return env.teacher_action()
    return act


# ----------------------------------------------------------------------------- the policy

class Policy:
    """A character-level GPT that writes one action line per turn (KV cache, stops at the newline)."""

    def __init__(self, model, tokenizer, device="cpu"):
        if tokenizer.name != "char":
            raise SystemExit(f"world policies use a character tokenizer, this checkpoint has {tokenizer.name!r}")
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.newline = tokenizer.stoi["\n"]

    @torch.no_grad()
    def act(self, transcript, temperature=0.0, seed=None):
        """The next action for a transcript that ends after an observation line."""
        was_training = self.model.training
        self.model.eval()
        prompt = self.tokenizer.encode(transcript + ACTION_PREFIX)
        # a long transcript keeps its end (generate_stream slides the window as the action grows), as in training
        idx = torch.tensor([prompt[-self.model.config.block_size:]], dtype=torch.long, device=self.device)
        ids = []
        for token in self.model.generate_stream(idx, MAX_ACTION_CHARS + 1, temperature=temperature,
                                                stop_token=self.newline, seed=seed):
            token = token.item()
            if token == self.newline:
                break
            if token < len(self.tokenizer.chars):  # EOT is no character of an action
                ids.append(token)
        self.model.train(was_training)
        return self.tokenizer.decode(ids)


def load_policy(path_or_run_dir, device="cpu"):
    """A Policy from a checkpoint file, or from a run folder (its policy.pt, else its ckpt.pt)."""
    path = path_or_run_dir
    if os.path.isdir(path):
        candidates = [os.path.join(path, name) for name in ("policy.pt", "ckpt.pt", "imitation/ckpt.pt")]
        path = next((p for p in candidates if os.path.exists(p)), candidates[0])
    state = load_checkpoint(path)
    if "tokenizer" not in state:
        raise SystemExit(f"{path} has no tokenizer: it was not trained by train.py or world.py")
    return Policy(load_model(state, device), tokenizer_from_meta(state["tokenizer"]), device)


# ----------------------------------------------------------------------------- learning from episodes

def action_batch(policy, items):
    """Inputs x and targets y (B, T): targets only on the items' action spans, -1 elsewhere.

    A text longer than the context keeps its end, where the latest actions are."""
    block = policy.model.config.block_size
    rows = []
    for item in items:
        ids = policy.tokenizer.encode(item["text"])  # one token per character: spans index tokens
        trained = [False] * len(ids)
        for start, end in item["spans"]:
            trained[start:end] = [True] * (end - start)
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
    x, y = action_batch(policy, items)
    _, nll = policy.model(x, y, reduction="none")  # (B, T), 0 where the target is -1
    per_item = nll.sum(1) / (y != -1).sum(1).clamp(min=1)
    loss = (torch.tensor(weights, dtype=per_item.dtype, device=per_item.device) * per_item).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


def episode_item(episode, number):
    """A replay item that trains every action of an episode."""
    return {"text": episode["transcript"], "spans": [list(s) for s in episode["action_spans"]],
            "task": episode["task"], "episode": number}


def teacher_items(episode, number):
    """Teacher help: at the first state where the policy's action differed from the teacher's, the
    teacher's action is shown after the same context (DAgger, Ross et al. 2011, first step only).

    Only the first: later states of a failed episode are far from what the policy will meet once it
    learns, and in a long episode their context no longer fits the window, so the teacher's choice
    looks arbitrary there (measured on rooms: labelling every step collapsed success to 0%)."""
    for (start, _), mine, right in zip(episode["action_spans"], episode["actions"], episode["teacher_actions"]):
        if mine != right:
            text = episode["transcript"][:start] + right + "\n"
            return [{"text": text, "spans": [[start, len(text)]], "task": episode["task"], "episode": number}]
    return []


class Replay:
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

def teacher_episodes(tasks, episodes_per_task, noise, seed):
    """Teacher episodes on training seeds; with noise > 0 some actions are random (noisy demonstrations)."""
    rng = random.Random(seed)
    episodes = []
    for name, options in tasks.items():
        env = make_env(name, **options)
        for _ in range(episodes_per_task):
            episodes.append(play_episode(env, teacher_act(env, noise, rng), rng.randrange(EVAL_SEED_BASE)))
    return episodes


def write_transcripts(path, episodes):
    """Episodes as a .jsonl corpus for prepare.py (one transcript per row), plus one row that holds
    the whole ALPHABET so the character vocabulary covers every character the world can show."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps({"text": ALPHABET}) + "\n")
        for episode in episodes:
            f.write(json.dumps({"text": episode["transcript"]}) + "\n")


def imitate(cfg):
    """A policy from teacher transcripts; returns its checkpoint path.

    Two stages: train.py learns the language of the world from every token of the transcripts (the
    observations too), then behaviour cloning trains on the action tokens alone, which is what makes
    the policy copy an expression into a tool call (measured: train.py alone, 800 steps, never copied)."""
    import prepare
    import train
    recipe_keys = ["tasks", "seed", "device", "imitation_episodes", "teacher_noise", "imitation_iters", "clone_iters",
                   "imitation_batch_size", "imitation_lr", "n_layer", "n_head", "n_embd", "block_size", "grad_clip"]
    recipe = {k: cfg[k] for k in recipe_keys}
    recipe_path = os.path.join(cfg["out_dir"], "imitation", "recipe.json")
    if os.path.exists(recipe_path):
        with open(recipe_path) as f:
            done = json.load(f)
        if done["recipe"] == json.loads(json.dumps(recipe)) and os.path.exists(done["checkpoint"]):
            try:
                load_model(load_checkpoint(done["checkpoint"]))
                print(f"reusing the imitation policy {done['checkpoint']} (same recipe); delete {recipe_path} to redo it")
                return done["checkpoint"]
            except RuntimeError as e:  # the model code changed since: its weights no longer fit
                print(f"cannot reuse {done['checkpoint']} ({str(e).splitlines()[0]}); imitating again")
    episodes = teacher_episodes(cfg["tasks"], cfg["imitation_episodes"], cfg["teacher_noise"], cfg["seed"])
    corpus = os.path.join(cfg["out_dir"], "teacher", "transcripts.jsonl")
    write_transcripts(corpus, episodes)
    rate = sum(e["success"] for e in episodes) / len(episodes)
    print(f"wrote {len(episodes)} teacher transcripts to {corpus} (noise {cfg['teacher_noise']}: {rate:.0%} succeed)")
    prepare.prepare(configure(prepare.DEFAULTS, []) | {
        "dataset": corpus, "name": "teacher", "tokenizer": "char", "data_dir": cfg["out_dir"], "force": True})
    run = configure(train.DEFAULTS, []) | {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "device", "seed")}
    run |= {"out_dir": os.path.join(cfg["out_dir"], "imitation"), "data_dir": cfg["out_dir"], "dataset": "teacher",
            "max_iters": cfg["imitation_iters"], "batch_size": cfg["imitation_batch_size"],
            "learning_rate": cfg["imitation_lr"], "min_lr": cfg["imitation_lr"] / 10, "warmup_iters": 50,
            "eval_interval": max(1, cfg["imitation_iters"] // 4), "eval_iters": 10, "log_interval": 25,
            "dropout": 0.0, "beta2": 0.99, "compile": False, "overwrite": True}  # the recipe changed: redo it
    train.train(run)
    path = os.path.join(run["out_dir"], "ckpt.pt")
    if cfg["clone_iters"]:
        state = load_checkpoint(path)
        policy = Policy(load_model(state, cfg["device"]), tokenizer_from_meta(state["tokenizer"]), cfg["device"])
        optimizer = torch.optim.AdamW(policy.model.parameters(), lr=cfg["imitation_lr"], betas=(0.9, 0.99),
                                      weight_decay=0.0)
        rng = random.Random(cfg["seed"])
        items = [episode_item(e, 0) for e in episodes]
        for step in tqdm(range(cfg["clone_iters"]), desc="cloning actions", disable=None):
            for group in optimizer.param_groups:  # cosine decay to a tenth
                group["lr"] = cfg["imitation_lr"] * (0.55 + 0.45 * math.cos(math.pi * step / cfg["clone_iters"]))
            update(policy, optimizer, [rng.choice(items) for _ in range(cfg["imitation_batch_size"])],
                   [1.0] * cfg["imitation_batch_size"], cfg["grad_clip"])
        path = os.path.join(cfg["out_dir"], "imitation", "cloned.pt")
        save_checkpoint(path, {**state, "model": policy.model.state_dict(), "optimizer": None,
                               "clone_iters": cfg["clone_iters"]})
    with open(recipe_path, "w") as f:
        json.dump({"recipe": recipe, "checkpoint": path}, f)
    return path


# ----------------------------------------------------------------------------- the learning loop

DEFAULTS = dict(
    out_dir="out/world",
    tasks={"arith": {}},       # task name -> make_env options: the tasks the run starts with
    changes=[],                # [(episode, task, options)]: the world changes a rule, or adds a task, mid-run
    init_from="imitate",       # imitate (teacher transcripts -> prepare.py -> train.py) | resume | a checkpoint path
    mode="expert_iteration",   # imitate (evaluate only) | expert_iteration | reinforce
    teacher_help=False,        # on a failed episode, the teacher's actions are shown and replayed
    seed=1337,
    device="cpu",
    # imitation: the policy's first weights
    imitation_episodes=1000,   # teacher transcripts per task
    teacher_noise=0.0,         # chance of a random action in a teacher transcript (noisy demonstrations)
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
MODES = ("imitate", "expert_iteration", "reinforce")


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


def evaluate(policy, tasks, n):
    """Greedy play on the held-out seeds of each task: {task: {success, reward}}."""
    result = {}
    for name, options in tasks.items():
        env = make_env(name, **options)
        episodes = [play_episode(env, policy.act, EVAL_SEED_BASE + i) for i in range(n)]
        result[name] = {"success": sum(e["success"] for e in episodes) / n,
                        "reward": sum(e["reward"] for e in episodes) / n}
    return result


def learn(policy, optimizer, episodes, replay, baselines, cfg, rng):
    """The gradient steps after a batch of episodes; returns the mean loss."""
    losses = []
    if cfg["mode"] == "reinforce":
        weights = []
        for e in episodes:
            weights.append(e["reward"] - baselines.get(e["task"], 0.0))
            baselines[e["task"]] = cfg["baseline_decay"] * baselines.get(e["task"], e["reward"]) + \
                (1 - cfg["baseline_decay"]) * e["reward"]
        items = [episode_item(e, 0) for e in episodes]
        extra = replay.sample(cfg["update_batch_size"], rng)
        losses.append(update(policy, optimizer, items + extra, weights + [1.0] * len(extra), cfg["grad_clip"]))
    else:
        for _ in range(cfg["updates_per_batch"]):
            items = replay.sample(cfg["update_batch_size"], rng)
            if items:
                losses.append(update(policy, optimizer, items, [1.0] * len(items), cfg["grad_clip"]))
    return sum(losses) / len(losses) if losses else float("nan")


def plot_world(out_dir, changes=()):
    """Success rate and reward per task over episodes (thick: held-out evals, thin: training) into world.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_rows(os.path.join(out_dir, "metrics.jsonl"))
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
    tmp = os.path.join(out_dir, "world.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, os.path.join(out_dir, "world.png"))


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


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_config(cfg):
    if cfg["mode"] not in MODES:
        raise SystemExit(f"mode must be one of {', '.join(MODES)}, got {cfg['mode']!r}")
    for name, options in task_options_at(float("inf"), cfg).items():
        try:
            make_env(name, **options)
        except ValueError as e:
            raise SystemExit(f"tasks/changes: {e}")


def run(cfg):
    """A whole run from a resolved config; returns the last held-out evaluation."""
    check_config(cfg)
    out_dir = cfg["out_dir"]
    policy_path, metrics_path = os.path.join(out_dir, "policy.pt"), os.path.join(out_dir, "metrics.jsonl")
    torch.manual_seed(cfg["seed"])
    rng = random.Random(cfg["seed"])
    replay = Replay(cfg["replay_size"], cfg["replay_recent_window"], cfg["replay_recent_fraction"])
    episode, baselines, state = 0, {}, None
    if cfg["init_from"] == "resume":
        state = load_checkpoint(policy_path)
        policy = Policy(load_model(state, cfg["device"]), tokenizer_from_meta(state["tokenizer"]), cfg["device"])
    else:
        path = imitate(cfg) if cfg["init_from"] == "imitate" else cfg["init_from"]
        policy = load_policy(path, cfg["device"])
        state = load_checkpoint(path)
    model_args, tokenizer_meta = state["model_args"], state["tokenizer"]
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=cfg["learning_rate"], betas=(0.9, 0.99),
                                  weight_decay=0.0)
    if cfg["init_from"] == "resume":
        optimizer.load_state_dict(state["optimizer"])
        episode, baselines = state["episode"], state["baselines"]
        replay.items = state["replay"]
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        truncate_jsonl(metrics_path, episode, key="episode")
    else:
        for stale in (metrics_path, policy_path):  # a fresh run starts a fresh log
            if os.path.exists(stale):
                os.remove(stale)
    del state
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)

    def log(row):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def save():
        save_checkpoint(policy_path, {"model_args": model_args, "model": policy.model.state_dict(),
                                      "optimizer": optimizer.state_dict(), "config": cfg, "episode": episode,
                                      "baselines": baselines, "replay": replay.items, "rng": rng.getstate(),
                                      "torch_rng": torch.get_rng_state(), "tokenizer": tokenizer_meta})

    def evaluate_and_save():
        result = evaluate(policy, task_options_at(episode, cfg), cfg["eval_episodes"])
        log({"episode": episode, "eval": result})
        tqdm.write(f"episode {episode}: held-out success " +
                   ", ".join(f"{t} {r['success']:.0%}" for t, r in result.items()))
        save()
        plot_world(out_dir, cfg["changes"])
        return result

    total = cfg["episodes"] if cfg["mode"] != "imitate" else 0
    result = None
    if not read_rows(metrics_path) or cfg["init_from"] != "resume":
        result = evaluate_and_save()
    bar = tqdm(total=total, initial=episode, unit="episode", dynamic_ncols=True, disable=None)
    with StopRequest(tqdm.write) as stop:
        while episode < total and not stop.requested:
            tasks = task_options_at(episode, cfg)
            envs = {name: make_env(name, **options) for name, options in tasks.items()}
            temperature = temperature_at(episode, cfg)
            batch, labels, t0 = [], 0, time.perf_counter()
            for _ in range(cfg["episodes_per_update"]):
                env = envs[rng.choice(sorted(envs))]
                act_seed = rng.randrange(2 ** 31)
                # each turn gets its own sampling seed, drawn from the run's rng: resumed runs replay exactly
                turn_seeds = random.Random(act_seed)
                e = play_episode(env, lambda t: policy.act(t, temperature, turn_seeds.randrange(2 ** 31)),
                                 rng.randrange(EVAL_SEED_BASE))
                batch.append(e)
                if e["success"]:
                    replay.add(episode_item(e, episode), rng)
                elif cfg["teacher_help"]:
                    for item in teacher_items(e, episode):
                        replay.add(item, rng)
                        labels += 1
                episode += 1
            loss = learn(policy, optimizer, batch, replay, baselines, cfg, rng)
            per_task = {}
            for name in sorted({e["task"] for e in batch}):
                mine = [e for e in batch if e["task"] == name]
                per_task[name] = {"success": sum(e["success"] for e in mine) / len(mine),
                                  "reward": sum(e["reward"] for e in mine) / len(mine)}
            log({"episode": episode, "train": per_task, "loss": loss, "temperature": temperature,
                 "teacher_labels": labels, "replay": len(replay.items), "seconds": time.perf_counter() - t0})
            bar.update(len(batch))
            bar.set_postfix(loss=f"{loss:.3f}", success=f"{sum(e['success'] for e in batch) / len(batch):.0%}")
            crossed = episode // cfg["eval_interval"] > (episode - len(batch)) // cfg["eval_interval"]
            if crossed or episode >= total or stop.requested:
                result = evaluate_and_save()
    bar.close()
    rows = read_rows(metrics_path)
    for when, name, options in cfg["changes"]:
        if when <= episode:
            print(f"change at episode {when} ({name} {options}): {recovery(rows, when, name)}")
    if stop.requested:
        print(f"stopped at episode {episode}; resume with --init_from=resume --out_dir={out_dir}")
    return result


if __name__ == "__main__":
    config = configure(DEFAULTS, sys.argv[1:])
    print_config(config)
    run(config)
