import json
import os

import pytest
import torch

import noise
import train
from conftest import tiny_train_config
from tokenizer import CharTokenizer

TEXT = "the quick brown fox jumps over the lazy dog, all good men aaand sooo on.\n" * 4


def char_batch(batch_size=3, block_size=40):
    tok = CharTokenizer(sorted(set(TEXT)))
    meta = {"tokenizer": "char", "chars": tok.chars, "vocab_size": tok.n_vocab, "eot": tok.eot}
    ids = torch.tensor(tok.encode(TEXT))
    starts = [0, 17, 101][:batch_size]
    x = torch.stack([ids[s:s + block_size] for s in starts])
    y = torch.stack([ids[s + 1:s + 1 + block_size] for s in starts])
    return meta, x, y


def is_ordered_walk(targets, clean_next):
    """Every target is the clean text's next character at an index that never moves backwards."""
    i = 0
    for t in targets:
        while i < len(clean_next) and clean_next[i] != t:
            i += 1
        if i == len(clean_next):
            return False
    return True


@pytest.mark.parametrize("family", ["delete", "insert", "transpose", "whitespace", "repeat"])
def test_edits_corrupt_inputs_while_targets_stay_the_clean_text(family):
    meta, x, y = char_batch()
    nx, ny = noise.InputNoise({family: 0.2}, meta, seed=0, embedding_rows=64)(x, y, key=7)
    assert nx.shape == x.shape and ny.shape == y.shape
    assert not torch.equal(nx, x)
    for row in range(x.size(0)):
        valid = ny[row][ny[row] >= 0].tolist()
        assert len(valid) > x.size(1) // 2 and is_ordered_walk(valid, y[row].tolist())


@pytest.mark.parametrize("family", ["mask", "keyboard"])
def test_substitutions_leave_targets_untouched(family):
    meta, x, y = char_batch()
    nx, ny = noise.InputNoise({family: 0.3}, meta, seed=0, embedding_rows=128)(x, y, key=1)
    assert torch.equal(ny, y) and not torch.equal(nx, x)
    if family == "mask":
        assert ((nx == x) | (nx == meta["vocab_size"])).all()


def test_noise_is_a_function_of_seed_and_key():
    meta, x, y = char_batch()
    probs = {"delete": 0.1, "insert": 0.1, "mask": 0.1}
    a = noise.InputNoise(probs, meta, seed=3, embedding_rows=64)
    same = [a(x, y, key=torch.tensor([5, 6], dtype=torch.uint8)) for _ in range(2)]
    assert all(torch.equal(u, v) for u, v in zip(*same))
    other = a(x, y, key=torch.tensor([5, 7], dtype=torch.uint8))
    assert not torch.equal(other[0], same[0][0])
    reseeded = noise.InputNoise(probs, meta, seed=4, embedding_rows=64)(x, y, key=torch.tensor([5, 6], dtype=torch.uint8))
    assert not torch.equal(reseeded[0], same[0][0])


def test_keyboard_neighbours_keep_case():
    assert set(noise.keyboard_neighbours("s")) == {"q", "w", "e", "a", "d", "z", "x", "c"}
    assert "W" in noise.keyboard_neighbours("S")
    assert noise.keyboard_neighbours("!") == []


@pytest.mark.parametrize("probs, message", [
    ({"delete": 1.5}, "must be a number in \\[0, 1\\]"),
    ({"delete": -0.1}, "must be a number in \\[0, 1\\]"),
    ({"typo": 0.1}, "unknown noise family 'typo'"),
    ({"unicode": 0.1}, "nothing to swap"),
])
def test_bad_noise_settings_are_clear_errors(probs, message):
    meta, _, _ = char_batch()
    with pytest.raises(SystemExit, match=message):
        noise.InputNoise(probs, meta, seed=0, embedding_rows=64)


def test_character_noise_needs_the_char_tokenizer():
    with pytest.raises(SystemExit, match="needs a char-tokenized dataset"):
        noise.check_noise({"delete": 0.1}, {"tokenizer": "gpt2"})
    noise.check_noise({"mask": 0.1}, {"tokenizer": "gpt2"})


