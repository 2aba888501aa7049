"""Whether processes a test started (or their children) are gone: shared by the tests that kill them."""
import os
import signal
import time


def gone(pid):
    """The process has exited (a zombie left unreaped by a PID 1 that does not reap counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc (macOS)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def wait_until_gone(pids, timeout=20):
    """The pids still running after waiting up to `timeout` seconds for them all to end."""
    deadline = time.monotonic() + timeout
    while not all(gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if not gone(p)]


def clean_up(proc, pids):
    """After a test, pass or fail: its process and every one of pids still running are killed."""
    proc.kill()
    proc.wait()
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
