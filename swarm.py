"""
A swarm of µLM workers: N worker subprocesses work on one goal at a time, may read each other's
proposals and revise, and an aggregator (or a human, at the terminal or on serve.py's page) decides.

    python swarm.py config/swarm_arith.py --workers=8 --aggregators="['verifier','majority']"
    python swarm.py config/swarm_arith.py --human              # accept / edit / reject / stop each goal
    python swarm.py config/swarm_arith.py --human --human_input=file   # ... from serve.py's web page
    python swarm.py config/swarm_arith.py --device=cuda        # workers on the GPU (cuda:0,1 spreads them)
    python swarm.py config/swarm_arith.py --learning=each --teacher_help=True   # workers learn from every goal
    python swarm.py config/swarm_arith.py --learning=each --resume=True         # continue from the last checkpoint
    python swarm.py config/swarm_arith.py --backend=ray                         # workers as Ray actors

The run: config -> workers -> goals (each: propose, debate, verify, aggregate, decide) -> learning from
the outcomes -> summary. The pieces around it, each a module:
    swarm_worker.py    the worker program (python swarm_worker.py): swarm_agent.py's policy serving the protocol
    swarm_protocol.py  what the coordinator and the workers say to each other (JSON lines; its docstring)
    swarm_console.py   a person in the loop (--human)
    processes.py       children in their own process groups that never outlive the coordinator

A goal is one episode of a world task (tasks.py) on a held-out seed: {"task": "arith", "seed": 1000000007}.
Each worker plays the episode with its own policy checkpoint, seed and temperature and proposes its
actions. Optional debate rounds send every worker the others' proposals; it keeps its own or adopts the
one its model finds most likely (debate="adopt"), or plays again with the others' plans in its context
as a `PEERS:` line (debate="text"; tasks.py's transcript format). A guide (a larger checkpoint) may play
first and give every worker its plan as a `HINT:` line (hint=True), and end the round with its own plan
when it is confident (guide_stop). Every proposal is then replayed in a fresh environment (the world's
reward is the verifier), a guide model (run as one more subprocess) may score them by likelihood, and
each aggregator in `aggregators` picks one: the first one decides, the others are scored on the same
proposals so one run compares them all. Everything lands in out_dir: swarm.jsonl (every message,
proposal, score and decision with timestamps, flushed as written), summary.json, summary.txt (the same,
for people), swarm.png (success rates over the goals) and worker_<i>.log (each worker's stderr).

Learning (learning="each" or "learner"): after every `learn_every` goals the coordinator shares the
verified outcome, the successful proposals (or, with teacher_help, every failed proposal, which the
worker labels with the teacher's action where it first went wrong), and the processes that learn
update their weights with world.py's expert-iteration pieces (replay buffer, gradient steps). With
"each" every worker learns from it on its own; with "learner" one more process learns and every
`broadcast_every` goals the workers load its weights. Learning processes save a checkpoint under
out_dir/checkpoints/ every `save_every` goals and at the end; --resume=True continues the run from the
last one. A learner that dies (twice) leaves the workers with its last weights; the run goes on and
says so.

Workers anywhere: `worker_command` is a template ({python}, {worker}) of the command that starts one
worker, e.g. "ssh gpu1 {python} {worker}" or "srun -n1 {python} {worker}"; the protocol runs over that
command's stdin/stdout, so anything that carries them works (weights travel as file paths: learning
across machines needs a shared out_dir). The older form "{python} {swarm} --worker" still works.
With backend=ray the workers are Ray actors instead (swarm_ray.py: a local Ray, or a cluster at ray_address),
behind the same Pool: the same messages, aggregation, learning and failure handling.

Reliability: a worker that crashes, misses the reply timeout or prints a line that is not protocol (or
one over 64 KiB, which is never read whole) is logged, killed, restarted once, then dropped; the goal
completes with the others. Workers run in their own process groups, and the whole group (a wrapping
shell's children included) is killed on exit, Ctrl-C, SIGTERM or error; a coordinator killed with
kill -9 takes them along too (processes.py, swarm_worker.py).
"""
import atexit
import contextlib
import dataclasses
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

from tqdm import tqdm

