"""
An HTTP API to every µLM pipeline, and a small web page.

    python serve.py                                  # http://127.0.0.1:8000, models from out/
    python serve.py config/serve.py --port=9000
    python serve.py --host=0.0.0.0 --token=SECRET    # another address needs a token

Inference speaks OpenAI's completions API, so the `openai` client and curl work unchanged:
    POST /v1/completions      prompt (text, token ids, or a list of either), max_tokens, temperature, top_p,
                              n, stop, seed, stream (server-sent events ending in `data: [DONE]`), echo,
                              logprobs (echoed prompt tokens' too), usage; extras top_k and ignore_eos (as in
                              vLLM), loops (a looped model's test-time loop count)
    GET  /v1/models           the runs under out/ with a ckpt.pt (id = the run's folder below out/) and
                              compress.py's inference exports (id = the file's path below out/, no .pt)
    POST /v1/chat/completions a 400: no µLM model has a chat format yet
    POST /tokenize, /detokenize, GET /tokenizer_info   vLLM's tokenizer routes (lm-eval's remote tokenizer); a
                              request that names no model uses tokenizer_model
Pipelines run as jobs, each the very script a user would run (`python train.py config/x.py --k=v`)
in its own process group, its record in jobs_dir/<id>/ (job.json, log.txt):
    POST /v1/jobs {kind, config, overrides} -> 202 + Location;  GET /v1/jobs, /v1/jobs/{id},
    /v1/jobs/{id}/metrics (?follow=true streams rows as SSE), /v1/jobs/{id}/log;
    DELETE /v1/jobs/{id} (SIGINT: the trainer saves a checkpoint, then stops);
    POST /v1/jobs/{id}/resume (a train or world job again, with init_from=resume)
    GET /v1/datasets (what prepare.py built), POST /v1/datasets?name=N (the body is the text or JSONL;
    it is saved under data/uploads/ and a prepare job builds data/N/), GET /v1/configs, GET /health
Every run under out_root, however it was started (train, world and swarm runs, by the files they write):
    GET /v1/runs, /v1/runs/{id}/metrics, /v1/runs/{id}/episodes (a world run's; ?index=N: a transcript),
    /v1/runs/{id}/swarm (a swarm's goals, proposals, decisions, whether it waits for its person);
    POST /v1/runs/{id}/control {action, text}: a person's command to a swarm run with human_input=file
    GET /                     serve.html: the cockpit (runs, a run's view, compare curves, a swarm's person,
                              the playground, jobs)

Each route is a function of its request and the server's `State` (models, jobs, config); batching.py
decodes concurrent completions together (decode_graph=True: each step is one CUDA graph's replay). A job
may set only its kind's allow-listed keys, and every path it reads or writes stays under out_root or
data_root; state-changing requests must come from this server's own page or a non-browser client (Host,
Origin and Content-Type checks): README, "Exposing the server".
"""
import asyncio
import base64
import contextlib
import dataclasses
import difflib
import hashlib
import hmac
import importlib
import inspect
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
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

import processes
import tasks
from architecture import MODEL_KEYS, OPTION_CLASSES, check_combinations, split_options
from batching import Batcher, Row
from checkpoint import atomic_write, load_checkpoint, load_model, write_json_atomic
from configurator import ConfigError, configure, print_config
from generation import check_runs, check_sampling_args
from metrics import read_json_file, run_kind, swarm_view, train_overview, world_overview
from runtime import claim_out_dir, resolve_device, resolve_dtype, set_threads
from swarm_console import ACTIONS as SWARM_ACTIONS
from swarm_console import CONTROL_FILE, MAX_CONTROL_CHARS
from tokenizer import EOT_TEXT, tokenizer_from_meta

ROOT = os.path.dirname(os.path.abspath(__file__))

DEFAULTS = dict(
    host="127.0.0.1",          # another address requires a token
    port=8000,
    token="",                  # bearer token every request must carry; "" reads $ULM_SERVE_TOKEN (or none on 127.0.0.1)
    allowed_hosts=[],          # more names the Host header may carry (a DNS name of this machine); localhost always
    out_root="out",            # models are read from, and job outputs written under, this folder
    data_root="data",          # prepared datasets; uploads land in data_root/uploads/
    config_root=os.path.join(ROOT, "config"),  # job config files come only from here
    jobs_dir="jobs",           # one folder per job: job.json and log.txt
    device="auto",
    dtype="auto",              # auto (bfloat16 on CUDA, else float32) | float32 | bfloat16
    seed=1337,                 # the sampler of requests that give no seed
    threads=0,                 # torch CPU threads for inference; 0: the cores the load average leaves idle at start
                               # (runtime.set_threads)
    tokenizer_model="",        # the model whose tokenizer /tokenize, /detokenize and /tokenizer_info use when a
                               # request names none (lm-eval's remote tokenizer names none)
    decode_graph=False,        # CUDA only: every decode step runs all max_batch rows at one shape, captured once as a
                               # CUDA graph and replayed per token (batching.py, decode_step="graph"); False: the rows
                               # in use, kernel by kernel
    decode_compile=False,      # with decode_graph: inductor's kernels in that graph (compiled at a model's first step)
    # limits: each bad value is a 400 or 422 naming the field
    max_batch=32,              # rows decoded together in one forward pass (per model and loop count)
    max_waiting=256,           # rows waiting for a batch slot; more is a 429
    max_tokens=1024,           # cap on a request's max_tokens
    max_n=8,                   # cap on n
    max_prompts=16,            # prompts in one request
    max_prompt_chars=65536,
    max_stop_chars=256,        # characters in one stop string
    max_loops=64,              # cap on a looped model's test-time loops (each loop count is a KV cache of its own)
    max_body_kb=1024,          # request bodies (uploads: max_upload_mb)
    max_upload_mb=64,
    model_memory_mb=4096,      # weights + KV caches of the loaded models; the least recently used idle one goes
    max_running_jobs=1,        # more jobs queue
    max_queued_jobs=32,
    cancel_grace_s=120.0,      # after a cancel's SIGINT, seconds before the job's process group is killed
    log_level="warning",       # uvicorn's
)

FINITE = dict(allow_inf_nan=False)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ApiError(Exception):
    def __init__(self, status, message, param=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


# ----------------------------------------------------------------------------- paths

def inside(path, root):
    """Whether path, with every symlink resolved, lies within root."""
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root + os.sep)


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a dataset or upload name: no separators, no dot first
SAFE_PATH = re.compile(r"^[A-Za-z0-9_.\-/]*$")  # a path below a root: nothing a page or a shell could misread


# ----------------------------------------------------------------------------- models

def valid_id(model_id):
    """A model id is a path below out_root: relative, no '..', no backslash."""
    return bool(model_id) and not os.path.isabs(model_id) and ".." not in model_id.split("/") and "\\" not in model_id


