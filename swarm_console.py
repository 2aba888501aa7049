"""
A person in swarm.py's loop (--human): after each goal the proposals and the aggregate are shown and the
person accepts, edits the final action, rejects or stops. Before the verdict they may set the next goal,
broadcast a line or a hint to every worker's context for the next goal, or pause. Each of those is logged.
Input is any text stream (the terminal, a pipe, a test's StringIO), or a control file that serve.py's web
page writes (`Inbox`: human_input="file").
"""
import json
import os
import time

import tasks
from swarm_protocol import goal_problem

HELP = ("[a]ccept, [e]dit (type the final action), [r]eject, [s]top, or first: g [TASK] SEED (set the next "
        "goal), m TEXT (a message to every worker), h PLAN (a hint: a plan every worker reads), [p]ause")
CONTROL_FILE = "control.jsonl"  # in the swarm's out_dir: one {"action", "text"} command per line
MAX_CONTROL_CHARS = 1000  # a command's text; notes are cut further, to the cap on a note line
# a page's command -> the line a person would type
ACTIONS = {"accept": "a", "edit": "e", "reject": "r", "stop": "s", "goal": "g", "note": "m", "hint": "h",
           "pause": "p", "resume": "resume"}


def ask(goal, proposals, chosen, inp, out, control, log, task, task_options):
    """Show the proposals and the aggregate; ('accept'|'edit'|'reject'|'stop', the edited action or None).
    A goal the person sets goes to control["next_goals"], a broadcast to control["notes"]; `task` and
    `task_options` are the run's, for a goal given by its seed alone."""
    out.write(f"\ngoal {goal}\n")
    for i, p in enumerate(proposals):
        mark = "*" if i == chosen else " "
        out.write(f" {mark} worker {p['worker']}: {p['answer']!r} (reward {p['reward']})\n")
    out.write(f"aggregate: {proposals[chosen]['answer']!r}\n" if chosen is not None else "aggregate: none\n")
    while True:
        out.write(f"{HELP}? ")
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
            set_goal(rest, task, task_options, control, log, out)
        elif choice in ("m", "message") and rest:
            broadcast("HUMAN", rest, control, log, out)
        elif choice in ("h", "hint") and rest:
            broadcast("HINT", rest, control, log, out)
        elif choice in ("p", "pause"):
            if not pause(inp, out, log):
                return "stop", None
        else:
            log("human", action="unknown", text=line.strip()[:200])
            out.write(f"please answer one of {HELP}\n")


def set_goal(text, task, task_options, control, log, out):
    """'SEED' or 'TASK SEED' as the next goal, or a line saying why not."""
    parts = text.split()
    name, seed = (task, parts[0]) if len(parts) == 1 else (parts[0], parts[-1])
    goal = {"task": name, "options": task_options if name == task else {}, "seed": tasks.parse_int(seed)}
    problem = "the seed must be an integer" if goal["seed"] is None else goal_problem(goal) if len(parts) <= 2 else \
        "write g SEED or g TASK SEED"
    if problem:
        out.write(f"cannot set that goal: {problem}\n")
        return
    control["next_goals"].append(goal)
    log("human", action="set_goal", goal=goal)
    out.write(f"next goal: {goal}\n")


def broadcast(kind, text, control, log, out):
    """A HUMAN: (a message) or HINT: (a plan, as a guide's hint reads) line in every worker's context for the
    next goal, cut to the cap on a note line."""
    text = " ".join(text.split())
    room = tasks.MAX_NOTE_CHARS - len(f"{kind}: ")
    if len(text) > room:
        out.write(f"message cut to {room} characters (the cap on a note line)\n")
    control["notes"].append(tasks.note_line(kind, [text[:room]]))
    log("human", action="broadcast" if kind == "HUMAN" else "hint", text=text[:room], cut=len(text) > room)
    out.write("every worker reads it in its context for the next goal\n")


def pause(inp, out, log):
    """Wait for the person to type resume (True) or stop, or for the end of input (False)."""
    log("human", action="pause")
    out.write("paused: the swarm waits; type resume (or stop)\n")
    while True:
        out.flush()
        line = inp.readline()
        if not line or line.strip().lower() in ("s", "stop"):
            log("human", action="stop")
            return False
        if line.strip().lower() in ("resume", "r", "c", "continue"):
            log("human", action="resume")
            out.write("resumed\n")
            return True
        out.write("paused: type resume (or stop)\n")


class Inbox:
    """A text stream of a person's lines read from out_dir/control.jsonl, which serve.py's page appends to
    (human_input="file"). readline() waits for the next whole line written after the swarm started; each JSON
    command becomes the line a person would type (an edit: "e", then its text). A line that is not a command
    becomes "?", which ask() logs as unknown. Never ends: the page may answer hours later."""

    def __init__(self, path, poll_s=0.2):
        self.path, self.poll_s, self.pending = path, poll_s, []
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0  # older commands were for another session

    def readline(self):
        while not self.pending:
            self.pending = [line for row in self.read_new() for line in typed_lines(row)]
            if not self.pending:
                time.sleep(self.poll_s)
        return self.pending.pop(0) + "\n"

    def read_new(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        whole = data[:data.rfind(b"\n") + 1]  # a line being written is read once it is whole
        self.offset += len(whole)
        return whole.decode("utf-8", "replace").splitlines()


def typed_lines(row):
    """The console lines of one control-file line: {"action": "note", "text": "..."} -> ["m ..."]."""
    try:
        command = json.loads(row)
        action, text = command["action"], " ".join(str(command.get("text", "")).split())[:MAX_CONTROL_CHARS]
    except (ValueError, KeyError, TypeError):
        return ["?"] if row.strip() else []
    if action not in ACTIONS:
        return ["?"]
    if action == "edit":
        return ["e", text]
    return [f"{ACTIONS[action]} {text}".strip()]
