"""
A swarm of µLM workers: N worker subprocesses work on one goal at a time, may read each other's
proposals and revise, and an aggregator (or a human) decides.

    python swarm.py config/swarm_arith.py --workers=8 --aggregators="['verifier','majority']"
    python swarm.py config/swarm_arith.py --human              # accept / edit / reject / stop each goal
    python swarm.py config/swarm_arith.py --device=cuda        # workers on the GPU (cuda:0,1 spreads them)
    python swarm.py config/swarm_arith.py --learning=each --teacher_help=True   # workers learn from every goal
    python swarm.py config/swarm_arith.py --learning=each --resume=True         # continue from the last checkpoint

A goal is one episode of a world task (tasks.py) on a held-out seed: {"task": "arith", "seed": 1000000007}. Each worker plays
the episode with its own policy checkpoint, seed and temperature and proposes its actions. Optional
debate rounds send every worker the others' proposals; it keeps its own or adopts the one its model
finds most likely (debate="adopt"), or plays again with the others' plans in its context as a `PEERS:`
line (debate="text"; tasks.py's transcript format). A guide (a larger checkpoint) may play first and
give every worker its plan as a `HINT:` line (hint=True), and end the round with its own plan when it
is confident (guide_stop). Every proposal is then replayed in a fresh environment (the world's reward is the
verifier), a guide model (a larger checkpoint, run as one more subprocess) may score them by
likelihood, and each aggregator in `aggregators` picks one: the first one decides, the others are
scored on the same proposals so one run compares them all. Everything lands in out_dir: swarm.jsonl
(every message, proposal, score and decision with timestamps, flushed as written), summary.json and
worker_<i>.log (each worker's stderr).

Learning (learning="each" or "learner"): after every `learn_every` goals the coordinator shares the
verified outcome, the successful proposals (or, with teacher_help, every failed proposal, which the
worker labels with the teacher's action where it first went wrong), and the processes that learn
update their weights with world.py's expert-iteration code (replay buffer, gradient steps). With
"each" every worker learns from it on its own; with "learner" one more process learns and every
`broadcast_every` goals the workers load its weights. Learning processes save a checkpoint under
out_dir/checkpoints/ every `save_every` goals and at the end; --resume=True continues the run from the
last one. A learner that dies (twice) leaves the workers with its last weights; the run goes on and
says so.

Workers anywhere: `worker_command` is a template ({python}, {swarm}) of the command that starts one
worker, e.g. "ssh gpu1 {python} {swarm} --worker" or "srun -n1 {python} {swarm} --worker"; the protocol
runs over that command's stdin/stdout, so anything that carries them works (weights travel as file
paths: learning across machines needs a shared out_dir).

Reliability: a worker that crashes, misses the reply timeout or prints a line that is not protocol is
logged, killed, restarted once, then dropped; the goal completes with the others. Workers run in their
own sessions (process groups) and are killed on exit, Ctrl-C, SIGTERM or error, so none outlives the
coordinator. A worker also watches for its coordinator's death, even inside a hung model call: on
Linux the kernel kills it when its parent dies (PR_SET_PDEATHSIG), and anywhere, the end of its input
with a new parent process makes it exit at once.

Protocol (version 2): one JSON object per line over the worker's stdin/stdout; every object has a
"type". stderr is free text (logs, tracebacks). The coordinator speaks first:

    -> {"type": "hello", "protocol": 2, "worker": 0, "checkpoint": "out/p/ckpt.pt", "seed": 0,
        "temperature": 1.0, "device": "cpu", "threads": 1, "learning": null or {...}, "resume": false}
    <- {"type": "ready", "protocol": 2, "worker": 0, "pid": 4242}       (or {"type": "error", ...})
    -> {"type": "goal", "round": 7, "goal": {"task": "arith", "seed": 100007}, "notes": ["HINT: ..."]}
    <- {"type": "proposal", "round": 7, "answer": "ANSWER 1665", "actions": ["CALL calc 37*45", ...],
        "confidence": 0.93}                                              (confidence: asked of the guide)
    -> {"type": "message", "round": 8, "goal": {...}, "proposals": [{"worker": 1, "answer": ..., "actions": [...]}, ...]}
    <- {"type": "proposal", "round": 8, "answer": ..., "actions": [...], "adopted_from": 1}
    -> {"type": "score", "round": 9, "goal": {...}, "proposals": [{"actions": [...]}, ...]}
    <- {"type": "scores", "round": 9, "scores": [-0.31, -1.2, ...]}     (mean log-prob per action token)
    -> {"type": "learn", "round": 10, "experience": [{"goal": {...}, "actions": [...], "notes": [...],
        "teacher": false}, ...]}
    <- {"type": "learned", "round": 10, "items": 3, "loss": 0.41}
    -> {"type": "save", "round": 11, "path": "out/swarm/checkpoints/worker_0.pt"}
    <- {"type": "saved", "round": 11, "path": ...}
    -> {"type": "weights", "round": 12, "path": "out/swarm/checkpoints/learner.pt"}
    <- {"type": "loaded", "round": 12, "path": ...}
    -> {"type": "stop"}                                                  (the worker exits 0)

A reply must carry the round of its request; anything else (not JSON, no such type, wrong round) is
garbage and counts as a failure of that worker. A worker answers a line it cannot read with
{"type": "error", "message": ...} and keeps serving.
"""
import atexit
import json
import os
import queue
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

from tqdm import tqdm

import tasks
from configurator import ConfigError, configure, print_config
from runtime import append_jsonl, claim_out_dir, read_jsonl

# torch (through world.py's Policy) is imported by the model-backed worker only: the coordinator and the
# fake test workers start without it

PROTOCOL = 2
FAKE_MODES = ("echo", "teacher", "crash", "hang", "garbage", "flood", "crashlearn")  # "fake:MODE" checkpoints, for tests
LEARNING = ("none", "each", "learner")
DEBATES = ("adopt", "text")
MAX_REPLY_CHARS = 1 << 16  # a reply line longer than this is not a proposal: the worker is misbehaving
MAX_ACTIONS = 64           # actions kept from one proposal (every task ends far sooner)

