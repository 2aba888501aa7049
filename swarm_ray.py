"""
Swarm workers as Ray actors (swarm.py --backend=ray): a local Ray by default, a cluster with ray_address.

The transport behind swarm.py's Pool, beside its subprocesses: each actor runs swarm_agent.serve, the worker
program's own loop, over in-memory lines instead of a process's pipes. The coordinator sends the same JSON
messages (`send`) and reads the same replies (`read`, called again and again from one thread per actor, as a
subprocess's stdout is read), so the protocol, the aggregation, the learning and the fault handling are
swarm.py's, unchanged: an actor that dies (its process crashed, or its loop ended), hangs past reply_timeout
or prints what is not protocol (a line over the cap included) is killed and started again once, then dropped.
What the agent prints to stderr comes back with its replies into out_dir/<role>_<i>.log.

`ray_agent` ("module:Class", swarm_agent:ModelAgent by default: a policy checkpoint) is the agent each actor
runs, as worker_command names the program a subprocess runs (tests run tests/swarm_fakes.py's FakeAgent).
Each actor asks Ray for `threads` CPUs, and on device=cuda for a share of a GPU (Ray then sets its
CUDA_VISIBLE_DEVICES); actors are spread over the nodes. On a cluster every node needs µLM's code, its
packages and the checkpoints at the same paths (a shared file system): hellos and weights travel as paths,
as with worker_command over ssh. The actors die with the coordinator (Ray ends an owner's actors).

Ray is optional (requirements-extras.txt): swarm.py imports this module only for backend=ray, and this
module imports ray only when it connects.
"""
import importlib
import importlib.util
import json
import math
import os
import re
import socket
import sys
import threading
import traceback

import processes
import swarm_agent
from swarm_protocol import MAX_LINE_BYTES

HERE = os.path.dirname(os.path.abspath(__file__))
READ_WAIT_S = 1.0           # how long one `read` waits for output before it answers with none
MAX_PENDING_LINES = 1024    # a worker that prints faster than the coordinator reads waits, as on a full pipe
MAX_LOG_CHARS = 1 << 20     # stderr an actor keeps for the coordinator between two reads


# ----------------------------------------------------------------------------- the actor's streams

class Lines:
    """The worker's input: lines put by the coordinator, read as swarm_agent.serve reads a stdin."""

    def __init__(self):
        self.lines, self.ready = [], threading.Condition()

    def put(self, line):
        with self.ready:
            self.lines.append(line)
            self.ready.notify()

    def readline(self):
        with self.ready:
            self.ready.wait_for(lambda: self.lines)
            return self.lines.pop(0)

    def __iter__(self):
        while True:
            yield self.readline()


class Output:
    """The worker's protocol output, as a subprocess writes it to stdout: whole lines for the coordinator, each
    bounded as processes.read_lines bounds a pipe's (a line over the limit ends the output there), and a
    writer that runs ahead of the reader waits."""

    def __init__(self, limit=MAX_LINE_BYTES):
        self.limit, self.partial, self.lines = limit, "", []
        self.too_long, self.ended, self.reason = False, False, None
        self.ready = threading.Condition()

    def write(self, text):
        with self.ready:
            if self.too_long or self.ended:
                return len(text)  # read no further: the coordinator is killing this actor
            *whole, self.partial = (self.partial + text).split("\n")
            for line in whole:
                if len(line.encode()) > self.limit:
                    self.too_long = True
                    break
                self.lines.append(line + "\n")
            self.too_long = self.too_long or len(self.partial.encode()) > self.limit
            self.ready.notify_all()
            self.ready.wait_for(lambda: len(self.lines) < MAX_PENDING_LINES or self.ended)
        return len(text)

    def flush(self):
        pass

    def end(self, reason):
        """The worker's loop is over (as a process's exit closes its stdout); reason says why."""
        with self.ready:
            self.ended, self.reason = True, reason
            self.ready.notify_all()

    def take(self, wait):
        """The lines written since the last take (waiting up to `wait` s for one), and whether the output
        overflowed or ended."""
        with self.ready:
            self.ready.wait_for(lambda: self.lines or self.too_long or self.ended, timeout=wait)
            lines, self.lines = self.lines, []
            self.ready.notify_all()
            return {"lines": lines, "too_long": self.too_long, "ended": self.ended, "reason": self.reason}


