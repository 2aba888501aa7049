"""
A swarm of µLM workers: N worker subprocesses work on one goal at a time, may read each other's
proposals and revise, and an aggregator (or a human) decides.

    python swarm.py config/swarm_arith.py --workers=8 --aggregators="['verifier','majority']"
    python swarm.py config/swarm_arith.py --human              # accept / edit / reject / stop each goal
    python swarm.py config/swarm_arith.py --device=cuda        # workers on the GPU (cuda:0,1 spreads them)

A goal is one episode of a world task (tasks.py) on a held-out seed: {"task": "arith", "seed": 1000000007}. Each worker plays
the episode with its own policy checkpoint, seed and temperature and proposes its actions. Optional
debate rounds send every worker the others' proposals; it keeps its own or adopts the one its model
finds most likely. Every proposal is then replayed in a fresh environment (the world's reward is the
verifier), a guide model (a larger checkpoint, run as one more subprocess) may score them by
likelihood, and each aggregator in `aggregators` picks one: the first one decides, the others are
scored on the same proposals so one run compares them all. Everything lands in out_dir: swarm.jsonl
(every message, proposal, score and decision with timestamps, flushed as written), summary.json and
worker_<i>.log (each worker's stderr).

Reliability: a worker that crashes, misses the reply timeout or prints a line that is not protocol is
logged, killed, restarted once, then dropped; the goal completes with the others. Workers run in their
own sessions (process groups) and are killed on exit, Ctrl-C, SIGTERM or error, so none outlives the
coordinator. A worker also watches for its coordinator's death, even inside a hung model call: on
Linux the kernel kills it when its parent dies (PR_SET_PDEATHSIG), and anywhere, the end of its input
with a new parent process makes it exit at once.

Protocol (version 1): one JSON object per line over the worker's stdin/stdout; every object has a
"type". stderr is free text (logs, tracebacks). The coordinator speaks first:

    -> {"type": "hello", "protocol": 1, "worker": 0, "checkpoint": "out/p/ckpt.pt", "seed": 0,
        "temperature": 1.0, "device": "cpu", "threads": 1}
    <- {"type": "ready", "protocol": 1, "worker": 0, "pid": 4242}       (or {"type": "error", ...})
    -> {"type": "goal", "round": 7, "goal": {"task": "arith", "seed": 100007}}
    <- {"type": "proposal", "round": 7, "answer": "ANSWER 1665", "actions": ["CALL calc 37*45", ...]}
    -> {"type": "message", "round": 8, "goal": {...}, "proposals": [{"worker": 1, "answer": ..., "actions": [...]}, ...]}
    <- {"type": "proposal", "round": 8, "answer": ..., "actions": [...], "adopted_from": 1}
    -> {"type": "score", "round": 9, "goal": {...}, "proposals": [{"actions": [...]}, ...]}
    <- {"type": "scores", "round": 9, "scores": [-0.31, -1.2, ...]}     (mean log-prob per action token)
    -> {"type": "stop"}                                                  (the worker exits 0)

A reply must carry the round of its request; anything else (not JSON, no such type, wrong round) is
garbage and counts as a failure of that worker. A worker answers a line it cannot read with
{"type": "error", "message": ...} and keeps serving.
"""
import atexit
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

from tqdm import tqdm

import tasks
from configurator import ConfigError, configure, print_config
from runtime import append_jsonl, claim_out_dir

# torch (through world.py's Policy) is imported by the model-backed worker only: the coordinator and the
# fake test workers start without it

PROTOCOL = 1
FAKE_MODES = ("echo", "teacher", "crash", "hang", "garbage")  # "fake:MODE" checkpoints, for tests

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
    human=False,                  # pause after each goal: accept / edit / reject / stop from the terminal
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


def play_proposal(goal, actions):
    """The episode a proposal's actions make in a fresh environment: the world's reward is the verifier."""
    return tasks.play_actions(goal_env(goal), actions, goal["seed"])


def goals_for(cfg):
    return [{"task": cfg["task"], "options": cfg["task_options"], "seed": tasks.EVAL_SEED_BASE + i}
            for i in range(cfg["num_goals"])]


# ----------------------------------------------------------------------------- the worker process

