"""serve.py exposed: what a job may set (an allow-list), where its paths may lead (under out_root and
data_root, nested task options included), requests from other web pages (Host, Origin, Content-Type),
names that could be markup, the jobs folder's lock, and clear errors for damaged model files and bad
values. Each security test tries the attack and sees it refused. In-process (FastAPI's TestClient)."""
import json
import os
import string

import pytest
import torch

import prepare
import serve
import train
from architecture import build_model, model_args
from checkpoint import load_checkpoint, load_model, save_checkpoint
from configurator import configure
from tokenizer import CharTokenizer

from conftest import ROOT

TestClient = pytest.importorskip("fastapi.testclient").TestClient
TOKENIZER = CharTokenizer(string.ascii_lowercase + " .")
SHAPE = dict(vocab_size=TOKENIZER.n_vocab, block_size=64, n_layer=2, n_head=4, n_embd=32)


def save_model(path, model):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_checkpoint(str(path), {"model_args": model_args(model), "model": model.state_dict(), "step": 7,
                                "tokenizer": {**TOKENIZER.meta(), "vocab_size": TOKENIZER.n_vocab, "eot": TOKENIZER.eot}})


def random_model(**options):
    """Weights scaled up so greedy choices are far from ties (batched and alone then agree in float32)."""
    torch.manual_seed(0)
    model = build_model({**SHAPE, **options})
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
    return model.eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """out/ with a plain, a looped, a feedback and a structurally pruned model; data/tiny; config/tiny.py."""
    root = tmp_path_factory.mktemp("safety")
    (root / "tiny.txt").write_text("".join(f"line {i}: the quick brown fox.\n" for i in range(100)))
    prepare.prepare(configure(prepare.DEFAULTS, [f"--dataset={root / 'tiny.txt'}", "--name=tiny", "--tokenizer=char",
                                                 f"--data_dir={root / 'data'}"]))
    save_model(root / "out" / "plain" / "ckpt.pt", random_model())
    save_model(root / "out" / "looped" / "ckpt.pt", random_model(n_prelude=1, n_core=1, n_coda=0, loops=2))
    save_model(root / "out" / "feedback" / "ckpt.pt", random_model(feedback=1))
    import compress
    pruned = random_model()
    compress.structured_prune(pruned, 0.5)
    save_model(root / "out" / "pruned" / "ckpt.pt", pruned)
    (root / "config").mkdir()
    (root / "config" / "tiny.py").write_text('dataset = "tiny"\ndevice = "cpu"\nn_layer = 1\nn_head = 2\nn_embd = 16\n'
                                             'block_size = 16\nmax_iters = 2\nout_dir = "out/tiny_job"\n')
    return root


def serve_cfg(root, jobs="jobs", *args):
    return configure(serve.DEFAULTS, ["--device=cpu", "--dtype=float32", f"--out_root={root / 'out'}",
                                      f"--data_root={root / 'data'}", f"--config_root={root / 'config'}",
                                      f"--jobs_dir={root / jobs}", "--max_running_jobs=1", *args])


@pytest.fixture(autouse=True)
def in_root(root, monkeypatch):
    """Run where the server would: the scripts' relative defaults (out/run, data) then fall under the roots."""
    monkeypatch.chdir(root)


@pytest.fixture(scope="module")
def http(root):
    cfg = serve_cfg(root, "jobs", "--max_queued_jobs=1000")
    cfg["max_running_jobs"] = 0  # accepted jobs stay queued: these tests only look at what is accepted
    with TestClient(serve.make_app(cfg), base_url="http://localhost") as client:
        yield client


def job(http, kind, **overrides):
    return http.post("/v1/jobs", json={"kind": kind, "overrides": overrides})


def in_process(path, prompt, n, **options):
    model = load_model(load_checkpoint(str(path)))
    ids = TOKENIZER.encode(prompt)
    return TOKENIZER.decode(model.generate(torch.tensor([ids]), n, temperature=0, **options)[0, len(ids):].tolist())


# ----------------------------------------------------------------------------- what a job may set

