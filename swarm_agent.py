"""
What one swarm worker does: a world policy checkpoint (ModelAgent) that serves swarm_protocol.py over a pair of
line streams (serve). swarm_worker.py runs it on stdin/stdout as a child process of swarm.py; swarm_ray.py runs
it in a Ray actor. The coordinator sends a hello, then goals, messages, scores, learning and saves, until stop.

It plays each goal with its own seed and temperature, scores and revises proposals with its model, and
learns from shared experience with policy.py's expert-iteration pieces (replay buffer, gradient steps)
when the hello asks it to. It never outlives its coordinator, even inside a hung model call: on Linux
the kernel kills it when its parent dies (PR_SET_PDEATHSIG), and anywhere, the end of its input while
its parent changed or nobody reads its output any more makes it exit at once.
"""
import dataclasses
import os
import queue
import random
import select
import sys
import threading
import time

import tasks
from processes import die_with_parent
from swarm_protocol import PROTOCOL, REPLY_TYPES, LearningSettings, goal_env, play_proposal, read_message, send

# torch and policy.py (the policy and its expert-iteration pieces) are imported by ModelAgent only, so a
# worker that fails its hello answers at once, and test workers (tests/swarm_fakes.py) start without torch


class ModelAgent:
    """A worker backed by a world policy checkpoint: plays episodes, scores and revises proposals, and
    learns from shared experience when the hello carries LearningSettings."""

    def __init__(self, hello, out=None):
        self.learning = learning_settings(hello.get("learning"))  # before loading anything: a mismatch says so at once
        import torch

        import policy as policies  # the policy and its learning pieces (policy.py)
        from runtime import resolve_device
        self.torch, self.policies = torch, policies
        torch.set_num_threads(hello["threads"])  # N workers share the cores instead of each taking all
        self.device = resolve_device(hello["device"])
        self.seed, self.temperature = hello["seed"], hello["temperature"]
        path = policies.policy_file(hello["checkpoint"])
        state = policies.load_policy_checkpoint(path)
        self.policy = policies.policy_from_checkpoint(state, str(self.device), path)
        if self.learning:
            self.optimizer = policies.make_optimizer(self.policy, self.learning.learning_rate)
            self.progress = self.resumed(state, path) if hello.get("resume") else policies.Progress(
                0, {}, self.replay_buffer(), random.Random(self.learning.seed))

    def replay_buffer(self, items=None):
        s = self.learning
        return self.policies.ReplayBuffer(s.replay_size, s.replay_recent_window, s.replay_recent_fraction, items)

    def resumed(self, state, path):
        """A checkpoint this worker saved: its optimizer, replay buffer and random state go on."""
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            rng = random.Random()
            rng.setstate(state["rng"])
            self.torch.set_rng_state(state["torch_rng"])
            return self.policies.Progress(state["step"], state["baselines"], self.replay_buffer(state["replay"]), rng)
        except (KeyError, TypeError, ValueError) as e:
            raise SystemExit(f"{path} cannot be resumed by a learning worker ({type(e).__name__}: {e}): it is not "
                             f"a checkpoint a swarm worker saved; start the run without --resume")

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
        """Expert iteration on shared experience: a success is imitated whole; a failure marked teacher gets
        the teacher's action where it first went wrong. Then updates_per_batch gradient steps on replay
        samples, on the likelihood of the actions (swarm workers write their actions: act=generate)."""
        if not self.learning:
            raise SystemExit("this worker was started without learning; it cannot learn")
        policies, progress, s = self.policies, self.progress, self.learning
        seen = set()
        for e in experience:
            episode = play_proposal(e["goal"], e["actions"], e.get("notes", ()))
            new = policies.teacher_items(episode, progress.episode) if e.get("teacher") else \
                [policies.episode_item(episode, progress.episode)] if episode["success"] else []
            for item in new:
                # failed plans that went wrong at the same state get the same teacher label: learn it once
                # (measured: 4 copies of each label per goal drove arith from 62% to 37% in 40 goals)
                key = (item["text"], str(item["spans"]))
                if key not in seen:
                    seen.add(key)
                    progress.replay.add(item, progress.rng)
            progress.episode += 1
        losses = []
        for _ in range(s.updates_per_batch):
            items = progress.replay.sample(s.update_batch_size, progress.rng)
            if items:
                losses.append(policies.update(self.policy, self.optimizer, items, [1.0] * len(items), s.grad_clip))
        return {"items": len(seen), "loss": sum(losses) / len(losses) if losses else None}  # None: nothing yet

    def save(self, path):
        if self.learning:
            self.policies.save_policy(path, self.policy, self.optimizer, dataclasses.asdict(self.learning),
                                      self.progress)
        return {"path": path}

    def load_weights(self, path):
        state = self.policies.load_policy_checkpoint(path)
        self.policy.model.load_state_dict(state["model"])
        return {"path": path}