def send(stream, message):
    stream.write(json.dumps(message) + "\n")
    stream.flush()


class ModelAgent:
    """A worker backed by a world policy checkpoint: plays episodes, scores and revises proposals."""

    def __init__(self, hello):
        import torch

        import world
        from runtime import resolve_device
        torch.set_num_threads(hello["threads"])  # N workers share the cores instead of each taking all
        torch.set_grad_enabled(False)  # a worker never trains
        self.device = resolve_device(hello["device"])
        self.seed, self.temperature = hello["seed"], hello["temperature"]
        self.policy = world.load_policy(hello["checkpoint"], device=str(self.device))

    def propose(self, goal):
        # a distinct, reproducible sampling seed per (worker, goal, turn)
        act = self.policy.actor(self.temperature, self.seed * 1_000_003 + goal["seed"])
        episode = tasks.play_episode(goal_env(goal), act, goal["seed"])
        return {"answer": episode["actions"][-1] if episode["actions"] else "", "actions": episode["actions"]}

    def score(self, goal, proposals):
        """Each proposal's mean log-prob per action token, each action given the transcript before it
        (as the policy saw it when it acted)."""
        scores = []
        for p in proposals:
            episode = play_proposal(goal, p["actions"])
            items = [{"text": episode["transcript"][:end], "spans": [[start, end]]}
                     for start, end in episode["action_spans"]]
            try:
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


class FakeAgent:
    """Test stand-ins: echo proposes a fixed answer, teacher the world's teacher actions; crash, hang
    and garbage misbehave on their first goal."""

    def __init__(self, hello, out):
        self.mode, self.out = hello["checkpoint"].removeprefix("fake:"), out
        if self.mode not in FAKE_MODES:
            raise SystemExit(f"unknown fake worker {hello['checkpoint']!r}; known: {', '.join(FAKE_MODES)}")

    def propose(self, goal):
        if self.mode == "crash":
            os._exit(3)
        if self.mode == "hang":
            while True:
                time.sleep(60)
        if self.mode == "garbage":
            self.out.write("Traceback? no: this line is not JSON\n")
            self.out.flush()
            return {"answer": "too late", "actions": []}
        if self.mode == "teacher":
            env = goal_env(goal)
            episode = tasks.play_episode(env, tasks.teacher_act(env), goal["seed"])
            return {"answer": episode["actions"][-1], "actions": episode["actions"]}
        return {"answer": "ECHO", "actions": ["ECHO"]}

    def score(self, goal, proposals):
        return [float(p["answer"] == "ECHO") for p in proposals]

    def revise(self, goal, own, proposals):
        return dict(own, adopted_from=None)


# what each message to a worker must carry besides its type
MESSAGE_FIELDS = {"hello": ("protocol", "worker", "checkpoint", "seed", "temperature", "device", "threads"),
                  "goal": ("goal",), "message": ("goal", "own", "proposals"), "score": ("goal", "proposals"),
                  "stop": ()}


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
    if "goal" in msg:
        goal = msg["goal"]
        if not isinstance(goal, dict) or not isinstance(goal.get("seed"), int):
            return f"a goal is {{\"task\": NAME, \"seed\": INT, \"options\": {{...}}}}, got {goal!r}"
        try:
            goal_env(goal)
        except (ValueError, TypeError) as e:
            return f"goal {goal!r}: {e}"
    return msg


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
            send(stdout, {"type": "proposal", "round": rnd, **agent.propose(msg["goal"])})
        elif kind == "message":
            send(stdout, {"type": "proposal", "round": rnd, **agent.revise(msg["goal"], msg["own"], msg["proposals"])})
        else:
            send(stdout, {"type": "scores", "round": rnd, "scores": agent.score(msg["goal"], msg["proposals"])})
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

    def __init__(self, index, checkpoint, seed, temperature, device, threads, role="worker"):
        self.index, self.role = index, role
        self.hello = {"type": "hello", "protocol": PROTOCOL, "worker": index, "checkpoint": checkpoint,
                      "seed": seed, "temperature": temperature, "device": device, "threads": threads}
        self.proc, self.generation, self.failures, self.dropped = None, 0, 0, False

    @property
    def name(self):
        return f"{self.role} {self.index}"