def test_unicode_noise_swaps_compatibility_variants():
    chars = sorted(set("abc ") | {"\uff41"})  # fullwidth a, whose NFKC form is a
    meta = {"tokenizer": "char", "chars": chars, "vocab_size": len(chars) + 1, "eot": len(chars)}
    ids = torch.tensor([[chars.index("a")] * 8])
    nx, ny = noise.InputNoise({"unicode": 1.0}, meta, seed=0, embedding_rows=64)(ids, ids, key=0)
    assert (nx == chars.index("\uff41")).all() and torch.equal(ny, ids)


def test_noise_touches_training_batches_only_and_resumes_exactly(tiny_data, monkeypatch):
    calls = []
    real_call = noise.InputNoise.__call__

    def counting(self, x, y, key):
        calls.append(x.shape)
        return real_call(self, x, y, key)
    monkeypatch.setattr(noise.InputNoise, "__call__", counting)
    probs = {"mask": 0.1, "delete": 0.05, "insert": 0.05}
    whole = tiny_train_config(tiny_data, out_dir=str(tiny_data / "whole"), noise=probs)
    train.train(whole)
    assert len(calls) == whole["max_iters"] + 1  # one per step and the prefetched next: none for evaluation
    split = tiny_train_config(tiny_data, out_dir=str(tiny_data / "split"), noise=probs, max_iters=10, lr_decay_iters=20)
    train.train(split)
    train.train(split | {"max_iters": 20, "init_from": "resume"})

    def rows(cfg):
        with open(os.path.join(cfg["out_dir"], "metrics.jsonl")) as f:
            return [(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, f)]
    assert rows(whole) == rows(split)


def test_input_noise_experiment_runs_tiny_on_a_training_slice(tiny_data):
    from test_synthetic import load_experiment
    config = tiny_data / "tiny_noise.py"
    config.write_text(f"dataset = 'tiny'\ndata_dir = {str(tiny_data / 'data')!r}\ndevice = 'cpu'\ncompile = False\n"
                      "n_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 16\nbatch_size = 4\nwarmup_iters = 1\n")
    out = tiny_data / "noise_out"
    load_experiment("input_noise").main([f"--train_config={config}", f"--out={out}", "--max_iters=4", "--evals=2",
                                         "--eval_iters=1", "--seeds=[1, 2]", "--train_tokens=2000",
                                         "--runs={'none': {}, 'delete': {'delete': 0.1}}"])
    result = json.loads((out / "input_noise.json").read_text())
    assert result["dataset"] == "tiny_train2000" and list(result["results"]) == ["none", "delete"]
    none = result["results"]["none"]
    assert sorted(none["seeds"]) == ["1", "2"] and [r["step"] for r in none["seeds"]["1"]["curve"]] == [0, 2, 4]
    assert none["val_clean"] == pytest.approx((none["seeds"]["1"]["val_clean"] + none["seeds"]["2"]["val_clean"]) / 2)
    sliced = tiny_data / "data" / "tiny_train2000"
    assert os.path.getsize(sliced / "train.bin") == 2 * 2000
    assert (sliced / "val.bin").read_bytes() == (tiny_data / "data" / "tiny" / "val.bin").read_bytes()
    assert (out / "input_noise.png").exists()


@pytest.mark.parametrize("arg, message", [("--train_tokens=10000000", "train_tokens=10000000 exceeds the"),
                                          ("--evals=0", "evals must be >= 1"), ("--seeds=[]", "seeds a non-empty list")])
def test_input_noise_experiment_refuses_bad_settings_before_training(tiny_data, arg, message):
    from test_synthetic import load_experiment
    config = tiny_data / "tiny_noise_bad.py"
    config.write_text(f"dataset = 'tiny'\ndata_dir = {str(tiny_data / 'data')!r}\ndevice = 'cpu'\ncompile = False\n")
    out = tiny_data / "noise_bad"
    with pytest.raises(SystemExit, match=message):
        load_experiment("input_noise").main([f"--train_config={config}", f"--out={out}", arg])
    assert not (out / "input_noise.json").exists()