import processes
import swarm_console
import tasks
from configurator import ConfigError, configure, print_config
from metrics import save_figure
from runtime import append_jsonl, auto_threads, claim_out_dir, progress, read_jsonl
from swarm_protocol import MAX_LINE_BYTES, PROTOCOL, LearningSettings, parse_reply, play_proposal

# no torch here: the coordinator starts in a fraction of a second, and only the workers load models

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER_PROGRAM = os.path.join(HERE, "swarm_worker.py")
LEARNING = ("none", "each", "learner")
BACKENDS = ("subprocess", "ray")
DEBATES = ("adopt", "text")
MAX_ACTIONS = 64           # actions kept from one proposal (every task ends far sooner)
MAX_WORKERS = 256          # a typo of 3000 started 2,500 processes and stalled a 2-core machine for minutes

DEFAULTS = dict(
    out_dir="out/swarm",
    overwrite=False,              # a run into an out_dir that holds one moves the old run aside (else it refuses)
    task="arith",                 # a tasks.py task name; each goal is one episode of it
    task_options={},              # passed to tasks.make_env, e.g. {"tool": ""} for arithmetic from memory
    num_goals=50,                 # goal i is the held-out episode tasks.EVAL_SEED_BASE + i (world.py evaluates on them too)
    workers=8,
    checkpoints=["out/policy_arith/ckpt.pt"],  # cycled over the workers
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
    worker_command="",            # how to start a worker: a template with {python} and {worker}, e.g.
                                  # "ssh host {python} {worker}"; empty: a local subprocess
    backend="subprocess",         # subprocess (worker_command) | ray: the workers as Ray actors (swarm_ray.py)
    ray_address="",               # backend=ray: "" starts a local Ray; host:port, ray://host:port or auto a cluster
    ray_agent="swarm_agent:ModelAgent",  # backend=ray: the agent each actor runs (module:Class)
    human=False,                  # pause after each goal: accept / edit / reject / stop, set the next goal,
                                  # broadcast a message or a hint, pause / resume
    human_input="stdin",          # where the person's answers come from: stdin (the terminal) | file
                                  # (out_dir/control.jsonl, which serve.py's page writes)
    device="cpu",                 # cpu | cuda (GPU 0) | cuda:0,1 (workers spread over these GPUs)
    threads=0,                    # torch threads per worker; 0: the idle cores (load average) shared among the
                                  # processes, at least 1 each. Micro models gain nothing from more, and on a
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


# ----------------------------------------------------------------------------- goals

def goals_for(cfg):
    return [{"task": cfg["task"], "options": cfg["task_options"], "seed": tasks.EVAL_SEED_BASE + i}
            for i in range(cfg["num_goals"])]




# ----------------------------------------------------------------------------- the coordinator's workers

@contextlib.contextmanager
def writing(path):
    """An OSError while writing under out_dir (read-only, full, not a folder) as a message, not a traceback."""
    try:
        yield
    except OSError as e:
        raise SystemExit(f"cannot write {path}: {e.strerror or e}; give --out_dir a writable folder with free space")


class EventLog:
    """swarm.jsonl: one timestamped JSON event per line, flushed as written, so a crash loses nothing."""

    def __init__(self, path):
        self.path = path

    def log(self, event, **fields):
        with writing(self.path):
            append_jsonl(self.path, {"time": round(time.time(), 3), "event": event, **fields})


class Worker:
    """One slot of the swarm: what it runs, its current process, and how often it failed."""

    def __init__(self, index, checkpoint, seed, temperature, device, threads, role="worker", learning=None):
        self.index, self.role = index, role
        self.hello = {"type": "hello", "protocol": PROTOCOL, "worker": index, "checkpoint": checkpoint,
                      "seed": seed, "temperature": temperature, "device": device, "threads": threads,
                      "learning": dataclasses.asdict(learning) if learning else None, "resume": False}
        self.proc, self.generation, self.failures, self.dropped = None, 0, 0, False
        self.start_error = None

    @property
    def name(self):
        return f"{self.role} {self.index}"


class Subprocesses:
    """The default transport of the Pool: each worker a child process (processes.py) started by worker_command,
    the protocol over its stdin/stdout, its stderr in out_dir/<role>_<i>.log. swarm_ray.RayActors is the other
    (backend=ray); the Pool calls the same five methods of either."""

    def __init__(self, argv, out_dir):
        self.argv, self.out_dir = argv, out_dir

    def start(self, w, replies):
        """Start w's process; its output lines go to replies as (index, generation, line), then None at its end.
        The start event's fields, or a string saying why the command cannot run (a failure like a crash)."""
        env = dict(os.environ)
        device = w.hello["device"]
        if device.startswith("cuda:"):
            # the worker sees only its GPU, as cuda:0
            env["CUDA_VISIBLE_DEVICES"] = device.removeprefix("cuda:")
        log_path = os.path.join(self.out_dir, f"{w.role}_{w.index}.log")
        with writing(log_path):
            stderr = open(log_path, "a")
        try:  # its own process group, killed with us (processes.start); the main thread starts every worker
            w.proc = processes.start(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                     env=env, cwd=os.getcwd())
        except OSError as e:  # the command does not exist or cannot run
            w.proc = None
            return f"could not run {' '.join(self.argv)!r}: {e.strerror or e}"
        finally:
            stderr.close()
        threading.Thread(target=self.read, args=(replies, w.index, w.generation, w.proc.stdout), daemon=True).start()
        return {"pid": w.proc.pid}

    @staticmethod
    def read(replies, index, generation, stream):
        """Every line of a worker's output into the replies queue; each read holds at most MAX_LINE_BYTES."""
        try:
            for line in processes.read_lines(stream, MAX_LINE_BYTES):
                replies.put((index, generation, line))
        except processes.LineTooLong as e:
            replies.put((index, generation, e))  # not read further: the worker is killed
            return
        except (OSError, ValueError):  # the pipe was closed under us: the worker is being stopped
            pass
        replies.put((index, generation, None))

    def write(self, w, message):
        try:
            w.proc.stdin.write((json.dumps(message) + "\n").encode())
            w.proc.stdin.flush()
        except (OSError, ValueError):
            pass  # a dead worker: its end of output reports the failure

    def ended(self, w):
        """Why w's output ended: its exit code."""
        processes.exited(w.proc, 1.0)  # let it finish exiting, then read its code
        return f"exited with code {processes.stop(w.proc, grace=1.0)} (crash?)"

    def kill(self, w):
        processes.stop(w.proc, grace=0)

    def close(self, workers):
        """Ask every worker to stop, give them a second, then end their process groups (processes.stop_all)."""
        procs = [w.proc for w in workers if w.proc is not None]
        for w in workers:
            if w.proc is not None and w.proc.returncode is None:
                self.write(w, {"type": "stop"})
        deadline = time.monotonic() + 1.0
        for proc in procs:
            processes.exited(proc, max(0.0, deadline - time.monotonic()))
        processes.stop_all(procs, grace=1.0)


class Pool:
    """Starts the workers through a transport (Subprocesses, or swarm_ray.RayActors), talks to them, and
    restarts or drops the ones that fail."""

    def __init__(self, workers, out_dir, log, reply_timeout, start_timeout, transport):
        self.workers, self.out_dir, self.log = workers, out_dir, log
        self.reply_timeout, self.start_timeout = reply_timeout, start_timeout
        self.transport = transport
        self.replies = queue.Queue()  # (worker index, generation, a line, LineTooLong, or None at end of output)
        self.round, self.closed = 0, False

    def alive(self, role="worker"):
        return [w for w in self.workers if w.role == role and not w.dropped]

    def spawn(self, w):
        w.generation += 1
        device = w.hello["device"]
        hello = dict(w.hello, device="cuda" if device.startswith("cuda") else device)
        started = self.transport.start(w, self.replies)
        if isinstance(started, str):  # it could not start: a failure like a crash at start
            w.start_error = started
            self.log("start_failed", worker=w.index, role=w.role, reason=w.start_error)
            self.replies.put((w.index, w.generation, None))
            return
        w.start_error = None
        self.log("start", worker=w.index, role=w.role, **started, generation=w.generation, hello=hello)
        self._write(w, hello)

    def _write(self, w, message):
        self.transport.write(w, message)

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
            reply = self.failure(w, line) or parse_reply(line, expect, rnd)
            if isinstance(reply, str):
                failed.append((w, reply))
                continue
            self.log("receive", worker=index, role=w.role, message=reply)
            replies[index] = reply
        for w, reason in failed:
            self.fail(w, reason)
        return replies

    def failure(self, w, line):
        """Why a worker's output ended or overflowed, or None for a line to parse."""
        if isinstance(line, processes.LineTooLong):
            return f"printed {line}, over the cap on a protocol line: the rest was not read"
        if line is None:
            return w.start_error or self.transport.ended(w)
        return None

    def fail(self, w, reason):
        """Log the failure, kill the process; restart it the first time, drop the worker the second."""
        w.failures += 1
        if w.proc is not None:
            self.transport.kill(w)
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
        """Stop every worker (the transport's close), once: atexit calls it again after run's finally."""
        if not self.closed:
            self.closed = True
            self.transport.close(self.workers)


def command_argv(template):
    """The argv that starts one worker: worker_command with {python}, {worker} (and the older {swarm})
    filled in, or swarm_worker.py in a local subprocess."""
    if not template:
        return [sys.executable, WORKER_PROGRAM]
    try:
        argv = shlex.split(template.format(python=sys.executable, worker=WORKER_PROGRAM,
                                           swarm=os.path.join(HERE, "swarm.py")))
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"worker_command {template!r} cannot be filled in ({e!r}): it may use {{python}} and "
                          f"{{worker}} (write {{{{ and }}}} for literal braces), with shell-style quoting")
    if not argv:
        raise ConfigError("worker_command is blank; leave it empty for a local subprocess")
    return argv


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
        kind = e.get("event") if isinstance(e, dict) else None
        if (kind == "result" and "record" not in e) or (kind == "checkpoint" and not (
                isinstance(e.get("paths"), dict) and isinstance(e.get("next_goal"), int))):
            raise SystemExit(f"{path} has a {kind} event swarm.py did not write ({str(e)[:120]}): it cannot be resumed")
        if kind == "result":
            records.append(e["record"])
        elif kind == "checkpoint":
            snapshot = (len(records), e)
        elif kind == "resume":  # goals after the checkpoint the last session resumed from were played again
            records = records[:snapshot[0]] if snapshot else []
    if snapshot is None:
        raise SystemExit(f"nothing to resume: {path} holds no checkpoint yet (only learning runs save them, every "
                         f"save_every goals); start the run again without --resume")
    return records[:snapshot[0]], snapshot[1]


