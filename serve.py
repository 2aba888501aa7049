"""
An HTTP API to every µLM pipeline, and a small web page.

    python serve.py                                  # http://127.0.0.1:8000, models from out/
    python serve.py config/serve.py --port=9000
    python serve.py --host=0.0.0.0 --token=SECRET    # another address needs a token

Inference speaks OpenAI's completions API, so the `openai` client and curl work unchanged:
    POST /v1/completions      prompt (str or list), max_tokens, temperature, top_p, n, stop, seed,
                              stream (server-sent events ending in `data: [DONE]`), echo, logprobs,
                              usage; extras top_k and ignore_eos (as in vLLM)
    GET  /v1/models           the runs under out/ with a ckpt.pt (id = the run's folder below out/) and
                              compress.py's inference exports (id = the file's path below out/, no .pt)
    POST /v1/chat/completions a 400: no µLM model has a chat format yet
Pipelines run as jobs, each the very script a user would run (`python train.py config/x.py --k=v`)
in its own process group, its record in jobs_dir/<id>/ (job.json, log.txt):
    POST /v1/jobs {kind, config, overrides} -> 202 + Location;  GET /v1/jobs, /v1/jobs/{id},
    /v1/jobs/{id}/metrics (?follow=true streams rows as SSE), /v1/jobs/{id}/log;
    DELETE /v1/jobs/{id} (SIGINT: the trainer saves a checkpoint, then stops);
    POST /v1/jobs/{id}/resume (a train or world job again, with init_from=resume)
    GET /v1/datasets (what prepare.py built), POST /v1/datasets?name=N (the body is the text or JSONL;
    it is saved under data/uploads/ and a prepare job builds data/N/), GET /v1/configs, GET /health
    GET /                     serve.html: a playground and a runs view

Concurrent completions share one forward pass per decode step (`Batcher`): the rows of every request
sit in one KV cache and each step feeds all of their newest tokens together.
"""
import asyncio
import codecs
import contextlib
import ctypes
import hmac
import importlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from typing import Literal, Optional, Union

import torch

from checkpoint import load_checkpoint, load_model, write_json_atomic
from configurator import ConfigError, configure, print_config
from generation import check_sampling_args, sample_next_token
from runtime import resolve_device, resolve_dtype
from tokenizer import tokenizer_from_meta

ROOT = os.path.dirname(os.path.abspath(__file__))

DEFAULTS = dict(
    host="127.0.0.1",          # another address requires a token
    port=8000,
    token="",                  # bearer token every request must carry; "" reads $ULM_SERVE_TOKEN (or none on 127.0.0.1)
    out_root="out",            # models are read from, and job outputs written under, this folder
    data_root="data",          # prepared datasets; uploads land in data_root/uploads/
    config_root=os.path.join(ROOT, "config"),  # job config files come only from here
    jobs_dir="jobs",           # one folder per job: job.json and log.txt
    device="auto",
    dtype="auto",              # auto (bfloat16 on CUDA, else float32) | float32 | bfloat16
    seed=1337,                 # the sampler of requests that give no seed
    threads=0,                 # torch CPU threads for inference; 0 keeps torch's default
    # limits: each bad value is a 400 or 422 naming the field
    max_batch=32,              # rows decoded together in one forward pass (per model)
    max_waiting=256,           # rows waiting for a batch slot; more is a 429
    max_tokens=1024,           # cap on a request's max_tokens
    max_n=8,                   # cap on n
    max_prompts=16,            # prompts in one request
    max_prompt_chars=65536,
    max_body_kb=1024,          # request bodies (uploads: max_upload_mb)
    max_upload_mb=64,
    model_memory_mb=4096,      # weights + KV caches of the loaded models; the least recently used idle one goes
    max_running_jobs=1,        # more jobs queue
    max_queued_jobs=32,
    cancel_grace_s=120.0,      # after a cancel's SIGINT, seconds before the job's process group is killed
    log_level="warning",       # uvicorn's
)

FINITE = dict(allow_inf_nan=False)


# ----------------------------------------------------------------------------- paths

def inside(path, root):
    """Whether path, with every symlink resolved, lies within root."""
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root + os.sep)


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a dataset or upload name: no separators, no dot first


# ----------------------------------------------------------------------------- batched generation

NEVER = 2 ** 62  # the position of a cache slot a row does not own: above every query's, so always masked


class Row:
    """One sequence being generated: its tokens, its sampling settings, and where its events go."""

    def __init__(self, context, max_new, temperature, top_k, top_p, seed, logprobs, stop, ignore_eos, echo_logprobs,
                 tokenizer, emit):
        self.ids = list(context)        # prompt then sampled tokens; the last one is not in the cache yet
        self.max_new, self.temperature, self.top_k, self.top_p = max_new, temperature, top_k, top_p
        self.generator = None if seed is None else seed  # becomes a torch.Generator on the batcher's device
        self.logprobs, self.stop, self.ignore_eos, self.echo_logprobs = logprobs, stop, ignore_eos, echo_logprobs
        self.tokenizer, self.emit = tokenizer, emit
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # BPE tokens can split a character
        self.text, self.sent, self.new, self.cancelled, self.done = "", 0, 0, False, False

    def add(self, token, logprob, top):
        """Take one sampled token; emit the text that is now certain, and finish at EOT, a stop string or max_new."""
        self.new += 1
        finish = None
        info = {"token": self.tokenizer.decode([token]), "logprob": logprob, "top": top}
        if token == self.tokenizer.eot and not self.ignore_eos:
            finish = "stop"
        else:
            self.ids.append(token)
            self.text += self.decoder.decode(self.tokenizer.decode_bytes([token]))
            cut = min((i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0),
                      default=-1)
            if cut >= 0:
                self.text, finish = self.text[:cut], "stop"
            elif self.new >= self.max_new:
                finish = "length"
        if finish:
            ready = len(self.text)
        else:  # hold back a tail that may be the start of a stop string
            held = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            ready = len(self.text) - held
        delta, self.sent = self.text[self.sent:ready], max(self.sent, ready)
        self.done = finish is not None
        self.emit({"text": delta, "logprobs": info, "finish_reason": finish})


