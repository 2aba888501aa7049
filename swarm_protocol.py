"""
What swarm.py's coordinator and its workers (swarm_worker.py) say to each other: one JSON object per line
over the worker's stdin/stdout, every object with a "type"; stderr is free text (logs, tracebacks).

Protocol (version 3). The coordinator speaks first:

    -> {"type": "hello", "protocol": 3, "worker": 0, "checkpoint": "out/p/ckpt.pt", "seed": 0,
        "temperature": 1.0, "device": "cpu", "threads": 1, "learning": null or {LearningSettings}, "resume": false}
    <- {"type": "ready", "protocol": 3, "worker": 0, "pid": 4242}       (or {"type": "error", "message": ...})
    -> {"type": "goal", "round": 7, "goal": {"task": "arith", "seed": 100007}, "notes": ["HINT: ..."]}
    <- {"type": "proposal", "round": 7, "answer": "ANSWER 1665", "actions": ["CALL calc 37*45", ...],
        "confidence": 0.93}                                              (confidence: asked of the guide)
    -> {"type": "message", "round": 8, "goal": {...}, "own": {...}, "proposals": [{"worker": 1, "answer": ...,
        "actions": [...]}, ...]}
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

A reply must carry the round of its request; anything else (not JSON, no such type, wrong round, a line
over MAX_LINE_BYTES) is garbage and counts as a failure of that worker. A worker answers a line it
cannot read with {"type": "error", "message": ...} and keeps serving. Version 3 changed the hello's
"learning" to exactly the fields of LearningSettings.
"""
import dataclasses
import json

import tasks

PROTOCOL = 3
MAX_LINE_BYTES = 1 << 16  # a reply line longer than this is not a proposal: the worker is misbehaving


@dataclasses.dataclass(frozen=True)
class LearningSettings:
    """How a learning process updates its weights from shared experience: world.py's expert iteration
    (a replay buffer, then gradient steps on samples of it). The hello's "learning", field for field."""
    learning_rate: float
    updates_per_batch: int        # gradient steps after each batch of experience
    update_batch_size: int        # replay items per gradient step
    grad_clip: float
    replay_size: int
    replay_recent_window: int
    replay_recent_fraction: float
    seed: int                     # the replay buffer's sampling


# ----------------------------------------------------------------------------- goals

def goal_env(goal):
    return tasks.make_env(goal["task"], **goal.get("options", {}))


def play_proposal(goal, actions, notes=()):
    """The episode a proposal's actions make in a fresh environment: the world's reward is the verifier."""
    return tasks.play_actions(goal_env(goal), actions, goal["seed"], notes)


def goal_problem(goal):
    """Why a goal cannot be played, or None."""
    if not isinstance(goal, dict) or not isinstance(goal.get("seed"), int):
        return f"a goal is {{\"task\": NAME, \"seed\": INT, \"options\": {{...}}}}, got {goal!r}"
    try:
        goal_env(goal)
    except (ValueError, TypeError) as e:
        return f"goal {goal!r}: {e}"
    return None


# ----------------------------------------------------------------------------- messages

# what each message to a worker must carry besides its type, and the type of its reply
MESSAGE_FIELDS = {"hello": ("protocol", "worker", "checkpoint", "seed", "temperature", "device", "threads"),
                  "goal": ("goal",), "message": ("goal", "own", "proposals"), "score": ("goal", "proposals"),
                  "learn": ("experience",), "save": ("path",), "weights": ("path",), "stop": ()}
REPLY_TYPES = {"goal": "proposal", "message": "proposal", "score": "scores", "learn": "learned", "save": "saved",
               "weights": "loaded"}


def send(stream, message):
    stream.write(json.dumps(message) + "\n")
    stream.flush()


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


def parse_reply(line, expect, rnd):
    """The reply dict on one line of a worker's output, or a string saying why the line is garbage."""
    try:
        reply = json.loads(line)
    except json.JSONDecodeError:
        return f"printed garbage: {line[:80]!r}"
    if isinstance(reply, dict) and reply.get("type") == "error" and expect != "error":
        return f"answered with an error: {str(reply.get('message'))[:300]}"
    if not isinstance(reply, dict) or reply.get("type") != expect:
        return f"expected a {expect} message, got {line[:120]!r}"
    if rnd is not None and reply.get("round") != rnd:
        return f"reply for round {reply.get('round')} while round {rnd} was asked"
    if expect == "ready" and reply.get("protocol") != PROTOCOL:
        return f"speaks protocol {reply.get('protocol')}, we speak {PROTOCOL}"
    return reply
