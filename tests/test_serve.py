"""serve.py: the OpenAI-compatible completions (through the real `openai` client), jobs, datasets, bad
input, auth, cancel, restart, path traversal, disconnects, and the web page in headless Chromium."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

import compress
import prepare
import serve
import train
from checkpoint import load_checkpoint, load_model
from configurator import configure
from tokenizer import tokenizer_from_meta

from conftest import ROOT, tiny_train_config

openai = pytest.importorskip("openai")

TINY_JOB = """# a train job that takes a few seconds on a CPU
dataset = "tiny"
device = "cpu"
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32
batch_size = 8
max_iters = 40
eval_interval = 20
eval_iters = 2
log_interval = 5
warmup_iters = 2
learning_rate = 1e-2
out_dir = "out/tiny_job"
"""


UPLOAD = {"content-type": "application/octet-stream"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_root(root, with_model=True):
    """A working folder for a server: data/tiny, a trained model in out/tiny, config/tiny.py."""
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))
    (root / "tiny.txt").write_text(text)
    prepare.prepare(configure(prepare.DEFAULTS, [f"--dataset={root / 'tiny.txt'}", "--name=tiny", "--tokenizer=char",
                                                 f"--data_dir={root / 'data'}"]))
    if with_model:
        cfg = tiny_train_config(root, out_dir=str(root / "out" / "tiny"), block_size=32, max_iters=60, dropout=0.0,
                                learning_rate=1e-2, eval_interval=30, log_interval=10)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny model on a busy CPU: more threads only wait on each other
        try:
            train.train(cfg)
        finally:
            torch.set_num_threads(threads)
    (root / "config").mkdir()
    (root / "config" / "tiny.py").write_text(TINY_JOB)
    return root


class Server:
    """serve.py in a subprocess with its working directory at root."""

    def __init__(self, root, *args):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(root / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--port={self.port}",
                                      f"--config_root={root / 'config'}", "--device=cpu", "--max_running_jobs=2",
                                      "--cancel_grace_s=30", "--threads=1", *args], cwd=root, stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code in (200, 401):
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start: {(root / f'server-{self.port}.log').read_text()[-2000:]}")
            time.sleep(0.2)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        self.log.close()

    def wait_job(self, job_id, states=("succeeded", "failed", "cancelled", "interrupted"), timeout=90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.http.get(f"/v1/jobs/{job_id}").json()
            if job["state"] in states:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} never reached {states}: {job}")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("serve"))


MARKUP = "<img src=x onerror=window.pwned=1>"  # what a careless or hostile name could hold


def plant_markup(root):
    """A run folder and a job record whose names are markup, made behind the server's back (the API refuses
    such names): the page must show them as text."""
    (root / "out" / MARKUP).mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "out" / "tiny" / "ckpt.pt", root / "out" / MARKUP / "ckpt.pt")
    record = {"id": "20000101-000000-planted", "kind": "train", "config": "", "overrides": {}, "argv": [],
              "out_dir": f"out/{MARKUP}", "total": 10, "state": "failed", "created": 0.0, "started": 0.0,
              "finished": 1.0, "returncode": 1, "pid": None, "error": f"<script>window.pwned=2</script>{MARKUP}",
              "resumed_from": None}
    (root / "jobs" / record["id"]).mkdir(parents=True)
    (root / "jobs" / record["id"] / "job.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def server(root):
    plant_markup(root)
    s = Server(root, "--max_tokens=20000")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(root):
    """The served model in-process, for the tokens sample.py's generate would give."""
    state = load_checkpoint(str(root / "out" / "tiny" / "ckpt.pt"))
    return load_model(state), tokenizer_from_meta(state["tokenizer"])