def model_bytes(model):
    """Bytes of a model's weights and buffers, each storage once (a tied head shares the embedding's)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def cache_bytes(model, batch_size, options):
    """Bytes of the KV cache a Batcher would make, counted on the meta device (nothing allocated)."""
    cache = model.make_cache(batch_size, model.config.block_size, "meta", model.rotary.cos.dtype, **options)
    return sum(t.numel() * t.element_size() for t in cache.tensors())


class Models:
    """The checkpoints under out_root, loaded on first use and kept within a memory budget. A loaded model
    has a Batcher per loop count asked of it: each loop count of a looped model is a cache layout of its own."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[resolve_dtype(cfg["dtype"], device)]
        self.loaded = {}  # id -> {"model", "tokenizer", "batchers": {loops: Batcher}, "bytes", "mtime", "used", "step"}
        self.info_cache = {}  # ckpt path -> (mtime, info)
        self.lock = threading.Lock()

    def path(self, model_id):
        """The file of a model id, or None if it is not a served model: a run folder's ckpt.pt, or an
        inference export (compress.py), named by its path below out_root without the .pt."""
        if not valid_id(model_id):
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
                stored = {t.untyped_storage().data_ptr(): t.numel() for t in state.get("model", {}).values()
                          if torch.is_tensor(t) and t.dtype != torch.bool}  # a tied head shares its storage
                info = {"step": state.get("step"), "val_loss": state.get("val_loss"), "kind": state.get("kind"),
                        "quantization": state.get("quantization"), "weights": sum(stored.values()),
                        "file_mb": round(os.path.getsize(path) / 2 ** 20, 2),
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

    def not_found(self, model_id):
        """The error for a model id that names no served model: a file that cannot be read says so."""
        root = self.cfg["out_root"]
        export = os.path.join(root, f"{model_id}.pt")
        if valid_id(model_id) and os.path.isfile(export) and inside(export, root) and "error" in self.info(export):
            return ApiError(422, f"model {model_id!r}: {model_id}.pt is an {self.info(export)['error']} (truncated "
                                 f"or corrupt?): export it again with compress.py", "model")
        return ApiError(404, f"model {model_id!r} not found: GET /v1/models lists the runs under out_root", "model")

    def get(self, model_id, loops=None):
        """The Batcher of a model at a loop count (None: the trained one), loading the model (and unloading
        idle ones beyond the budget) if needed. Raises ApiError for an unknown model or one that does not fit."""
        path = self.path(model_id)
        if path is None:
            raise self.not_found(model_id)
        with self.lock:
            entry = self.loaded.get(model_id)
            if entry and entry["mtime"] != os.path.getmtime(path) and not self.busy(entry):
                self.unload(model_id)  # retrained since it was loaded: load the new weights
                entry = None
            if entry is None:
                entry = self.load(model_id, path)
            key = self.loops_key(entry["model"], loops)
            if key not in entry["batchers"]:
                options = {"loops": key} if key else {}
                self.make_room(cache_bytes(entry["model"], self.cfg["max_batch"], options), model_id)
                entry["batchers"][key] = Batcher(entry["model"], entry["tokenizer"], self.cfg["max_batch"],
                                                 self.cfg["max_waiting"], self.cfg["seed"], options,
                                                 decode_step="graph" if self.cfg["decode_graph"] else "eager",
                                                 compile=self.cfg["decode_compile"])
            entry["used"] = time.monotonic()
            return entry["batchers"][key]

    def loops_key(self, model, loops):
        """The loop count a request runs at (None for a model without a looped core), or ApiError."""
        loop = getattr(model, "loop", None)
        if loop is None:
            if loops is not None:
                raise ApiError(400, f"loops={loops} needs a looped model (n_core > 0); this one has no looped core",
                               "loops")
            return None
        if loops is not None and loops > self.cfg["max_loops"]:
            raise ApiError(400, f"loops={loops} is over this server's cap {self.cfg['max_loops']}", "loops")
        return loops or loop.loops

    def load(self, model_id, path):
        """Load a model onto the device within the budget; ApiError (422) for a file that cannot be served."""
        try:
            state = load_checkpoint(path, map_location="cpu")
            if state.get("kind") == "export":  # its weights keep their format; int4 readies its kernel on the device
                model = load_model(state, self.device)
            else:
                model = load_model(state).to(self.device, self.dtype)
            tokenizer = tokenizer_from_meta(state["tokenizer"])
        except SystemExit as e:
            raise ApiError(422, f"model {model_id!r}: {e}", "model")
        except KeyError:
            raise ApiError(422, f"model {model_id!r} records no tokenizer, so its tokens cannot be text", "model")
        if getattr(model, "loop", None) and model.loop.exit_tol:
            raise ApiError(422, f"model {model_id!r} exits loops per token (exit_tol), which works without a KV "
                                f"cache only: it cannot be served in batches", "model")
        try:
            check_runs(model)
        except ValueError as e:
            raise ApiError(422, f"model {model_id!r}: {e}", "model")
        size = model_bytes(model)
        self.make_room(size, model_id)
        entry = {"model": model, "tokenizer": tokenizer, "batchers": {}, "bytes": size,
                 "mtime": os.path.getmtime(path), "step": state.get("step"), "used": time.monotonic()}
        self.loaded[model_id] = entry
        return entry

    def busy(self, entry):
        return any(b.busy() for b in entry["batchers"].values())

    def unload(self, model_id):
        for batcher in self.loaded.pop(model_id)["batchers"].values():
            batcher.close()

    def used_bytes(self):
        return sum(e["bytes"] + sum(b.cache_bytes() for b in e["batchers"].values()) for e in self.loaded.values())

    def make_room(self, size, model_id):
        """Unload idle models (least recently used first, never model_id) until size more bytes fit the budget."""
        budget = self.cfg["model_memory_mb"] * 2 ** 20
        if size > budget:
            raise ApiError(400, f"model {model_id!r} needs {size / 2 ** 20:.0f} MB more with its KV cache, more than "
                                f"model_memory_mb={self.cfg['model_memory_mb']}", "model")
        for other in sorted(self.loaded, key=lambda k: self.loaded[k]["used"]):
            if self.used_bytes() + size <= budget:
                return
            if other != model_id and not self.busy(self.loaded[other]):
                self.unload(other)
        if self.used_bytes() + size > budget:
            raise ApiError(503, "the memory budget is taken by models that are generating; retry shortly", "model")


# ----------------------------------------------------------------------------- what a job may do

# The keys a job request may override, per kind: an allow-list, so a key that names a program, a command
# or code (swarm's worker_command, bench's nanogpt, train's compile_options: Inductor options can name a
# compiler) stays out of reach, and so does any key a script adds later until it is listed here. Config
# files under config_root may set anything: they are the server operator's.
TRAIN_SETTABLE = set(MODEL_KEYS) | {
    "out_dir", "dataset", "data_dir", "init_from", "train_only", "overwrite", "eval_interval", "eval_iters",
    "log_interval", "eval_loops", "batch_size", "gradient_accumulation_steps", "max_iters", "learning_rate", "min_lr",
    "schedule", "warmup_iters", "decay_frac", "lr_decay_iters", "weight_decay", "optimizer", "muon_lr", "beta1",
    "beta2", "grad_clip", "memory_lr_scale", "knn_store", "teacher", "distill_alpha", "distill_temperature", "noise",
    "eval_position_loss", "position_buckets", "eval_token_watch", "tensorboard", "device", "dtype", "compile", "fp8",
    "fp8_head", "seed"}
SETTABLE = {
    "prepare": {"dataset", "name", "tokenizer", "data_dir", "val_fraction", "max_tokens", "text_field", "num_threads",
                "force", "synthetic_docs", "seed"},
    "train": TRAIN_SETTABLE,
    "world": {"out_dir", "overwrite", "tasks", "changes", "init_from", "mode", "act", "choose_untried", "teacher_help",
              "choice_loss", "seed", "device", "imitation_episodes", "teacher_noise", "imitation_notes",
              "imitation_iters", "clone_iters", "imitation_batch_size", "imitation_lr", "n_layer", "n_head", "n_embd",
              "block_size", "episodes", "episodes_per_update", "updates_per_batch", "update_batch_size",
              "learning_rate", "grad_clip", "temperature_start", "temperature_end", "baseline_decay", "replay_size",
              "replay_recent_window", "replay_recent_fraction", "eval_interval", "eval_episodes"},
    "swarm": {"out_dir", "overwrite", "task", "task_options", "num_goals", "workers", "checkpoints", "temperatures",
              "seed", "aggregators", "guide", "debate_rounds", "debate", "hint", "guide_stop", "learning", "learner",
              "guide_learns", "teacher_help", "learn_every", "broadcast_every", "save_every", "resume",
              "learning_rate", "updates_per_batch", "update_batch_size", "grad_clip", "replay_size",
              "replay_recent_window", "replay_recent_fraction", "device", "threads", "reply_timeout",
              "start_timeout", "human", "human_input"},
    "bench": {"suite", "parts", "out", "out_dir", "data_dir", "device", "config", "steps", "warmup_steps",
              "plain_steps", "best_batch", "new_tokens", "profile", "budget_s", "smoke", "levers", "lever_budget_s",
              "parity_lever", "parity_steps"},
}


def is_path(value):
    """Whether a dataset value names a file or folder (else it is a dataset's name: shakespeare_char, ...)."""
    return os.sep in value or "/" in value or os.path.exists(value)


def task_paths(where, name, options):
    """(key, path, root key) of a task's path options (textworld's games `root`, its default included); a
    task's options must be a dict, and no other option may hold a path."""
    param = f"overrides.{where.split('.')[0]}"
    if not isinstance(name, str) or not isinstance(options, dict):
        raise ApiError(422, f"{where}: a task is a name and a dict of its options, got {name!r}: {options!r}", param)
    try:
        defaults = inspect.signature(tasks.task_class(name)).parameters
    except ValueError as e:
        raise ApiError(422, f"{where}: {e}", param)
    paths = []
    for key in defaults:
        if key == "root":
            paths.append((f"{where}.root", options.get("root", defaults["root"].default), "data_root"))
    for key, value in options.items():
        if key != "root" and isinstance(value, str) and ("/" in value or os.sep in value):
            raise ApiError(422, f"{where}.{key}={value!r}: task options hold no paths (but root)", param)
    return paths


def prepare_paths(c):
    name = c["name"] or os.path.splitext(os.path.basename(os.path.normpath(c["dataset"])))[0].replace(":", "_")
    if c["name"] and not NAME.match(c["name"]):
        raise ApiError(422, f"name={c['name']!r}: letters, digits, '_', '-' or '.' (not first), no separators",
                       "overrides.name")
    paths = [("data_dir", c["data_dir"], "data_root"), ("name", os.path.join(c["data_dir"], name), "data_root")]
    return paths + ([("dataset", c["dataset"], "data_root")] if is_path(c["dataset"]) else [])


def train_paths(c):
    paths = [("out_dir", c["out_dir"], "out_root"), ("data_dir", c["data_dir"], "data_root"),
             ("dataset", os.path.join(c["data_dir"], c["dataset"]), "data_root")]
    if c["init_from"] not in ("scratch", "resume"):
        paths.append(("init_from", c["init_from"], "out_root"))
    return paths + [(k, c[k], "out_root") for k in ("teacher", "knn_store") if c[k]]


def world_paths(c):
    if not isinstance(c["tasks"], dict) or not isinstance(c["changes"], (list, tuple)):
        raise ApiError(422, "tasks is a dict of task name -> options, changes a list of (episode, name, options)",
                       "overrides.tasks")
    paths = [("out_dir", c["out_dir"], "out_root")]
    if c["init_from"] not in ("imitate", "resume"):
        paths.append(("init_from", c["init_from"], "out_root"))
    for name, options in c["tasks"].items():
        paths += task_paths(f"tasks.{name}", name, options)
    for change in c["changes"]:
        if not isinstance(change, (list, tuple)) or len(change) != 3 or not isinstance(change[0], int):
            raise ApiError(422, f"changes: each change is (episode, task name, options), got {change!r}",
                           "overrides.changes")
        paths += task_paths(f"changes.{change[1]}", change[1], change[2])
    return paths


def swarm_paths(c):
    paths = [("out_dir", c["out_dir"], "out_root")] + task_paths("task_options", c["task"], c["task_options"])
    for key in ("checkpoints", "guide", "learner"):
        values = c[key] if isinstance(c[key], (list, tuple)) else [c[key]]
        paths += [(key, v, "out_root") for v in values if v and not (isinstance(v, str) and v.startswith("fake:"))]
    return paths


def bench_paths(c):
    if not isinstance(c["parity_lever"], dict) or not set(c["parity_lever"]) <= TRAIN_SETTABLE - {
            "out_dir", "data_dir", "dataset", "init_from", "teacher", "knn_store"}:
        raise ApiError(422, "parity_lever takes train.py options that name no path or program",
                       "overrides.parity_lever")
    return [("out", c["out"], "out_root"), ("out_dir", c["out_dir"], "out_root"),
            ("data_dir", c["data_dir"], "data_root"), ("config", c["config"], "config_root")]


def check_model_options(c):
    """The model options, checked as architecture.build_model checks them: train.py builds its model only
    after it claims out_dir (where overwrite=True has already moved the old run aside)."""
    options = split_options({k: c[k] for k in MODEL_KEYS if k in c and k != "vocab_size"})
    check_combinations(*(options[cls] for cls in OPTION_CLASSES))


def check_swarm_person(c):
    """A swarm job has no terminal: its person answers on the page, through the run's control file."""
    if c["human"] and c["human_input"] != "file":
        raise ValueError("a swarm job has no terminal: with human=True set human_input='file', and answer on the "
                         "page (the swarm's view), which writes its control file")


# a kind of job: its script, the paths it touches (a function of the resolved config), the metrics file and
# counter that give its progress. Each script's own check_config (and check here) runs before it is queued.
JOB_KINDS = {
    "prepare": dict(script="prepare.py", paths=prepare_paths),
    "train": dict(script="train.py", paths=train_paths, check=check_model_options, metrics="metrics.jsonl",
                  progress=("step", "max_iters"), resumable=True),
    "world": dict(script="world.py", paths=world_paths, metrics="metrics.jsonl", progress=("episode", "episodes"),
                  resumable=True),
    "swarm": dict(script="swarm.py", paths=swarm_paths, check=check_swarm_person),
    "bench": dict(script="bench.py", paths=bench_paths),
}
ACTIVE = ("queued", "running")


def script_module(kind):
    """A job script as a module: its DEFAULTS and check_config validate a request before anything runs."""
    return importlib.import_module(JOB_KINDS[kind]["script"].removesuffix(".py"))


def check_override_keys(kind, overrides, defaults):
    """ApiError naming the key for an override the script does not know or a job may not set."""
    for key in overrides:
        param = f"overrides.{key}"
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            raise ApiError(422, f"{kind} has no config key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
                           param)
        if key not in SETTABLE[kind]:
            raise ApiError(422, f"{kind} jobs may not set {key!r} (it names a program, command or code to run, or "
                                f"is not on the list of keys a job may set); put it in a config file under config_root "
                                f"if the server's operator wants it", param)


def check_job_paths(kind, resolved, overrides, roots):
    """ApiError naming the key (the override's, where one set it) if a path a job would read or write leaves
    its root, or names itself with characters outside [A-Za-z0-9_.-/]."""
    for key, path, root_key in JOB_KINDS[kind]["paths"](resolved):
        param = f"overrides.{key.split('.')[0]}" if key.split(".")[0] in overrides else "config"
        root = roots[root_key]
        if not isinstance(path, str) or not inside(path, root):
            raise ApiError(422, f"{key}={path!r} is outside {root}: {kind} jobs may only use paths under "
                                f"{root_key}={root!r}", param)
        below = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
        if not SAFE_PATH.match(below):
            raise ApiError(422, f"{key}={path!r}: a path may hold only letters, digits and _ . - /", param)


def run_script_check(kind, resolved, overrides):
    """The server's extra check of a whole config (what a job may do: first, so a refusal names its key), then
    the script's own, as a 422."""
    checks = [JOB_KINDS[kind].get("check"), getattr(script_module(kind), "check_config", None)]
    for check in filter(None, checks):
        try:
            check(resolved)
        except (SystemExit, ValueError, TypeError, KeyError, AttributeError) as e:
            message = str(e) or type(e).__name__
            key = min((k for k in overrides if k in message), key=message.find, default=None)  # named first
            raise ApiError(422, message, f"overrides.{key}" if key else "config")


def resolve_job(kind, config, overrides, cfg):
    """A job request checked in full: (the script's argv after its name, the resolved config). ApiError (422)
    naming the field for anything a job may not do or the script would refuse."""
    if not isinstance(overrides, dict):
        raise ApiError(422, "overrides is a JSON object of config keys and values", "overrides")
    module = script_module(kind)
    check_override_keys(kind, overrides, module.DEFAULTS)
    args = []
    if config:
        path = config if os.path.isabs(config) else os.path.join(cfg["config_root"], config.removeprefix("config/"))
        if not inside(path, cfg["config_root"]) or not os.path.isfile(path):
            raise ApiError(422, f"config {config!r} is not a file in {cfg['config_root']} (GET /v1/configs lists "
                                f"them)", "config")
        args.append(os.path.realpath(path))
    args += [f"--{key}={value!r}" for key, value in overrides.items()]
    try:
        resolved = configure(module.DEFAULTS, args)
    except ConfigError as e:
        key = next((k for k in overrides if f"'{k}'" in str(e)), None)
        raise ApiError(422, str(e), f"overrides.{key}" if key else "config")
    check_job_paths(kind, resolved, overrides, cfg)
    run_script_check(kind, resolved, overrides)
    return args, resolved


def job_out_dir(kind, resolved):
    """The folder a job writes: its out_dir (a prepare job's output dataset folder)."""
    if kind == "prepare":
        return next(path for key, path, _ in prepare_paths(resolved) if key == "name")
    return resolved.get("out_dir")


# ----------------------------------------------------------------------------- job processes
# Jobs run through processes.py (their own process group, SIGTERM when the server dies). SIGTERM may come more
# than once: the kernel sends it whenever the child's parent *thread* exits, and a dying server hands its
# children from one exiting thread to the next (measured: 1 to 6 deliveries); runtime.StopRequest takes any
# number as one request: SIGTERM never means "quit without saving", as a second Ctrl-C does.

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


# ----------------------------------------------------------------------------- jobs

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


def lock_jobs_dir(root):
    """An flock on jobs_dir/.lock for this server's life (the kernel drops it however the server dies): a
    second server on the same folder stops before it reads or rewrites any record."""
    try:
        return claim_out_dir(root, resuming=True, run_files=())
    except SystemExit:
        raise SystemExit(f"jobs_dir={root} is in use by another serve.py: give this one its own --jobs_dir, or "
                         f"stop the other") from None


class Jobs:
    """Job records on disk, and one thread that starts, watches and cancels their processes."""

    def __init__(self, cfg):
        self.cfg, self.root = cfg, cfg["jobs_dir"]
        self.folder_lock = lock_jobs_dir(self.root)
        self.jobs, self.procs, self.lock = {}, {}, threading.RLock()
        for job_id in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, job_id, "job.json")
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                with open(path) as f:
                    job = json.load(f)
                if job["state"] == "running":  # the server stopped while it ran
                    self.update(job, state="interrupted", finished=time.time())
                self.jobs[job["id"]] = job
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True, name="jobs")
        self.thread.start()

    def folder(self, job):
        return os.path.join(self.root, job["id"])

    def update(self, job, **fields):
        job.update(fields)
        write_json_atomic(os.path.join(self.folder(job), "job.json"), job)

    def submit(self, kind, config, overrides, resumed_from=None):
        """Validate a request (ApiError naming the field) and queue the job."""
        args, resolved = resolve_job(kind, config, overrides, self.cfg)
        out_dir = job_out_dir(kind, resolved)
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
                processes.signal_group(self.procs[job["id"]], signal.SIGINT)  # the script's Ctrl-C path: save, stop

    def start(self, job):
        argv = [sys.executable, "-u", os.path.join(ROOT, job["argv"][0]), *job["argv"][1:]]
        try:
            with open(os.path.join(self.folder(job), "log.txt"), "ab") as log:
                proc = processes.start(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       death_signal=signal.SIGTERM)
        except OSError as e:
            self.update(job, state="failed", error=f"could not start: {e}", finished=time.time())
            return
        self.procs[job["id"]] = proc
        self.update(job, state="running", pid=proc.pid, started=time.time())

    def poll(self):
        with self.lock:
            for job_id, proc in list(self.procs.items()):
                job = self.jobs[job_id]
                if not processes.exited(proc):
                    if job.get("cancel_requested") and time.time() - job["cancel_requested"] > self.cfg["cancel_grace_s"]:
                        processes.signal_group(proc, signal.SIGKILL)
                    continue
                code = processes.stop(proc, grace=0)  # reaps it, and ends whatever it left in its group
                del self.procs[job_id]
                state = "cancelled" if job.get("cancel_requested") else "succeeded" if code == 0 else "failed"
                error = log_tail(os.path.join(self.folder(job), "log.txt")) if state == "failed" else None
                self.update(job, state=state, returncode=code, finished=time.time(), error=error)
            if self.stopping.is_set():
                return
            queued = sorted((j for j in self.jobs.values() if j["state"] == "queued"), key=lambda j: j["created"])
            for job in queued[:max(0, self.cfg["max_running_jobs"] - len(self.procs))]:
                self.start(job)

    def run(self):
        """The one thread that starts job processes: a child's parent-death signal follows this thread, so
        it lives as long as the server."""
        while not self.stopping.wait(0.2):
            try:
                self.poll()
            except Exception as e:  # a full disk or a vanished folder must not stop job supervision
                print(f"jobs: {type(e).__name__}: {e}", file=sys.stderr)

    def shutdown(self):
        """The server is stopping: running jobs get their SIGTERM as it exits (parent-death signal) and save;
        their records say interrupted, so a restarted server can resume them. The jobs folder is let go."""
        self.stopping.set()
        self.thread.join(timeout=5)
        with self.lock:
            for job_id in list(self.procs):
                self.update(self.jobs[job_id], state="interrupted", finished=time.time())
        self.folder_lock.close()