def learning_settings(fields):
    """The hello's "learning" as LearningSettings (None: this worker does not learn)."""
    if fields is None:
        return None
    try:
        return LearningSettings(**fields)
    except TypeError as e:  # a coordinator of another version: say which fields, not a KeyError later
        raise SystemExit(f"the hello's learning settings do not fit this worker ({e}); it expects "
                         f"{[f.name for f in dataclasses.fields(LearningSettings)]}")


# ----------------------------------------------------------------------------- serving the protocol

def nobody_reads(stream):
    """Whether the reading end of this output pipe is gone (the coordinator died): poll flags an error."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), 0)  # errors and hang-ups are reported whatever is asked
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll here, or not a pipe
        return False


def read_requests(stream, lines, parent, out):
    """Feed the worker's input into the queue `lines`, then None at its end. After the end, a new parent
    process or an output nobody reads means the coordinator is gone (a shell or ssh between us keeps our
    parent alive): exit at once, whatever the main thread is stuck in. Otherwise the main thread answers
    what was read, then returns."""
    for line in stream:
        lines.put(line)
    lines.put(None)
    while True:  # a daemon thread: it ends with the process when the main thread finishes normally
        if os.getppid() != parent or nobody_reads(out):
            os._exit(1)
        time.sleep(0.2)


def answer(agent, msg):
    """The reply to one request (the protocol's round trip for every type but stop)."""
    kind = msg["type"]
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
    return {"type": REPLY_TYPES[kind], "round": msg.get("round"), **reply}


def serve(stdin, stdout, make_agent=ModelAgent):
    """Serve the protocol until stop, or until the end of input once every request is answered; the exit
    code. make_agent(hello, stdout) builds the agent (a SystemExit from it is the hello's error reply)."""
    parent = os.getppid()
    die_with_parent()
    hello = read_message(stdin.readline() or "null", expect="hello")
    if isinstance(hello, str) or hello["protocol"] != PROTOCOL:
        problem = hello if isinstance(hello, str) else f"speaks protocol {hello['protocol']}"
        print(f"worker: expected a protocol {PROTOCOL} hello: {problem}", file=sys.stderr)
        send(stdout, {"type": "error", "message": f"expected a protocol {PROTOCOL} hello: {problem}"})
        return 2
    try:
        agent = make_agent(hello, stdout)
    except SystemExit as e:  # a checkpoint that cannot be a policy: the coordinator logs why
        print(f"worker {hello['worker']}: {e}", file=sys.stderr)
        send(stdout, {"type": "error", "message": str(e)})
        return 2
    send(stdout, {"type": "ready", "protocol": PROTOCOL, "worker": hello["worker"], "pid": os.getpid()})
    lines = queue.Queue()
    threading.Thread(target=read_requests, args=(stdin, lines, parent, stdout), daemon=True).start()
    for line in iter(lines.get, None):
        msg = read_message(line)
        if isinstance(msg, str):
            print(f"worker {hello['worker']}: {msg}", file=sys.stderr)
            send(stdout, {"type": "error", "message": msg})
        elif msg["type"] == "stop":
            return 0
        else:
            send(stdout, answer(agent, msg))
    return 0