class Batcher:
    """Continuous batching over one model: every active row is a row of one KV cache, and each decode
    step runs one forward pass over all of them.

    All rows write their newest token at one shared slot `pos`; a row's earlier tokens sit right before
    it, from its own start slot. Rotary attention depends only on the distance between positions, so a
    row computes what it would alone; each row's mask hides the slots before its start (`slots` holds
    NEVER there). When pos reaches block_size, `compact` rebuilds the cache with every row re-prefilled
    right-aligned at a lower pos (a row longer than the context keeps its last block_size // 2 tokens,
    a sliding window).
    """

    def __init__(self, model, tokenizer, max_batch, max_waiting, seed):
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.device = model.rotary.cos.device  # the rotary tables carry the float dtype (an export's embedding may be int8)
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.cache = model.make_cache(max_batch, self.config.block_size, self.device, model.rotary.cos.dtype)
        # each row's own slot positions (NEVER before its start), so its mask hides the other rows' history
        self.cache.slots = torch.full((max_batch, 1, 1, self.config.block_size), NEVER, dtype=torch.long,
                                      device=self.device)
        self.slots = self.cache.slots
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.rows, self.waiting, self.pos, self.closed = [], [], 0, False
        self.wake = threading.Condition()
        self.error = None
        self.thread = threading.Thread(target=self.run, daemon=True, name="batcher")
        self.thread.start()

    def submit(self, rows):
        """Queue rows for the next step; an error message if they cannot be taken."""
        with self.wake:
            if self.closed:
                return "this model was just unloaded to make room; retry"
            if len(self.waiting) + len(rows) > self.max_waiting:
                return f"{self.max_waiting} rows are already waiting for this model (max_waiting); retry shortly"
            self.waiting.extend(rows)
            self.wake.notify()
        return None

    def close(self):
        """Stop the thread once idle, so an unloaded model's weights and cache are freed."""
        with self.wake:
            self.closed = True
            self.wake.notify()

    def busy(self):
        return bool(self.rows or self.waiting)

    def prefill(self, i, context, logits_for="last"):
        """Write context (list of ids) into row i right-aligned before self.pos; logits of the last token
        (V,), of every token (T, V) with logits_for='all', or None."""
        T = len(context)
        start = self.pos - T
        self.slots[i].fill_(NEVER)
        self.slots[i, ..., start:] = torch.arange(start, self.config.block_size, device=self.device)
        idx = torch.tensor([context], dtype=torch.long, device=self.device)
        h = self.model.hidden(idx, self.cache.rows(i, i + 1), pos=start)  # (1, T, C)
        if logits_for is None:
            return None
        h = h[0] if logits_for == "all" else h[0, -1]
        return self.model.lm_head(h).float()[..., :self.config.vocab_size]

    def cached_length(self, row):
        """How many of a row's tokens (all but the newest) to keep in the cache at a compaction."""
        n = len(row.ids) - 1
        return n if n <= self.config.block_size - 2 else self.config.block_size // 2

    def compact(self, at_least=0):
        live = [(i, row) for i, row in enumerate(self.rows) if not row.done and not row.cancelled]
        self.pos = max([self.cached_length(row) for _, row in live] + [at_least])
        for i, row in live:
            self.prefill(i, row.ids[:-1][-self.cached_length(row):], logits_for=None)

    def admit(self, row):
        context = row.ids[-self.config.block_size:]  # like sample.py: the last block_size tokens of a long prompt
        row.ids = context
        if len(context) > self.pos:
            self.compact(at_least=len(context))
        i = len(self.rows)
        self.rows.append(row)
        if row.generator is not None:
            row.generator = torch.Generator(device=self.device).manual_seed(row.generator)
        logits = self.prefill(i, context, "all" if row.echo_logprobs else "last")
        if row.echo_logprobs:
            logp = torch.log_softmax(logits[:-1], dim=-1)
            row.prompt_logprobs = [None] + logp.gather(1, torch.tensor(context[1:], device=self.device)[:, None])[:, 0].tolist()
            logits = logits[-1]
        self.sample([row], logits[None])

    def remove(self, i):
        """Drop row i: the last row moves into its place, so the active rows stay rows 0..n-1."""
        last = len(self.rows) - 1
        if i != last:
            self.cache.move_row(last, i)
            self.rows[i] = self.rows[last]
        self.rows.pop()
        if not self.rows:
            self.pos = 0

    def sample(self, rows, logits):
        """Sample one token per row from logits (B, V): rows with the same settings and no seed in one call."""
        groups = {}
        for i, row in enumerate(rows):
            key = ("seeded", i) if row.generator is not None else (row.temperature, row.top_k, row.top_p)
            groups.setdefault(key, []).append(i)
        if len(groups) == 1:
            tokens = sample_next_token(logits, rows[0].temperature, rows[0].top_k, rows[0].top_p,
                                       rows[0].generator or self.generator)
        else:
            tokens = torch.empty(len(rows), dtype=torch.long, device=self.device)
            for members in groups.values():
                row = rows[members[0]]
                index = torch.tensor(members, device=self.device)
                tokens[index] = sample_next_token(logits[index], row.temperature, row.top_k, row.top_p,
                                                  row.generator or self.generator)
        chosen, top_values, top_ids = [None] * len(rows), None, None
        if any(r.logprobs is not None for r in rows):
            logp = torch.log_softmax(logits, dim=-1)  # the model's own distribution, before temperature
            chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
            k = max(r.logprobs or 0 for r in rows)
            if k:
                top = torch.topk(logp, min(k, logp.size(-1)))
                top_values, top_ids = top.values.tolist(), top.indices.tolist()
        tokens = tokens.tolist()
        for i, row in enumerate(rows):
            alternatives = None
            if row.logprobs:
                alternatives = {self.tokenizer.decode([t]): v for t, v in
                                zip(top_ids[i][:row.logprobs], top_values[i][:row.logprobs])}
            row.add(tokens[i], chosen[i], alternatives)

    def step(self):
        """One decode step: every row's newest token in one forward pass, then one new token each."""
        if self.pos >= self.config.block_size:
            self.compact()
        n = len(self.rows)
        last = torch.tensor([[r.ids[-1]] for r in self.rows], dtype=torch.long, device=self.device)  # (n, 1)
        logits = self.model.next_logits(last, self.cache.rows(0, n), pos=self.pos)  # (n, V)
        self.pos += 1
        self.sample(self.rows, logits)

    @torch.no_grad()
    def run(self):
        while True:
            with self.wake:
                while not self.rows and not self.waiting:
                    if self.closed:
                        return
                    self.wake.wait()
                admitted = self.waiting[:self.max_batch - len(self.rows)]
                del self.waiting[:len(admitted)]
            try:
                for row in admitted:
                    if not row.cancelled:
                        self.admit(row)
                for i in reversed(range(len(self.rows))):
                    if self.rows[i].done or self.rows[i].cancelled:
                        self.remove(i)
                if self.rows:
                    self.step()
            except Exception as e:  # a bug must not hang the clients: fail every row, keep serving
                self.error = f"{type(e).__name__}: {e}"
                print(f"batcher error: {self.error}", file=sys.stderr)
                for row in self.rows + admitted:
                    if not row.done:
                        row.done = True
                        row.emit({"error": self.error})
                self.rows, self.pos = [], 0