# ----------------------------------------------------------------------------- every run under out_root

MAX_RUN_DEPTH = 4     # folders below out_root searched for runs
MAX_CURVE_ROWS = 4000  # metrics rows a curve request returns; longer runs are thinned (evaluations always kept)
SWARM_EVENTS = ("config", "goal", "proposals", "aggregate", "awaiting_human", "human", "result", "summary")


def run_status(folder):
    """running while a process holds the folder's lock (runtime.claim_out_dir's flock on .lock), else stopped.
    Read from /proc/locks, never by taking the lock (a run starting that instant would be refused); where there
    is no /proc, by whether the pid the lock file names still lives."""
    lock = os.path.join(folder, ".lock")
    try:
        stat = os.stat(lock)
        with open("/proc/locks") as f:
            key = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
            return "running" if any(line.split()[5:6] == [key] for line in f if "FLOCK" in line) else "stopped"
    except FileNotFoundError as e:
        if e.filename == lock:
            return "stopped"
    except OSError:
        return "stopped"
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(lock) as f:
            text = f.read().split()
        if text[0] == "pid" and process_alive(int(text[1])):
            return "running"
    return "stopped"


def plain(value):
    """A value as JSON reads it back (tuples as lists), so a config file's values compare with config.json's."""
    return json.loads(json.dumps(value, default=str))