# ----------------------------------------------------------------------------- the decision

def decide(goal, result, cfg, log, inp, out, control):
    """The decision for one goal: the deciding aggregator's choice, or the person's verdict on it."""
    proposals, choices = result["proposals"], result["choices"]
    chosen = choices[cfg["aggregators"][0]]
    actions = proposals[chosen]["actions"] if chosen is not None else []
    verdict, edited = "accept", None
    if cfg["human"]:
        log("awaiting_human", goal=goal, chosen_worker=proposals[chosen]["worker"] if chosen is not None else None)
        verdict, edited = swarm_console.ask(goal, proposals, chosen, inp, out, control, log, cfg["task"],
                                            cfg["task_options"])
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

AT_LEAST_ONE = ("workers", "num_goals", "learn_every", "broadcast_every", "save_every", "updates_per_batch",
                "update_batch_size", "replay_size", "replay_recent_window")


def check_config(cfg):
    """Stop before starting anything when the config cannot work."""
    for key in AT_LEAST_ONE:
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be at least 1, got {cfg[key]}")
    if cfg["workers"] > MAX_WORKERS:
        raise ConfigError(f"workers={cfg['workers']} is more than {MAX_WORKERS}: each worker is a process with its own "
                          f"model, all started before the first goal")
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
    for path in list(cfg["checkpoints"]) + [p for p in (cfg["guide"], cfg["learner"]) if p]:
        if not os.path.exists(path):
            raise ConfigError(f"no checkpoint at {path}: train a policy first (see BENCHMARKS.md, Swarm)")
    if cfg["debate_rounds"] < 0 or cfg["threads"] < 0:
        raise ConfigError("debate_rounds and threads must not be negative (threads=0: automatic)")
    if cfg["human_input"] not in ("stdin", "file"):
        raise ConfigError(f"human_input must be stdin or file, got {cfg['human_input']!r}")
    if not (0 < cfg["reply_timeout"] <= threading.TIMEOUT_MAX and 0 < cfg["start_timeout"] <= threading.TIMEOUT_MAX):
        raise ConfigError(f"reply_timeout and start_timeout must be positive, at most {threading.TIMEOUT_MAX:.0f} s")
    if not (cfg["device"] == "cpu" or cfg["device"].startswith("cuda")):
        raise ConfigError(f"device must be cpu, cuda or cuda:0,1,..., got {cfg['device']!r}")
    if cfg["device"].startswith("cuda") and cfg["backend"] != "ray":  # Ray's GPUs are the cluster's, not this machine's
        import torch
        if not torch.cuda.is_available():
            raise ConfigError(f"device={cfg['device']} but this torch sees no CUDA GPU; use --device=cpu")
    command_argv(cfg["worker_command"])
    try:
        tasks.make_env(cfg["task"], **cfg["task_options"])
    except ValueError as e:
        raise ConfigError(f"task/task_options: {e}")
    check_backend(cfg)