# ----------------------------------------------------------------------------- models

def model_bytes(model):
    """Bytes of a model's weights and buffers, each storage once (a tied head shares the embedding's)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


class Models:
    """The checkpoints under out_root, loaded on first use and kept within a memory budget."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[resolve_dtype(cfg["dtype"], device)]
        self.loaded = {}  # id -> {"batcher", "bytes", "mtime", "used", "step", "val_loss"}
        self.info_cache = {}  # ckpt path -> (mtime, info)
        self.lock = threading.Lock()

    def path(self, model_id):
        """The file of a model id, or None if it is not a served model: a run folder's ckpt.pt, or an
        inference export (compress.py), named by its path below out_root without the .pt."""
        if not model_id or os.path.isabs(model_id) or ".." in model_id.split("/") or "\\" in model_id:
            return None
        root = self.cfg["out_root"]
        run, export = os.path.join(root, model_id, "ckpt.pt"), os.path.join(root, model_id + ".pt")
        if os.path.isfile(run) and inside(run, root):
            return run
        if os.path.isfile(export) and inside(export, root) and self.info(export).get("kind") == "export":
            return export
        return None

    def info(self, path):
        """Step, val loss and config of a checkpoint, read without loading its tensors (cached by mtime)."""
        mtime = os.path.getmtime(path)
        if self.info_cache.get(path, (None,))[0] != mtime:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                info = {"step": state.get("step"), "val_loss": state.get("val_loss"), "kind": state.get("kind"),
                        "quantization": state.get("quantization"),
                        "model_args": state.get("model_args"),
                        "config": {k: v for k, v in (state.get("config") or {}).items() if k in ("dataset", "max_iters", "optimizer")}}
            except Exception as e:
                info = {"error": f"unreadable checkpoint: {type(e).__name__}"}
            self.info_cache[path] = (mtime, info)
        return self.info_cache[path][1]

    def list(self):
        root = self.cfg["out_root"]
        found = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.startswith("replaced-"))
            folder_id = os.path.relpath(folder, root).replace(os.sep, "/")
            # the run itself, then any inference exports beside it (other .pt files are not read further)
            ids = [folder_id] if "ckpt.pt" in files else []
            ids += [f"{folder_id}/{f[:-3]}".removeprefix("./") for f in sorted(files)
                    if f.endswith(".pt") and f != "ckpt.pt"]
            for model_id in ids:
                path = self.path(model_id)
                if path:
                    found.append({"id": model_id, "object": "model", "owned_by": "ulm",
                                  "created": int(os.path.getmtime(path)), "loaded": model_id in self.loaded,
                                  **self.info(path)})
        return found

    def get(self, model_id):
        """The Batcher of a model, loading it (and unloading idle ones beyond the budget) if needed.
        Raises ApiError for an unknown model or one that does not fit."""
        path = self.path(model_id)
        if path is None:
            raise ApiError(404, f"model {model_id!r} not found: GET /v1/models lists the runs under out_root", "model")
        with self.lock:
            entry = self.loaded.get(model_id)
            if entry and entry["mtime"] != os.path.getmtime(path) and not entry["batcher"].busy():
                self.loaded.pop(model_id)["batcher"].close()  # retrained since it was loaded: load the new weights
                entry = None
            if entry is None:
                try:
                    state = load_checkpoint(path, map_location="cpu")
                    if state.get("kind") == "export":  # its weights keep their format; int4 readies its kernel on the device
                        model = load_model(state, self.device)
                    else:
                        model = load_model(state).to(self.device, self.dtype)
                    tokenizer = tokenizer_from_meta(state["tokenizer"])
                except SystemExit as e:
                    raise ApiError(400, f"model {model_id!r}: {e}", "model")
                c = model.config
                cache = 2 * c.n_layer * self.cfg["max_batch"] * c.kv_heads * c.block_size * (c.n_embd // c.n_head)
                size = model_bytes(model) + cache * model.rotary.cos.element_size()
                self.make_room(size, model_id)
                entry = {"batcher": Batcher(model, tokenizer, self.cfg["max_batch"], self.cfg["max_waiting"],
                                            self.cfg["seed"]),
                         "bytes": size, "mtime": os.path.getmtime(path), "step": state.get("step")}
                self.loaded[model_id] = entry
            entry["used"] = time.monotonic()
            return entry["batcher"]

    def make_room(self, size, model_id):
        budget = self.cfg["model_memory_mb"] * 2 ** 20
        if size > budget:
            raise ApiError(400, f"model {model_id!r} needs {size / 2 ** 20:.0f} MB with its KV cache, more than "
                                f"model_memory_mb={self.cfg['model_memory_mb']}", "model")
        for other in sorted(self.loaded, key=lambda k: self.loaded[k]["used"]):
            if sum(e["bytes"] for e in self.loaded.values()) + size <= budget:
                return
            if not self.loaded[other]["batcher"].busy():
                self.loaded.pop(other)["batcher"].close()
        if sum(e["bytes"] for e in self.loaded.values()) + size > budget:
            raise ApiError(503, "the memory budget is taken by models that are generating; retry shortly", "model")


# ----------------------------------------------------------------------------- jobs

# a new kind of job is one entry: its script, the config keys that name paths with the root each must
# stay under, and the metrics file and counter that give its progress
JOB_KINDS = {
    "prepare": dict(script="prepare.py", paths={"data_dir": "data_root", "dataset": "data_root"}),
    "train": dict(script="train.py", paths={"out_dir": "out_root", "data_dir": "data_root", "teacher": "out_root",
                                            "knn_store": "out_root"},
                  metrics="metrics.jsonl", progress=("step", "max_iters"), resumable=True),
    "world": dict(script="world.py", paths={"out_dir": "out_root", "init_from": "out_root"},
                  metrics="metrics.jsonl", progress=("episode", "episodes"), resumable=True),
    "swarm": dict(script="swarm.py", paths={"out_dir": "out_root", "checkpoints": "out_root", "guide": "out_root"}),
    "bench": dict(script="bench.py", paths={"out": "out_root", "out_dir": "out_root", "data_dir": "data_root",
                                            "config": "config_root"}),
}
NOT_PATHS = {"", "scratch", "resume", "imitate"}  # words some path keys also take
ACTIVE = ("queued", "running")


def script_defaults(kind):
    """A job script's DEFAULTS, to validate a request's config before anything runs."""
    return importlib.import_module(JOB_KINDS[kind]["script"].removesuffix(".py")).DEFAULTS


def check_job_paths(kind, config, cfg):
    """SystemExit naming the key if a path in a job's resolved config leaves its allowed root."""
    for key, root_key in JOB_KINDS[kind]["paths"].items():
        values = config.get(key)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if not isinstance(value, str) or value in NOT_PATHS or value.startswith("fake:"):
                continue
            if key == "dataset" and os.sep not in value and not os.path.exists(value):
                continue  # a named dataset (shakespeare_char, tinystories, ...)
            if not inside(value, cfg[root_key]):
                raise SystemExit(f"{key}={value!r} is outside {cfg[root_key]}: {kind} jobs may only use "
                                 f"paths under {root_key}={cfg[root_key]!r}")


def log_tail(path, lines=20):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 16384))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