class Log:
    """The actor's stderr (and stray stdout, as swarm_worker.py sends it there): written to Ray's log as
    before, and kept for the coordinator, which appends it to out_dir/<role>_<i>.log."""

    def __init__(self, stream):
        self.stream, self.text, self.lock = stream, "", threading.Lock()

    def write(self, text):
        self.stream.write(text)
        with self.lock:
            self.text = (self.text + text)[-MAX_LOG_CHARS:]
        return len(text)

    def take(self):
        with self.lock:
            text, self.text = self.text, ""
        return text

    def __getattr__(self, name):  # flush, fileno, isatty, ...: the real stream's
        return getattr(self.stream, name)


class WorkerActor:
    """One swarm worker in a Ray actor (ray.remote wraps it when Ray is connected): swarm_agent.serve in a
    thread, over in-memory lines; the coordinator calls `send` and `read`."""

    def __init__(self, agent):
        self.inbox, self.outbox = Lines(), Output()
        self.log = Log(sys.__stderr__)
        sys.stderr = sys.stdout = self.log  # this process is this actor's alone
        threading.Thread(target=self.serve, args=(agent_class(agent),), daemon=True, name="swarm worker").start()

    def serve(self, make_agent):
        reason = None
        try:
            code = swarm_agent.serve(self.inbox, self.outbox, make_agent)
            reason = f"its worker loop ended with code {code}"
        except BaseException as e:  # a bug in the agent: a subprocess would die with this traceback
            traceback.print_exc()
            reason = f"its worker loop failed: {type(e).__name__}: {e}"
        finally:
            self.outbox.end(reason)

    def send(self, line):
        self.inbox.put(line)

    def read(self, wait):
        """The worker's output since the last read (its lines, its stderr), waiting up to `wait` s for a line."""
        return {**self.outbox.take(wait), "log": self.log.take()}

    def stopped(self, wait):
        """Whether the worker's loop has ended, waiting up to `wait` s (after the messages sent before this)."""
        with self.outbox.ready:
            return self.outbox.ready.wait_for(lambda: self.outbox.ended, timeout=wait)


def agent_class(agent):
    """The class `module:Class` names; or, where this node cannot load it, a stand-in whose answer to the
    hello says why (as a worker program whose agent cannot start answers with an error)."""
    module, name = agent.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        message = f"ray_agent={agent!r} cannot be loaded on this node: {type(e).__name__}: {e}"

        def refuse(hello, out):
            raise SystemExit(message)
        return refuse


# ----------------------------------------------------------------------------- the coordinator's side

def agent_paths(agent):
    """The folders an actor needs on its import path: µLM's, and the agent module's ("module:Class"); or a
    string saying why the agent cannot be found here."""
    module, _, name = agent.partition(":")
    if not module or not name.isidentifier():
        return f"ray_agent={agent!r} is not module:Class (e.g. swarm_agent:ModelAgent)"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:
        spec, why = None, f" ({e})"
    else:
        why = ""
    if spec is None or not spec.origin:
        return f"ray_agent={agent!r}: no module {module!r} on this machine's import path{why}"
    return [HERE] + [os.path.dirname(spec.origin)] * (os.path.dirname(spec.origin) != HERE)


def address_problem(address):
    """Why a Ray address cannot be reached (a TCP connect: Ray itself retries an unreachable one for minutes),
    or None. "" starts a local Ray and "auto" finds a running one: Ray answers those at once."""
    if address in ("", "auto"):
        return None
    host, _, port = address.removeprefix("ray://").rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return f"ray_address={address!r} is not host:port or ray://host:port (or empty for a local Ray)"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        return (f"cannot reach a Ray cluster at ray_address={address!r} ({e.strerror or e}): start one there "
                f"(`ray start --head`), or leave ray_address empty for a local Ray")
    return None


def problem(address, agent):
    """Why backend=ray cannot run with these settings, or None (swarm.check_config asks before anything starts)."""
    if importlib.util.find_spec("ray") is None:
        return "backend=ray needs Ray: pip install -r requirements-extras.txt (or pip install ray)"
    paths = agent_paths(agent)
    return paths if isinstance(paths, str) else address_problem(address)