def check_backend(cfg):
    """The backend's settings; for Ray, whether it is installed, the agent found and the cluster reachable."""
    if cfg["backend"] not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {cfg['backend']!r}")
    if cfg["backend"] != "ray":
        if cfg["ray_address"]:
            raise ConfigError("ray_address needs backend=ray (the workers as Ray actors)")
        return
    if cfg["worker_command"]:
        raise ConfigError("worker_command starts subprocesses; with backend=ray every worker is a Ray actor running "
                          "ray_agent: leave worker_command empty")
    if cfg["device"] not in ("cpu", "cuda"):
        raise ConfigError(f"with backend=ray, device is cpu or cuda (Ray gives each actor its GPU), got {cfg['device']!r}")
    import swarm_ray  # Ray itself is imported only once the run connects
    problem = swarm_ray.problem(cfg["ray_address"], cfg["ray_agent"])
    if problem:
        raise ConfigError(problem)


def make_transport(cfg, count):
    """How the Pool starts and talks to its `count` workers: subprocesses, or Ray actors."""
    if cfg["backend"] == "ray":
        import swarm_ray
        return swarm_ray.RayActors(cfg["ray_address"], cfg["ray_agent"], cfg["out_dir"], count)
    return Subprocesses(command_argv(cfg["worker_command"]), cfg["out_dir"])