def settings_of(kind, config):
    """The keys of a run's config that differ from its script's defaults: what makes the run what it is."""
    defaults = plain(script_module(kind).DEFAULTS)
    return {k: v for k, v in (config or {}).items()
            if k in defaults and k not in ("out_dir", "overwrite", "resume") and v != defaults[k]}


def thinned(rows, limit=MAX_CURVE_ROWS):
    """At most about `limit` rows: every evaluation and an even share of the rest."""
    if len(rows) <= limit:
        return rows
    every = -(-len(rows) // limit)
    return [r for i, r in enumerate(rows) if "val_loss" in r or "eval" in r or i % every == 0]


class Runs:
    """The runs under out_root, however they were started (a job, the command line, another script), read from
    the files their scripts write. JSON-lines files are read incrementally and kept in memory, each row shaped
    on the way in (a swarm's messages and an episode's transcript stay on disk)."""

    def __init__(self, root):
        self.root, self.files, self.lock = root, {}, threading.Lock()

    def folder(self, run_id, kind=None):
        """The folder of a run id (its path below out_root), or ApiError 404."""
        folder = os.path.join(self.root, run_id)
        if not valid_id(run_id) or not inside(folder, self.root) or not os.path.isdir(folder) or \
                run_kind(folder) is None or (kind and run_kind(folder) != kind):
            raise ApiError(404, f"no {kind or ''} run {run_id!r} under out_root (GET /v1/runs lists them)".replace(
                "  ", " "), "id")
        return folder

    def rows(self, path, shape=None):
        """The rows of a JSON-lines file, each through shape(row, byte offset) (None drops it); only the lines
        added since the last call are read, and a file replaced or cut (a resumed run) is read again."""
        with self.lock:
            try:
                stat = os.stat(path)
            except OSError:
                return []
            inode, offset, rows = self.files.get(path, (None, 0, []))
            if inode != stat.st_ino or stat.st_size < offset:
                offset, rows = 0, []
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(max(0, stat.st_size - offset))
            end = data.rfind(b"\n") + 1  # a line being written is read once it is whole
            at = offset
            for line in data[:end].split(b"\n")[:-1]:
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    row = shape(row, at) if shape else row
                    if row is not None:
                        rows.append(row)
                at += len(line) + 1
            self.files[path] = (stat.st_ino, offset + end, rows)
            return rows

    def swarm(self, folder):
        keep = lambda e, at: e if isinstance(e, dict) and e.get("event") in SWARM_EVENTS else None  # noqa: E731
        return swarm_view(self.rows(os.path.join(folder, "swarm.jsonl"), keep))

    def episodes(self, folder):
        """A world run's episodes without their transcripts (each row knows where its line starts)."""
        def index(row, at):
            return {**{k: v for k, v in row.items() if k != "transcript"}, "at": at} if isinstance(row, dict) else None
        return self.rows(os.path.join(folder, "episodes.jsonl"), index)

    def overview(self, folder):
        """One run as the page lists it: kind, status, its settings, progress and best result."""
        kind = run_kind(folder)
        run = {"id": os.path.relpath(folder, self.root).replace(os.sep, "/"), "kind": kind, "status": run_status(folder),
               "updated": max((os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder)), default=0.0),
               "model": os.path.isfile(os.path.join(folder, "ckpt.pt"))}
        if kind == "swarm":
            view = self.swarm(folder)
            config, decided = view["config"] or {}, [g["decision"] for g in view["goals"] if g.get("decision")]
            run.update(progress={"done": len(view["goals"]), "total": config.get("num_goals"), "unit": "goal"},
                       result={"decision_success": sum(bool(d.get("success")) for d in decided) / len(decided)
                               if decided else None, "waiting": view["waiting"], "paused": view["paused"]},
                       human=bool(config.get("human")) and config.get("human_input") == "file")
        else:
            config = read_json_file(os.path.join(folder, "config.json")) or {}
            rows = self.rows(os.path.join(folder, "metrics.jsonl"))
            if kind == "train":
                result = train_overview(rows)
                progress = {"done": result["step"], "total": config.get("max_iters"), "unit": "step"}
            else:
                result = world_overview(rows)
                total = 0 if config.get("mode") == "evaluate" else config.get("episodes")
                progress = {"done": result["episode"], "total": total, "unit": "episode"}
            run.update(progress=progress, result=result)
        run["settings"] = settings_of(kind, config)
        return run

    def list(self):
        found = []
        for folder, dirs, files in os.walk(self.root):
            depth = os.path.relpath(folder, self.root).count(os.sep) + 1
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.startswith("replaced-")
                             and depth < MAX_RUN_DEPTH)
            if folder != self.root and run_kind(folder):
                with contextlib.suppress(OSError):  # a run moved aside or deleted while it was read
                    found.append(self.overview(folder))
        return sorted(found, key=lambda r: -r["updated"])


