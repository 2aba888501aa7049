"""
The world's tasks: small text environments, each with a scripted teacher, and the one transcript
format every task shares. No torch here: world.py (learning) and swarm.py (many workers) both build on it.

A task is a class with a `name`, a `max_steps` and four methods (the contract play_episode relies on):

    reset(seed) -> observation             a seed fixes the episode; training seeds stay below EVAL_SEED_BASE
    step(action) -> (observation, reward, done, info)
                                           info: {"success": bool, "kind": "obs" | "tool" | "error", ...}
    teacher_action() -> action             what the scripted teacher (or a walkthrough) does in this state
    random_action(rng) -> action           a plausible random move (noisy demonstrations)

and optionally `admissible_actions() -> [action, ...]` where the task can list its legal moves (a
policy may then choose among them by likelihood instead of writing one). The scripted tasks below
subclass Env, which counts steps and cuts runaway episodes; a task built on an outside engine may
implement the contract directly. A task whose module needs an extra package is named in
OPTIONAL_TASKS and imported on first use, so this file stays light.

A transcript reads like this; a policy sees everything up to `act ` and writes the rest of the line:

    task arith
    obs Compute 37*45+12. Tools: calc.
    act CALL calc 37*45+12
    tool 1677
    act ANSWER 1677
    obs Correct.
    reward +1
    done success

Notes from others (swarm.py) sit between the first observation and the first action, one line each,
cut to MAX_NOTE_CHARS: `PEERS: ...` (the other workers' plans, one per ` | `), `HINT: ...` (a guide's
plan) and `HUMAN: ...` (a person's broadcast). A plan is its actions joined by ` ; `:

    obs Compute 37*45+12. Tools: calc.
    PEERS: CALL calc 37*45+12 ; ANSWER 1677 | ANSWER 1600
    HINT: CALL calc 37*45+12 ; ANSWER 1677
    act CALL calc 37*45+12
"""
import ast
import importlib
import itertools
import json
import operator
import os
import random
import re
import string

SUCCESS_REWARD = 1.0
BAD_ACTION_PENALTY = -0.1  # small: a malformed action costs a little, so trying things stays cheap
MAX_ACTION_CHARS = 96      # an action is one short line; anything longer is cut (TextWorld commands reach ~70)
ACTION_PREFIX = "act "
MAX_NOTE_CHARS = 240      # a note line (peers' plans, a hint, a human's message) is cut here: context is short
NOTE_KINDS = ("PEERS", "HINT", "HUMAN")
EVAL_SEED_BASE = 10 ** 9   # held-out seeds (world.py's evaluations, swarm.py's goals) are EVAL_SEED_BASE + i;
                           # training seeds stay below it
# every character a transcript can hold: the policy's character vocabulary is built from this
ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"


# ----------------------------------------------------------------------------- environments

class Env:
    """The base of the scripted tasks, which implement the contract above through it.

    A task subclass sets `name` and `max_steps` and writes `_reset`, `_act`, `teacher_action` and
    `random_action`. `_act` returns (kind, observation, reward, done, success) where kind is 'obs',
    'tool' or 'error'; this class counts steps, cuts runaway episodes and builds `info`.
    """
    name = ""
    max_steps = 10

    def __init__(self, max_steps=None):
        if max_steps is not None and not (type(max_steps) is int and max_steps >= 1):
            raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
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


def int_range(name, value, least):
    """A (low, high) pair of integers with least <= low <= high, or ValueError saying what to give."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(type(v) is int for v in value)
            and least <= value[0] <= value[1]):
        raise ValueError(f"{name} is a range (low, high) of integers with {least} <= low <= high, "
                         f"e.g. {name}=({least}, {least + 2}); got {value!r}")
    return tuple(value)


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
        self.tools, self.terms = [tool] if isinstance(tool, str) else list(tool), int_range("terms", terms, 1)

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
        self.n_rooms, self.box_chance = int_range("rooms", rooms, 2), box_chance
        if self.n_rooms[1] > len(ROOM_NAMES):
            raise ValueError(f"rooms: at most {len(ROOM_NAMES)} rooms have names; got {rooms!r}")

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
        if not (type(high) is int and high >= 1):
            raise ValueError(f"high must be an integer >= 1, got {high!r}")
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
# tasks that need a package the others do not: name -> (module, class), imported on first use
OPTIONAL_TASKS = {"textworld": ("textworld_env", "TextWorld")}


def task_class(name):
    """The class of a task name; an optional task's module is imported only when it is asked for."""
    if name in OPTIONAL_TASKS:
        module, cls = OPTIONAL_TASKS[name]
        try:
            return getattr(importlib.import_module(module), cls)
        except ImportError as e:
            raise ValueError(f"task {name!r} cannot load ({e}); pip install -r requirements.txt") from None
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks are {', '.join([*TASKS, *OPTIONAL_TASKS])}, or "
                         f"gym:<env id> for a Gymnasium text environment")
    return TASKS[name]