def worker_devices(device, n):
    """Each worker's device: cpu, or cuda:K round-robin over the GPUs named in cuda:0,1,..."""
    if device == "cpu":
        return ["cpu"] * n
    gpus = device.removeprefix("cuda").lstrip(":").split(",") if ":" in device else ["0"]
    return [f"cuda:{gpus[i % len(gpus)]}" for i in range(n)]


def learning_settings(cfg, seed):
    """What a learning process needs of the config (world.py's expert iteration), with its own seed."""
    return LearningSettings(learning_rate=cfg["learning_rate"], updates_per_batch=cfg["updates_per_batch"],
                            update_batch_size=cfg["update_batch_size"], grad_clip=cfg["grad_clip"],
                            replay_size=cfg["replay_size"], replay_recent_window=cfg["replay_recent_window"],
                            replay_recent_fraction=cfg["replay_recent_fraction"], seed=seed)


def make_workers(cfg):
    """The workers, then the guide and the learner (when configured), each with its own index."""
    n = cfg["workers"]
    threads = cfg["threads"] or auto_threads(n + bool(cfg["guide"]) + (cfg["learning"] == "learner"))
    devices = worker_devices(cfg["device"], n + 2)
    each = cfg["learning"] == "each"
    workers = [Worker(i, cfg["checkpoints"][i % len(cfg["checkpoints"])], cfg["seed"] + i,
                      float(cfg["temperatures"][i % len(cfg["temperatures"])]), devices[i], threads,
                      learning=learning_settings(cfg, cfg["seed"] + i) if each else None)
               for i in range(n)]
    if cfg["guide"]:
        workers.append(Worker(len(workers), cfg["guide"], cfg["seed"] + n, 0.0, devices[n], threads, role="guide",
                              learning=learning_settings(cfg, cfg["seed"] + n) if cfg["guide_learns"] else None))
    if cfg["learning"] == "learner":
        i = len(workers)
        workers.append(Worker(i, cfg["learner"] or cfg["checkpoints"][0], cfg["seed"] + i, 0.0, devices[i], threads,
                              role="learner", learning=learning_settings(cfg, cfg["seed"] + i)))
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