def in_process(reference, prompt, n):
    model, tok = reference
    ids = tok.encode(prompt)
    out = model.generate(torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()
    return tok.decode(out[:out.index(tok.eot)] if tok.eot in out else out)


# ----------------------------------------------------------------------------- completions

def test_models_lists_runs_with_step_and_val_loss(server):
    models = server.http.get("/v1/models").json()["data"]
    tiny = next(m for m in models if m["id"] == "tiny")
    assert tiny["step"] == 60 and tiny["val_loss"] > 0 and tiny["model_args"]["block_size"] == 32
    assert server.http.get("/health").json()["status"] == "ok"


def test_openai_client_greedy_completion_equals_in_process_generation(client, reference):
    out = client.completions.create(model="tiny", prompt="line 1", max_tokens=20, temperature=0)
    assert out.choices[0].text == in_process(reference, "line 1", 20)
    assert out.usage.prompt_tokens == 6 and out.usage.completion_tokens == 20 and out.usage.total_tokens == 26
    assert out.choices[0].finish_reason == "length"


def test_openai_client_streams_and_the_stream_ends_with_done(client, server, reference):
    chunks = list(client.completions.create(model="tiny", prompt="line 2", max_tokens=20, temperature=0, stream=True))
    assert len(chunks) >= 5 and "".join(c.choices[0].text for c in chunks) == in_process(reference, "line 2", 20)
    with server.http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "li", "max_tokens": 3,
                                                             "stream": True, "stream_options": {"include_usage": True}}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-2][6:])["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_concurrent_requests_share_a_batch_and_each_gets_its_own_tokens(client, reference):
    prompts = ["line 3", "the quick brown", "l", "fox jumps over the"]  # different lengths join one batch
    results = {}

    def ask(p):
        results[p] = client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text
    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {p: in_process(reference, p, 12) for p in prompts}


def test_generation_past_the_context_slides_the_window(client, reference):
    long, short = [], []
    threads = [threading.Thread(target=lambda: long.append(client.completions.create(
                   model="tiny", prompt="line 1", max_tokens=90, temperature=0, extra_body={"ignore_eos": True}))),
               threading.Thread(target=lambda: short.append(client.completions.create(
                   model="tiny", prompt="the", max_tokens=10, temperature=0)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert long[0].usage.completion_tokens == 90  # 96 tokens in a 32-token context
    assert long[0].choices[0].text.startswith(in_process(reference, "line 1", 20))
    assert short[0].choices[0].text == in_process(reference, "the", 10)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_compress_exports_are_listed_and_complete_like_the_loaded_export(server, client, root, fmt):
    src = root / "out" / "tiny" / "ckpt.pt"
    cfg = configure(compress.DEFAULTS, [])
    compress.export({**cfg, "ckpt": str(src), "format": fmt, "group_size": 32, "device": "cpu", "measure": False})
    torch.save({"not": "a model"}, root / "out" / "tiny" / "notes.pt")  # other .pt files are not models
    models = {m["id"]: m for m in server.http.get("/v1/models").json()["data"]}
    assert models[f"tiny/ckpt_{fmt}"]["quantization"]["format"] == fmt and "tiny/notes" not in models
    state = load_checkpoint(str(src.with_name(f"ckpt_{fmt}.pt")))
    export = (load_model(state), tokenizer_from_meta(state["tokenizer"]))
    out = client.completions.create(model=f"tiny/ckpt_{fmt}", prompt="line 1", max_tokens=12, temperature=0)
    assert out.choices[0].text == in_process(export, "line 1", 12)
    assert server.http.post("/v1/completions", json={"model": "tiny/notes", "prompt": "a"}).status_code == 404


def test_seed_n_prompt_lists_stop_echo_and_logprobs(client):
    a = client.completions.create(model="tiny", prompt=["line", "the"], n=2, max_tokens=15, seed=7, temperature=1.0)
    b = client.completions.create(model="tiny", prompt=["line", "the"], n=2, max_tokens=15, seed=7, temperature=1.0)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 4
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    stopped = client.completions.create(model="tiny", prompt="line 1", max_tokens=30, temperature=0, stop=["o"])
    assert "o" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    echoed = client.completions.create(model="tiny", prompt="line", max_tokens=5, temperature=0, echo=True, logprobs=2)
    lp = echoed.choices[0].logprobs
    assert echoed.choices[0].text.startswith("line") and len(lp.tokens) == 4 + 5
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert len(lp.top_logprobs[-1]) == 2 and "".join(lp.tokens) == echoed.choices[0].text


@pytest.mark.parametrize("body, status, field", [
    ({"model": None}, 422, "model"),
    ({"max_tokens": 0}, 422, "max_tokens"),
    ({"max_tokens": 10 ** 6}, 400, "max_tokens"),
    ({"temperature": -1}, 422, "temperature"),
    ({"temperature": "hot"}, 422, "temperature"),
    ({"top_p": 0}, 422, "top_p"),
    ({"top_p": 1.5}, 422, "top_p"),
    ({"top_k": 0}, 422, "top_k"),
    ({"n": 100}, 400, "n"),
    ({"logprobs": 9}, 422, "logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x" * 70000}, 400, "prompt"),
    ({"prompt": "€uro"}, 400, "prompt"),       # a character the char vocabulary lacks
    ({"prompt": ["a"] * 40}, 400, "prompt"),
    ({"frequency_penalty": 1.0}, 400, "frequency_penalty"),
    ({"max_tokenz": 5}, 422, "max_tokenz"),     # a typo is named, not ignored
    ({"model": "nope"}, 404, "model"),
    ({"model": "../out/tiny"}, 404, "model"),
    ({"model": "/etc"}, 404, "model"),
])
def test_bad_completion_inputs_are_errors_naming_the_field(server, body, status, field):
    r = server.http.post("/v1/completions", json={"model": "tiny", "prompt": "line", **body})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == field


def test_nan_sampling_values_are_rejected(server):
    r = server.http.post("/v1/completions", content=b'{"model": "tiny", "temperature": NaN}',
                         headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "temperature"


def test_oversized_body_is_413_and_chat_is_a_clear_400(server):
    r = server.http.post("/v1/completions", content=b"{" + b" " * (2 * 2 ** 20) + b"}",
                         headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = server.http.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and "chat format" in r.json()["error"]["message"]


def test_client_disconnect_mid_stream_frees_its_slot(server):
    with server.http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "line", "max_tokens": 1000,
                                                             "stream": True, "ignore_eos": True}) as r:
        next(r.iter_lines())
    deadline = time.time() + 20
    while server.http.get("/health").json()["generations"] and time.time() < deadline:
        time.sleep(0.1)
    assert server.http.get("/health").json()["generations"] == 0
    assert server.http.post("/v1/completions", json={"model": "tiny", "prompt": "l", "max_tokens": 2}).status_code == 200


def test_a_non_streaming_client_that_hangs_up_frees_its_rows_promptly(server):
    body = {"model": "tiny", "prompt": "line", "max_tokens": 20000, "n": 4, "ignore_eos": True}  # ~half a minute
    with pytest.raises(httpx.ReadTimeout):  # tokens keep coming for it, but nobody is reading any more
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    hung_up = time.time()
    while server.http.get("/health").json()["generations"] and time.time() < hung_up + 30:
        time.sleep(0.05)
    assert server.http.get("/health").json()["generations"] == 0 and time.time() - hung_up < 3


def test_bad_requests_beside_two_streams_leave_both_streams_whole(server):
    lines = {}

    def stream(name, prompt):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 120, "stream": True, "ignore_eos": True,
                "temperature": 0.8, "seed": 3}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            lines[name] = [line for line in r.iter_lines() if line]
    threads = [threading.Thread(target=stream, args=(name, name)) for name in ("line", "the quick")]
    for t in threads:
        t.start()
    time.sleep(0.2)
    for bad in ({"seed": 2 ** 70}, {"temperature": 1e-300}, {"stop": ["x" * 200_000] * 4}, {"top_k": 0}):
        r = server.http.post("/v1/completions", json={"model": "tiny", "prompt": "l", **bad})
        assert r.status_code in (400, 422) and r.json()["error"]["param"] == next(iter(bad))
    for t in threads:
        t.join(timeout=60)
    for name in ("line", "the quick"):
        assert lines[name][-1] == "data: [DONE]" and len(lines[name]) == 121, lines[name][-3:]


# ----------------------------------------------------------------------------- jobs and datasets

def test_train_job_runs_the_script_and_reports_progress_metrics_and_log(server, root):
    r = server.http.post("/v1/jobs", json={"kind": "train", "config": "tiny.py", "overrides": {"max_iters": 30}})
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    job_id = r.json()["id"]
    with server.http.stream("GET", f"/v1/jobs/{job_id}/metrics?follow=true") as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    job = server.wait_job(job_id)
    assert job["state"] == "succeeded" and job["progress"] == {"done": 30, "total": 30, "unit": "step"}
    assert job["last_metrics"]["step"] == 30 and os.path.exists(root / "out" / "tiny_job" / "ckpt.pt")
    rows = server.http.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    assert any("val_loss" in row for row in rows) and len(events) == len(rows) + 1  # + the end event
    assert "step 30" in server.http.get(f"/v1/jobs/{job_id}/log").text
    assert any(j["id"] == job_id for j in server.http.get("/v1/jobs").json()["data"])
    assert "tiny_job" in [m["id"] for m in server.http.get("/v1/models").json()["data"]]


def test_unknown_config_key_fails_at_submission_with_the_configurators_message(server):
    r = server.http.post("/v1/jobs", json={"kind": "train", "config": "tiny.py", "overrides": {"max_iter": 5}})
    assert r.status_code == 422 and "did you mean 'max_iters'" in r.json()["error"]["message"]
    r = server.http.post("/v1/jobs", json={"kind": "train", "overrides": {"batch_size": "big"}})
    assert r.status_code == 422 and "expects int" in r.json()["error"]["message"]
    assert server.http.post("/v1/jobs", json={"kind": "rm"}).status_code == 422


@pytest.mark.parametrize("request_body", [
    {"kind": "train", "config": "../tiny.txt"},
    {"kind": "train", "config": "/etc/passwd"},
    {"kind": "train", "config": "evil.py"},                                  # a symlink leaving config/
    {"kind": "train", "config": "tiny.py", "overrides": {"out_dir": "/tmp/elsewhere"}},
    {"kind": "train", "config": "tiny.py", "overrides": {"out_dir": "out/../../escape"}},
    {"kind": "train", "config": "tiny.py", "overrides": {"out_dir": "out/link/run"}},  # a symlink leaving out/
    {"kind": "train", "config": "tiny.py", "overrides": {"data_dir": "/"}},
    {"kind": "prepare", "overrides": {"dataset": "/etc/hostname"}},
    {"kind": "bench", "overrides": {"out": "../bench.json"}},
])
def test_paths_outside_config_out_and_data_are_refused(server, root, tmp_path_factory, request_body):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "evil.py").write_text("max_iters = 1\n")
    for link, target in ((root / "config" / "evil.py", outside / "evil.py"), (root / "out" / "link", outside)):
        if not link.is_symlink():
            link.symlink_to(target)
    r = server.http.post("/v1/jobs", json=request_body)
    assert r.status_code == 422, r.text
    assert not os.path.exists(outside / "run") and not os.path.exists(root.parent / "escape")


def test_cancel_stops_a_running_train_job_through_its_save_path(server, root):
    job = server.http.post("/v1/jobs", json={"kind": "train", "config": "tiny.py", "overrides": {
        "max_iters": 100000, "out_dir": "out/cancelled", "eval_interval": 1000}}).json()
    server.wait_job(job["id"], states=("running",))
    deadline = time.time() + 60
    while (server.http.get(f"/v1/jobs/{job['id']}").json()["last_metrics"] or {}).get("step", 0) < 5 and \
            time.time() < deadline:
        time.sleep(0.2)
    assert server.http.delete(f"/v1/jobs/{job['id']}").status_code == 200
    done = server.wait_job(job["id"])
    assert done["state"] == "cancelled"
    state = load_checkpoint(str(root / "out" / "cancelled" / "ckpt.pt"))  # saved by the Ctrl-C path
    assert 0 < state["step"] < 100000


def test_a_crashing_job_is_failed_with_its_log_tail_and_the_server_stays_up(server):
    job = server.http.post("/v1/jobs", json={"kind": "train", "config": "tiny.py", "overrides": {
        "dataset": "missing", "out_dir": "out/crash"}}).json()
    done = server.wait_job(job["id"])
    assert done["state"] == "failed" and done["returncode"] != 0 and "missing" in done["error"]
    assert server.http.get("/health").status_code == 200


def test_upload_a_dataset_then_it_is_prepared_and_listed(server, root):
    text = "".join(f"upload {i}: some words to learn\n" for i in range(50)).encode()
    r = server.http.post("/v1/datasets?name=mine", content=text, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 202
    assert server.wait_job(r.json()["id"])["state"] == "succeeded"
    listed = {d["id"]: d["meta"] for d in server.http.get("/v1/datasets").json()["data"]}
    assert listed["mine"]["tokenizer"] == "char" and "tiny" in listed
    for bad in ("../x", "a/b", ".hidden", "/abs"):
        r = server.http.post("/v1/datasets", params={"name": bad}, content=b"text", headers=UPLOAD)
        assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    assert server.http.post("/v1/datasets?name=empty", content=b" ", headers=UPLOAD).status_code == 400


def start_long_job_and_stop_the_server(root, sig):
    """A server whose train job has logged step 10 (its only scheduled checkpoint is step 0's), stopped by
    sig; returns the job once its process has gone."""
    first = Server(root)
    job = first.http.post("/v1/jobs", json={"kind": "train", "config": "tiny.py", "overrides": {
        "max_iters": 100000, "eval_interval": 100000, "log_interval": 1, "out_dir": "out/killed"}}).json()
    deadline = time.time() + 60
    while (first.http.get(f"/v1/jobs/{job['id']}").json()["last_metrics"] or {}).get("step", 0) < 10 and \
            time.time() < deadline:
        time.sleep(0.1)
    pid = first.http.get(f"/v1/jobs/{job['id']}").json()["pid"]
    first.stop(sig)
    deadline = time.time() + 60
    while serve.process_alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not serve.process_alive(pid)
    return job


def test_killing_the_server_mid_job_saves_its_progress_then_restarting_resumes_it(tmp_path):
    """kill -9: no clean shutdown. The trainer may get the parent-death signal several times (each exiting
    thread of the dying server it is handed to sends it again); it must save once, not take the second as
    "quit now without saving" (the audit: ckpt.pt stayed at step 0 at step 40 in 4 of 6 trials)."""
    root = make_root(tmp_path, with_model=False)
    job = start_long_job_and_stop_the_server(root, signal.SIGKILL)
    assert "quitting now without saving" not in (root / "jobs" / job["id"] / "log.txt").read_text()
    saved = load_checkpoint(str(root / "out" / "killed" / "ckpt.pt"))  # whole and loadable
    assert saved["step"] >= 10
    second = Server(root)
    try:
        assert second.http.get(f"/v1/jobs/{job['id']}").json()["state"] == "interrupted"
        resumed = second.http.post(f"/v1/jobs/{job['id']}/resume", json={})
        assert resumed.status_code == 202 and resumed.json()["resumed_from"] == job["id"]
        deadline = time.time() + 60  # the resumed run logs steps past the saved one
        while (second.http.get(f"/v1/jobs/{resumed.json()['id']}").json()["last_metrics"] or {}).get("step", 0) \
                <= saved["step"] and time.time() < deadline:
            time.sleep(0.2)
        second.http.delete(f"/v1/jobs/{resumed.json()['id']}")
        assert second.wait_job(resumed.json()["id"])["state"] == "cancelled"
        assert "resume" in second.http.get(f"/v1/jobs/{resumed.json()['id']}/log").text
        assert load_checkpoint(str(root / "out" / "killed" / "ckpt.pt"))["step"] >= saved["step"]
    finally:
        second.stop()


def test_stopping_the_server_mid_job_with_sigterm_saves_its_progress(tmp_path):
    root = make_root(tmp_path, with_model=False)
    job = start_long_job_and_stop_the_server(root, signal.SIGTERM)
    assert "quitting now without saving" not in (root / "jobs" / job["id"] / "log.txt").read_text()
    assert load_checkpoint(str(root / "out" / "killed" / "ckpt.pt"))["step"] >= 10
    assert json.loads((root / "jobs" / job["id"] / "job.json").read_text())["state"] == "interrupted"


def test_a_second_server_on_the_same_jobs_folder_exits_before_touching_a_record(server, root):
    planted = root / "jobs" / "20000101-000001-second"
    planted.mkdir()
    record = {"id": planted.name, "kind": "train", "config": "tiny.py", "overrides": {}, "argv": ["train.py"],
              "out_dir": "out/never", "total": 1, "state": "queued", "created": 1.0, "started": None,
              "finished": None, "returncode": None, "pid": None, "error": None, "resumed_from": None}
    (planted / "job.json").write_text(json.dumps(record))  # only a second server would see it
    before = {p: p.read_bytes() for p in (root / "jobs").glob("*/job.json")}
    second = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), f"--port={free_port()}",
                             f"--config_root={root / 'config'}", "--device=cpu"], cwd=root, capture_output=True,
                            text=True, timeout=60)
    assert second.returncode != 0 and "in use by another serve.py" in second.stderr
    assert {p: p.read_bytes() for p in (root / "jobs").glob("*/job.json")} == before
    assert not (root / "out" / "never").exists()