class Pool:
    """Starts worker processes, talks to them, and restarts or drops the ones that fail."""

    def __init__(self, workers, out_dir, log, reply_timeout, start_timeout):
        self.workers, self.out_dir, self.log = workers, out_dir, log
        self.reply_timeout, self.start_timeout = reply_timeout, start_timeout
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
        w.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1, env=env,
                                  start_new_session=True, cwd=os.getcwd())
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
                w.proc.wait()
                failed.append((w, f"exited with code {w.proc.returncode} (crash?)"))
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
            tqdm.write(f"{w.name} failed again ({reason}); dropped")

    def close(self):
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                self._write(w, {"type": "stop"})
        for w in self.workers:
            if w.proc is not None:
                kill(w.proc, grace=1.0)


def parse_reply(line, expect, rnd):
    """The reply dict, or a string saying why the line is garbage."""
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

def solve(pool, goal, cfg, log):
    """One goal: (workers asked, their first proposals, the final proposals after debate, each
    aggregator's choice among the final). A worker that fails to answer has no proposal."""
    asked = len(pool.alive())
    replies = pool.ask([(w, {"type": "goal", "goal": goal}) for w in pool.alive()], "proposal")
    first = proposals = verified(goal, [proposal_of(i, r) for i, r in sorted(replies.items())])
    log("proposals", goal=goal, debate_round=0, proposals=first)
    for debate_round in range(1, cfg["debate_rounds"] + 1):
        by_worker = {p["worker"]: p for p in proposals}
        requests = [(w, {"type": "message", "goal": goal, "own": by_worker[w.index],
                         "proposals": [p for p in proposals if p["worker"] != w.index]})
                    for w in pool.alive() if w.index in by_worker]
        revised = pool.ask(requests, "proposal")
        proposals = verified(goal, [proposal_of(i, r) for i, r in sorted(revised.items())])
        log("proposals", goal=goal, debate_round=debate_round, proposals=proposals)
    guides = pool.alive("guide")
    if guides and proposals:
        scored = pool.ask([(guides[0], {"type": "score", "goal": goal, "proposals": proposals})], "scores")
        scores = scored.get(guides[0].index, {}).get("scores")
        if scores is not None and len(scores) == len(proposals):
            proposals = [dict(p, guide_score=s) for p, s in zip(proposals, scores)]
    choices = {name: AGGREGATORS[name](proposals) for name in cfg["aggregators"]}
    log("aggregate", goal=goal, choices=choices,
        guide_scores=[p.get("guide_score") for p in proposals] if guides else None)
    return asked, first, proposals, choices


def verified(goal, proposals):
    """Copies of the proposals with the reward and success of their actions replayed in a fresh environment."""
    episodes = [play_proposal(goal, p["actions"]) for p in proposals]
    return [dict(p, reward=e["reward"], success=bool(e["success"])) for p, e in zip(proposals, episodes)]


def proposal_of(worker, reply):
    actions = [str(a) for a in reply.get("actions", [])]
    answer = str(reply.get("answer", actions[-1] if actions else ""))
    return {"worker": worker, "answer": answer, "actions": actions, "adopted_from": reply.get("adopted_from")}


HUMAN_HELP = "[a]ccept, [e]dit (type the final action), [r]eject, [s]top"


def ask_human(goal, proposals, chosen, inp, out):
    """Show the proposals and the aggregate; ('accept'|'edit'|'reject'|'stop', edited answer or None)."""
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
        choice = line.strip().lower()
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
        out.write(f"please answer one of {HUMAN_HELP}\n")


def decide(goal, proposals, choices, cfg, log, inp, out):
    """The decision for one goal: the deciding aggregator's choice, or the human's verdict on it."""
    chosen = choices[cfg["aggregators"][0]]
    actions = proposals[chosen]["actions"] if chosen is not None else []
    verdict, edited = ("accept", None) if not cfg["human"] else ask_human(goal, proposals, chosen, inp, out)
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

