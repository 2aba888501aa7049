"""lm-evaluation-harness scores a µLM through serve.py: its local-completions client (token-id prompts, echoed
prompt log-probabilities, the remote tokenizer over /tokenize and /tokenizer_info) against a real server
process, on the README's tasks in evals/, and the scores equal the model's own scoring of the same items.
Also the tokenizer routes for a char and a BPE model, and clear errors for bad token ids and requests.

Both sides score over the real vocabulary: serve.py slices the padded logits to vocab_size before its
log-softmax, and so does model.forward, which scores here (training's loss normalises over the padded
vocabulary, whose extra columns training pushed down: not the same numbers)."""
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch

import prepare
import serve
import train
from architecture import build_model, model_args
from checkpoint import load_checkpoint, load_model, save_checkpoint
from configurator import configure
from tokenizer import GPT2Tokenizer, tokenizer_from_meta

from conftest import ROOT, tiny_train_config

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval[api]: what its local-completions client needs

EVALS = os.path.join(ROOT, "evals")
BLOCK = 64


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_bpe_model(path):
    """A random model with the GPT-2 tokenizer: the tokenizer routes of a BPE model."""
    torch.manual_seed(0)
    model = build_model(dict(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=16))
    os.makedirs(os.path.dirname(path))
    save_checkpoint(str(path), {"model_args": model_args(model), "model": model.state_dict(), "step": 0,
                                "tokenizer": GPT2Tokenizer().meta()})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A char model trained on the pangram lines (out/tiny) and a random BPE model (out/bpe)."""
    root = tmp_path_factory.mktemp("lm_eval")
    (root / "tiny.txt").write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n"
                                           for i in range(200)))
    prepare.prepare(configure(prepare.DEFAULTS, [f"--dataset={root / 'tiny.txt'}", "--name=tiny", "--tokenizer=char",
                                                 f"--data_dir={root / 'data'}"]))
    cfg = tiny_train_config(root, out_dir=str(root / "out" / "tiny"), block_size=BLOCK, max_iters=60, dropout=0.0,
                            learning_rate=1e-2, eval_interval=100, log_interval=50)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.train(cfg)
    finally:
        torch.set_num_threads(threads)
    save_bpe_model(root / "out" / "bpe" / "ckpt.pt")
    return root


@pytest.fixture(scope="module")
def server(root):
    """serve.py in its own process on a free port, the char model's tokenizer the default."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--port={port}", "--device=cpu",
                                 "--threads=1", "--tokenizer_model=tiny", f"--out_root={root / 'out'}",
                                 f"--jobs_dir={root / 'jobs'}"], cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.2)
    with httpx.Client(base_url=url, timeout=60) as http:
        yield url, http
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def reference(root):
    state = load_checkpoint(str(root / "out" / "tiny" / "ckpt.pt"))
    return load_model(state).eval(), tokenizer_from_meta(state["tokenizer"])


def read_jsonl(name):
    with open(os.path.join(EVALS, name)) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- the model's own scoring

@torch.no_grad()
def loglikelihood(reference, context, continuation):
    """log p(continuation | context) from one full forward pass: logits over the real vocabulary."""
    model, tok = reference
    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    logits, _ = model(torch.tensor([whole]))  # (1, T, vocab_size)
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


@torch.no_grad()
def greedy(reference, context, max_new, stops):
    """The greedy continuation, cut at EOT and at the first stop string, as lm-eval's until asks."""
    model, tok = reference
    ids = tok.encode(context)
    out = model.generate(torch.tensor([ids]), max_new, temperature=0)[0, len(ids):].tolist()
    text = tok.decode(out[:out.index(tok.eot)] if tok.eot in out else out)
    cuts = [text.index(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


def expected_choice(reference):
    """acc, acc_norm and every choice's log-likelihood of evals/ulm_choice.jsonl (target_delimiter " ")."""
    lls, acc, acc_norm = [], [], []
    for item in read_jsonl("ulm_choice.jsonl"):
        scores = [loglikelihood(reference, item["context"], " " + c) for c in item["choices"]]
        lls.append(scores)
        acc.append(int(np.argmax(scores)) == item["label"])
        acc_norm.append(int(np.argmax([s / len(c) for s, c in zip(scores, item["choices"])])) == item["label"])
    return float(np.mean(acc)), float(np.mean(acc_norm)), lls


def expected_complete(reference):
    texts = [greedy(reference, item["context"], 16, [".", "\n"]) for item in read_jsonl("ulm_complete.jsonl")]
    hits = [t == item["target"] for t, item in zip(texts, read_jsonl("ulm_complete.jsonl"))]
    return float(np.mean(hits)), texts


# ----------------------------------------------------------------------------- lm-eval end to end

@pytest.fixture(scope="module")
def evaluated(server, tmp_path_factory):
    """lm-eval's simple_evaluate on the README's tasks, as its CLI runs it (the CLI itself spends ~20 s indexing
    every built-in task); its datasets cache in a temporary folder, and the caller's random state kept."""
    url, _ = server
    from datasets import config as datasets_config
    from lm_eval.tasks import TaskManager
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cache, cwd = datasets_config.HF_DATASETS_CACHE, os.getcwd()
    datasets_config.HF_DATASETS_CACHE = str(tmp_path_factory.mktemp("datasets_cache"))
    os.chdir(ROOT)  # the tasks' data_files are relative to the repository root, as in the README's command
    try:
        return lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model=tiny,base_url={url}/v1/completions,tokenizer_backend=remote,max_length={BLOCK}",
            tasks=["ulm_choice", "ulm_complete"], task_manager=TaskManager(include_path=EVALS, include_defaults=False),
            log_samples=True)
    finally:
        os.chdir(cwd)
        datasets_config.HF_DATASETS_CACHE = cache
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def test_lm_eval_multiple_choice_scores_equal_the_models_own_loglikelihoods(evaluated, reference):
    acc, acc_norm, lls = expected_choice(reference)
    results = evaluated["results"]["ulm_choice"]
    assert results["acc,none"] == pytest.approx(acc) and results["acc_norm,none"] == pytest.approx(acc_norm)
    assert acc >= 0.5  # a trained model: the pangram endings are learnt
    for sample in evaluated["samples"]["ulm_choice"]:
        served = [ll for ll, _greedy in sample["filtered_resps"]]
        assert served == pytest.approx(lls[sample["doc_id"]], abs=1e-4)


def test_lm_eval_generation_scores_equal_the_models_own_greedy_continuations(evaluated, reference):
    exact, texts = expected_complete(reference)
    assert evaluated["results"]["ulm_complete"]["exact_match,none"] == pytest.approx(exact)
    assert exact > 0  # the pangram completions are learnt
    for sample in evaluated["samples"]["ulm_complete"]:
        assert sample["filtered_resps"][0] == texts[sample["doc_id"]]


# ----------------------------------------------------------------------------- the routes lm-eval uses

def test_token_id_prompts_echo_every_prompt_tokens_logprob_and_top_logprobs(server, reference):
    _, http = server
    model, tok = reference
    ids = tok.encode("the quick brown")
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": [ids, ids[:3]], "max_tokens": 1,
                                           "temperature": 0, "echo": True, "logprobs": 2})
    assert r.status_code == 200, r.text
    first, second = r.json()["choices"]
    lp = first["logprobs"]
    assert first["text"].startswith("the quick brown") and second["text"].startswith("the")
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # as OpenAI's echo
    assert len(lp["token_logprobs"]) == len(ids) + 1 and all(len(top) == 2 for top in lp["top_logprobs"][1:])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0], dim=-1)
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx([logp[i - 1, ids[i]].item() for i in range(1, len(ids))],
                                                             abs=1e-4)
    best = logp[:-1].max(dim=-1).values.tolist()
    assert [max(top.values()) for top in lp["top_logprobs"][1:len(ids)]] == pytest.approx(best, abs=1e-4)