@pytest.mark.parametrize("kind, overrides", [
    ("swarm", {"worker_command": "sh -c 'id > /tmp/owned'"}),   # a shell command
    ("swarm", {"human": True}),                                   # a console on the server's stdin
    ("bench", {"nanogpt": "/tmp"}),                               # runs that folder's bench.py
    ("train", {"compile_options": {"cpp.cxx": ["/bin/sh"]}}),      # Inductor options can name a compiler
    ("bench", {"parity_lever": {"compile_options": {"cpp.cxx": ["/bin/sh"]}}}),  # nested train options too
])
def test_overrides_that_name_a_program_or_code_are_refused(http, kind, overrides):
    r = job(http, kind, **overrides)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == f"overrides.{next(iter(overrides))}"
    assert not os.path.exists("/tmp/owned")


def test_the_allow_lists_name_only_keys_the_scripts_have():
    for kind in serve.JOB_KINDS:
        unknown = serve.SETTABLE[kind] - set(serve.script_module(kind).DEFAULTS) - {"vocab_size"}
        assert not unknown, (kind, unknown)


# settable string options that are words, not paths: a string option a script adds must be either checked as
# a path by its kind or listed here, so no path can slip past the sandbox by a new name
WORDS = {"prepare": {"tokenizer", "text_field", "dataset"},  # dataset: a name, or a path (checked when it is one)
         "train": {"attention", "device", "dtype", "halt_rule", "init_state", "inject", "loop_loss", "loops_sampling", "memory",
                   "optimizer", "schedule", "train_only"},
         "world": {"act", "device", "mode"},
         "swarm": {"task", "debate", "learning", "device", "aggregators", "human_input"},
         "bench": {"device", "levers", "parts", "suite"}}


def test_every_string_option_a_job_may_set_is_a_checked_path_or_a_known_word():
    for kind in serve.JOB_KINDS:
        defaults = serve.script_module(kind).DEFAULTS
        marked = {}
        for key in serve.SETTABLE[kind] - WORDS[kind]:
            value = defaults.get(key)
            if isinstance(value, str):
                marked[key] = f"marker-{key}"
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
                marked[key] = [f"marker-{key}"]
        checked = {key.split(".")[0] for key, path, _ in serve.JOB_KINDS[kind]["paths"]({**defaults, **marked})
                   if isinstance(path, str) and "marker-" in path}
        assert set(marked) <= checked, (kind, set(marked) - checked)


# ----------------------------------------------------------------------------- where a job's paths may lead

@pytest.mark.parametrize("kind, overrides, param", [
    ("prepare", {"name": "/tmp/elsewhere"}, "overrides.name"),
    ("prepare", {"name": "../../elsewhere"}, "overrides.name"),
    ("prepare", {"dataset": "/etc/hostname"}, "overrides.dataset"),
    ("prepare", {"data_dir": "/tmp"}, "overrides.data_dir"),
    ("train", {"dataset": "../../../etc"}, "overrides.dataset"),
    ("train", {"dataset": "/etc"}, "overrides.dataset"),
    ("train", {"out_dir": "/tmp/run"}, "overrides.out_dir"),
    ("train", {"init_from": "/etc/passwd"}, "overrides.init_from"),
    ("train", {"teacher": "../../teacher"}, "overrides.teacher"),
    ("train", {"knn_store": "/tmp/store"}, "overrides.knn_store"),
    ("world", {"init_from": "/tmp/policy.pt"}, "overrides.init_from"),
    ("world", {"tasks": {"textworld": {"root": "/tmp/games"}}}, "overrides.tasks"),
    ("world", {"changes": [[5, "textworld", {"root": "../../games"}]]}, "overrides.changes"),
    ("world", {"tasks": {"arith": {"tool": "../../x"}}}, "overrides.tasks"),
    ("swarm", {"task": "textworld", "task_options": {"root": "/tmp/games"}}, "overrides.task_options"),
    ("swarm", {"learner": "/tmp/learner.pt", "checkpoints": ["fake:echo"]}, "overrides.learner"),
    ("swarm", {"guide": "../../guide.pt", "checkpoints": ["fake:echo"]}, "overrides.guide"),
    ("swarm", {"checkpoints": ["/tmp/policy.pt"]}, "overrides.checkpoints"),
    ("bench", {"out": "/tmp/bench.json"}, "overrides.out"),
    ("bench", {"out": "out/bench.json", "config": "/etc/passwd"}, "overrides.config"),
])
def test_every_path_option_of_every_job_kind_stays_under_its_root(http, root, kind, overrides, param):
    if "textworld" in json.dumps(overrides):
        pytest.importorskip("textworld")
    r = job(http, kind, **overrides)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_a_task_without_a_root_option_is_checked_at_its_default_root():
    pytest.importorskip("textworld")
    import textworld_env
    assert serve.task_paths("tasks.textworld", "textworld", {}) == [
        ("tasks.textworld.root", textworld_env.GAMES_DIR, "data_root")]