def read_rows(path, offset=0):
    """The complete JSON lines of a metrics file from a byte offset, and the offset after them."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows, offset + end


def _die_with_parent():
    """In the job's child process: SIGINT when the server dies, however it dies (Linux), so a trainer
    saves a checkpoint and stops instead of running on unwatched."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


class Jobs:
    """Job records on disk, and one thread that starts, watches and cancels their processes."""

    def __init__(self, cfg):
        self.cfg, self.root = cfg, cfg["jobs_dir"]
        os.makedirs(self.root, exist_ok=True)
        self.jobs, self.procs, self.lock = {}, {}, threading.RLock()
        for job_id in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, job_id, "job.json")
            with contextlib.suppress(OSError, ValueError):
                with open(path) as f:
                    job = json.load(f)
                if job["state"] == "running":  # the server stopped while it ran
                    self.update(job, state="interrupted", finished=time.time())
                self.jobs[job["id"]] = job
        self.thread = threading.Thread(target=self.run, daemon=True, name="jobs")
        self.thread.start()

    def folder(self, job):
        return os.path.join(self.root, job["id"])

    def update(self, job, **fields):
        job.update(fields)
        write_json_atomic(os.path.join(self.folder(job), "job.json"), job)

    def submit(self, kind, config, overrides, resumed_from=None):
        """Validate a request (SystemExit with the message on a bad one) and queue the job."""
        if kind not in JOB_KINDS:
            raise SystemExit(f"kind must be one of {', '.join(JOB_KINDS)}, got {kind!r}")
        args = []
        if config:
            path = config if os.path.isabs(config) else os.path.join(self.cfg["config_root"], config.removeprefix("config/"))
            if not inside(path, self.cfg["config_root"]) or not os.path.isfile(path):
                raise SystemExit(f"config {config!r} is not a file in {self.cfg['config_root']} (GET /v1/configs lists them)")
            args.append(os.path.realpath(path))
        for key, value in overrides.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise SystemExit(f"override key {key!r} is not a config key")
            args.append(f"--{key}={value!r}")
        resolved = configure(script_defaults(kind), args)
        check_job_paths(kind, resolved, self.cfg)
        out_dir = resolved.get("out_dir") if kind != "prepare" else os.path.join(
            resolved["data_dir"], resolved["name"] or os.path.splitext(os.path.basename(resolved["dataset"]))[0])
        with self.lock:
            if sum(j["state"] == "queued" for j in self.jobs.values()) >= self.cfg["max_queued_jobs"]:
                raise ApiError(429, f"{self.cfg['max_queued_jobs']} jobs are already queued (max_queued_jobs)")
            for other in self.jobs.values():
                if other["state"] in ACTIVE and other["out_dir"] and out_dir and \
                        os.path.realpath(other["out_dir"]) == os.path.realpath(out_dir):
                    raise ApiError(409, f"job {other['id']} ({other['state']}) already writes {out_dir}", "overrides")
            job = {"id": time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3), "kind": kind, "config": config,
                   "overrides": overrides, "argv": [JOB_KINDS[kind]["script"], *args], "out_dir": out_dir,
                   "total": resolved.get((JOB_KINDS[kind].get("progress") or (None, None))[1]),
                   "state": "queued", "created": time.time(), "started": None, "finished": None,
                   "returncode": None, "pid": None, "error": None, "resumed_from": resumed_from}
            os.makedirs(self.folder(job))
            self.update(job)
            self.jobs[job["id"]] = job
        return job

    def view(self, job):
        """A job as the API shows it: its record plus progress and the last metrics row."""
        spec = JOB_KINDS[job["kind"]]
        last = None
        if spec.get("metrics") and job["out_dir"]:
            rows, _ = read_rows(os.path.join(job["out_dir"], spec["metrics"]))
            last = rows[-1] if rows else None
        progress = None
        if spec.get("progress"):
            counter, _ = spec["progress"]
            progress = {"done": (last or {}).get(counter, 0), "total": job["total"], "unit": counter}
        return {**job, "progress": progress, "last_metrics": last}

    def cancel(self, job):
        with self.lock:
            if job["state"] == "queued":
                self.update(job, state="cancelled", finished=time.time())
            elif job["state"] == "running" and not job.get("cancel_requested"):
                self.update(job, cancel_requested=time.time())
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(job["pid"], signal.SIGINT)  # the script's Ctrl-C path: save, then stop

    def start(self, job):
        log = open(os.path.join(self.folder(job), "log.txt"), "ab")
        try:
            proc = subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, job["argv"][0]), *job["argv"][1:]],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        except OSError as e:
            self.update(job, state="failed", error=f"could not start: {e}", finished=time.time())
            return
        finally:
            log.close()
        self.procs[job["id"]] = proc
        self.update(job, state="running", pid=proc.pid, started=time.time())

    def poll(self):
        with self.lock:
            for job_id, proc in list(self.procs.items()):
                job, code = self.jobs[job_id], proc.poll()
                if code is None:
                    if job.get("cancel_requested") and time.time() - job["cancel_requested"] > self.cfg["cancel_grace_s"]:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                    continue
                del self.procs[job_id]
                state = "cancelled" if job.get("cancel_requested") else "succeeded" if code == 0 else "failed"
                error = log_tail(os.path.join(self.folder(job), "log.txt")) if state == "failed" else None
                self.update(job, state=state, returncode=code, finished=time.time(), error=error)
            queued = sorted((j for j in self.jobs.values() if j["state"] == "queued"), key=lambda j: j["created"])
            for job in queued[:max(0, self.cfg["max_running_jobs"] - len(self.procs))]:
                self.start(job)

    def run(self):
        """The one thread that starts job processes (a child's parent-death signal follows this thread)."""
        while True:
            try:
                self.poll()
            except Exception as e:  # a full disk or a vanished folder must not stop job supervision
                print(f"jobs: {type(e).__name__}: {e}", file=sys.stderr)
            time.sleep(0.2)

    def shutdown(self):
        """The server is stopping: running jobs get their SIGINT from the kernel as it exits (parent-death
        signal) and save; their records say interrupted, so a restarted server can resume them."""
        with self.lock:
            for job_id in list(self.procs):
                self.update(self.jobs[job_id], state="interrupted", finished=time.time())


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    return True