def previous_run(cfg):
    """(goal records, the checkpoint event) to resume from, or ([], None) for a fresh run; refuses a fresh
    run into an out_dir holding one, unless overwrite."""
    events = os.path.join(cfg["out_dir"], "swarm.jsonl")
    if cfg["resume"]:
        if not os.path.exists(events):
            raise SystemExit(f"nothing to resume: {events} does not exist; start the run without --resume")
        return resume_point(events)
    if os.path.exists(events) and not cfg["overwrite"]:
        raise ConfigError(f"{cfg['out_dir']} already holds a swarm run (swarm.jsonl): choose another --out_dir, "
                          f"or pass --overwrite=True to move the old run aside")
    return [], None


def resumed_workers(workers, checkpoint):
    """Each process restarts from the checkpoint it saved (a learning process also from its optimizer and replay)."""
    for w in workers:
        path = checkpoint["paths"].get(f"{w.role}_{w.index}")
        if path and path != w.hello["checkpoint"]:
            w.hello.update(checkpoint=path, resume=w.hello["learning"] is not None)
    return workers


def play(pool, cfg, log, records, state, inp, out):
    """Goal after goal until the goals run out, a person stops, or no worker is left; learning between them."""
    goals, control, pending = goals_for(cfg), {"next_goals": [], "notes": []}, []
    # a person at the terminal sees each goal's proposals instead of a bar
    bar = progress(len(goals), "goals", "goal", initial=state["next_goal"],
                   disable=cfg["human"] and cfg["human_input"] == "stdin")
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


def write_summary(out_dir, summary):
    write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))


def write_text(path, text):
    """A file written whole: a temp file renamed (checkpoint.atomic_write would import torch here)."""
    with writing(path):
        with open(f"{path}.tmp", "w") as f:
            f.write(text + "\n")
        os.replace(f"{path}.tmp", path)


def percent(rate):
    return "-" if rate is None else f"{rate:.0%}"


def readable_summary(summary, cfg):
    """summary.json for a person: what decided, how often each way of deciding was right, and what next."""
    deciding = "a person" if cfg["human"] else cfg["aggregators"][0]
    lines = [f"swarm {cfg['out_dir']}: {summary['goals']} goals of {cfg['task']} in {summary['seconds']:.0f} s "
             f"({summary['goals_per_minute'] or 0:.1f} goals/min, {summary['startup_seconds']:.0f} s to start), "
             f"{summary['workers']} workers, {summary['worker_failures']} worker failures",
             f"  the decision ({deciding}) solved {percent(summary['decision_success'])} of the goals",
             "  each aggregator on the same proposals: " +
             ", ".join(f"{name} {percent(summary[f'{name}_success'])}" for name in cfg["aggregators"]),
             f"  one worker alone {percent(summary['single_worker_success'])}, any worker (the oracle) "
             f"{percent(summary['any_worker_success'])}"]
    if cfg["human"]:
        lines.append(f"  the person edited {summary['edited']} and rejected {summary['rejected']}")
    if summary["early_stops"]:
        lines.append(f"  the guide ended {summary['early_stops']} rounds early")
    lines += [f"files: swarm.jsonl (every event), summary.json, summary.txt, swarm.png, worker_<i>.log",
              "next: python serve.py (its page shows this swarm, goal by goal), or another aggregator: "
              f"--aggregators=\"['verifier', 'majority']\" --out_dir={cfg['out_dir']}_verifier"]
    return "\n".join(lines)