def test_names_that_could_be_markup_are_refused(http):
    r = job(http, "train", out_dir="out/<img src=x onerror=alert(1)>", dataset="tiny")
    assert r.status_code == 422 and r.json()["error"]["param"] == "overrides.out_dir"
    assert "letters, digits" in r.json()["error"]["message"]
    assert job(http, "prepare", name="a b").status_code == 422


def test_a_job_within_its_roots_is_accepted(http, root):
    r = job(http, "train", out_dir=str(root / "out" / "fine"), dataset="tiny", data_dir=str(root / "data"),
            n_layer=1, n_head=2, n_embd=16, block_size=16)
    assert r.status_code == 202, r.text


# ----------------------------------------------------------------------------- a job's config, checked first

def test_a_job_config_the_script_would_refuse_is_refused_before_it_queues(http, root):
    r = job(http, "world", tasks={"arith": 5})
    assert r.status_code == 422 and r.json()["error"]["param"] == "overrides.tasks"
    r = job(http, "world", changes=[[5, "arith"]])
    assert r.status_code == 422 and "each change is" in r.json()["error"]["message"]
    r = job(http, "world", mode="nonsense")
    assert r.status_code == 422 and "mode must be" in r.json()["error"]["message"]
    r = job(http, "train", max_iter=5)
    assert r.status_code == 422 and "did you mean 'max_iters'" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "overrides.max_iter"


def test_overwrite_with_a_bad_value_is_refused_before_the_old_run_moves(http, root):
    old = root / "out" / "plain"
    before = sorted(os.listdir(old))
    for bad in ({"n_head": 5}, {"learning_rate": -1.0}, {"schedule": "linear"}, {"n_core": 1}):
        r = job(http, "train", out_dir=str(old), dataset="tiny", data_dir=str(root / "data"), overwrite=True, **bad)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == f"overrides.{next(iter(bad))}"
    assert sorted(os.listdir(old)) == before


# ----------------------------------------------------------------------------- requests from other web pages