def append_control(folder, action, text):
    """One command for a swarm's person into its control file (swarm_console.Inbox reads it): a single write of a
    whole line with O_APPEND, never through a symlink."""
    line = json.dumps({"action": action, "text": " ".join(text.split())[:MAX_CONTROL_CHARS], "time": time.time()})
    fd = os.open(os.path.join(folder, CONTROL_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- requests from browsers

def host_name(host):
    """The name in a Host header, without its port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_hosts(cfg):
    """The names a request's Host header may carry, or None for any (bound to every address: the token guards).
    A web page on another name that resolves here (DNS rebinding) is refused."""
    if cfg["host"] in ("0.0.0.0", "::") and not cfg["allowed_hosts"]:
        return None
    return {*LOOPBACK, cfg["host"].lower(), *(h.lower() for h in cfg["allowed_hosts"])}


JSON_TYPES = ("application/json",)
UPLOAD_TYPES = ("application/octet-stream", "application/json", "application/x-ndjson")


def refusal(scope, headers, token, hosts):
    """(status, message, param) for a request refused before any route sees it, or None: a foreign Host, a
    missing or wrong token, a state-changing request from another web page, or one a web page could send
    without asking (a form's or text/plain body: browsers send those across sites without a preflight)."""
    host = headers.get(b"host", b"").decode("latin-1")
    if hosts is not None and host_name(host) not in hosts:
        return 403, (f"Host {host!r} is not this server's name (a web page on another name that resolves here?); "
                     f"add the name to allowed_hosts if it is yours"), "host"
    if token and scope["path"] != "/":  # the page itself holds no data; it asks for the token
        if not hmac.compare_digest(headers.get(b"authorization", b""), f"Bearer {token}".encode()):
            return 401, "missing or wrong bearer token (Authorization: Bearer <token>)", None
    if scope["method"] in ("GET", "HEAD", "OPTIONS"):
        return None
    origin = headers.get(b"origin")
    if origin is not None and origin.decode("latin-1") not in (f"http://{host}", f"https://{host}"):
        return 403, f"a {scope['method']} from another web page ({origin.decode('latin-1')}) is refused", "origin"
    if scope["method"] in ("POST", "PUT", "PATCH"):
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
        wanted = UPLOAD_TYPES if scope["path"] == "/v1/datasets" else JSON_TYPES
        if kind not in wanted:
            return 415, (f"{scope['method']} {scope['path']} needs Content-Type: {' or '.join(wanted)} (got "
                         f"{kind or 'none'}): a web page cannot send those to another site without asking"), \
                "content-type"
    return None


class Guard:
    """ASGI middleware: `refusal`'s checks, then bounded request bodies.

    Plain ASGI rather than FastAPI's @middleware, which would pass every streamed chunk through a queue.
    """

    def __init__(self, app, token, hosts, body_limit, upload_limit):
        self.app, self.token, self.hosts = app, token, hosts
        self.body_limit, self.upload_limit = body_limit, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refused = refusal(scope, headers, self.token, self.hosts)
        if refused:
            return await error_response(*refused)(scope, receive, send)
        limit = self.upload_limit if scope["path"] == "/v1/datasets" else self.body_limit
        length = headers.get(b"content-length")
        if length is not None:  # the HTTP server delivers no more than this many bytes
            if not length.isdigit() or int(length) > limit:
                return await error_response(413, f"request body over {limit} bytes")(scope, receive, send)
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
                return await error_response(413, f"request body over {limit} bytes")(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await self.app(scope, replay, send)


def error_response(status, message, param=None):
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 409: "conflict_error", 415: "invalid_request_error", 422: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


async def api_error(request, e):
    return error_response(e.status, e.message, e.param)


async def validation_error(request, e):
    first = e.errors()[0]
    if first["type"] == "json_invalid":  # its location is a character offset, not a field
        return error_response(422, f"the body is not valid JSON: {first['msg']} (at character {first['loc'][-1]})",
                              "body")
    field = ".".join(str(p) for p in first["loc"] if p != "body")
    return error_response(422, f"{field}: {first['msg']}" if field else first["msg"], field or None)


# ----------------------------------------------------------------------------- the server's state

@dataclasses.dataclass
class State:
    """What every route works on: the resolved serve config, the models, the jobs, the runs under out_root."""
    cfg: dict
    models: Models
    jobs: Jobs
    runs: Runs
    generations: int = 0  # rows being generated now


def state_of(request: Request) -> State:
    return request.app.state.serve


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]] = EOT_TEXT  # text, or token ids
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, **FINITE)
    top_p: float = Field(1.0, gt=0, le=1, **FINITE)
    top_k: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0, lt=2 ** 64)  # what a torch.Generator takes
    stream: bool = False
    stream_options: Optional[dict] = None
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    ignore_eos: bool = False
    loops: Optional[int] = Field(None, ge=1)  # a looped model's test-time loop count; None: the trained one
    user: Optional[str] = None
    best_of: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("prompt", mode="wrap")
    @classmethod
    def one_prompt_form(cls, value, handler):
        try:
            return handler(value)
        except ValidationError:  # pydantic would list why it is none of the four forms, each as its own error
            raise ValueError("prompt is a string, a list of strings, a list of token ids (ints), or a list of "
                             "lists of token ids") from None


class TokenizeRequest(BaseModel):
    """vLLM's POST /tokenize, as lm-eval's remote tokenizer sends it."""
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None  # None: the server's tokenizer_model
    prompt: str
    add_special_tokens: bool = True  # µLM's tokenizers have no BOS or other token to add: it changes nothing
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    tokens: list[StrictInt]


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal[tuple(JOB_KINDS)]
    config: str = ""
    overrides: dict = {}


class ControlRequest(BaseModel):
    """A person's command to a swarm, as swarm_console reads it: accept, edit (text: the final action), reject,
    stop, goal (text: [TASK] SEED), note (text: a message every worker reads), hint (text: a plan), pause, resume."""
    model_config = ConfigDict(extra="forbid")
    action: Literal[tuple(SWARM_ACTIONS)]
    text: str = Field("", max_length=MAX_CONTROL_CHARS)