# ----------------------------------------------------------------------------- the HTTP API

class Guard:
    """ASGI middleware: the bearer token (compared in constant time) and bounded request bodies.

    Plain ASGI rather than FastAPI's @middleware, which would pass every streamed chunk through a queue.
    """

    def __init__(self, app, token, body_limit, upload_limit, error):
        self.app, self.token, self.error = app, token, error
        self.body_limit, self.upload_limit = body_limit, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token and scope["path"] != "/":  # the page itself holds no data; it asks for the token
            if not hmac.compare_digest(headers.get(b"authorization", b""), f"Bearer {self.token}".encode()):
                return await self.error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")(
                    scope, receive, send)
        limit = self.upload_limit if scope["path"] == "/v1/datasets" else self.body_limit
        length = headers.get(b"content-length")
        if length is not None:  # the HTTP server delivers no more than this many bytes
            if not length.isdigit() or int(length) > limit:
                return await self.error(413, f"request body over {limit} bytes")(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, more = b"", True  # chunked: read it all here, bounded, then hand it on
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await self.error(413, f"request body over {limit} bytes")(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await self.app(scope, replay, send)


class ApiError(Exception):
    def __init__(self, status, message, param=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def make_app(cfg):
    """The FastAPI app for a resolved serve config (tests call this; main() runs it under uvicorn)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    class CompletionRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str
        prompt: Union[str, list[str]] = "<|endoftext|>"
        max_tokens: int = Field(16, ge=1)
        temperature: float = Field(1.0, ge=0, **FINITE)
        top_p: float = Field(1.0, gt=0, le=1, **FINITE)
        top_k: Optional[int] = Field(None, ge=1)
        n: int = Field(1, ge=1)
        stop: Union[str, list[str], None] = None
        seed: Optional[int] = None
        stream: bool = False
        stream_options: Optional[dict] = None
        echo: bool = False
        logprobs: Optional[int] = Field(None, ge=0, le=5)
        ignore_eos: bool = False
        user: Optional[str] = None
        best_of: Optional[int] = None
        presence_penalty: float = 0.0
        frequency_penalty: float = 0.0

    class JobRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal[tuple(JOB_KINDS)]
        config: str = ""
        overrides: dict = {}

    device = resolve_device(cfg["device"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    models, jobs = Models(cfg, device), Jobs(cfg)
    generations = {"active": 0}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        jobs.shutdown()

    app = FastAPI(title="µLM", lifespan=lifespan)
    app.state.models, app.state.jobs = models, jobs

    def error(status, message, param=None):
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                422: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)

    @app.exception_handler(ApiError)
    async def api_error(request, e):
        return error(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"] if p != "body")
        return error(422, f"{field}: {first['msg']}" if field else first["msg"], field or None)

    token = cfg["token"] or os.environ.get("ULM_SERVE_TOKEN", "")
    app.add_middleware(Guard, token=token, body_limit=cfg["max_body_kb"] * 1024,
                       upload_limit=cfg["max_upload_mb"] * 2 ** 20, error=error)

    @app.get("/")
    async def page():
        return FileResponse(os.path.join(ROOT, "serve.html"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "device": str(device), "models_loaded": list(models.loaded),
                "generations": generations["active"],
                "jobs": {s: sum(j["state"] == s for j in jobs.jobs.values()) for s in ACTIVE}}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": await asyncio.to_thread(models.list)}

    @app.post("/v1/chat/completions")
    async def chat():
        raise ApiError(400, "no µLM model has a chat format yet: use POST /v1/completions with a plain-text prompt",
                       "messages")

    def check_completion(req, tokenizer):
        """The request's rows as (prompt ids, seed) pairs, or ApiError naming the bad field."""
        if req.max_tokens > cfg["max_tokens"]:
            raise ApiError(400, f"max_tokens={req.max_tokens} is over this server's cap {cfg['max_tokens']}", "max_tokens")
        if req.n > cfg["max_n"]:
            raise ApiError(400, f"n={req.n} is over this server's cap {cfg['max_n']}", "n")
        if req.best_of not in (None, req.n):
            raise ApiError(400, "best_of is not supported (leave it out, or equal to n)", "best_of")
        for field in ("presence_penalty", "frequency_penalty"):
            if getattr(req, field):
                raise ApiError(400, f"{field} is not supported (leave it at 0)", field)
        try:
            check_sampling_args(req.temperature, req.top_k, req.top_p)
        except ValueError as e:
            raise ApiError(400, str(e), str(e).split()[0])
        stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", "stop")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or len(prompts) > cfg["max_prompts"]:
            raise ApiError(400, f"prompt takes 1 to {cfg['max_prompts']} strings", "prompt")
        if len(prompts) * req.n > cfg["max_batch"]:
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} rows exceed max_batch={cfg['max_batch']}", "n")
        encoded = []
        for text in prompts:
            if len(text) > cfg["max_prompt_chars"]:
                raise ApiError(400, f"prompt is {len(text)} characters, over the cap {cfg['max_prompt_chars']}", "prompt")
            try:
                ids = [tokenizer.eot] if text in ("", "<|endoftext|>") else tokenizer.encode(text)
            except ValueError as e:
                raise ApiError(400, f"prompt: {e}", "prompt")
            encoded.append(ids)
        return encoded, stops

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        batcher = await asyncio.to_thread(models.get, req.model)
        prompts, stops = check_completion(req, batcher.tokenizer)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        rows = []
        for p, ids in enumerate(prompts):
            for j in range(req.n):
                index = p * req.n + j

                def emit(event, index=index):
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))
                rows.append(Row(ids, req.max_tokens, req.temperature, req.top_k, req.top_p,
                                None if req.seed is None else req.seed + j, req.logprobs, stops, req.ignore_eos,
                                req.echo and req.logprobs is not None, batcher.tokenizer, emit))
        refused = batcher.submit(rows)
        if refused:
            raise ApiError(429 if "max_waiting" in refused else 503, refused)
        generations["active"] += len(rows)
        created, completion_id = int(time.time()), "cmpl-" + secrets.token_hex(12)
        echoes = [batcher.tokenizer.decode(ids) if req.echo and ids != [batcher.tokenizer.eot] else "" for ids in prompts]
        usage = {"prompt_tokens": sum(len(ids) for ids in prompts), "completion_tokens": 0}

        def logprobs_of(index, infos, with_prompt):
            """OpenAI's logprobs object for a choice's tokens (with the prompt's first, when echoed)."""
            if req.logprobs is None:
                return None
            entries = infos
            if req.echo and with_prompt:
                ids = prompts[index // req.n]
                prompt_lp = getattr(rows[index], "prompt_logprobs", None) or [None] * len(ids)
                entries = [{"token": batcher.tokenizer.decode([t]), "logprob": lp, "top": None}
                           for t, lp in zip(ids, prompt_lp)] + infos
            offsets, at = [], 0
            for e in entries:
                offsets.append(at)
                at += len(e["token"])
            return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                    "top_logprobs": [e["top"] for e in entries] if req.logprobs else None, "text_offset": offsets}

        async def events():
            """(index, event) until every row has finished; cancels the rows if the consumer goes away."""
            open_rows = set(range(len(rows)))
            try:
                while open_rows:
                    try:
                        index, event = await asyncio.wait_for(queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                    if "error" in event:
                        raise ApiError(500, f"generation failed: {event['error']}")
                    usage["completion_tokens"] += 1
                    if event["finish_reason"]:
                        open_rows.discard(index)
                    yield index, event
            finally:
                generations["active"] -= len(rows)
                for row in rows:
                    row.cancelled = True  # the batcher drops unfinished rows at its next step

        def total_usage():
            return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}

        def chunk(choices):
            return {"id": completion_id, "object": "text_completion", "created": created, "model": req.model,
                    "choices": choices}

        if req.stream:
            async def sse():
                first = set()
                async for index, event in events():
                    text, starts = event["text"], index not in first
                    if starts:
                        first.add(index)
                        text = echoes[index // req.n] + text
                    lp = logprobs_of(index, [event["logprobs"]], starts)
                    yield "data: " + json.dumps(chunk([{"index": index, "text": text, "logprobs": lp,
                                                        "finish_reason": event["finish_reason"]}])) + "\n\n"
                if (req.stream_options or {}).get("include_usage"):
                    yield "data: " + json.dumps({**chunk([]), "usage": total_usage()}) + "\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")

        texts, infos, finish = [""] * len(rows), [[] for _ in rows], [None] * len(rows)
        async for index, event in events():
            texts[index] += event["text"]
            infos[index].append(event["logprobs"])
            finish[index] = event["finish_reason"]
        if any(f is None for f in finish):  # the client went away
            return PlainTextResponse("", 499)
        choices = [{"index": i, "text": echoes[i // req.n] + texts[i], "logprobs": logprobs_of(i, infos[i], True),
                    "finish_reason": finish[i]} for i in range(len(rows))]
        return {**chunk(choices), "usage": total_usage()}

    # jobs

    def find_job(job_id):
        job = jobs.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r} (GET /v1/jobs lists them)", "id")
        return job

    def submit(kind, config, overrides, resumed_from=None):
        try:
            job = jobs.submit(kind, config, overrides, resumed_from)
        except SystemExit as e:  # the configurator's message, or a path outside its root
            raise ApiError(422, str(e), "overrides" if isinstance(e, ConfigError) else "config")
        return JSONResponse(jobs.view(job), 202, headers={"Location": f"/v1/jobs/{job['id']}"})

    @app.post("/v1/jobs")
    async def create_job(req: JobRequest):
        return await asyncio.to_thread(submit, req.kind, req.config, req.overrides)

    @app.get("/v1/jobs")
    async def list_jobs():
        return {"object": "list", "data": [jobs.view(j) for j in sorted(jobs.jobs.values(), key=lambda j: j["created"])]}

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str):
        return jobs.view(find_job(job_id))

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str):
        job = find_job(job_id)
        jobs.cancel(job)
        return jobs.view(job)

    @app.post("/v1/jobs/{job_id}/resume")
    async def resume_job(job_id: str):
        job = find_job(job_id)
        if not JOB_KINDS[job["kind"]].get("resumable"):
            raise ApiError(400, f"{job['kind']} jobs do not resume; submit a new one", "id")
        if job["state"] in ACTIVE:
            raise ApiError(409, f"job {job_id} is {job['state']}; cancel it first", "id")
        if job.get("pid") and process_alive(job["pid"]):
            raise ApiError(409, f"job {job_id}'s process {job['pid']} is still saving and stopping; retry shortly", "id")
        overrides = {**job["overrides"], "init_from": "resume"}
        return await asyncio.to_thread(submit, job["kind"], job["config"], overrides, job_id)

    @app.get("/v1/jobs/{job_id}/log")
    async def job_log(job_id: str, tail: int = 200):
        return PlainTextResponse(log_tail(os.path.join(jobs.folder(find_job(job_id)), "log.txt"), tail))

    @app.get("/v1/jobs/{job_id}/metrics")
    async def job_metrics(job_id: str, request: Request, follow: bool = False):
        job = find_job(job_id)
        name = JOB_KINDS[job["kind"]].get("metrics")
        path = os.path.join(job["out_dir"], name) if name and job["out_dir"] else None
        if not follow:
            return {"object": "list", "data": read_rows(path)[0] if path else []}

        async def rows():
            offset = 0
            while True:
                done = job["state"] not in ACTIVE  # read before the file: rows written before the end are sent
                new, offset = read_rows(path, offset) if path else ([], 0)
                for row in new:
                    yield "data: " + json.dumps(row) + "\n\n"
                if done:
                    yield "event: end\ndata: " + json.dumps({"state": job["state"]}) + "\n\n"
                    return
                await asyncio.sleep(0.5)
        return StreamingResponse(rows(), media_type="text/event-stream")

    # datasets and configs

    @app.get("/v1/datasets")
    async def list_datasets():
        data = []
        root = cfg["data_root"]
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            meta = os.path.join(root, name, "meta.json")
            if NAME.match(name) and os.path.isfile(meta) and inside(meta, root):
                with contextlib.suppress(OSError, ValueError):
                    with open(meta) as f:
                        info = json.load(f)
                    info.pop("chars", None)  # the whole vocabulary is noise here
                    data.append({"id": name, "meta": info})
        return {"object": "list", "data": data}

    @app.post("/v1/datasets")
    async def upload_dataset(request: Request, name: str, format: Literal["txt", "jsonl"] = "txt",
                             tokenizer: Literal["char", "gpt2"] = "char", text_field: str = "text"):
        if not NAME.match(name):
            raise ApiError(400, "name must be letters, digits, '_', '-' or '.', not starting with '.' "
                                "(no path separators)", "name")
        body = await request.body()
        if not body.strip():
            raise ApiError(400, "the request body (the text or JSONL to prepare) is empty", "body")
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "the body is not UTF-8 text", "body")
        uploads = os.path.join(cfg["data_root"], "uploads")
        path = os.path.join(uploads, f"{name}.{format}")
        if not inside(path, cfg["data_root"]):
            raise ApiError(400, f"{path} would leave data_root", "name")
        from checkpoint import atomic_write
        await asyncio.to_thread(atomic_write, path, lambda f: f.write(body))
        return await asyncio.to_thread(submit, "prepare", "", {"dataset": path, "name": name, "tokenizer": tokenizer,
                                                               "text_field": text_field,
                                                               "data_dir": cfg["data_root"], "force": True})

    @app.get("/v1/configs")
    async def list_configs():
        root = cfg["config_root"]
        return {"object": "list", "data": sorted(f for f in os.listdir(root) if f.endswith(".py"))}

    return app


def check_serve_config(cfg):
    if cfg["host"] not in ("127.0.0.1", "localhost", "::1") and not (cfg["token"] or os.environ.get("ULM_SERVE_TOKEN")):
        raise SystemExit(f"host={cfg['host']} would let anyone on the network in: give --token=<secret> (or set "
                         f"ULM_SERVE_TOKEN), or keep host=127.0.0.1")
    for key in ("max_batch", "max_waiting", "max_tokens", "max_n", "max_prompts", "max_running_jobs"):
        if cfg[key] < 1:
            raise SystemExit(f"{key} must be at least 1, got {cfg[key]}")


def main(argv):
    cfg = configure(DEFAULTS, argv)
    check_serve_config(cfg)
    print_config({**cfg, "token": "***" if cfg["token"] else ""})
    import uvicorn
    app = make_app(cfg)
    print(f"serving on http://{cfg['host']}:{cfg['port']}  (models from {cfg['out_root']}/, jobs in {cfg['jobs_dir']}/)")
    uvicorn.run(app, host=cfg["host"], port=cfg["port"], log_level=cfg["log_level"])


if __name__ == "__main__":
    main(sys.argv[1:])