# ----------------------------------------------------------------------------- auth and binding

def test_auth_on_needs_the_bearer_token_and_auth_off_does_not(root):
    from fastapi.testclient import TestClient
    cfg = configure(serve.DEFAULTS, ["--token=s3cret", "--device=cpu", f"--out_root={root / 'out'}",
                                     f"--data_root={root / 'data'}", f"--config_root={root / 'config'}",
                                     f"--jobs_dir={root / 'jobs-auth'}"])
    with TestClient(serve.make_app(cfg), base_url="http://localhost") as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.post("/v1/jobs", json={"kind": "train"}).status_code == 401
        assert http.get("/").status_code == 200  # the page itself asks for the token
    with TestClient(serve.make_app({**cfg, "token": ""}), base_url="http://localhost") as http:
        assert http.get("/v1/models").status_code == 200


def test_models_load_on_first_use_and_the_least_recent_idle_one_leaves_beyond_the_budget(root):
    from fastapi.testclient import TestClient
    (root / "out" / "tiny2").mkdir(exist_ok=True)
    shutil.copy(root / "out" / "tiny" / "ckpt.pt", root / "out" / "tiny2" / "ckpt.pt")
    cfg = configure(serve.DEFAULTS, ["--device=cpu", "--model_memory_mb=1", f"--out_root={root / 'out'}",
                                     f"--data_root={root / 'data'}", f"--config_root={root / 'config'}",
                                     f"--jobs_dir={root / 'jobs-budget'}"])  # one tiny model fits in 1 MB, two do not
    with TestClient(serve.make_app(cfg), base_url="http://localhost") as http:
        assert http.get("/health").json()["models_loaded"] == []
        assert http.post("/v1/completions", json={"model": "tiny", "prompt": "l", "max_tokens": 2}).status_code == 200
        first = http.app.state.serve.models.loaded["tiny"]["batchers"][None]
        assert http.post("/v1/completions", json={"model": "tiny2", "prompt": "l", "max_tokens": 2}).status_code == 200
        assert http.get("/health").json()["models_loaded"] == ["tiny2"]
        first.thread.join(timeout=10)
        assert not first.thread.is_alive()  # its weights and cache are freed
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "l", "max_tokens": 2})
        assert r.status_code == 200 and http.get("/health").json()["models_loaded"] == ["tiny"]
    shutil.rmtree(root / "out" / "tiny2")