DEFAULTS = dict(
    out_dir="out/swarm",
    overwrite=False,              # a run into an out_dir that holds one moves the old run aside (else it refuses)
    task="arith",                 # a tasks.py task name; each goal is one episode of it
    task_options={},              # passed to tasks.make_env, e.g. {"tool": ""} for arithmetic from memory
    num_goals=50,                 # goal i is the held-out episode tasks.EVAL_SEED_BASE + i (world.py evaluates on them too)
    workers=8,
    checkpoints=["out/policy_arith/ckpt.pt"],  # cycled over the workers; "fake:echo" etc. in tests
    temperatures=[1.0],           # cycled over the workers
    seed=0,                       # worker i samples with seed + i
    aggregators=["majority", "verifier"],  # majority | verifier | guide; the first decides
    guide="",                     # the guide's checkpoint (a larger model); needed by the guide aggregator
    debate_rounds=0,              # message rounds: each worker sees the others' proposals and may revise
    debate="adopt",               # adopt: keep one's own or adopt the peer proposal one's model finds likeliest |
                                  # text: play again with the others' plans in context (a PEERS: line)
    hint=False,                   # the guide plays first; its plan is a HINT: line in every worker's context
    guide_stop=0.0,               # > 0: a guide plan whose mean per-token probability reaches this ends the round
    # learning: the verified outcome of every goal is shared, and the swarm learns from it
    learning="none",              # none | each (every worker learns on its own) | learner (one process learns,
                                  # the workers load its weights every broadcast_every goals)
    learner="",                   # the learner's starting checkpoint (default: the first of checkpoints)
    guide_learns=False,           # the guide learns from the shared outcomes too (needs learning != none)
    teacher_help=False,           # a goal nobody solved is learnt from the teacher's action where each proposal went wrong
    learn_every=1,                # goals per batch of shared experience
    broadcast_every=4,            # goals between the learner's weight broadcasts
    save_every=25,                # goals between checkpoints of the learning processes (and at the end)
    resume=False,                 # continue the run in out_dir from its last checkpoint
    learning_rate=3e-4,           # world.py's expert iteration, per learning process:
    updates_per_batch=2,          # gradient steps after each batch of experience
    update_batch_size=16,         # replay items per gradient step
    grad_clip=1.0,
    replay_size=4000,
    replay_recent_window=256,
    replay_recent_fraction=0.5,
    worker_command="",            # how to start a worker: a template with {python} and {swarm}, e.g.
                                  # "ssh host {python} {swarm} --worker"; empty: a local subprocess
    human=False,                  # pause after each goal: accept / edit / reject / stop, set the next goal,
                                  # broadcast a message, pause / resume, from the terminal
    device="cpu",                 # cpu | cuda (GPU 0) | cuda:0,1 (workers spread over these GPUs)
    threads=1,                    # torch threads per worker: micro models gain nothing from more, and on a
                                  # busy 2-core CPU one worker with 2 threads ran 30x slower than with 1
    reply_timeout=60.0,           # seconds a worker may take for one reply before it counts as hung
    start_timeout=120.0,          # seconds for a worker to load its checkpoint and answer the hello
)


# ----------------------------------------------------------------------------- aggregators
# Each takes the proposals of one goal (dicts with "answer", and "reward" / "guide_score" once
# computed) and returns the index of the chosen one, or None when it cannot choose.

def majority_vote(proposals):
    """Self-consistency (Wang et al. 2023): the most common final answer; ties go to the earliest."""
    if not proposals:
        return None
    counts = Counter(p["answer"].strip() for p in proposals)
    best = max(counts.values())
    return next(i for i, p in enumerate(proposals) if counts[p["answer"].strip()] == best)


def best_of_n_verifier(proposals):
    """Best-of-N by the verifier: the highest world reward (replayed by the coordinator, not claimed)."""
    scored = [i for i, p in enumerate(proposals) if p.get("reward") is not None]
    return max(scored, key=lambda i: proposals[i]["reward"]) if scored else None


def guide_choice(proposals):
    """The proposal the guide model finds most likely (mean log-prob per action token)."""
    scored = [i for i, p in enumerate(proposals) if p.get("guide_score") is not None]
    return max(scored, key=lambda i: proposals[i]["guide_score"]) if scored else None


AGGREGATORS = {"majority": majority_vote, "verifier": best_of_n_verifier, "guide": guide_choice}


# ----------------------------------------------------------------------------- world glue

def goal_env(goal):
    return tasks.make_env(goal["task"], **goal.get("options", {}))


def play_proposal(goal, actions, notes=()):
    """The episode a proposal's actions make in a fresh environment: the world's reward is the verifier."""
    return tasks.play_actions(goal_env(goal), actions, goal["seed"], notes)


def goals_for(cfg):
    return [{"task": cfg["task"], "options": cfg["task_options"], "seed": tasks.EVAL_SEED_BASE + i}
            for i in range(cfg["num_goals"])]


# ----------------------------------------------------------------------------- the worker process

def send(stream, message):
    stream.write(json.dumps(message) + "\n")
    stream.flush()


class ModelAgent:
    """A worker backed by a world policy checkpoint: plays episodes, scores and revises proposals, and
    learns from shared experience with world.py's expert-iteration code when the hello asks it to."""

    def __init__(self, hello):
        import torch

        import world
        from runtime import resolve_device
        self.torch, self.world = torch, world
        torch.set_num_threads(hello["threads"])  # N workers share the cores instead of each taking all
        self.device = resolve_device(hello["device"])
        self.seed, self.temperature = hello["seed"], hello["temperature"]
        path = world.policy_file(hello["checkpoint"])
        state = world.load_policy_checkpoint(path)
        self.policy = world.policy_from_checkpoint(state, str(self.device), path)
        self.learning = hello.get("learning")
        if self.learning:
            self.optimizer = world.make_optimizer(self.policy, self.learning["learning_rate"])
            if hello.get("resume"):  # a checkpoint this worker saved: its optimizer, replay buffer and rng go on
                self.progress = world.resume_progress(state, self.optimizer, self.learning)
            else:
                self.progress = world.Progress(0, {}, world.ReplayBuffer(
                    self.learning["replay_size"], self.learning["replay_recent_window"],
                    self.learning["replay_recent_fraction"]), random.Random(self.learning["seed"]))

    def propose(self, goal, notes=(), confidence=False):
        # a distinct, reproducible sampling seed per (worker, goal, turn)
        act = self.policy.actor(self.temperature, self.seed * 1_000_003 + goal["seed"])
        episode = tasks.play_episode(goal_env(goal), act, goal["seed"], notes)
        proposal = {"answer": episode["actions"][-1] if episode["actions"] else "", "actions": episode["actions"]}
        if confidence:  # the mean per-token probability of its own plan: how sure the guide is
            proposal["confidence"] = float(self.torch.tensor(self.score(goal, [proposal], notes)[0]).exp())
        return proposal

    def score(self, goal, proposals, notes=()):
        """Each proposal's mean log-prob per action token, each action given the transcript before it
        (as the policy saw it when it acted)."""
        scores = []
        for p in proposals:
            episode = play_proposal(goal, p["actions"], notes)
            items = [{"text": episode["transcript"][:end], "spans": [[start, end]]}
                     for start, end in episode["action_spans"]]
            try:
                with self.torch.no_grad():
                    log_likelihood, count = self.policy.action_log_likelihood(items)
            except ValueError:  # a character this model cannot write: it would never propose this
                scores.append(float("-inf"))
                continue
            scores.append(float(log_likelihood.sum() / count.sum()) if count.sum() else float("-inf"))
        return scores

    def revise(self, goal, own, proposals):
        """Keep the own proposal or adopt the peer's that this model finds most likely."""
        candidates = [own] + proposals
        scores = self.score(goal, candidates)
        best = max(range(len(candidates)), key=lambda i: scores[i])
        chosen = dict(candidates[best])
        chosen["adopted_from"] = candidates[best].get("worker")
        return chosen

    def learn(self, experience):
        """Expert iteration on shared experience (world.py's replay buffer and update): a success is
        imitated whole; a failure marked teacher gets the teacher's action where it first went wrong."""
        if not self.learning:
            raise SystemExit("this worker was started without learning; it cannot learn")
        world, seen = self.world, set()
        for e in experience:
            episode = play_proposal(e["goal"], e["actions"], e.get("notes", ()))
            new = world.teacher_items(episode, self.progress.episode) if e.get("teacher") else \
                [world.episode_item(episode, self.progress.episode)] if episode["success"] else []
            for item in new:
                # failed plans that went wrong at the same state get the same teacher label: learn it once
                # (measured: 4 copies of each label per goal drove arith from 62% to 37% in 40 goals)
                key = (item["text"], str(item["spans"]))
                if key not in seen:
                    seen.add(key)
                    self.progress.replay.add(item, self.progress.rng)
            self.progress.episode += 1
        items = len(seen)
        loss = world.learn(self.policy, self.optimizer, [], self.progress, self.learning)
        return {"items": items, "loss": None if loss != loss else loss}  # NaN (nothing to learn yet) is not JSON

    def save(self, path):
        if self.learning:
            self.world.save_policy(path, self.policy, self.optimizer, self.learning, self.progress)
        return {"path": path}

    def load_weights(self, path):
        state = self.world.load_policy_checkpoint(path)
        self.policy.model.load_state_dict(state["model"])
        return {"path": path}


