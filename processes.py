"""
Child processes that never outlive their parent, for the scripts that start them (swarm.py's workers,
experiments/ddp_scaling.py's training runs, serve.py's jobs):

- `start` runs a command in its own session (process group): one signal reaches the child and everything
  it starts (a shell's children, torchrun's ranks), and Ctrl-C in the terminal reaches only the parent.
  On Linux the kernel also signals the child when the parent dies, even by kill -9 (`die_with_parent`).
- `read_lines` reads a child's output line by line with every read bounded: a child that prints without
  a newline cannot make its parent hold more than one line's limit.
- `stop` ends children: SIGTERM to each whole group, a grace period, then SIGKILL to whatever is left of
  each group; every child is reaped. A supervisor that must not block (a server's job loop) uses the
  pieces: `signal_group` now, `exited` on each round, `stop(proc, grace=0)` once it has exited or is late.

run_in_processes (runtime.py) runs Python functions in multiprocessing's pool instead (pickled calls and
results): its workers share `die_with_parent` only.
"""
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _prctl():
    """libc's prctl, looked up by the parent: between fork and exec a child should call it, not load it."""
    import ctypes
    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(sig=signal.SIGKILL):
    """Linux: the kernel sends this process `sig` when its parent dies, even inside a hung call (a no-op
    elsewhere). Strictly, when the parent's thread that started it ends: start children from a thread that
    lives as long as they should."""
    if sys.platform.startswith("linux"):
        _prctl()(PR_SET_PDEATHSIG, int(sig))


def start(argv, *, stdin=None, stdout=None, stderr=None, env=None, cwd=None, death_signal=signal.SIGKILL):
    """subprocess.Popen(argv) in a session of its own, its pipes binary (wrap them, or use read_lines).

    death_signal: what the child gets when this process dies (Linux; SIGKILL for a worker that has nothing
    to save, SIGTERM or SIGINT for a run that saves on it, None for a child meant to outlive us), strictly
    when the thread that called start ends: call it from one that lives as long as the child should. Only
    the child itself gets it, not its group: a grandchild (behind a shell) goes along if it dies with its
    own parent too, as swarm_worker.py does; while this process lives, `stop` ends the whole group.
    With a death_signal Popen forks rather than spawns (a preexec step), which costs a large parent a
    little more. An argv that cannot run raises OSError, as Popen does."""
    preexec = None
    if death_signal is not None and sys.platform.startswith("linux"):
        prctl, parent = _prctl(), os.getpid()

        def preexec():  # in the child, before exec: the signal stays set across exec
            prctl(PR_SET_PDEATHSIG, int(death_signal))
            if os.getppid() != parent:  # the parent died before the line above: nobody would signal us
                os.kill(os.getpid(), death_signal)
    return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd,
                            start_new_session=True, preexec_fn=preexec)


class LineTooLong(Exception):
    """A child printed more than the limit without a newline; its output was not read further."""


def read_lines(stream, limit):
    """Each line of a binary stream as text, newline kept; a line of more than `limit` bytes before its
    newline raises LineTooLong after `limit` + 1 bytes of it were read, so memory stays bounded however
    much the child prints. The last line may lack its newline."""
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            raise LineTooLong(f"a line of more than {limit} bytes")
        yield line.decode("utf-8", "replace")


def _running(proc):
    """Whether proc has not exited yet, without reaping it: while it is unreaped its pid, which is its
    group's id, cannot be given to another process, so signalling the group is safe."""
    if proc.returncode is not None:
        return False
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:  # reaped already (by Popen.poll elsewhere)
        return False


def signal_group(proc, sig):
    """Send sig to the child's whole process group (e.g. SIGINT: a script's Ctrl-C path) without waiting.
    Safe until the child is reaped (by `stop`, or Popen's poll or wait): check with `exited`, not poll."""
    try:
        os.killpg(proc.pid, sig)  # its group: a child of `start` leads one
    except ProcessLookupError:  # no group of that id: a child not started by `start`, signalled alone
        if _running(proc):
            proc.send_signal(sig)


def exited(proc, timeout=0.0):
    """Whether proc has exited, waiting up to `timeout` seconds (0: a glance). It is not reaped, so `stop`
    still reaches what it left in its group and reads its exit code."""
    deadline = time.monotonic() + timeout
    while _running(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def stop_all(procs, grace=5.0, sig=signal.SIGTERM):
    """End children started by `start`: `sig` to each group, up to `grace` seconds for them to exit (0:
    none), then SIGKILL to whatever is left of each group, the leader's own children included. Every child
    is reaped and its pipes closed. Returns their exit codes (negative: the signal that ended it)."""
    procs = list(procs)
    if grace > 0:
        for proc in procs:
            if _running(proc):
                signal_group(proc, sig)
        deadline = time.monotonic() + grace
        while any(_running(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.02)
    for proc in procs:
        if proc.returncode is None:  # unreaped, even if it exited: what it left in its group goes too
            signal_group(proc, signal.SIGKILL)
    codes = [proc.wait() for proc in procs]
    for proc in procs:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except (OSError, ValueError):  # a pipe whose reader is gone
                pass
    return codes


def stop(proc, grace=5.0, sig=signal.SIGTERM):
    """stop_all for one child; its exit code."""
    return stop_all([proc], grace, sig)[0]