def test_tokenize_and_detokenize_round_trip_for_char_and_bpe_models(server, reference):
    _, http = server
    _, tok = reference
    r = http.post("/tokenize", json={"prompt": "the fox<|endoftext|>", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("the fox") + [tok.eot] and r["count"] == 8 and r["max_model_len"] == BLOCK
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "the fox<|endoftext|>"}
    info = http.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == "char" and info["eos_token"] == "<|endoftext|>" and info["vocab_size"] == tok.n_vocab
    gpt2 = GPT2Tokenizer()
    r = http.post("/tokenize", json={"model": "bpe", "prompt": "Hello, world!<|endoftext|>", "return_token_strs": True})
    assert r.json()["tokens"] == gpt2.encode("Hello, world!") + [50256]
    assert "".join(r.json()["token_strs"]) == "Hello, world!<|endoftext|>"
    assert http.post("/detokenize", json={"model": "bpe", "tokens": r.json()["tokens"]}).json()["prompt"] == \
        "Hello, world!<|endoftext|>"
    assert http.get("/tokenizer_info", params={"model": "bpe"}).json()["tokenizer_class"] == "gpt2"


@pytest.mark.parametrize("path, body, status, field, words", [
    ("/v1/completions", {"prompt": [5, 400]}, 400, "prompt", "outside this model's vocabulary"),
    ("/v1/completions", {"prompt": [[5], [-1]]}, 400, "prompt", "outside"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt", "at least one id"),
    ("/v1/completions", {"prompt": [True, 3]}, 422, "prompt", "list of token ids"),
    ("/v1/completions", {"prompt": ["the", 3]}, 422, "prompt", "list of token ids"),
    ("/v1/completions", {"prompt": [1] * (BLOCK + 1), "echo": True, "logprobs": 0}, 400, "prompt", "block_size=64"),
    ("/detokenize", {"tokens": [1, 41]}, 400, "tokens", "ids 0 to 40"),
    ("/detokenize", {"model": "bpe", "tokens": [50257]}, 400, "tokens", "outside"),
    ("/tokenize", {"prompt": "€"}, 400, "prompt", "not in this character vocabulary"),
    ("/tokenize", {"model": "nope", "prompt": "a"}, 404, "model", "not found"),
    ("/tokenize", {"prompt": "a", "messages": []}, 422, "messages", "Extra inputs"),
])
def test_bad_token_ids_and_tokenizer_requests_are_clear_errors(server, path, body, status, field, words):
    _, http = server
    if path == "/v1/completions":
        body = {"model": "tiny", "max_tokens": 1, **body}
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == field and words in r.json()["error"]["message"]


def test_a_tokenizer_request_naming_no_model_without_a_default_says_how_to_name_one(root):
    cfg = configure(serve.DEFAULTS, ["--device=cpu", f"--out_root={root / 'out'}", f"--jobs_dir={root / 'jobs-direct'}"])
    state = serve.State(cfg, serve.Models(cfg, torch.device("cpu")), serve.Jobs(cfg), serve.Runs(cfg["out_root"]))
    try:
        with pytest.raises(serve.ApiError, match="--tokenizer_model"):
            asyncio.run(serve.tokenizer_info(None, state))
        assert asyncio.run(serve.tokenizer_info("bpe", state))["eos_token_id"] == 50256
    finally:
        state.jobs.shutdown()
    with pytest.raises(SystemExit, match="tokenizer_model"):
        serve.check_serve_config(configure(serve.DEFAULTS, ["--tokenizer_model=../elsewhere"]))