# ----------------------------------------------------------------------------- completions

def encode_text(tokenizer, text):
    """Token ids of text, each literal <|endoftext|> the EOT token (as a Hugging Face tokenizer reads its special
    tokens in text): /tokenize and a text prompt agree, so lm-eval's context lengths match the served tokens."""
    ids = []
    for i, piece in enumerate(text.split(EOT_TEXT)):
        ids += ([tokenizer.eot] if i else []) + tokenizer.encode(piece)
    return ids


def check_token_ids(ids, tokenizer, field):
    """ApiError (400) for a token id outside the model's vocabulary."""
    bad = next((t for t in ids if not 0 <= t < tokenizer.n_vocab), None)
    if bad is not None:
        raise ApiError(400, f"{field}: token id {bad} is outside this model's vocabulary (ids 0 to "
                            f"{tokenizer.n_vocab - 1}; {tokenizer.eot} is <|endoftext|>)", field)


def encode_prompt(prompt, cfg, tokenizer):
    """One prompt (text, or a list of token ids) as token ids; an empty text is <|endoftext|>."""
    if isinstance(prompt, str):
        if len(prompt) > cfg["max_prompt_chars"]:
            raise ApiError(400, f"prompt is {len(prompt)} characters, over the cap {cfg['max_prompt_chars']}", "prompt")
        try:
            return encode_text(tokenizer, prompt) or [tokenizer.eot]
        except ValueError as e:
            raise ApiError(400, f"prompt: {e}", "prompt")
    if not prompt:
        raise ApiError(400, "prompt: a list of token ids needs at least one id", "prompt")
    if len(prompt) > cfg["max_prompt_chars"]:
        raise ApiError(400, f"prompt is {len(prompt)} tokens, over the cap {cfg['max_prompt_chars']}", "prompt")
    check_token_ids(prompt, tokenizer, "prompt")
    return list(prompt)


def check_completion(req, cfg, tokenizer, block_size=None):
    """The request's prompts as token ids and its stop strings, or ApiError naming the bad field. With
    block_size, a prompt whose echoed log-probabilities the model cannot give whole (longer than its
    context) is refused rather than scored on its last block_size tokens."""
    if req.max_tokens > cfg["max_tokens"]:
        raise ApiError(400, f"max_tokens={req.max_tokens} is over this server's cap {cfg['max_tokens']}", "max_tokens")
    if req.n > cfg["max_n"]:
        raise ApiError(400, f"n={req.n} is over this server's cap {cfg['max_n']}", "n")
    if req.seed is not None and req.seed + req.n > 2 ** 64:
        raise ApiError(400, f"seed={req.seed}: choice i samples with seed + i, which must stay below 2**64", "seed")
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
    if len(stops) > 4 or not all(stops) or any(len(s) > cfg["max_stop_chars"] for s in stops):
        raise ApiError(400, f"stop takes up to 4 non-empty strings of up to {cfg['max_stop_chars']} characters", "stop")
    one = isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int))  # a text or one id list
    prompts = [req.prompt] if one else req.prompt
    if not prompts or len(prompts) > cfg["max_prompts"]:
        raise ApiError(400, f"prompt takes 1 to {cfg['max_prompts']} prompts", "prompt")
    if len(prompts) * req.n > cfg["max_batch"]:
        raise ApiError(400, f"{len(prompts)} prompts x n={req.n} rows exceed max_batch={cfg['max_batch']}", "n")
    encoded = [encode_prompt(p, cfg, tokenizer) for p in prompts]
    longest = max(len(ids) for ids in encoded)
    if block_size and req.echo and req.logprobs is not None and longest > block_size:
        raise ApiError(400, f"prompt is {longest} tokens, longer than this model's context (block_size={block_size}): "
                            f"its echoed log-probabilities would not be conditioned on all of it; send at most "
                            f"{block_size} tokens (lm-eval: --model_args max_length={block_size})", "prompt")
    return encoded, stops