def test_a_cross_site_upload_or_job_is_refused(http, root):
    text = b"some text to replace a dataset with\n" * 20
    r = http.post("/v1/datasets?name=tiny", content=text, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["param"] == "content-type"  # what a form or page can send
    r = http.post("/v1/datasets?name=tiny", content=text,
                  headers={"content-type": "application/octet-stream", "origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["param"] == "origin"
    r = http.post("/v1/jobs", content=json.dumps({"kind": "train"}), headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = http.delete("/v1/jobs/x", headers={"origin": "null"})  # a sandboxed frame or a file:// page
    assert r.status_code == 403
    r = http.post("/v1/jobs/x/resume", headers={"content-type": "application/json", "origin": "http://localhost"})
    assert r.status_code == 404  # the page's own origin passes (and the job does not exist)


def test_a_dns_rebinding_host_is_refused_even_without_a_token(http):
    assert http.get("/v1/models", headers={"host": "evil.example:8000"}).status_code == 403
    assert http.get("/", headers={"host": "evil.example"}).status_code == 403
    assert http.get("/v1/models", headers={"host": "127.0.0.1:8000"}).status_code == 200
    assert http.get("/v1/models", headers={"host": "[::1]:8000"}).status_code == 200


def test_allowed_hosts_and_a_wildcard_bind(root):
    app = serve.make_app(serve_cfg(root, "jobs-hosts", "--allowed_hosts=['box.lan']"))
    with TestClient(app, base_url="http://box.lan") as http:
        assert http.get("/v1/models").status_code == 200
        assert http.get("/v1/models", headers={"host": "other.lan"}).status_code == 403
    assert serve.allowed_hosts({"host": "0.0.0.0", "allowed_hosts": []}) is None  # the token is the guard there


def test_a_missing_content_type_or_malformed_json_says_what_to_fix(http):
    r = http.post("/v1/completions", content=b'{"model": "plain"}')
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]["message"]
    r = http.post("/v1/completions", content=b'{"model": "plain",', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "body"
    assert "not valid JSON" in r.json()["error"]["message"]


def test_the_page_runs_only_its_own_script_and_renders_data_as_text(http):
    r = http.get("/")
    policy = r.headers["content-security-policy"]
    assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
    assert "frame-ancestors 'none'" in policy
    assert http.get("/docs").status_code == 404  # FastAPI's page would run a CDN's scripts on this origin
    page = open(os.path.join(ROOT, "serve.html")).read()
    assert "innerHTML" not in page and "onclick=" not in page  # data goes in as text, handlers in the script


# ----------------------------------------------------------------------------- one server per jobs folder

def test_a_second_server_on_the_same_jobs_folder_stops_before_touching_a_record(root):
    cfg = serve_cfg(root, "jobs-locked")
    first = serve.Jobs(cfg)
    record = {"id": "job1", "kind": "train", "state": "running", "out_dir": None, "overrides": {}}
    os.makedirs(root / "jobs-locked" / "job1")
    (root / "jobs-locked" / "job1" / "job.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="in use by another serve.py"):
        serve.make_app(cfg)
    assert json.loads((root / "jobs-locked" / "job1" / "job.json").read_text())["state"] == "running"
    first.shutdown()
    second = serve.Jobs(cfg)  # free once the first lets go: it finds the job its predecessor left running
    assert second.jobs["job1"]["state"] == "interrupted"
    second.shutdown()


# ----------------------------------------------------------------------------- completions

def completion(http, **body):
    return http.post("/v1/completions", json={"max_tokens": 12, "temperature": 0, "ignore_eos": True, **body})


@pytest.mark.parametrize("model", ["feedback", "pruned"])
def test_feedback_and_structurally_pruned_models_serve_generates_tokens(http, root, model):
    r = completion(http, model=model, prompt="the fox")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == in_process(root / "out" / model / "ckpt.pt", "the fox", 12)


def test_loops_runs_a_looped_model_at_that_loop_count(http, root):
    path = root / "out" / "looped" / "ckpt.pt"
    texts = {}
    for loops in (1, 2, 5):
        r = completion(http, model="looped", prompt="lo", loops=loops)
        assert r.status_code == 200, r.text
        texts[loops] = r.json()["choices"][0]["text"]
        assert texts[loops] == in_process(path, "lo", 12, loops=loops)
    assert len(set(texts.values())) > 1  # the loop count changes what the model says
    assert completion(http, model="looped", prompt="lo").json()["choices"][0]["text"] == texts[2]  # trained count


@pytest.mark.parametrize("body, status, param", [
    ({"model": "plain", "loops": 2}, 400, "loops"),        # not a looped model
    ({"model": "looped", "loops": 0}, 422, "loops"),
    ({"model": "looped", "loops": 10 ** 6}, 400, "loops"),
    ({"model": "plain", "seed": 2 ** 70}, 422, "seed"),
    ({"model": "plain", "seed": 2 ** 64 - 1, "n": 2}, 400, "seed"),
    ({"model": "plain", "temperature": 1e-300}, 400, "temperature"),
    ({"model": "plain", "stop": ["a" * 200_000] * 4}, 400, "stop"),
])
def test_out_of_range_values_are_refused_naming_the_field(http, body, status, param):
    r = completion(http, prompt="lo", **body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_a_failing_row_ends_its_own_stream_with_an_error_and_the_other_streams_finish(http, monkeypatch):
    import batching
    real = batching.sample_next_token

    def broken_at_half(logits, temperature, *args):
        if temperature == 0.5:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, temperature, *args)
    monkeypatch.setattr(batching, "sample_next_token", broken_at_half)
    import threading
    lines = {}

    def stream(name, temperature):
        with http.stream("POST", "/v1/completions", json={"model": "plain", "prompt": "lo", "max_tokens": 40,
                                                          "temperature": temperature, "stream": True,
                                                          "ignore_eos": True}) as r:
            lines[name] = [line for line in r.iter_lines() if line]
    threads = [threading.Thread(target=stream, args=(n, t)) for n, t in (("good", 0.0), ("bad", 0.5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert lines["good"][-1] == "data: [DONE]" and len(lines["good"]) == 41
    assert lines["bad"][-1] == "data: [DONE]" and "sampling failed" in lines["bad"][0]


# ----------------------------------------------------------------------------- damaged model files

def test_a_truncated_or_damaged_export_is_a_clear_error(http, root):
    import compress
    src = root / "out" / "plain" / "ckpt.pt"
    out = compress.export({**configure(compress.DEFAULTS, []), "ckpt": str(src), "format": "int8", "device": "cpu",
                           "measure": False, "out": str(root / "out" / "plain" / "int8.pt")})
    data = open(out, "rb").read()
    (root / "out" / "plain" / "truncated.pt").write_bytes(data[:len(data) // 2])
    r = completion(http, model="plain/truncated", prompt="lo")
    assert r.status_code == 422 and "truncated or corrupt" in r.json()["error"]["message"]
    state = torch.load(out, weights_only=True)
    state["model"]["blocks.0.attn.q_proj.q"] = state["model"]["blocks.0.attn.q_proj.q"][:-1]
    torch.save(state, root / "out" / "plain" / "misshaped.pt")
    r = completion(http, model="plain/misshaped", prompt="lo")
    assert r.status_code == 422 and "damaged" in r.json()["error"]["message"]
    del state["model"]["blocks.0.attn.q_proj.q"]
    torch.save(state, root / "out" / "plain" / "missing.pt")
    r = completion(http, model="plain/missing", prompt="lo")
    assert r.status_code == 422 and "do not fit" in r.json()["error"]["message"]
    assert completion(http, model="plain", prompt="lo").status_code == 200  # the rest serves on


def test_a_bad_port_or_limit_is_a_clear_error():
    for arg in ("--port=-1", "--port=70000", "--max_stop_chars=0", "--max_loops=0"):
        with pytest.raises(SystemExit, match="must be"):
            serve.check_serve_config(configure(serve.DEFAULTS, [arg]))


def test_a_looped_model_that_exits_per_token_is_refused_clearly(http, root):
    save_model(root / "out" / "exits" / "ckpt.pt", random_model(n_prelude=1, n_core=1, n_coda=0, exit_tol=0.1))
    r = completion(http, model="exits", prompt="lo")
    assert r.status_code == 422 and "exit_tol" in r.json()["error"]["message"]


def test_routes_are_plain_functions_of_a_state(root):
    """Each route reads alone: called here without an HTTP server."""
    import asyncio
    cfg = serve_cfg(root, "jobs-direct")
    state = serve.State(cfg, serve.Models(cfg, torch.device("cpu")), serve.Jobs(cfg), serve.Runs(cfg["out_root"]))
    try:
        assert asyncio.run(serve.list_configs(state))["data"] == ["tiny.py"]
        assert asyncio.run(serve.health(state))["generations"] == 0
        req = serve.CompletionRequest(model="plain", prompt=["lo", "a"], n=2, stop="x")
        assert serve.check_completion(req, cfg, TOKENIZER) == ([TOKENIZER.encode("lo"), TOKENIZER.encode("a")], ["x"])
        with pytest.raises(serve.ApiError, match="max_tokens"):
            serve.check_completion(serve.CompletionRequest(model="plain", max_tokens=10 ** 6), cfg, TOKENIZER)
    finally:
        state.jobs.shutdown()
