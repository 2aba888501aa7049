"""
A person in swarm.py's loop (--human): after each goal the proposals and the aggregate are shown and the
person accepts, edits the final action, rejects or stops. Before the verdict they may set the next goal,
broadcast a line to every worker's context for the next goal, or pause. Each of those is logged.
Input is any text stream (the terminal, a pipe, a test's StringIO).
"""
import tasks
from swarm_protocol import goal_problem

HELP = ("[a]ccept, [e]dit (type the final action), [r]eject, [s]top, or first: g [TASK] SEED (set the next "
        "goal), m TEXT (a message to every worker), [p]ause")


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
            broadcast(rest, control, log, out)
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


def broadcast(text, control, log, out):
    """A HUMAN: line in every worker's context for the next goal, cut to the cap on a note line."""
    text = " ".join(text.split())
    room = tasks.MAX_NOTE_CHARS - len("HUMAN: ")
    if len(text) > room:
        out.write(f"message cut to {room} characters (the cap on a note line)\n")
    control["notes"].append(tasks.note_line("HUMAN", [text[:room]]))
    log("human", action="broadcast", text=text[:room], cut=len(text) > room)
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