class Completion:
    """One completion request in flight: its rows on a batcher, and the events they send back."""

    DISCONNECT_CHECK_S = 0.25  # how often to ask whether the client is still there

    def __init__(self, req, batcher, prompts, stops):
        self.req, self.batcher, self.prompts, self.tokenizer = req, batcher, prompts, batcher.tokenizer
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.rows = [Row(ids, req.max_tokens, req.temperature, req.top_k, req.top_p,
                         None if req.seed is None else req.seed + j, req.logprobs, stops, req.ignore_eos,
                         req.echo and req.logprobs is not None, self.tokenizer, self.emitter(p * req.n + j))
                     for p, ids in enumerate(prompts) for j in range(req.n)]
        self.created, self.id = int(time.time()), "cmpl-" + secrets.token_hex(12)
        self.echoes = [self.tokenizer.decode(ids) if req.echo and ids != [self.tokenizer.eot] else ""
                       for ids in prompts]
        self.usage = {"prompt_tokens": sum(len(ids) for ids in prompts), "completion_tokens": 0}

    def emitter(self, index):
        def emit(event):  # called on the batcher's thread
            with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        return emit

    async def events(self, request):
        """(index, event) until every row has finished or failed; cancels the rows if the client goes away,
        which it checks every DISCONNECT_CHECK_S whether tokens are coming or not."""
        open_rows, checked = set(range(len(self.rows))), time.monotonic()
        try:
            while open_rows:
                with contextlib.suppress(asyncio.TimeoutError):
                    index, event = await asyncio.wait_for(self.queue.get(), timeout=self.DISCONNECT_CHECK_S)
                    if "error" in event or event["finish_reason"]:
                        open_rows.discard(index)
                    if "error" not in event:
                        self.usage["completion_tokens"] += 1
                    yield index, event
                if time.monotonic() - checked >= self.DISCONNECT_CHECK_S:
                    if await request.is_disconnected():
                        return
                    checked = time.monotonic()
        finally:
            for row in self.rows:
                row.cancelled = True  # the batcher drops unfinished rows at its next step

    def logprobs_of(self, index, infos, with_prompt):
        """OpenAI's logprobs object for a choice's tokens (with the prompt's first, when echoed)."""
        if self.req.logprobs is None:
            return None
        entries = infos
        if self.req.echo and with_prompt:
            ids = self.prompts[index // self.req.n]
            row = self.rows[index]
            prompt_lp, prompt_top = row.prompt_logprobs or [None] * len(ids), row.prompt_top or [None] * len(ids)
            entries = [{"token": self.tokenizer.decode([t]), "logprob": lp, "top": top}
                       for t, lp, top in zip(ids, prompt_lp, prompt_top)] + infos
        offsets, at = [], 0
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries] if self.req.logprobs else None, "text_offset": offsets}

    def total_usage(self):
        return {**self.usage, "total_tokens": self.usage["prompt_tokens"] + self.usage["completion_tokens"]}

    def chunk(self, choices):
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.req.model,
                "choices": choices}

    async def stream(self, request):
        """Server-sent events: a chunk per token, an error event for a row that fails, then [DONE]."""
        first = set()
        async for index, event in self.events(request):
            if "error" in event:
                yield "data: " + json.dumps({"error": {"message": event["error"], "type": "server_error",
                                                       "param": None, "code": None, "index": index}}) + "\n\n"
                continue
            text, starts = event["text"], index not in first
            if starts:
                first.add(index)
                text = self.echoes[index // self.req.n] + text
            lp = self.logprobs_of(index, [event["logprobs"]], starts)
            yield "data: " + json.dumps(self.chunk([{"index": index, "text": text, "logprobs": lp,
                                                     "finish_reason": event["finish_reason"]}])) + "\n\n"
        if (self.req.stream_options or {}).get("include_usage"):
            yield "data: " + json.dumps({**self.chunk([]), "usage": self.total_usage()}) + "\n\n"
        yield "data: [DONE]\n\n"

    async def collect(self, request):
        """The whole completion as one response body; ApiError if a row failed, None if the client left."""
        texts, infos, finish = [""] * len(self.rows), [[] for _ in self.rows], [None] * len(self.rows)
        async for index, event in self.events(request):
            if "error" in event:
                raise ApiError(500, f"generation failed: {event['error']}")
            texts[index] += event["text"]
            infos[index].append(event["logprobs"])
            finish[index] = event["finish_reason"]
        if any(f is None for f in finish):
            return None
        choices = [{"index": i, "text": self.echoes[i // self.req.n] + texts[i],
                    "logprobs": self.logprobs_of(i, infos[i], True), "finish_reason": finish[i]}
                   for i in range(len(self.rows))]
        return {**self.chunk(choices), "usage": self.total_usage()}


async def completions(req: CompletionRequest, request: Request, s: State = Depends(state_of)):
    batcher = await asyncio.to_thread(s.models.get, req.model, req.loops)
    prompts, stops = check_completion(req, s.cfg, batcher.tokenizer, batcher.config.block_size)
    completion = Completion(req, batcher, prompts, stops)
    refused = batcher.submit(completion.rows)
    if refused:
        raise ApiError(429 if "max_waiting" in refused else 503, refused)
    s.generations += len(completion.rows)
    if req.stream:
        async def sse():
            try:
                async for text in completion.stream(request):
                    yield text
            finally:
                s.generations -= len(completion.rows)
        return StreamingResponse(sse(), media_type="text/event-stream")
    try:
        body = await completion.collect(request)
    finally:
        s.generations -= len(completion.rows)
    return body if body is not None else PlainTextResponse("", 499)  # 499: the client went away


async def chat():
    raise ApiError(400, "no µLM model has a chat format yet: use POST /v1/completions with a plain-text prompt",
                   "messages")


# ----------------------------------------------------------------------------- tokenizers (vLLM's routes)
# lm-eval's local-completions client tokenizes through these (tokenizer_backend=remote) when it cannot load a
# Hugging Face tokenizer: a character model has none. Its requests name no model: the server's tokenizer_model.

async def tokenizer_of(s, model_id):
    """(tokenizer, block_size) of the named model, or of tokenizer_model when the request names none."""
    model_id = model_id or s.cfg["tokenizer_model"]
    if not model_id:
        raise ApiError(400, "name the model whose tokenizer to use: \"model\" in the body (GET /tokenizer_info?model=ID), "
                            "or start serve.py with --tokenizer_model=ID (lm-eval's remote tokenizer names no model)",
                       "model")
    batcher = await asyncio.to_thread(s.models.get, model_id)
    return batcher.tokenizer, batcher.config.block_size


async def tokenize(req: TokenizeRequest, s: State = Depends(state_of)):
    tokenizer, block_size = await tokenizer_of(s, req.model)
    if len(req.prompt) > s.cfg["max_prompt_chars"]:
        raise ApiError(400, f"prompt is {len(req.prompt)} characters, over the cap {s.cfg['max_prompt_chars']}",
                       "prompt")
    try:
        ids = encode_text(tokenizer, req.prompt)
    except ValueError as e:
        raise ApiError(400, f"prompt: {e}", "prompt")
    body = {"count": len(ids), "max_model_len": block_size, "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = [tokenizer.decode([t]) for t in ids]
    return body


async def detokenize(req: DetokenizeRequest, s: State = Depends(state_of)):
    tokenizer, _ = await tokenizer_of(s, req.model)
    check_token_ids(req.tokens, tokenizer, "tokens")
    return {"prompt": tokenizer.decode(req.tokens)}


async def tokenizer_info(model: Optional[str] = None, s: State = Depends(state_of)):
    tokenizer, block_size = await tokenizer_of(s, model)
    return {"tokenizer_class": tokenizer.name, "vocab_size": tokenizer.n_vocab, "model_max_length": block_size,
            "eos_token": EOT_TEXT, "eos_token_id": tokenizer.eot, "bos_token": None, "pad_token": None,
            "unk_token": None, "chat_template": None}


# ----------------------------------------------------------------------------- the page, health, models

def page_security_headers(html):
    """Content-Security-Policy for the page: only its own inline script runs (by hash), so markup that
    reached the page as data could run nothing; it talks to this server only and cannot be framed."""
    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
                      for script in re.findall(r"<script>(.*?)</script>", html, re.S))
    return {"Content-Security-Policy": f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
                                       f"connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
                                       f"frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


async def page():
    with open(os.path.join(ROOT, "serve.html"), encoding="utf-8") as f:
        html = f.read()
    return HTMLResponse(html, headers=page_security_headers(html))


async def health(s: State = Depends(state_of)):
    return {"status": "ok", "device": str(s.models.device), "models_loaded": list(s.models.loaded),
            "generations": s.generations,
            "jobs": {state: sum(j["state"] == state for j in s.jobs.jobs.values()) for state in ACTIVE}}


async def list_models(s: State = Depends(state_of)):
    return {"object": "list", "data": await asyncio.to_thread(s.models.list)}


# ----------------------------------------------------------------------------- jobs

def find_job(s, job_id):
    job = s.jobs.jobs.get(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id!r} (GET /v1/jobs lists them)", "id")
    return job


async def submit_job(s, kind, config, overrides, resumed_from=None):
    job = await asyncio.to_thread(s.jobs.submit, kind, config, overrides, resumed_from)
    return JSONResponse(s.jobs.view(job), 202, headers={"Location": f"/v1/jobs/{job['id']}"})


async def create_job(req: JobRequest, s: State = Depends(state_of)):
    return await submit_job(s, req.kind, req.config, req.overrides)


async def list_jobs(s: State = Depends(state_of)):
    return {"object": "list", "data": [s.jobs.view(j) for j in sorted(s.jobs.jobs.values(), key=lambda j: j["created"])]}


async def get_job(job_id: str, s: State = Depends(state_of)):
    return s.jobs.view(find_job(s, job_id))


async def cancel_job(job_id: str, s: State = Depends(state_of)):
    job = find_job(s, job_id)
    s.jobs.cancel(job)
    return s.jobs.view(job)


async def resume_job(job_id: str, s: State = Depends(state_of)):
    job = find_job(s, job_id)
    if not JOB_KINDS[job["kind"]].get("resumable"):
        raise ApiError(400, f"{job['kind']} jobs do not resume; submit a new one", "id")
    if job["state"] in ACTIVE:
        raise ApiError(409, f"job {job_id} is {job['state']}; cancel it first", "id")
    if job.get("pid") and process_alive(job["pid"]):
        raise ApiError(409, f"job {job_id}'s process {job['pid']} is still saving and stopping; retry shortly", "id")
    return await submit_job(s, job["kind"], job["config"], {**job["overrides"], "init_from": "resume"}, job_id)


async def job_log(job_id: str, tail: int = 200, s: State = Depends(state_of)):
    return PlainTextResponse(log_tail(os.path.join(s.jobs.folder(find_job(s, job_id)), "log.txt"), tail))


async def job_metrics(job_id: str, follow: bool = False, s: State = Depends(state_of)):
    job = find_job(s, job_id)
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


# ----------------------------------------------------------------------------- datasets and configs

async def list_datasets(s: State = Depends(state_of)):
    data, root = [], s.cfg["data_root"]
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        meta = os.path.join(root, name, "meta.json")
        if NAME.match(name) and os.path.isfile(meta) and inside(meta, root):
            with contextlib.suppress(OSError, ValueError):
                with open(meta) as f:
                    info = json.load(f)
                info.pop("chars", None)  # the whole vocabulary is noise here
                data.append({"id": name, "meta": info})
    return {"object": "list", "data": data}


async def upload_dataset(request: Request, name: str, format: Literal["txt", "jsonl"] = "txt",
                         tokenizer: Literal["char", "gpt2"] = "char", text_field: str = "text",
                         s: State = Depends(state_of)):
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
    path = os.path.join(s.cfg["data_root"], "uploads", f"{name}.{format}")
    await asyncio.to_thread(atomic_write, path, lambda f: f.write(body))
    return await submit_job(s, "prepare", "", {"dataset": path, "name": name, "tokenizer": tokenizer,
                                               "text_field": text_field, "data_dir": s.cfg["data_root"],
                                               "force": True})


async def list_configs(s: State = Depends(state_of)):
    root = s.cfg["config_root"]
    return {"object": "list", "data": sorted(f for f in os.listdir(root) if f.endswith(".py"))}


# ----------------------------------------------------------------------------- runs (the page's cockpit)

async def list_runs(s: State = Depends(state_of)):
    return {"object": "list", "data": await asyncio.to_thread(s.runs.list)}


async def run_metrics(run_id: str, s: State = Depends(state_of)):
    folder = s.runs.folder(run_id)
    kind = run_kind(folder)
    if kind == "swarm":
        raise ApiError(400, f"{run_id} is a swarm: GET /v1/runs/{run_id}/swarm has its goals", "id")
    rows = await asyncio.to_thread(s.runs.rows, os.path.join(folder, "metrics.jsonl"))
    return {"object": "list", "kind": kind, "data": thinned(rows)}


async def run_episodes(run_id: str, index: Optional[int] = None, split: Literal["all", "train", "eval"] = "all",
                       failed: bool = False, last: int = Query(500, ge=1, le=10000), s: State = Depends(state_of)):
    """A world run's last episodes (task, seed, success, reward, split, the episode count they belong to; only
    one split's, only failures if asked), or with ?index=N the Nth with its transcript."""
    folder = s.runs.folder(run_id, "world")
    rows = await asyncio.to_thread(s.runs.episodes, folder)
    if index is None:
        chosen = [{k: v for k, v in r.items() if k != "at"} | {"index": i} for i, r in enumerate(rows)
                  if split in ("all", r.get("split")) and not (failed and r.get("success"))]
        return {"object": "list", "total": len(rows), "data": chosen[-last:]}
    if not 0 <= index < len(rows):
        raise ApiError(404, f"{run_id} has {len(rows)} episodes; index {index} is not one", "index")
    with open(os.path.join(folder, "episodes.jsonl"), "rb") as f:
        f.seek(rows[index]["at"])
        row = json.loads(f.readline())
    return {**row, "index": index}


async def run_swarm(run_id: str, last: int = Query(100, ge=1, le=10000), s: State = Depends(state_of)):
    """A swarm run: its last decided goals, the goal being decided, whether it waits for a person, the summary."""
    folder = s.runs.folder(run_id, "swarm")
    view = await asyncio.to_thread(s.runs.swarm, folder)
    config = view["config"] or {}
    return {**view, "config": None, "goals": view["goals"][-last:], "goals_done": len(view["goals"]),
            "settings": settings_of("swarm", config), "status": run_status(folder),
            "aggregators": config.get("aggregators", []), "task": config.get("task"),
            "takes_commands": bool(config.get("human")) and config.get("human_input") == "file"}


async def control_swarm(run_id: str, req: ControlRequest, s: State = Depends(state_of)):
    """A person's command from the page to a running swarm that reads them (human=True, human_input=file)."""
    folder = s.runs.folder(run_id, "swarm")
    config = (await asyncio.to_thread(s.runs.swarm, folder))["config"] or {}
    if not (config.get("human") and config.get("human_input") == "file"):
        raise ApiError(409, f"swarm {run_id} takes no commands from this page: start it with human=True and "
                            f"human_input=file", "id")
    if run_status(folder) != "running":
        raise ApiError(409, f"swarm {run_id} is not running", "id")
    if req.action in ("edit", "goal", "note", "hint") and not req.text.strip():
        raise ApiError(422, f"{req.action} needs a text", "text")
    try:
        await asyncio.to_thread(append_control, folder, req.action, req.text)
    except OSError as e:  # a symlink in its place (O_NOFOLLOW), a read-only folder
        raise ApiError(409, f"cannot write {CONTROL_FILE} of swarm {run_id}: {e.strerror or e}", "id")
    return JSONResponse({"queued": req.action}, 202)


ROUTES = [
    ("GET", "/", page), ("GET", "/health", health), ("GET", "/v1/models", list_models),
    ("POST", "/v1/completions", completions), ("POST", "/v1/chat/completions", chat),
    ("POST", "/tokenize", tokenize), ("POST", "/detokenize", detokenize), ("GET", "/tokenizer_info", tokenizer_info),
    ("POST", "/v1/jobs", create_job), ("GET", "/v1/jobs", list_jobs), ("GET", "/v1/jobs/{job_id}", get_job),
    ("DELETE", "/v1/jobs/{job_id}", cancel_job), ("POST", "/v1/jobs/{job_id}/resume", resume_job),
    ("GET", "/v1/jobs/{job_id}/log", job_log), ("GET", "/v1/jobs/{job_id}/metrics", job_metrics),
    ("GET", "/v1/datasets", list_datasets), ("POST", "/v1/datasets", upload_dataset),
    ("GET", "/v1/configs", list_configs),
    ("GET", "/v1/runs", list_runs), ("GET", "/v1/runs/{run_id:path}/metrics", run_metrics),
    ("GET", "/v1/runs/{run_id:path}/episodes", run_episodes), ("GET", "/v1/runs/{run_id:path}/swarm", run_swarm),
    ("POST", "/v1/runs/{run_id:path}/control", control_swarm),
]


def make_app(cfg):
    """The FastAPI app for a resolved serve config (tests call this; main() runs it under uvicorn)."""
    device = resolve_device(cfg["device"])
    check_decode_config(cfg, device)
    set_threads(cfg["threads"])
    state = State(cfg, Models(cfg, device), Jobs(cfg), Runs(cfg["out_root"]))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.jobs.shutdown()

    # no /docs or /redoc: their pages load scripts from a CDN, which would then run with this server's origin
    app = FastAPI(title="µLM", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    for method, path, route in ROUTES:
        app.add_api_route(path, route, methods=[method])
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(Guard, token=cfg["token"] or os.environ.get("ULM_SERVE_TOKEN", ""), hosts=allowed_hosts(cfg),
                       body_limit=cfg["max_body_kb"] * 1024, upload_limit=cfg["max_upload_mb"] * 2 ** 20)
    return app


def check_serve_config(cfg):
    if cfg["host"] not in LOOPBACK and not (cfg["token"] or os.environ.get("ULM_SERVE_TOKEN")):
        raise SystemExit(f"host={cfg['host']} would let anyone on the network in: give --token=<secret> (or set "
                         f"ULM_SERVE_TOKEN), or keep host=127.0.0.1")
    if not 1 <= cfg["port"] <= 65535:
        raise SystemExit(f"port must be between 1 and 65535, got {cfg['port']}")
    for key in ("max_batch", "max_waiting", "max_tokens", "max_n", "max_prompts", "max_prompt_chars", "max_stop_chars",
                "max_loops", "max_body_kb", "max_upload_mb", "model_memory_mb", "max_running_jobs"):
        if cfg[key] < 1:
            raise SystemExit(f"{key} must be at least 1, got {cfg[key]}")
    if cfg["max_queued_jobs"] < 0 or cfg["cancel_grace_s"] < 0 or cfg["threads"] < 0:
        raise SystemExit("max_queued_jobs, cancel_grace_s and threads must not be negative")
    if cfg["tokenizer_model"] and not valid_id(cfg["tokenizer_model"]):
        raise SystemExit(f"tokenizer_model={cfg['tokenizer_model']!r} is not a model id: a run's folder below out_root "
                         f"(GET /v1/models lists them)")
    if not all(isinstance(h, str) and h for h in cfg["allowed_hosts"]):
        raise SystemExit(f"allowed_hosts is a list of host names, got {cfg['allowed_hosts']!r}")


def check_decode_config(cfg, device):
    if cfg["decode_graph"] and device.type != "cuda":
        raise SystemExit(f"decode_graph=True replays the batched decode step as a CUDA graph: it needs a CUDA device, "
                         f"got device={device}; leave decode_graph=False")
    if cfg["decode_compile"] and not cfg["decode_graph"]:
        raise SystemExit("decode_compile=True compiles the step that decode_graph captures: set decode_graph=True too")


def main(argv):
    cfg = configure(DEFAULTS, argv)
    check_serve_config(cfg)
    print_config({**cfg, "token": "***" if cfg["token"] else ""})
    import uvicorn
    app = make_app(cfg)
    print(f"serving on http://{cfg['host']}:{cfg['port']}  (models from {cfg['out_root']}/, jobs in {cfg['jobs_dir']}/)")
    # a stream that never ends (a followed job's metrics) must not hold a stopping server up
    uvicorn.run(app, host=cfg["host"], port=cfg["port"], log_level=cfg["log_level"], timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main(sys.argv[1:])