def plot_swarm(records, cfg, path):
    """swarm.png: the running success rate over the goals of the decision, each aggregator, one worker alone
    and any worker."""
    if not records:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    played = lambda r: not r.get("early_stop") and r["asked"]  # noqa: E731
    series = {"decision": [r["decision"]["success"] for r in records]}
    for name in cfg["aggregators"]:
        series[name] = [r["choices"][name] is not None and r["proposals"][r["choices"][name]]["success"]
                        for r in records]
    series["one worker alone"] = [sum(p["success"] for p in r["first"]) / r["asked"] if played(r) else None
                                  for r in records]
    series["any worker"] = [any(p["success"] for p in r["first"]) if played(r) else None for r in records]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, (name, hits) in enumerate(series.items()):
        xs, ys, total, n = [], [], 0.0, 0
        for goal, hit in enumerate(hits, 1):
            if hit is not None:
                total, n = total + float(hit), n + 1
                xs.append(goal)
                ys.append(total / n)
        ax.plot(xs, ys, lw=2.5 if name == "decision" else 1.2, color=f"C{i}",
                ls="-" if name in ("decision", *cfg["aggregators"]) else "--",
                label=f"{name} ({total / n:.0%})" if n else name)
    ax.set_xlabel("goals")
    ax.set_ylabel("success rate so far")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(f"swarm of {cfg['workers']} on {cfg['task']}")
    fig.tight_layout()
    with writing(path):
        save_figure(fig, path)


def run(cfg, inp=sys.stdin, out=sys.stderr):
    """The whole swarm run; returns the summary. Every child is gone when this returns or raises."""
    check_config(cfg)
    records, resumed_from = previous_run(cfg)
    with writing(cfg["out_dir"]):
        lock = claim_out_dir(cfg["out_dir"], cfg["resume"], cfg["overwrite"], run_files=("swarm.jsonl",))
    if cfg["human"] and cfg["human_input"] == "file":  # serve.py's page writes the person's commands here
        inp = swarm_console.Inbox(os.path.join(cfg["out_dir"], swarm_console.CONTROL_FILE))
    log = EventLog(os.path.join(cfg["out_dir"], "swarm.jsonl")).log
    workers = make_workers(cfg)
    if resumed_from:
        resumed_workers(workers, resumed_from)
    pool = Pool(workers, cfg["out_dir"], log, cfg["reply_timeout"], cfg["start_timeout"],
                make_transport(cfg, len(workers)))
    atexit.register(pool.close)  # also on an exception that escapes main
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM unwinds like Ctrl-C
    done_before, t0 = len(records), time.perf_counter()
    state = {"next_goal": resumed_from["next_goal"] if resumed_from else 0, "broadcast_at": None, "saved_at": None,
             "learner_lost_at": None}
    try:
        log("config", config=cfg, protocol=PROTOCOL)
        if resumed_from:
            log("resume", goals_done=done_before, next_goal=state["next_goal"])
        pool.start_all()
        startup, t0 = time.perf_counter() - t0, time.perf_counter()  # goals per minute leave out loading
        play(pool, cfg, log, records, state, inp, out)
        failures = sum(w.failures for w in pool.workers)
        summary = {**summarize(records, cfg, time.perf_counter() - t0, failures, records[done_before:]),
                   "startup_seconds": round(startup, 2), "learning": cfg["learning"],
                   "learner_lost_at_goal": state["learner_lost_at"], "resumed_at_goal": done_before if resumed_from else None}
        log("summary", **summary)
        write_summary(cfg["out_dir"], summary)
        readable = readable_summary(summary, cfg)
        write_text(os.path.join(cfg["out_dir"], "summary.txt"), readable)
        plot_swarm(records, cfg, os.path.join(cfg["out_dir"], "swarm.png"))
        print(readable)
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
    if argv[:1] == ["--worker"]:  # the older worker_command form, {python} {swarm} --worker: the worker program
        os.execv(sys.executable, [sys.executable, WORKER_PROGRAM, *argv[1:]])
    argv = ["--human=True" if a == "--human" else a for a in argv]  # a bare --human reads naturally
    cfg = configure(DEFAULTS, argv)
    print_config(cfg)
    run(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