def gpu_share(gpus, processes):
    """The fraction of a GPU each of `processes` actors asks for, so that they all fit on `gpus` GPUs."""
    if gpus < 1:
        raise SystemExit("device=cuda but the Ray cluster has no GPU: use --device=cpu, or add GPU nodes")
    return 1.0 / math.ceil(processes / int(gpus))


class RayActors:
    """The swarm's workers as Ray actors; the methods swarm.Pool calls of its transport (start, write, ended,
    kill, close), as for its subprocesses."""

    def __init__(self, address, agent, out_dir, count):
        self.address, self.agent, self.out_dir, self.count = address, agent, out_dir, count  # count: actors at once
        self.ray, self.actor_class, self.started_ray, self.gpus = None, None, False, None
        self.endings = {}  # (worker index, generation) -> why its output ended

    def connect(self):
        """Connect to Ray once (a local one, started here, by default); a process already connected (a
        notebook, a test) keeps its connection."""
        if self.ray is not None:
            return
        try:
            import ray
        except ImportError:
            raise SystemExit("backend=ray needs Ray: pip install -r requirements-extras.txt (or pip install ray)")
        if not ray.is_initialized():
            try:
                if self.address:
                    ray.init(address=self.address, log_to_driver=False)
                else:  # as local subprocesses: every worker runs, whatever the core count
                    ray.init(num_cpus=max(os.cpu_count() or 1, self.count), include_dashboard=False,
                             log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise SystemExit(f"cannot connect to Ray at ray_address={self.address!r}: {e}")
            self.started_ray = True
        self.ray = ray
        self.actor_class = ray.remote(concurrency_groups={"output": 1})(WorkerActor)

    def start(self, w, replies):
        """Start w's actor; its output lines go to replies as (index, generation, line), then None at its end.
        The start event's fields."""
        self.connect()
        options = dict(num_cpus=w.hello["threads"], scheduling_strategy="SPREAD",
                       runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(agent_paths(self.agent))}})
        if w.hello["device"].startswith("cuda"):
            if self.gpus is None:
                self.gpus = gpu_share(self.ray.cluster_resources().get("GPU", 0), self.count)
            options["num_gpus"] = self.gpus
        w.proc = self.actor_class.options(**options).remote(self.agent)
        log_path = os.path.join(self.out_dir, f"{w.role}_{w.index}.log")
        open(log_path, "a").close()  # there, as a subprocess's, whether the worker writes to it or not
        threading.Thread(target=self.read_output, args=(w.proc, w.index, w.generation, replies, log_path),
                         daemon=True).start()
        return {"actor": w.proc._actor_id.hex()}

    def read_output(self, actor, index, generation, replies, log_path):
        """Every line the actor writes into replies, its stderr into its log file; None once it ends or dies."""
        while True:
            try:
                out = self.ray.get(actor.read.options(concurrency_group="output").remote(READ_WAIT_S))
            except Exception as e:  # RayActorError: it died (crashed, or killed), or Ray is shutting down
                first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()[0]  # without Ray's colours
                self.endings[(index, generation)] = f"its actor died ({first})"
                break
            if out["log"]:
                with open(log_path, "a") as f:
                    f.write(out["log"])
            for line in out["lines"]:
                replies.put((index, generation, line))
            if out["too_long"]:
                replies.put((index, generation, processes.LineTooLong(f"a line of more than {MAX_LINE_BYTES} bytes")))
                return
            if out["ended"]:
                self.endings[(index, generation)] = out["reason"]
                break
        replies.put((index, generation, None))

    def write(self, w, message):
        w.proc.send.remote(json.dumps(message) + "\n")

    def ended(self, w):
        """Why w's output ended (its actor died or its loop returned)."""
        return self.endings.pop((w.index, w.generation), "its actor ended")

    def kill(self, w):
        self.ray.kill(w.proc, no_restart=True)

    def close(self, workers):
        """Ask every actor to stop, give them a second, end them all; a Ray started here is shut down."""
        if self.ray is None:
            return
        actors = [w.proc for w in workers if w.proc is not None]
        for w in workers:
            if w.proc is not None and not w.dropped:
                self.write(w, {"type": "stop"})
        self.ray.wait([a.stopped.remote(1.0) for a in actors], num_returns=len(actors), timeout=2.0)
        for actor in actors:
            self.ray.kill(actor, no_restart=True)
        if self.started_ray:
            self.ray.shutdown()
