"""
What every run needs from its machine and its out_dir, shared by the scripts:

- the device and dtype to run on (`resolve_device`, `resolve_dtype`), never a silent fallback;
- one run per out_dir (`claim_out_dir`): a lock that a crashed run does not leave stuck, and a fresh
  run that refuses to replace a finished one unless told to;
- Ctrl-C and SIGTERM as a request to save and stop (`StopRequest`);
- metrics as JSON lines (`append_jsonl`, `read_jsonl`, `truncate_jsonl`);
- several small runs side by side on one device (`run_in_processes`);
- which code a measurement ran (`code_version`);
- how many CPU threads torch uses (`set_threads`: on a busy machine fewer is faster);
- progress bars that suit a terminal and a log file alike (`progress`).
"""
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from tqdm import tqdm


# ----------------------------------------------------------------------------- device and dtype

def resolve_device(name):
    """A torch.device; asking for a device this machine lacks is an error, never a silent fallback."""
    import torch  # here, not at the top: swarm.py's coordinator uses this module without torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device={name} but this torch sees no CUDA GPU; use --device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"device={name} but MPS is not available here; use --device=cpu")
    return device


def resolve_dtype(name, device):
    """'bfloat16' or 'float32': auto picks bfloat16 on a CUDA GPU that has it."""
    import torch
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if name not in ("float32", "bfloat16"):
        raise SystemExit(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return name


# ----------------------------------------------------------------------------- CPU threads

def busy_cores(seconds=0.1, cpus=None):
    """How many of `cpus` (default: the ones this process may run on) are busy now: their non-idle time over
    `seconds` from Linux's per-CPU lines of /proc/stat, or None where there is none. Only our own CPUs count, so
    a container pinned to 2 cores of a busy 64-core host is not read as busy. Why not the load average: it
    trails by a minute both ways, so right after a job (a training run, then sample.py) an idle 2-core machine
    still reads as half busy, and threads=0 took one thread where two trained 1.55x faster (BENCHMARKS.md)."""
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    wanted = {f"cpu{i}" for i in cpus}

    def cpu_times():  # (idle + iowait, total) summed over the wanted CPUs
        idle = total = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name in wanted:
                    values = [int(v) for v in fields[:8]]  # all but guest time, counted in user already
                    idle, total = idle + values[3] + values[4], total + sum(values)
        return idle, total
    try:
        idle0, total0 = cpu_times()
        time.sleep(seconds)
        idle1, total1 = cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * len(wanted)


def auto_threads(processes=1):
    """What threads=0 means: OMP_NUM_THREADS when it is set, else the cores this process may run on that
    others leave idle (busy_cores, or the load average without /proc/stat), shared among `processes`, and at
    least 1. torch's default takes every core, and its threads wait on each other at every operation: on a
    busy 2-core machine cpu_quick's training ran 15x slower on 2 threads than on 1 (BENCHMARKS.md)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return max(1, int(os.environ["OMP_NUM_THREADS"]) // processes)
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = len(cpus)
    busy = busy_cores(cpus=cpus)
    if busy is None:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)) // processes)


def set_threads(threads):
    """Set torch's CPU threads for this process (0: auto_threads()) and return how many it uses, never more
    than torch's own default (one per physical core)."""
    import torch  # here, not at the top: swarm.py's coordinator uses this module without torch
    if threads < 0:
        raise SystemExit(f"threads must be 0 (automatic) or more, got {threads}")
    n = threads or min(auto_threads(), _torch_default_threads())
    torch.set_num_threads(n)
    return n


def _torch_default_threads(_first=[]):  # noqa: B006 -- torch's count before anyone set it, read once
    import torch
    if not _first:
        _first.append(torch.get_num_threads())
    return _first[0]


# ----------------------------------------------------------------------------- progress

class _Lines:
    """A file for tqdm that is not a terminal: each refresh becomes one whole line (no carriage returns), and a
    refresh that shows no progress since the last line (the redraw after a message, the one at the end) none."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text):
        line = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).replace("\r", "").strip()  # no cursor moves
        counts = line.split("[")[0]  # the bar and its counts, without the times and rates
        if line and counts != self.last:
            self.stream.write(line + "\n")
            self.last = counts

    def flush(self):
        self.stream.flush()


def progress(total=None, desc=None, unit="it", initial=0, interval=30.0, disable=False, file=None):
    """A tqdm bar with an ETA on a terminal; anywhere else (CI, a job's log.txt, a pipe) one plain line every
    `interval` seconds and one at the end, so a log shows progress without a wall of carriage returns."""
    stream = file or sys.stderr
    if disable:
        return tqdm(total=total, disable=True)
    if stream.isatty():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream, dynamic_ncols=True)
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=_Lines(stream), mininterval=interval,
                maxinterval=interval, ncols=100)


# ----------------------------------------------------------------------------- one run per out_dir

def claim_out_dir(out_dir, resuming, overwrite=False, run_files=("ckpt.pt", "metrics.jsonl"), option="--out_dir"):
    """Lock out_dir for this process and check a fresh run may start there; returns the held lock.

    The lock is an flock on out_dir/.lock: the kernel drops it when the process dies, however it dies,
    so a crashed run never leaves it stuck. A fresh run (not resuming) into a folder that already holds
    one of run_files refuses, unless overwrite=True, which moves the old run aside to out_dir/replaced-<time>/.
    """
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as e:  # read-only, a file in the way, no space: say which folder, not a traceback
        raise SystemExit(f"cannot write to {out_dir} ({e.strerror or e}): give {option} a folder you can write "
                         f"to") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise SystemExit(f"{out_dir} is in use by a running job ({holder}): one run per out_dir. "
                         f"Wait for it, stop it, or choose another --out_dir")
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}")
    lock.flush()
    existing = [name for name in run_files if os.path.exists(os.path.join(out_dir, name))]
    if existing and not resuming:
        if not overwrite:
            lock.close()
            raise SystemExit(f"{out_dir} already holds a run ({', '.join(existing)}). Resume it with "
                             f"--init_from=resume, choose another --out_dir, or pass --overwrite=True to move "
                             f"the old run aside and start fresh")
        aside = os.path.join(out_dir, time.strftime("replaced-%Y%m%d-%H%M%S"))
        os.makedirs(aside, exist_ok=True)
        for name in os.listdir(out_dir):
            if name != ".lock" and not name.startswith("replaced-"):
                shutil.move(os.path.join(out_dir, name), os.path.join(aside, name))
        print(f"overwrite=True: the old run in {out_dir} was moved to {aside}", file=sys.stderr)
    return lock


# ----------------------------------------------------------------------------- stop requests

class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to save and stop at the next step boundary.

    A second Ctrl-C quits at once, without saving: the last checkpoint on disk is kept as it is. A second
    SIGTERM changes nothing: it is a supervisor's request, which may come more than once (serve.py's
    parent-death signal comes each time the job's parent thread exits, and a dying server hands its
    children from thread to thread), never a person's impatience.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, say=print):
        self.requested = False
        self.say = say
        self.previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGTERM:
            return
        if self.requested:
            self.say(f"{name} again: quitting now without saving; the last checkpoint on disk is kept")
            raise SystemExit(130)
        self.requested = True
        self.say(f"{name}: saving a checkpoint at the end of this step (Ctrl-C again to quit now)")

    def __exit__(self, *exc):
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)


# ----------------------------------------------------------------------------- JSON lines

def append_jsonl(path, row):
    """Append one JSON row and flush it: a crash loses at most the row being written."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path):
    """The rows of a JSON-lines file. A torn last line (a crash mid-write) is skipped with a warning;
    a broken line elsewhere is an error naming the file and line."""
    with open(path) as f:
        lines = f.read().split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: the write was cut short
                print(f"warning: {path}:{number}: ignoring a torn last line", file=sys.stderr)
                continue
            raise SystemExit(f"{path}:{number}: not a JSON line ({e.msg}); fix or delete that line")
    return rows


def truncate_jsonl(path, upto, key="step"):
    """Keep the rows whose key is <= upto (a resumed checkpoint's step or episode), atomically."""
    if not os.path.exists(path):
        return
    rows = [row for row in read_jsonl(path) if row.get(key, upto) <= upto]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- small runs side by side

def run_in_processes(fn, jobs, workers, deadline=None):
    """fn(*job) for every job; with workers > 1, that many spawned processes run jobs at once (a small
    model leaves most of a GPU idle, so several share it) and results come as they finish, so a run
    stopped early keeps every finished one. Past `deadline` (a time.monotonic() value) no new job starts;
    the running ones finish. fn must be a module-level function of an importable module or of the script
    being run. The processes die with this one (processes.die_with_parent: call this from the thread that
    lives longest, the main one), and stopping early (an error, Ctrl-C, SIGTERM, leaving the loop) kills
    them instead of waiting for every job."""
    def late():
        return deadline is not None and time.monotonic() > deadline
    if workers <= 1:
        for job in jobs:
            if late():
                return
            yield fn(*job)
        return
    import concurrent.futures
    import multiprocessing

    from processes import die_with_parent
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=die_with_parent)
    finished = False
    try:
        futures = [pool.submit(fn, *job) for job in jobs]
        for done in concurrent.futures.as_completed(futures):
            if done.cancelled():
                continue
            yield done.result()
            if late():
                for future in futures:
                    future.cancel()  # the ones not started yet
        finished = True
    finally:
        # the library's shutdown would run every job still queued first (measured: SIGTERM took 60 s with
        # four 30 s jobs on two workers); Python 3.14 has pool.kill_workers(), before it the pool's own list
        running = [] if finished else list((pool._processes or {}).values())
        pool.shutdown(wait=finished, cancel_futures=True)
        for process in running:
            process.kill()
            process.join()


def named_call(name, fn, *args):
    """(name, fn(*args)): run_in_processes returns results as they finish, this says whose each is."""
    return name, fn(*args)


# ----------------------------------------------------------------------------- which code a measurement ran

def code_version(path):
    """{"commit", "dirty", "tree"} of the git checkout that holds the file `path` (the code being measured, not
    the working directory's repository): "commit" is its HEAD, "dirty" whether tracked .py files differ from it.
    Both are None when the file is in no checkout or is not tracked by the one around it (a `git archive` copy
    unpacked inside another repository must not be credited with that repository's commit)."""
    path = os.path.abspath(path)
    unknown = {"commit": None, "dirty": None, "tree": os.path.dirname(path)}

    def git(where, *args):
        return subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, timeout=30)
    try:
        top = git(os.path.dirname(path), "rev-parse", "--show-toplevel")
        if top.returncode or git(os.path.dirname(path), "ls-files", "--error-unmatch", path).returncode:
            return unknown
        tree = top.stdout.strip()
        commit = git(tree, "rev-parse", "HEAD").stdout.strip()
        changed = git(tree, "status", "--porcelain", "--untracked-files=no", "--", "*.py")
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        return unknown
    return {"commit": commit or None, "dirty": bool(changed.stdout.strip()) if not changed.returncode else None,
            "tree": tree}


# ----------------------------------------------------------------------------- float8 training

def float8_training(model, head=True, recipe="tensorwise"):
    """Swap the model's linear layers for torchao's float8 ones (dynamic scales: one per tensor, or with
    recipe="rowwise" one per row, finer and costlier): the matmuls run on the H100's fp8 tensor cores, weights and
    optimizer stay in float32. head=False leaves lm_head (tied to the embedding) in bf16. CUDA with compute
    capability >= 8.9 only."""
    import torch  # here, not at the top: the swarm coordinator imports runtime without torch
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("fp8=True needs a CUDA GPU with fp8 tensor cores (H100, L4, RTX 4090 or newer)")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise SystemExit("fp8=True needs torchao: pip install torchao")

    def wanted(module, fqn):  # fp8 matmuls need both dimensions divisible by 16
        if fqn == "lm_head" and not head:
            return False
        return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0
    return convert_to_float8_training(model, module_filter_fn=wanted, config=Float8LinearConfig.from_recipe_name(recipe))