class FakeAgent:
    """Test stand-ins: echo proposes a fixed answer, teacher the world's teacher actions; crash, hang
    and garbage misbehave on their first goal, flood answers it with a line over the cap, crashlearn
    dies in its first weight update. They learn by counting: their "weights" are a JSON file."""

    def __init__(self, hello, out):
        self.mode, self.out = hello["checkpoint"].removeprefix("fake:"), out
        if self.mode not in FAKE_MODES:
            raise SystemExit(f"unknown fake worker {hello['checkpoint']!r}; known: {', '.join(FAKE_MODES)}")
        self.learned = 0

    def propose(self, goal, notes=(), confidence=False):
        if self.mode == "crash":
            os._exit(3)
        if self.mode == "hang":
            while True:
                time.sleep(60)
        if self.mode == "garbage":
            self.out.write("Traceback? no: this line is not JSON\n")
            self.out.flush()
            return {"answer": "too late", "actions": []}
        if self.mode == "flood":
            return {"answer": "x", "actions": ["x" * MAX_REPLY_CHARS]}
        if self.mode == "teacher":
            env = goal_env(goal)
            episode = tasks.play_episode(env, tasks.teacher_act(env), goal["seed"])
            proposal = {"answer": episode["actions"][-1], "actions": episode["actions"]}
        else:
            proposal = {"answer": "ECHO", "actions": ["ECHO"]}
        return dict(proposal, confidence=1.0) if confidence else proposal

    def score(self, goal, proposals):
        return [float(p["answer"] == "ECHO") for p in proposals]

    def revise(self, goal, own, proposals):
        return dict(own, adopted_from=None)

    def learn(self, experience):
        if self.mode == "crashlearn":
            os._exit(4)
        self.learned += len(experience)
        return {"items": len(experience), "loss": 0.0}

    def save(self, path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(f"{path}.tmp", "w") as f:
            json.dump({"learned": self.learned}, f)
        os.replace(f"{path}.tmp", path)
        return {"path": path}

    def load_weights(self, path):
        with open(path) as f:
            self.learned = json.load(f)["learned"]
        return {"path": path}


# what each message to a worker must carry besides its type
MESSAGE_FIELDS = {"hello": ("protocol", "worker", "checkpoint", "seed", "temperature", "device", "threads"),
                  "goal": ("goal",), "message": ("goal", "own", "proposals"), "score": ("goal", "proposals"),
                  "learn": ("experience",), "save": ("path",), "weights": ("path",), "stop": ()}
REPLY_TYPES = {"goal": "proposal", "message": "proposal", "score": "scores", "learn": "learned", "save": "saved",
               "weights": "loaded"}


def read_message(line, expect=None):
    """The message on one line of a worker's input, or a string saying why it is not one."""
    try:
        msg = json.loads(line)
    except json.JSONDecodeError:
        return f"not a JSON line: {line[:80]!r}"
    kinds = [expect] if expect else [k for k in MESSAGE_FIELDS if k != "hello"]
    if not isinstance(msg, dict) or msg.get("type") not in kinds:
        return f"expected a message of type {' or '.join(kinds)}, got {line[:80]!r}"
    missing = [k for k in MESSAGE_FIELDS[msg["type"]] if k not in msg]
    if missing:
        return f"a {msg['type']} message needs {', '.join(missing)}; got {line[:80]!r}"
    goals = [msg["goal"]] if "goal" in msg else [e.get("goal") if isinstance(e, dict) else e
                                                  for e in msg.get("experience", [])]
    for goal in goals:
        problem = goal_problem(goal)
        if problem:
            return problem
    return msg


def goal_problem(goal):
    """Why a goal cannot be played, or None."""
    if not isinstance(goal, dict) or not isinstance(goal.get("seed"), int):
        return f"a goal is {{\"task\": NAME, \"seed\": INT, \"options\": {{...}}}}, got {goal!r}"
    try:
        goal_env(goal)
    except (ValueError, TypeError) as e:
        return f"goal {goal!r}: {e}"
    return None


def die_with_parent():
    """Linux: the kernel kills this process when its parent dies (PR_SET_PDEATHSIG), even inside a hung
    call. Strictly, when the parent's thread that started it ends: the coordinator starts workers from
    the thread that runs the whole swarm."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def read_lines(stream, lines, parent):
    """Feed the worker's input into the queue `lines`, then None at its end. At the end, a new parent
    process means the coordinator is gone: exit at once, whatever the main thread is stuck in."""
    for line in stream:
        lines.put(line)
    lines.put(None)
    while True:  # a daemon thread: it ends with the process when the main thread finishes normally
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(0.2)


def worker_main(stdin=sys.stdin, stdout=sys.stdout):
    """Serve the protocol until stop, or until the end of input once every request is answered."""
    parent = os.getppid()
    die_with_parent()
    hello = read_message(stdin.readline() or "null", expect="hello")
    if isinstance(hello, str) or hello["protocol"] != PROTOCOL:
        problem = hello if isinstance(hello, str) else f"speaks protocol {hello['protocol']}"
        print(f"worker: expected a protocol {PROTOCOL} hello: {problem}", file=sys.stderr)
        send(stdout, {"type": "error", "message": f"expected a protocol {PROTOCOL} hello: {problem}"})
        return 2
    try:
        agent = FakeAgent(hello, stdout) if str(hello["checkpoint"]).startswith("fake:") else ModelAgent(hello)
    except SystemExit as e:  # a checkpoint that cannot be a policy: the coordinator logs why
        print(f"worker {hello['worker']}: {e}", file=sys.stderr)
        send(stdout, {"type": "error", "message": str(e)})
        return 2
    send(stdout, {"type": "ready", "protocol": PROTOCOL, "worker": hello["worker"], "pid": os.getpid()})
    lines = queue.Queue()
    threading.Thread(target=read_lines, args=(stdin, lines, parent), daemon=True).start()
    for line in iter(lines.get, None):
        msg = read_message(line)
        if isinstance(msg, str):
            print(f"worker {hello['worker']}: {msg}", file=sys.stderr)
            send(stdout, {"type": "error", "message": msg})
            continue
        kind, rnd = msg["type"], msg.get("round")
        if kind == "stop":
            return 0
        if kind == "goal":
            reply = agent.propose(msg["goal"], [str(n) for n in msg.get("notes", [])], bool(msg.get("confidence")))
        elif kind == "message":
            reply = agent.revise(msg["goal"], msg["own"], msg["proposals"])
        elif kind == "score":
            reply = {"scores": agent.score(msg["goal"], msg["proposals"])}
        elif kind == "learn":
            reply = agent.learn(msg["experience"])
        elif kind == "save":
            reply = agent.save(msg["path"])
        else:
            reply = agent.load_weights(msg["path"])
        send(stdout, {"type": REPLY_TYPES[kind], "round": rnd, **reply})
    return 0


# ----------------------------------------------------------------------------- the coordinator

class EventLog:
    """swarm.jsonl: one timestamped JSON event per line, flushed as written, so a crash loses nothing."""

    def __init__(self, path):
        self.path = path

    def log(self, event, **fields):
        append_jsonl(self.path, {"time": round(time.time(), 3), "event": event, **fields})


class Worker:
    """One slot of the swarm: what it runs, its current process, and how often it failed."""

    def __init__(self, index, checkpoint, seed, temperature, device, threads, role="worker", learning=None):
        self.index, self.role = index, role
        self.hello = {"type": "hello", "protocol": PROTOCOL, "worker": index, "checkpoint": checkpoint,
                      "seed": seed, "temperature": temperature, "device": device, "threads": threads,
                      "learning": learning, "resume": False}
        self.proc, self.generation, self.failures, self.dropped = None, 0, 0, False
        self.start_error = None

    @property
    def name(self):
        return f"{self.role} {self.index}"


class Pool:
    """Starts worker processes, talks to them, and restarts or drops the ones that fail."""

    def __init__(self, workers, out_dir, log, reply_timeout, start_timeout, command=""):
        self.workers, self.out_dir, self.log = workers, out_dir, log
        self.reply_timeout, self.start_timeout = reply_timeout, start_timeout
        self.command = command_argv(command)
        self.replies = queue.Queue()  # (worker index, generation, line or None at end of output)
        self.round = 0

    def alive(self, role="worker"):
        return [w for w in self.workers if w.role == role and not w.dropped]

    def spawn(self, w):
        w.generation += 1
        env = dict(os.environ)
        device = w.hello["device"]
        if device.startswith("cuda:"):
            # the worker sees only its GPU, as cuda:0
            env["CUDA_VISIBLE_DEVICES"] = device.removeprefix("cuda:")
        hello = dict(w.hello, device="cuda" if device.startswith("cuda") else device)
        stderr = open(os.path.join(self.out_dir, f"{w.role}_{w.index}.log"), "a")
        # its own session: Ctrl-C in the terminal reaches only us, and killpg takes the whole group
        try:
            w.proc, w.start_error = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                     stderr=stderr, text=True, bufsize=1, env=env,
                                                     start_new_session=True, cwd=os.getcwd()), None
        except OSError as e:  # the command does not exist or cannot run: a failure like a crash at start
            w.proc, w.start_error = None, f"could not run {' '.join(self.command)!r}: {e.strerror or e}"
            self.log("start_failed", worker=w.index, role=w.role, reason=w.start_error)
            self.replies.put((w.index, w.generation, None))
            return
        finally:
            stderr.close()
        threading.Thread(target=self._read, args=(w.index, w.generation, w.proc.stdout), daemon=True).start()
        self.log("start", worker=w.index, role=w.role, pid=w.proc.pid, generation=w.generation, hello=hello)
        self._write(w, hello)

    def _read(self, index, generation, stream):
        for line in stream:
            self.replies.put((index, generation, line))
        self.replies.put((index, generation, None))

    def _write(self, w, message):
        try:
            w.proc.stdin.write(json.dumps(message) + "\n")
            w.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # a dead worker: its end of output reports the failure

    def start_all(self):
        for w in self.workers:
            self.spawn(w)
        self.collect(self.workers, "ready", None, self.start_timeout)

    def ask(self, requests, expect):
        """Send each worker its message; {worker index: reply} from those that answered in time."""
        self.round += 1
        for w, message in requests:
            self.log("send", worker=w.index, role=w.role, message=dict(message, round=self.round))
            self._write(w, dict(message, round=self.round))
        return self.collect([w for w, _ in requests], expect, self.round, self.reply_timeout)

    def collect(self, workers, expect, rnd, timeout):
        """Wait for one reply from each worker; failures are handled once all others have answered."""
        waiting = {w.index: w for w in workers}
        replies, failed, deadline = {}, [], time.monotonic() + timeout
        while waiting:
            try:
                index, generation, line = self.replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                failed += [(w, f"no {expect} within {timeout:g} s (hung?)") for w in waiting.values()]
                break
            w = waiting.get(index)
            if w is None or generation != w.generation:
                continue  # the rest of a process we already gave up on
            del waiting[index]
            if line is None:
                failed.append((w, w.start_error or f"exited with code {w.proc.wait()} (crash?)"))
                continue
            reply = parse_reply(line, expect, rnd)
            if isinstance(reply, str):
                failed.append((w, reply))
                continue
            self.log("receive", worker=index, role=w.role, message=reply)
            replies[index] = reply
        for w, reason in failed:
            self.fail(w, reason)
        return replies

    def fail(self, w, reason):
        """Log the failure, kill the process; restart it the first time, drop the worker the second."""
        w.failures += 1
        kill(w.proc)
        if w.failures == 1:
            self.log("restart", worker=w.index, role=w.role, reason=reason)
            tqdm.write(f"{w.name} failed ({reason}); restarting it once (see {self.out_dir}/{w.role}_{w.index}.log)")
            self.spawn(w)
            self.collect([w], "ready", None, self.start_timeout)
        else:
            w.dropped = True
            self.log("drop", worker=w.index, role=w.role, reason=reason)
            tqdm.write(f"{w.name} failed again ({reason}); dropped (its log: {self.out_dir}/{w.role}_{w.index}.log)")

    def close(self):
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                self._write(w, {"type": "stop"})
        for w in self.workers:
            if w.proc is not None:
                kill(w.proc, grace=1.0)


def command_argv(template):
    """The argv that starts one worker: worker_command with {python} and {swarm} filled in, or a local subprocess."""
    here = os.path.abspath(__file__)
    if not template:
        return [sys.executable, here, "--worker"]
    try:
        argv = shlex.split(template.format(python=sys.executable, swarm=here))
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"worker_command {template!r} cannot be filled in ({e!r}): it may use {{python}} and "
                          f"{{swarm}} (write {{{{ and }}}} for literal braces), with shell-style quoting")
    if not argv:
        raise ConfigError("worker_command is blank; leave it empty for a local subprocess")
    return argv


def parse_reply(line, expect, rnd):
    """The reply dict, or a string saying why the line is garbage."""
    if len(line) > MAX_REPLY_CHARS:
        return f"sent a reply of {len(line)} characters, over the cap of {MAX_REPLY_CHARS}"
    try:
        reply = json.loads(line)
    except json.JSONDecodeError:
        return f"printed garbage: {line[:80]!r}"
    if not isinstance(reply, dict) or reply.get("type") != expect:
        return f"expected a {expect} message, got {line[:120]!r}"
    if rnd is not None and reply.get("round") != rnd:
        return f"reply for round {reply.get('round')} while round {rnd} was asked"
    if expect == "ready" and reply.get("protocol") != PROTOCOL:
        return f"speaks protocol {reply.get('protocol')}, we speak {PROTOCOL}"
    return reply


def kill(proc, grace=0.0):
    """Stop a worker's whole process group: a polite wait, then SIGKILL; always reaped."""
    if proc is None:
        return
    if grace and proc.poll() is None:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except (OSError, ValueError):
            pass


# ----------------------------------------------------------------------------- one goal

def solve(pool, goal, cfg, log, notes=()):
    """One goal: {asked: workers asked, first: their first proposals, proposals: the final ones after
    debate, choices: each aggregator's choice among the final, early_stop, episodes played}. `notes`
    (a person's broadcast) go into every worker's context. A worker that fails to answer has no proposal."""
    notes, episodes = list(notes), 0
    guides = pool.alive("guide")
    if guides and (cfg["hint"] or cfg["guide_stop"]):
        guide = guides[0]
        reply = pool.ask([(guide, {"type": "goal", "goal": goal, "notes": notes, "confidence": True})], "proposal")
        if guide.index in reply:
            episodes += 1
            plan = verified(goal, [proposal_of(guide.index, reply[guide.index], notes)])[0]
            confidence = reply[guide.index].get("confidence")
            log("guide_plan", goal=goal, plan=plan, confidence=confidence)
            if cfg["guide_stop"] and isinstance(confidence, (int, float)) and confidence >= cfg["guide_stop"]:
                log("early_stop", goal=goal, confidence=confidence)  # confident: no worker is asked
                return {"asked": 0, "first": [], "proposals": [plan], "choices": {n: 0 for n in cfg["aggregators"]},
                        "early_stop": True, "episodes": episodes}
            if cfg["hint"]:
                notes.append(tasks.note_line("HINT", [tasks.plan_text(plan["actions"])]))
    asked = len(pool.alive())
    replies = pool.ask([(w, {"type": "goal", "goal": goal, "notes": notes}) for w in pool.alive()], "proposal")
    first = proposals = verified(goal, [proposal_of(i, r, notes) for i, r in sorted(replies.items())])
    episodes += len(first)
    log("proposals", goal=goal, debate_round=0, proposals=first)
    for debate_round in range(1, cfg["debate_rounds"] + 1):
        by_worker = {p["worker"]: p for p in proposals}
        talkers = [w for w in pool.alive() if w.index in by_worker]
        if cfg["debate"] == "text":  # play again, the others' plans in context
            seen = {w.index: notes + [tasks.note_line("PEERS", [tasks.plan_text(p["actions"]) for p in proposals
                                                               if p["worker"] != w.index])] for w in talkers}
            revised = pool.ask([(w, {"type": "goal", "goal": goal, "notes": seen[w.index]}) for w in talkers], "proposal")
            proposals = verified(goal, [proposal_of(i, r, seen[i]) for i, r in sorted(revised.items())])
            episodes += len(proposals)
        else:
            revised = pool.ask([(w, {"type": "message", "goal": goal, "own": by_worker[w.index],
                                     "proposals": [p for p in proposals if p["worker"] != w.index]}) for w in talkers],
                               "proposal")
            proposals = verified(goal, [proposal_of(i, r, r.get("notes", notes)) for i, r in sorted(revised.items())])
        log("proposals", goal=goal, debate_round=debate_round, proposals=proposals)
    if guides and proposals:
        scored = pool.ask([(guides[0], {"type": "score", "goal": goal, "proposals": proposals})], "scores")
        scores = scored.get(guides[0].index, {}).get("scores")
        if scores is not None and len(scores) == len(proposals):
            proposals = [dict(p, guide_score=s) for p, s in zip(proposals, scores)]
    choices = {name: AGGREGATORS[name](proposals) for name in cfg["aggregators"]}
    log("aggregate", goal=goal, choices=choices,
        guide_scores=[p.get("guide_score") for p in proposals] if guides else None)
    return {"asked": asked, "first": first, "proposals": proposals, "choices": choices, "early_stop": False,
            "episodes": episodes}


def verified(goal, proposals):
    """Copies of the proposals with the reward and success of their actions replayed in a fresh environment."""
    episodes = [play_proposal(goal, p["actions"]) for p in proposals]
    return [dict(p, reward=e["reward"], success=bool(e["success"])) for p, e in zip(proposals, episodes)]


def proposal_of(worker, reply, notes=()):
    """A reply as a proposal; `notes` are what the worker read in its context (what it learns with)."""
    actions = [tasks.clean_action(str(a)) for a in reply.get("actions", [])][:MAX_ACTIONS]
    answer = tasks.clean_action(str(reply.get("answer", actions[-1] if actions else "")))
    notes = [str(n) for n in notes] if isinstance(notes, list) else []
    return {"worker": worker, "answer": answer, "actions": actions, "adopted_from": reply.get("adopted_from"),
            "notes": notes}


# ----------------------------------------------------------------------------- learning

def experience_of(goal, result, decision, teacher_help):
    """What the swarm learns from one goal: every distinct successful plan (the workers', the guide's, a
    person's edit); where none succeeded and teacher help is on, every distinct failed proposal, which
    the learner labels with the teacher's action where it first went wrong."""
    candidates = result["first"] + result["proposals"]
    if decision["success"]:
        candidates = candidates + [{"actions": decision["actions"], "notes": [], "success": True}]
    wins = [p for p in candidates if p["success"]]
    chosen, shared, seen = wins or (candidates if teacher_help else []), [], set()
    for p in chosen:
        key = (tuple(p["actions"]), tuple(p.get("notes", ())))
        if key not in seen:
            seen.add(key)
            shared.append({"goal": goal, "actions": p["actions"], "notes": p.get("notes", []), "teacher": not wins})
    return shared


def checkpoint_path(cfg, w):
    return os.path.join(cfg["out_dir"], "checkpoints", f"{w.role}_{w.index}.pt")


def share(pool, cfg, experience):
    """The learning processes update their weights from the experience (in parallel)."""
    learners = pool.alive("learner" if cfg["learning"] == "learner" else "worker")
    learners += pool.alive("guide") if cfg["guide_learns"] else []
    if learners and experience:
        pool.ask([(w, {"type": "learn", "experience": experience}) for w in learners], "learned")


def broadcast(pool, cfg, log, done, state):
    """The learner saves its weights and every worker loads them (restarted workers start from them too)."""
    learner = pool.alive("learner")
    if not learner:
        return
    path = checkpoint_path(cfg, learner[0])
    if learner[0].index not in pool.ask([(learner[0], {"type": "save", "path": path})], "saved"):
        return  # the learner failed: the pool restarts it from its last weights, or drops it
    learner[0].hello.update(checkpoint=path, resume=True)
    workers = pool.alive()
    pool.ask([(w, {"type": "weights", "path": path}) for w in workers], "loaded")
    for w in workers:
        w.hello.update(checkpoint=path)
    state["broadcast_at"] = done
    log("broadcast", goals_done=done, path=path)


def save_checkpoints(pool, cfg, log, done, state):
    """Every learning worker saves its state; the event names every process's checkpoint, so a run resumes."""
    workers = (pool.alive() if cfg["learning"] == "each" else []) + (pool.alive("guide") if cfg["guide_learns"] else [])
    if workers:
        saved = pool.ask([(w, {"type": "save", "path": checkpoint_path(cfg, w)}) for w in workers], "saved")
        for w in workers:
            if w.index in saved:
                w.hello.update(checkpoint=checkpoint_path(cfg, w), resume=True)
    state["saved_at"] = done
    log("checkpoint", goals_done=done, next_goal=state["next_goal"],
        paths={f"{w.role}_{w.index}": w.hello["checkpoint"] for w in pool.workers if not w.dropped})


def after_goal(pool, cfg, log, done, pending, state, final=False):
    """The learning due after `done` goals: share the experience, broadcast weights, save checkpoints.
    Returns the experience not shared yet."""
    if cfg["learning"] == "none":
        return []
    checkpoint = state["saved_at"] != done and (final or done % cfg["save_every"] == 0)
    if pending and (checkpoint or done % cfg["learn_every"] == 0):
        share(pool, cfg, pending)
        pending = []
    if cfg["learning"] == "learner" and state["broadcast_at"] != done and (checkpoint or done % cfg["broadcast_every"] == 0):
        broadcast(pool, cfg, log, done, state)
    if checkpoint:
        save_checkpoints(pool, cfg, log, done, state)
    if cfg["learning"] == "learner" and not pool.alive("learner") and state["learner_lost_at"] is None:
        state["learner_lost_at"] = done
        log("learner_lost", goals_done=done, weights_from_goal=state["broadcast_at"])
        tqdm.write(f"the learner is gone after goal {done}: the workers keep the weights it broadcast after goal "
                   f"{state['broadcast_at']} (None: their start checkpoint) and the run goes on without learning")
    return pending


def resume_point(path):
    """From a run's swarm.jsonl: the goal records up to its last checkpoint, and that checkpoint event."""
    records, snapshot = [], None
    for e in read_jsonl(path):
        if e["event"] == "result":
            records.append(e["record"])
        elif e["event"] == "checkpoint":
            snapshot = (len(records), e)
        elif e["event"] == "resume":  # goals after the checkpoint the last session resumed from were played again
            records = records[:snapshot[0]] if snapshot else []
    if snapshot is None:
        raise SystemExit(f"nothing to resume: {path} holds no checkpoint yet (only learning runs save them, every "
                         f"save_every goals); start the run again without --resume")
    return records[:snapshot[0]], snapshot[1]


# ----------------------------------------------------------------------------- a person in the loop

HUMAN_HELP = ("[a]ccept, [e]dit (type the final action), [r]eject, [s]top, or first: g [TASK] SEED (set the next "
              "goal), m TEXT (a message to every worker), [p]ause")


def ask_human(goal, proposals, chosen, inp, out, control=None, log=None, cfg=None):
    """Show the proposals and the aggregate; ('accept'|'edit'|'reject'|'stop', edited answer or None).
    Before the verdict a person may queue the next goal (control["next_goals"]), broadcast a message to
    every worker for the next goal (control["notes"]) and pause; each of those is logged."""
    control = control if control is not None else {"next_goals": [], "notes": []}
    log = log or (lambda *a, **k: None)
    out.write(f"\ngoal {goal}\n")
    for i, p in enumerate(proposals):
        mark = "*" if i == chosen else " "
        out.write(f" {mark} worker {p['worker']}: {p['answer']!r} (reward {p['reward']})\n")
    out.write(f"aggregate: {proposals[chosen]['answer']!r}\n" if chosen is not None else "aggregate: none\n")
    while True:
        out.write(f"{HUMAN_HELP}? ")
        out.flush()
        line = inp.readline()
        if not line:
            return "stop", None  # end of input: nobody is there to decide
        choice, _, rest = line.strip().partition(" ")
        choice, rest = choice.lower(), rest.strip()
        if choice in ("a", "accept") and chosen is not None:
            return "accept", None
        if choice in ("e", "edit"):
            out.write("final action: ")
            out.flush()
            return "edit", inp.readline().strip()
        if choice in ("r", "reject"):
            return "reject", None
        if choice in ("s", "stop"):
            return "stop", None
        if choice in ("g", "goal") and rest:
            human_goal(rest, cfg or {"task": goal["task"], "task_options": goal.get("options", {})}, control, log, out)
        elif choice in ("m", "message") and rest:
            text = " ".join(rest.split())
            room = tasks.MAX_NOTE_CHARS - len("HUMAN: ")
            if len(text) > room:
                out.write(f"message cut to {room} characters (the cap on a note line)\n")
            control["notes"].append(tasks.note_line("HUMAN", [text[:room]]))
            log("human", action="broadcast", text=text[:room], cut=len(text) > room)
            out.write("every worker reads it in its context for the next goal\n")
        elif choice in ("p", "pause"):
            log("human", action="pause")
            out.write("paused: the swarm waits; type resume (or stop)\n")
            while True:
                out.flush()
                line = inp.readline()
                if not line or line.strip().lower() in ("s", "stop"):
                    log("human", action="stop")
                    return "stop", None
                if line.strip().lower() in ("resume", "r", "c", "continue"):
                    log("human", action="resume")
                    out.write("resumed\n")
                    break
                out.write("paused: type resume (or stop)\n")
        else:
            log("human", action="unknown", text=line.strip()[:200])
            out.write(f"please answer one of {HUMAN_HELP}\n")


def human_goal(text, cfg, control, log, out):
    """'SEED' or 'TASK SEED' as the next goal, or a line saying why not."""
    parts = text.split()
    task, seed = (cfg["task"], parts[0]) if len(parts) == 1 else (parts[0], parts[-1])
    options = cfg["task_options"] if task == cfg["task"] else {}
    goal = {"task": task, "options": options, "seed": tasks.parse_int(seed)}
    problem = "the seed must be an integer" if goal["seed"] is None else goal_problem(goal) if len(parts) <= 2 else \
        "write g SEED or g TASK SEED"
    if problem:
        out.write(f"cannot set that goal: {problem}\n")
        return
    control["next_goals"].append(goal)
    log("human", action="set_goal", goal=goal)
    out.write(f"next goal: {goal}\n")


def decide(goal, result, cfg, log, inp, out, control=None):
    """The decision for one goal: the deciding aggregator's choice, or the person's verdict on it."""
    proposals, choices = result["proposals"], result["choices"]
    chosen = choices[cfg["aggregators"][0]]
    actions = proposals[chosen]["actions"] if chosen is not None else []
    verdict, edited = ("accept", None) if not cfg["human"] else ask_human(goal, proposals, chosen, inp, out, control,
                                                                          log, cfg)
    if verdict == "edit":
        actions = actions[:-1] + [edited]  # the human rewrites the final action
    if verdict in ("reject", "stop") or not actions:
        success = False
    else:
        success = bool(play_proposal(goal, actions)["success"])
    decision = {"goal": goal, "verdict": verdict, "chosen_worker": proposals[chosen]["worker"] if chosen is not None else None,
                "actions": actions, "success": success}
    log("decision", **decision)
    return decision


# ----------------------------------------------------------------------------- the run

AT_LEAST_ONE = ("workers", "threads", "num_goals", "learn_every", "broadcast_every", "save_every", "updates_per_batch",
                "update_batch_size", "replay_size", "replay_recent_window")


def check_config(cfg):
    """Stop before starting anything when the config cannot work."""
    for key in AT_LEAST_ONE:
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be at least 1, got {cfg[key]}")
    if not cfg["checkpoints"] or not cfg["temperatures"]:
        raise ConfigError("checkpoints and temperatures need at least one entry each")
    for t in cfg["temperatures"]:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
            raise ConfigError(f"temperatures must be numbers >= 0 (0 is greedy), got {t!r} in {cfg['temperatures']}")
    if not cfg["aggregators"]:
        raise ConfigError(f"aggregators must name at least one of {', '.join(AGGREGATORS)}")
    for name in cfg["aggregators"]:
        if name not in AGGREGATORS:
            raise ConfigError(f"unknown aggregator {name!r}; known: {', '.join(AGGREGATORS)}")
    if "guide" in cfg["aggregators"] and not cfg["guide"]:
        raise ConfigError("the guide aggregator needs --guide=PATH to a guide checkpoint")
    if (cfg["hint"] or cfg["guide_stop"]) and not cfg["guide"]:
        raise ConfigError("hint and guide_stop need --guide=PATH to a guide checkpoint (the guide writes the hint)")
    if not 0 <= cfg["guide_stop"] <= 1:
        raise ConfigError(f"guide_stop is a probability (0 turns it off), got {cfg['guide_stop']}")
    if cfg["learning"] not in LEARNING:
        raise ConfigError(f"learning must be one of {', '.join(LEARNING)}, got {cfg['learning']!r}")
    if cfg["guide_learns"] and (cfg["learning"] == "none" or not cfg["guide"]):
        raise ConfigError("guide_learns needs a guide (--guide=PATH) and learning=each or learner")
    if cfg["debate"] not in DEBATES:
        raise ConfigError(f"debate must be one of {', '.join(DEBATES)}, got {cfg['debate']!r}")
    if cfg["replay_recent_window"] > cfg["replay_size"]:
        raise ConfigError(f"replay_recent_window={cfg['replay_recent_window']} is larger than replay_size={cfg['replay_size']}")
    if cfg["learning_rate"] < 0 or cfg["grad_clip"] < 0 or not 0 <= cfg["replay_recent_fraction"] <= 1:
        raise ConfigError("learning_rate and grad_clip must be >= 0, replay_recent_fraction in [0, 1]")
    if cfg["resume"] and cfg["overwrite"]:
        raise ConfigError("resume=True continues the run in out_dir and overwrite=True moves it aside: pick one")
    paths = list(cfg["checkpoints"]) + [p for p in (cfg["guide"], cfg["learner"]) if p]
    for path in paths:
        if path.startswith("fake:"):
            if path.removeprefix("fake:") not in FAKE_MODES:
                raise ConfigError(f"unknown fake worker {path!r}; known: {', '.join(FAKE_MODES)}")
        elif not os.path.exists(path):
            raise ConfigError(f"no checkpoint at {path}: train a policy first (see BENCHMARKS.md, Swarm)")
    if cfg["debate_rounds"] < 0:
        raise ConfigError("debate_rounds must be at least 0")
    if cfg["reply_timeout"] <= 0 or cfg["start_timeout"] <= 0:
        raise ConfigError("reply_timeout and start_timeout must be positive")
    if not (cfg["device"] == "cpu" or cfg["device"].startswith("cuda")):
        raise ConfigError(f"device must be cpu, cuda or cuda:0,1,..., got {cfg['device']!r}")
    if cfg["device"].startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError(f"device={cfg['device']} but this torch sees no CUDA GPU; use --device=cpu")
    command_argv(cfg["worker_command"])
    try:
        tasks.make_env(cfg["task"], **cfg["task_options"])
    except ValueError as e:
        raise ConfigError(f"task/task_options: {e}")


def worker_devices(device, n):
    """Each worker's device: cpu, or cuda:K round-robin over the GPUs named in cuda:0,1,..."""
    if device == "cpu":
        return ["cpu"] * n
    gpus = device.removeprefix("cuda").lstrip(":").split(",") if ":" in device else ["0"]
    return [f"cuda:{gpus[i % len(gpus)]}" for i in range(n)]


def learning_config(cfg, seed):
    """What a learning process needs of the config: world.py's expert iteration settings."""
    keys = ("learning_rate", "updates_per_batch", "update_batch_size", "grad_clip", "replay_size",
            "replay_recent_window", "replay_recent_fraction", "out_dir")
    # swarm workers write their actions (act=generate), so updates train the actions' likelihood
    return {k: cfg[k] for k in keys} | {"mode": "expert_iteration", "seed": seed, "choice_loss": False}


def make_workers(cfg):
    """The workers, then the guide and the learner (when configured), each with its own index."""
    n, threads = cfg["workers"], cfg["threads"]
    devices = worker_devices(cfg["device"], n + 2)
    each = cfg["learning"] == "each"
    workers = [Worker(i, cfg["checkpoints"][i % len(cfg["checkpoints"])], cfg["seed"] + i,
                      float(cfg["temperatures"][i % len(cfg["temperatures"])]), devices[i], threads,
                      learning=learning_config(cfg, cfg["seed"] + i) if each else None)
               for i in range(n)]
    if cfg["guide"]:
        workers.append(Worker(len(workers), cfg["guide"], cfg["seed"] + n, 0.0, devices[n], threads, role="guide",
                              learning=learning_config(cfg, cfg["seed"] + n) if cfg["guide_learns"] else None))
    if cfg["learning"] == "learner":
        i = len(workers)
        workers.append(Worker(i, cfg["learner"] or cfg["checkpoints"][0], cfg["seed"] + i, 0.0, devices[i], threads,
                              role="learner", learning=learning_config(cfg, cfg["seed"] + i)))
    return workers


def summarize(records, cfg, seconds, worker_failures, timed=None):
    """Success rates: the decision, each aggregator, one worker alone (the mean over the workers asked of
    their first proposals, before any debate; a worker that failed to answer counts as a failure; goals
    the guide ended early are left out) and any worker (the oracle: some first proposal succeeds).
    Speeds count the `timed` records (this session's goals; all by default)."""
    n = len(records)
    timed = records if timed is None else timed
    rate = lambda hits: round(sum(hits) / len(hits), 4) if hits else None  # noqa: E731
    played = [r for r in records if not r.get("early_stop")]
    episodes = sum(r.get("episodes", r["asked"]) for r in timed)
    summary = {"goals": n, "workers": cfg["workers"], "seconds": round(seconds, 2),
               "goals_per_minute": round(60 * len(timed) / seconds, 2) if seconds else None,
               "episodes": episodes, "episodes_per_minute": round(60 * episodes / seconds, 2) if seconds else None,
               "worker_failures": worker_failures,
               "decision_success": rate([r["decision"]["success"] for r in records]),
               "single_worker_success": rate([sum(p["success"] for p in r["first"]) / r["asked"]
                                              if r["asked"] else 0 for r in played]),
               "any_worker_success": rate([any(p["success"] for p in r["first"]) for r in played]),
               "early_stops": n - len(played)}
    for name in cfg["aggregators"]:
        summary[f"{name}_success"] = rate([r["choices"][name] is not None and r["proposals"][r["choices"][name]]["success"]
                                           for r in records])
    summary["rejected"] = sum(r["decision"]["verdict"] == "reject" for r in records)
    summary["edited"] = sum(r["decision"]["verdict"] == "edit" for r in records)
    return summary


def run(cfg, inp=sys.stdin, out=sys.stderr):
    """The whole swarm run; returns the summary. Every child is gone when this returns or raises."""
    check_config(cfg)
    events = os.path.join(cfg["out_dir"], "swarm.jsonl")
    records, resumed_from = [], None
    if cfg["resume"]:
        if not os.path.exists(events):
            raise SystemExit(f"nothing to resume: {events} does not exist; start the run without --resume")
        records, resumed_from = resume_point(events)
    elif os.path.exists(events) and not cfg["overwrite"]:
        raise ConfigError(f"{cfg['out_dir']} already holds a swarm run (swarm.jsonl): choose another --out_dir, "
                          f"or pass --overwrite=True to move the old run aside")
    lock = claim_out_dir(cfg["out_dir"], cfg["resume"], cfg["overwrite"], run_files=("swarm.jsonl",))
    log = EventLog(events).log
    workers = make_workers(cfg)
    state = {"next_goal": 0, "broadcast_at": None, "saved_at": None, "learner_lost_at": None}
    if resumed_from:
        state["next_goal"] = resumed_from["next_goal"]
        for w in workers:
            path = resumed_from["paths"].get(f"{w.role}_{w.index}")
            if path and path != w.hello["checkpoint"]:
                w.hello.update(checkpoint=path, resume=w.hello["learning"] is not None)
    pool = Pool(workers, cfg["out_dir"], log, cfg["reply_timeout"], cfg["start_timeout"], cfg["worker_command"])
    atexit.register(pool.close)  # also on an exception that escapes main
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM unwinds like Ctrl-C
    done_before, control, pending, t0 = len(records), {"next_goals": [], "notes": []}, [], time.perf_counter()
    try:
        log("config", config=cfg, protocol=PROTOCOL)
        if resumed_from:
            log("resume", goals_done=done_before, next_goal=state["next_goal"])
        pool.start_all()
        startup, t0 = time.perf_counter() - t0, time.perf_counter()  # goals per minute leave out loading
        goals = goals_for(cfg)
        bar = tqdm(total=len(goals), initial=state["next_goal"], desc="goals", unit="goal", file=sys.stderr, disable=None)
        # checked before every goal and after the last: a dead swarm never exits 0
        while pool.alive() and (control["next_goals"] or state["next_goal"] < len(goals)):
            if control["next_goals"]:
                goal = control["next_goals"].pop(0)  # a person set it
            else:
                goal, state["next_goal"] = goals[state["next_goal"]], state["next_goal"] + 1
                bar.update()
            log("goal", goal=goal)
            notes, control["notes"] = control["notes"], []
            result = solve(pool, goal, cfg, log, notes)
            decision = decide(goal, result, cfg, log, inp, out, control)
            records.append({"goal": goal, **result, "decision": decision})
            log("result", index=len(records) - 1, record=records[-1])
            if decision["verdict"] == "stop":
                break
            if cfg["learning"] != "none":
                pending += experience_of(goal, result, decision, cfg["teacher_help"])
                pending = after_goal(pool, cfg, log, len(records), pending, state)
        bar.close()
        if pool.alive():
            after_goal(pool, cfg, log, len(records), pending, state, final=True)
        failures = sum(w.failures for w in pool.workers)
        summary = {**summarize(records, cfg, time.perf_counter() - t0, failures, records[done_before:]),
                   "startup_seconds": round(startup, 2), "learning": cfg["learning"],
                   "learner_lost_at_goal": state["learner_lost_at"], "resumed_at_goal": done_before if resumed_from else None}
        log("summary", **summary)
        tmp = os.path.join(cfg["out_dir"], "summary.json.tmp")
        with open(tmp, "w") as f:  # renamed when whole (checkpoint.write_json_atomic would import torch here)
            json.dump(summary, f, indent=1)
        os.replace(tmp, os.path.join(cfg["out_dir"], "summary.json"))
        if not pool.alive():
            raise SystemExit(f"every worker was dropped after {len(records)} goals (summary: {cfg['out_dir']}/"
                             f"summary.json); see why in the worker logs {cfg['out_dir']}/worker_*.log")
        return summary
    except KeyboardInterrupt:
        log("interrupted", goals_done=len(records))
        raise SystemExit("interrupted: every worker stopped; the event log so far is in "
                         f"{cfg['out_dir']}/swarm.jsonl")
    finally:
        pool.close()
        signal.signal(signal.SIGTERM, previous)
        lock.close()


def main(argv):
    if argv and argv[0] == "--worker":
        protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print lands in the log, not the protocol
        sys.stdout = sys.stderr
        sys.exit(worker_main(sys.stdin, protocol_out))
    argv = ["--human=True" if a == "--human" else a for a in argv]  # a bare --human reads naturally
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    summary = run(cfg)
    print(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1:])
