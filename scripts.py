"""
One µLM script run from another, as a user would type it: `python prepare.py --key=value ...`.

    run_script("train.py", {"out_dir": "out/x", "max_iters": 100}, stop)

No script imports another script (a script's globals and command line are its own); a script that
needs another's work runs it as a child process. The child's output streams through; a failure is a
SystemExit that shows its last lines and the command to run it alone. Ctrl-C and SIGTERM reach the
child once, through our StopRequest: the child runs in a session of its own (processes.start), so a
terminal's Ctrl-C does not also reach it directly (two signals would make it quit without saving), and
on Linux it gets SIGTERM (save and stop) if we die without passing one on.
"""
import collections
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

from configurator import parse_value
from processes import LineTooLong, read_lines, start
from processes import stop as stop_child

ROOT = os.path.dirname(os.path.abspath(__file__))  # the scripts live here, whatever the working directory
TAIL_LINES = 20     # lines of a failed child's output repeated in the error
QUIT_GRACE_S = 30   # after a second stop request, seconds the child has to quit before it is killed
MAX_LINE_BYTES = 1 << 16  # a longer line is not a log line: the child is misbehaving


def script_command(script, overrides=(), args=()):
    """The command line: this Python, the script at the repository root, plain args (config files), then
    --key=value for each override (values as Python literals, which the configurator reads back exactly)."""
    return [sys.executable, "-u", os.path.join(ROOT, script), *args,
            *(f"--{key}={literal(value)}" for key, value in dict(overrides).items())]


def literal(value):
    """A value as the configurator reads it back: a string that would stay a string is written bare
    (--device=cpu, as a user types it), anything else as a Python literal (--seed=5, --name='5')."""
    return value if isinstance(value, str) and parse_value(value) == value else repr(value)


def _echo(stream, tail, out):
    """Copy the child's output to ours line by line (each read bounded), keeping the last lines for an error."""
    try:
        for line in read_lines(stream, MAX_LINE_BYTES):
            out.write(line)
            out.flush()
            tail.append(line.rstrip("\n"))
    except LineTooLong:
        tail.append(f"(a line of more than {MAX_LINE_BYTES} bytes: the rest of the output was not read)")
    finally:
        stream.close()


def _wait(proc, stop, signalled):
    """Wait for the child; pass our first stop request on to it once. Returns whether it was passed."""
    while proc.poll() is None:
        if stop is not None and stop.requested and not signalled:
            proc.send_signal(signal.SIGTERM)  # the child's StopRequest: save, then stop
            signalled = True
        time.sleep(0.1)
    return signalled


def shorten(line, limit=300):
    """A line of a child's output as an error repeats it: a whole printed config is cut."""
    return line if len(line) <= limit else f"{line[:limit]} ... ({len(line) - limit} more characters)"


def script_config(script, args=(), overrides=()):
    """Another script's resolved config for these config files and overrides (its --show_config), as the run
    would see it: its own defaults, read without importing it."""
    command = script_command(script, overrides, args) + ["--show_config"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{script} could not resolve its config: {done.stderr.strip()[-1000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_script(script, overrides=(), stop=None, args=(), env=None, out=None):
    """Run `python <script> args --key=value ...` to the end; returns its exit code (0, or what it exited
    with after we asked it to stop).

    stop: a runtime.StopRequest of the caller; a request (Ctrl-C, SIGTERM) is passed to the child, which
    saves and stops; a second one (StopRequest raises SystemExit) reaches the child too, which then quits
    at once. A child that fails is a SystemExit with its last lines, unless we asked it to stop.
    env: environment variables to set for the child (e.g. OMP_NUM_THREADS); out: where its output goes."""
    command = script_command(script, overrides, args)
    out = out or sys.stdout
    tail = collections.deque(maxlen=TAIL_LINES)
    # its own session, and SIGTERM (save and stop) from the kernel if we die: processes.start
    proc = start(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                 death_signal=signal.SIGTERM)
    reader = threading.Thread(target=_echo, args=(proc.stdout, tail, out), daemon=True)
    reader.start()
    signalled = False
    try:
        signalled = _wait(proc, stop, signalled)
    except BaseException:  # a second Ctrl-C (StopRequest's SystemExit), or any error of ours: the child goes too
        if proc.poll() is None:  # a second signal makes its StopRequest quit at once; killed if late
            stop_child(proc, grace=QUIT_GRACE_S, sig=signal.SIGINT if signalled else signal.SIGTERM)
        raise
    finally:
        reader.join(5)
    if proc.returncode != 0 and not signalled:
        lines = "\n".join(f"    {shorten(line)}" for line in tail) or "    (it printed nothing)"
        raise SystemExit(f"{script} failed (exit code {proc.returncode}); its last lines:\n{lines}\n"
                         f"the command was: {shlex.join(command)}")
    return proc.returncode
