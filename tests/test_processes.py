import io
import os
import signal
import subprocess
import sys
import time

import pytest

import processes
from child_processes import clean_up, gone, wait_until_gone
from conftest import ROOT


def test_stop_ends_the_whole_group_a_shells_children_included():
    # the shell's background child would survive a kill of the shell alone
    proc = processes.start(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE)
    child = int(proc.stdout.readline())
    assert os.getpgid(proc.pid) == proc.pid == os.getpgid(child) != os.getpgid(0)  # its own group, not ours
    assert processes.stop(proc, grace=2.0) == -signal.SIGTERM
    assert wait_until_gone([proc.pid, child]) == []


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace():
    proc = processes.start(["sh", "-c", "trap '' TERM; echo ready; sleep 60"], stdout=subprocess.PIPE)
    proc.stdout.readline()
    t0 = time.monotonic()
    assert processes.stop(proc, grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - t0 < 5


def test_stop_gives_the_exit_code_of_a_child_that_ended_by_itself():
    proc = processes.start(["sh", "-c", "exit 7"])
    assert processes.exited(proc, timeout=10)
    assert processes.stop(proc) == 7 and processes.stop(proc) == 7  # stopping twice is harmless


def test_a_supervisor_that_must_not_block_signals_now_and_reaps_later():
    # serve.py's job loop: SIGINT (the script's Ctrl-C path: save, then stop), a glance each round, then the code
    proc = processes.start(["sh", "-c", "trap 'exit 3' INT; echo ready; while :; do sleep 0.1; done"],
                           stdout=subprocess.PIPE)
    proc.stdout.readline()
    assert not processes.exited(proc)
    processes.signal_group(proc, signal.SIGINT)
    assert processes.exited(proc, timeout=30) and proc.returncode is None  # exited, not reaped yet (30 s: a busy machine)
    assert processes.stop(proc, grace=0) == 3


def test_children_die_with_a_parent_killed_by_sigkill():
    code = ("import subprocess, sys, time; sys.path.insert(0, sys.argv[1]); import processes; "
            "p = processes.start(['sleep', '60']); print(p.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code, ROOT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert not gone(child)
        parent.kill()
        parent.wait()
        assert wait_until_gone([child]) == []
    finally:
        if not gone(child):
            os.kill(child, signal.SIGKILL)


def test_lines_are_read_with_a_bound_and_a_longer_one_stops_the_reading():
    limit = 1024
    fits = b"x" * limit + b"\n"
    stream = io.BufferedReader(io.BytesIO(b"ok\n" + fits + b"y" * (50 * limit) + b"\nnever read\n"), buffer_size=256)
    lines = processes.read_lines(stream, limit)
    assert next(lines) == "ok\n" and next(lines) == fits.decode()
    with pytest.raises(processes.LineTooLong, match=f"more than {limit} bytes"):
        next(lines)
    assert stream.tell() <= 2 * limit + 256 + 10  # what was read of the long line: about the limit, not all of it
    assert list(processes.read_lines(io.BytesIO(b"a\nno newline at the end"), limit)) == ["a\n", "no newline at the end"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_run_in_processes_leaves_no_worker_when_stopped(sig):
    # four 60 s jobs on two workers: stopped, the run ends at once instead of running every queued job
    code = ("import signal, sys, time; sys.path.insert(0, sys.argv[1]); import runtime; "
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); print('go', flush=True); "
            "list(runtime.run_in_processes(time.sleep, [(60,)] * 4, 2))")
    parent = subprocess.Popen([sys.executable, "-c", code, ROOT], stdout=subprocess.PIPE, text=True,
                              env=os.environ | {"OMP_NUM_THREADS": "1"})
    workers = []
    try:
        assert parent.stdout.readline() == "go\n"
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:  # the two pool workers (the resource tracker aside)
            out = subprocess.run(["pgrep", "-P", str(parent.pid), "-f", "spawn_main"], capture_output=True, text=True)
            workers = [int(p) for p in out.stdout.split()]
            time.sleep(0.1)
        assert len(workers) == 2
        time.sleep(1)  # both started their job
        parent.send_signal(sig)
        assert parent.wait(timeout=20) != 0
        assert wait_until_gone(workers) == []
    finally:
        clean_up(parent, workers)