def check_config(cfg):
    """Stop before starting anything when the config cannot work."""
    if cfg["workers"] < 1:
        raise ConfigError(f"workers must be at least 1, got {cfg['workers']}")
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
    for path in list(cfg["checkpoints"]) + ([cfg["guide"]] if cfg["guide"] else []):
        if path.startswith("fake:"):
            if path.removeprefix("fake:") not in FAKE_MODES:
                raise ConfigError(f"unknown fake worker {path!r}; known: {', '.join(FAKE_MODES)}")
        elif not os.path.exists(path):
            raise ConfigError(f"no checkpoint at {path}: train a policy first (see BENCHMARKS.md, Swarm)")
    if cfg["num_goals"] < 1 or cfg["debate_rounds"] < 0:
        raise ConfigError("num_goals must be at least 1 and debate_rounds at least 0")
    if cfg["reply_timeout"] <= 0 or cfg["start_timeout"] <= 0:
        raise ConfigError("reply_timeout and start_timeout must be positive")
    if not (cfg["device"] == "cpu" or cfg["device"].startswith("cuda")):
        raise ConfigError(f"device must be cpu, cuda or cuda:0,1,..., got {cfg['device']!r}")
    if cfg["device"].startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError(f"device={cfg['device']} but this torch sees no CUDA GPU; use --device=cpu")
    if cfg["threads"] < 1:
        raise ConfigError(f"threads must be at least 1, got {cfg['threads']}")
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


def make_workers(cfg):
    n = cfg["workers"]
    threads = cfg["threads"]
    devices = worker_devices(cfg["device"], n + 1)
    workers = [Worker(i, cfg["checkpoints"][i % len(cfg["checkpoints"])], cfg["seed"] + i,
                      float(cfg["temperatures"][i % len(cfg["temperatures"])]), devices[i], threads)
               for i in range(n)]
    if cfg["guide"]:
        workers.append(Worker(n, cfg["guide"], cfg["seed"] + n, 0.0, devices[n], threads, role="guide"))
    return workers


def summarize(records, cfg, seconds, worker_failures):
    """Success rates: the decision, each aggregator, one worker alone (the mean over the workers asked of
    their first proposals, before any debate; a worker that failed to answer counts as a failure) and
    any worker (the oracle: some first proposal succeeds)."""
    n = len(records)
    rate = lambda hits: round(sum(hits) / n, 4) if n else None  # noqa: E731
    summary = {"goals": n, "workers": cfg["workers"], "seconds": round(seconds, 2),
               "goals_per_minute": round(60 * n / seconds, 2) if seconds else None,
               "worker_failures": worker_failures,
               "decision_success": rate([r["decision"]["success"] for r in records]),
               "single_worker_success": rate([sum(p["success"] for p in r["first"]) / r["asked"]
                                              if r["asked"] else 0 for r in records]),
               "any_worker_success": rate([any(p["success"] for p in r["first"]) for r in records])}
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
    if os.path.exists(events) and not cfg["overwrite"]:
        raise ConfigError(f"{cfg['out_dir']} already holds a swarm run (swarm.jsonl): choose another --out_dir, "
                          f"or pass --overwrite=True to move the old run aside")
    lock = claim_out_dir(cfg["out_dir"], False, cfg["overwrite"], run_files=("swarm.jsonl",))
    log = EventLog(events).log
    pool = Pool(make_workers(cfg), cfg["out_dir"], log, cfg["reply_timeout"], cfg["start_timeout"])
    atexit.register(pool.close)  # also on an exception that escapes main
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM unwinds like Ctrl-C
    records, t0 = [], time.perf_counter()
    try:
        log("config", config=cfg, protocol=PROTOCOL)
        pool.start_all()
        startup, t0 = time.perf_counter() - t0, time.perf_counter()  # goals per minute leave out loading
        for goal in tqdm(goals_for(cfg), desc="goals", unit="goal", file=sys.stderr, disable=None):
            if not pool.alive():  # checked before every goal and after the last: a dead swarm never exits 0
                break
            log("goal", goal=goal)
            asked, first, proposals, choices = solve(pool, goal, cfg, log)
            decision = decide(goal, proposals, choices, cfg, log, inp, out)
            records.append({"goal": goal, "asked": asked, "first": first, "proposals": proposals,
                            "choices": choices, "decision": decision})
            if decision["verdict"] == "stop":
                break
        failures = sum(w.failures for w in pool.workers)
        summary = {**summarize(records, cfg, time.perf_counter() - t0, failures), "startup_seconds": round(startup, 2)}
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