def make_env(name, **options):
    """The environment for a task name, built with its options (e.g. make_env('arith', tool='compute')).
    gym:<env id> is a Gymnasium text environment (gym_envs.py), e.g. gym:ulm/arith-v0."""
    if name.startswith("gym:"):
        try:
            from gym_envs import GymTask  # Gymnasium is optional: imported for a gym: task only
        except ImportError as e:
            raise ValueError(f"task {name!r} needs Gymnasium ({e}); pip install -r requirements-extras.txt") from None
        return GymTask(name, **options)
    cls = task_class(name)
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"bad options {options} for task {name!r}: {e}") from None


# ----------------------------------------------------------------------------- transcripts

def play_episode(env, act, seed, notes=()):
    """One episode: act(transcript so far) -> action text, until done. Returns the episode dict.

    Besides the contract's keys it keeps `action_spans` (character ranges of each action line in the
    transcript, newline included: the tokens a policy is trained on) and `teacher_actions` (what the
    teacher would have done in each state the policy met: the labels of teacher help). A task that lists
    its commands adds `choices`: the list in each state the policy met (what act=choose picked from).
    `notes` are lines from others (note_line) shown after the first observation.
    """
    obs = env.reset(seed)
    transcript = f"task {env.name}\nobs {obs}\n" + "".join(f"{line}\n" for line in notes)
    actions, spans, teacher_actions, choices, total = [], [], [], [], 0.0
    done, info = False, {"success": False}
    lists = hasattr(env, "admissible_actions")
    while not done:
        teacher_actions.append(env.teacher_action())
        if lists:
            choices.append(env.admissible_actions())
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
    episode = {"task": env.name, "seed": seed, "success": info["success"], "reward": total, "actions": actions,
               "transcript": transcript, "action_spans": spans, "teacher_actions": teacher_actions}
    return episode | ({"choices": choices} if lists else {})


def plan_text(actions):
    """A plan as one line of text: actions joined by ' ; ' (a worker's message, a guide's hint)."""
    return " ; ".join(clean_action(a) for a in actions)


def note_line(kind, texts):
    """A note for the transcript: 'KIND: text | text', newlines removed and cut to MAX_NOTE_CHARS."""
    assert kind in NOTE_KINDS, kind
    body = " | ".join(" ".join(str(t).split()) for t in texts)
    return f"{kind}: {body}"[:MAX_NOTE_CHARS]


def teacher_act(env, noise=0.0, rng=None):
    """An act function for play_episode: the teacher, or with probability `noise` a random action."""
    def act(transcript):
        if noise and rng.random() < noise:
            return env.random_action(rng)
        return env.teacher_action()
    return act


def turn_by_turn(act_at):
    """An act function for play_episode from act_at(transcript, turn), turn = 0, 1, ...: for acting
    that depends on the turn (a fixed list of actions, a sampling seed of its own for each turn)."""
    turns = itertools.count()
    return lambda transcript: act_at(transcript, next(turns))


def play_actions(env, actions, seed, notes=()):
    """The episode a fixed list of actions makes: a missing action is empty (an invalid move that costs
    a step), extra ones are never used. The world's own verdict on a proposed solution."""
    return play_episode(env, turn_by_turn(lambda _, turn: actions[turn] if turn < len(actions) else ""), seed, notes)


# ----------------------------------------------------------------------------- teacher transcripts (imitation data)

def teacher_episodes(tasks, episodes_per_task, noise, seed, notes=0.0):
    """Teacher episodes on training seeds; with noise > 0 some actions are random (noisy demonstrations).
    With notes > 0, that share of episodes shows a PEERS line and (independently) a HINT line, so a
    policy learns to read them: 2-3 peer plans and a hint, each the teacher's plan or a noisy one."""
    rng = random.Random(seed)
    episodes = []
    for name, options in tasks.items():
        env = make_env(name, **options)
        for _ in range(episodes_per_task):
            episode_seed = rng.randrange(EVAL_SEED_BASE)
            lines = sample_notes(env, episode_seed, notes, rng) if notes else []
            episodes.append(play_episode(env, teacher_act(env, noise, rng), episode_seed, lines))
    return episodes


def sample_notes(env, seed, share, rng):
    """Notes for one imitation episode: right plans (the teacher's) and wrong ones (half random actions)."""
    def plan(right):
        return plan_text(play_episode(env, teacher_act(env, 0.0 if right else 0.5, rng), seed)["actions"])
    lines = []
    if rng.random() < share:
        lines.append(note_line("PEERS", [plan(rng.random() < 0.5) for _ in range(rng.randint(2, 3))]))
    if rng.random() < share:
        lines.append(note_line("HINT", [plan(rng.random() < 0.7)]))
    return lines


def write_transcripts(path, episodes):
    """Episodes as a .jsonl corpus for prepare.py (one transcript per row), plus one row that holds
    the whole ALPHABET so the character vocabulary covers every character the world can show."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.tmp", "w") as f:  # renamed when whole: a killed run never leaves half a corpus
        f.write(json.dumps({"text": ALPHABET}) + "\n")
        for episode in episodes:
            f.write(json.dumps({"text": episode["transcript"]}) + "\n")
    os.replace(f"{path}.tmp", path)