def test_the_shipped_serve_config_loads():
    serve.check_serve_config(configure(serve.DEFAULTS, [os.path.join(ROOT, "config", "serve.py")]))


def test_another_host_without_a_token_refuses_to_start(monkeypatch):
    monkeypatch.delenv("ULM_SERVE_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="token"):
        serve.check_serve_config(configure(serve.DEFAULTS, ["--host=0.0.0.0"]))
    serve.check_serve_config(configure(serve.DEFAULTS, ["--host=0.0.0.0", "--token=x"]))


def test_a_cuda_graph_decode_step_on_a_cpu_server_refuses_to_start():
    with pytest.raises(SystemExit, match="needs a CUDA device, got device=cpu"):
        serve.make_app(configure(serve.DEFAULTS, ["--device=cpu", "--decode_graph=True"]))
    with pytest.raises(SystemExit, match="set decode_graph=True too"):
        serve.make_app(configure(serve.DEFAULTS, ["--device=cpu", "--decode_compile=True"]))



# ----------------------------------------------------------------------------- every run under out_root

@pytest.fixture(scope="module")
def runs(root):
    """Beside the trained model: a world run (with its episodes), a finished swarm of fake workers, and a swarm
    that waits for a person on the page (human_input=file), all started outside the server."""
    import swarm
    import world
    from swarm_fakes import fake_checkpoint, fake_command
    from test_world import tiny_run_config
    world.run(tiny_run_config(root, out_dir=str(root / "out" / "world")))
    fakes = [fake_checkpoint(str(root / "fakes"), mode) for mode in ("teacher", "echo", "echo")]
    swarm_cfg = configure(swarm.DEFAULTS, [])
    swarm_cfg.update(out_dir=str(root / "out" / "swarm_done"), num_goals=3, workers=3, checkpoints=fakes,
                     worker_command=fake_command())
    swarm.run(swarm_cfg)
    live = subprocess.Popen([sys.executable, os.path.join(ROOT, "swarm.py"), "--human", "--human_input=file",
                             "--workers=2", "--num_goals=3", f"--checkpoints={fakes[:2]!r}",
                             f"--worker_command={fake_command()}", f"--out_dir={root / 'out' / 'swarm_live'}"],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while '"awaiting_human"' not in read_text(root / "out" / "swarm_live" / "swarm.jsonl"):
        assert live.poll() is None and time.time() < deadline, "the live swarm never asked for a person"
        time.sleep(0.1)
    yield {"live": live}
    live.kill()
    live.wait()


def read_text(path):
    return path.read_text() if path.exists() else ""


def test_every_run_under_out_root_is_listed_however_it_was_started(server, runs):
    listed = {r["id"]: r for r in server.http.get("/v1/runs").json()["data"]}
    tiny = listed["tiny"]  # trained in-process, never a job of this server
    assert tiny["kind"] == "train" and tiny["status"] == "stopped" and tiny["model"]
    assert tiny["progress"] == {"done": 60, "total": 60, "unit": "step"} and tiny["result"]["best_val"] < 4
    assert tiny["settings"]["n_layer"] == 2 and "out_dir" not in tiny["settings"]  # what differs from the defaults
    assert listed["world"]["kind"] == "world" and set(listed["world"]["result"]["success"]) == {"arith"}
    assert listed["world/imitation"]["kind"] == "train"
    assert listed["swarm_done"]["progress"] == {"done": 3, "total": 3, "unit": "goal"}
    assert listed["swarm_live"]["status"] == "running" and listed["swarm_live"]["result"]["waiting"]
    rows = server.http.get("/v1/runs/tiny/metrics").json()["data"]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 30, 60]
    for bad in ("../tiny", "nope", "tiny/../../x", "link"):
        assert server.http.get(f"/v1/runs/{bad}/metrics").status_code == 404


def test_a_world_run_lists_its_episodes_and_shows_a_transcript(server, runs):
    episodes = server.http.get("/v1/runs/world/episodes").json()
    assert episodes["total"] == 8 + 3 * 2  # training episodes, and held-out ones at episodes 0, 4 and 8
    held_out = server.http.get("/v1/runs/world/episodes?split=eval").json()["data"]
    assert [e["episode"] for e in held_out] == [0, 0, 4, 4, 8, 8] and "transcript" not in held_out[0]
    one = server.http.get(f"/v1/runs/world/episodes?index={held_out[-1]['index']}").json()
    assert one["transcript"].startswith("task arith\nobs ") and one["seed"] == held_out[-1]["seed"]
    assert server.http.get("/v1/runs/world/episodes?index=99").status_code == 404
    assert server.http.get("/v1/runs/tiny/episodes").status_code == 404  # not a world run


def test_a_person_on_the_page_decides_for_a_waiting_swarm(server, root, runs):
    view = server.http.get("/v1/runs/swarm_live/swarm").json()
    assert view["waiting"] and view["takes_commands"] and len(view["current"]["proposals"]) == 2
    post = lambda run, body, **kw: server.http.post(f"/v1/runs/{run}/control", json=body, **kw)  # noqa: E731
    assert post("swarm_live", {"action": "note", "text": "use\nthe tool"}).status_code == 202
    assert post("swarm_live", {"action": "accept"}).status_code == 202
    deadline = time.time() + 30
    while server.http.get("/v1/runs/swarm_live/swarm").json()["goals_done"] < 1 and time.time() < deadline:
        time.sleep(0.2)
    view = server.http.get("/v1/runs/swarm_live/swarm").json()
    assert view["goals"][0]["decision"]["verdict"] == "accept"
    assert [h["action"] for h in view["human"]] == ["broadcast"] and view["human"][0]["text"] == "use the tool"
    # what may not reach a swarm: another kind of command, an empty edit, a swarm that reads no page, markup's origin
    assert post("swarm_live", {"action": "shell", "text": "rm"}).status_code == 422
    assert post("swarm_live", {"action": "edit", "text": " "}).status_code == 422
    assert post("swarm_done", {"action": "accept"}).status_code == 409
    assert post("world", {"action": "accept"}).status_code == 404
    assert post("swarm_live", {"action": "stop"}, headers={"origin": "http://evil.example"}).status_code == 403
    assert server.http.post("/v1/runs/swarm_live/control", content=b'{"action": "stop"}',
                            headers={"content-type": "text/plain"}).status_code == 415
    r = server.http.post("/v1/jobs", json={"kind": "swarm", "overrides": {"human": True, "checkpoints": ["out/tiny/ckpt.pt"]}})
    assert r.status_code == 422 and "human_input='file'" in r.json()["error"]["message"]


def test_a_control_file_that_is_a_symlink_is_never_written_through(server, root, runs, tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("")
    control = root / "out" / "swarm_live" / "control.jsonl"
    saved = control.read_bytes()
    control.unlink()
    control.symlink_to(target)
    try:
        r = server.http.post("/v1/runs/swarm_live/control", json={"action": "pause"})
        assert r.status_code == 409 and "cannot write control.jsonl" in r.json()["error"]["message"]
        assert target.read_text() == ""
    finally:
        control.unlink()
        control.write_bytes(saved)

# ----------------------------------------------------------------------------- the page in a real browser

def chromium():
    """Headless Chromium through selenium, or a skip where either is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary or not shutil.which("chromedriver"):
        pytest.skip("no chromium/chromedriver here (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1250,1100"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))


def keep_screenshot(browser, tmp_path, name, element_id=None):
    """A screenshot of the page (or one element), also copied to $ULM_SCREENSHOTS/ when that folder is given."""
    path = tmp_path / name
    if element_id:
        browser.execute_script("arguments[0].scrollIntoView()", browser.find_element("id", element_id))
        browser.find_element("id", element_id).screenshot(str(path))
    else:
        browser.save_screenshot(str(path))
    if os.environ.get("ULM_SCREENSHOTS"):
        os.makedirs(os.environ["ULM_SCREENSHOTS"], exist_ok=True)
        shutil.copy(path, os.path.join(os.environ["ULM_SCREENSHOTS"], name))
    return path


def test_web_page_streams_a_completion_and_draws_a_growing_loss_curve(server, tmp_path):
    browser = chromium()
    try:
        browser.get(server.url + "/")
        wait_for(lambda: browser.execute_script("return [...document.querySelectorAll('#model option')]"
                                                ".some(o => o.value === 'tiny')"))
        # names that are markup are shown as text and run nothing
        assert browser.execute_script("return [...document.querySelectorAll('#model option')].map(o => o.text)"
                                      ".includes(arguments[0])", MARKUP)
        wait_for(lambda: MARKUP in browser.find_element("id", "jobs").text)
        assert browser.execute_script("return window.pwned === undefined && !document.querySelector('#jobs img')")
        browser.execute_script("document.getElementById('model').value = 'tiny';"
                               "document.getElementById('prompt').value = 'line';"
                               "document.getElementById('max_tokens').value = '40';")
        browser.find_element("id", "generate").click()
        wait_for(lambda: len(browser.find_element("id", "completion").text) > len("line") + 20)
        browser.execute_script("document.getElementById('config').value = 'tiny.py';"
                               "document.getElementById('overrides').value = "
                               "'{\"max_iters\": 400, \"eval_interval\": 100, \"out_dir\": \"out/page\"}';")
        browser.find_element("id", "start").click()
        points = lambda: int(browser.execute_script("return document.getElementById('curve').dataset.points || 0"))
        wait_for(lambda: points() >= 3, timeout=90)
        first = points()
        wait_for(lambda: points() > first, timeout=90)  # the curve grows as the job logs
        keep_screenshot(browser, tmp_path, "jobs.png", "jobs_section")
        assert "running" in browser.find_element("id", "jobs").text or "succeeded" in browser.find_element("id", "jobs").text
    finally:
        browser.quit()


def test_the_page_shows_every_run_compares_curves_and_steers_a_swarm(server, runs, tmp_path):
    browser = chromium()
    script = browser.execute_script
    try:
        browser.get(server.url + "/")
        wait_for(lambda: script("return ['tiny', 'world', 'swarm_live', 'world/imitation'].every(id => "
                                "document.querySelector(`#run_rows tr[data-id='${id}']`))"))
        assert MARKUP in browser.find_element("id", "run_rows").text  # a folder named with markup is text
        assert script("return window.pwned === undefined && !document.querySelector('#run_rows img')")
        for run in ("tiny", "world/imitation"):  # two curves on one plot
            script(f"document.querySelector(`#run_rows tr[data-id='{run}'] input`).click()")
        wait_for(lambda: int(script("return document.getElementById('compare').dataset.points || 0")) > 4)
        keep_screenshot(browser, tmp_path, "runs.png", "runs")

        script("document.querySelector(`#run_rows tr[data-id='world'] a`).click()")
        wait_for(lambda: browser.find_element("id", "transcript").text.startswith("task arith"))
        assert int(script("return document.getElementById('world_curve').dataset.points")) >= 3
        script("const s = document.getElementById('episode_split'); s.value = 'train'; s.dispatchEvent(new Event('change'))")
        wait_for(lambda: "training at episode" in browser.find_element("id", "episodes").text)
        keep_screenshot(browser, tmp_path, "world.png", "detail")

        script("document.querySelector(`#run_rows tr[data-id='swarm_live'] a`).click()")
        wait_for(lambda: browser.find_element("id", "swarm_controls").is_displayed())
        done = int(server.http.get("/v1/runs/swarm_live/swarm").json()["goals_done"])
        wait_for(lambda: "waits for your decision" in browser.find_element("id", "swarm_state").text)
        script("document.getElementById('c_note_text').value = 'try the calculator'")
        browser.find_element("id", "c_hint").click()
        wait_for(lambda: "sent: hint" in browser.find_element("id", "control_note").text)
        browser.find_element("id", "c_reject").click()
        wait_for(lambda: server.http.get("/v1/runs/swarm_live/swarm").json()["goals_done"] == done + 1)
        wait_for(lambda: "reject" in browser.find_element("id", "goals").text)
        keep_screenshot(browser, tmp_path, "swarm.png", "detail")
        human = server.http.get("/v1/runs/swarm_live/swarm").json()["human"]
        assert {"action": "hint", "text": "try the calculator"}.items() <= human[-1].items()

        script("const m = document.getElementById('model'); m.value = 'tiny'; m.dispatchEvent(new Event('change'));"
               "document.getElementById('prompt').value = 'line';"
               "document.getElementById('max_tokens').value = '30'; document.getElementById('seed').value = '7';"
               "document.getElementById('top_p').value = '0.9'; document.getElementById('stop_text').value = 'zzz';")
        assert "val loss" in browser.find_element("id", "model_facts").text
        assert not browser.find_element("id", "loops").is_enabled()  # not a looped model
        browser.find_element("id", "generate").click()
        wait_for(lambda: "tokens/s" in browser.find_element("id", "speed").text)
        first = browser.find_element("id", "completion").text
        browser.find_element("id", "generate").click()  # the same seed samples the same text
        wait_for(lambda: "tokens/s" in browser.find_element("id", "speed").text and
                 browser.find_element("id", "completion").text == first)
        keep_screenshot(browser, tmp_path, "playground.png", "playground")
    finally:
        browser.quit()


def wait_for(condition, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")
