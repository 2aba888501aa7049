"""Checkpoints written before issue 26 split model.py (tests/fixtures/, made by main at bb63247) still load,
compute the same logits, sample the same tokens and resume to the same losses."""
import json
import os
import shutil

import pytest
import torch

import train
from architecture import DEFAULTS, build_model, model_args
from checkpoint import load_checkpoint, load_model
from conftest import tiny_train_config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
CHECKPOINTS = os.path.join(FIXTURES, "checkpoints")
KINDS = ["plain", "gqa", "looped_concat", "looped_add", "pkm", "feedback", "heads", "shapes", "untied",
         "plain_int8", "plain_pruned"]
PROMPT = torch.tensor([[5, 17, 33, 2, 40, 11, 8, 60]])


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_from_before_the_split_computes_and_samples_the_same(kind):
    expected = torch.load(os.path.join(CHECKPOINTS, "expected.pt"))[kind]
    state = load_checkpoint(os.path.join(CHECKPOINTS, f"{kind}.pt"))
    args = dict(state["model_args"])
    model = load_model(state)
    with torch.no_grad():
        # equal up to float rounding: another CPU's kernels (AVX-512 against AVX2) sum in another order
        torch.testing.assert_close(model(PROMPT)[0], expected["logits"], rtol=1e-5, atol=1e-6)
    assert torch.equal(model.generate(PROMPT, 8, temperature=0), expected["tokens"])
    recorded = model_args(model)  # a checkpoint written now records the same options, and newer ones at their defaults
    assert {k: recorded[k] for k in args} == args and all(recorded[k] == DEFAULTS[k] for k in recorded.keys() - args)


@pytest.mark.parametrize("kind", ["plain", "gqa", "looped_add", "pkm", "feedback", "heads", "shapes", "untied"])
def test_a_fresh_model_starts_from_the_same_weights_as_before_the_split(kind):
    # the fixture maker seeded torch with the kind's index before building each model
    state = load_checkpoint(os.path.join(CHECKPOINTS, f"{kind}.pt"))
    torch.manual_seed(KINDS.index(kind))
    fresh = build_model(state["model_args"]).state_dict()
    moved = ("head_gate", "feedback_proj")  # the fixture maker woke these up after building
    for name, tensor in fresh.items():
        if not any(m in name for m in moved):
            assert torch.equal(tensor, state["model"][name]), name


@pytest.mark.parametrize("kind", ["plain", "looped"])
def test_a_run_stopped_before_the_split_resumes_to_the_same_losses(tmp_path, kind):
    resume = os.path.join(FIXTURES, "resume")
    shutil.copytree(os.path.join(resume, "data"), tmp_path / "data")
    out_dir = tmp_path / kind
    out_dir.mkdir()
    shutil.copy(os.path.join(resume, f"{kind}_step4.pt"), out_dir / "ckpt.pt")
    extra = dict(n_layer=3, n_prelude=1, n_core=1, n_coda=1, loops=2, loops_sampling="uniform", dropout=0.0) \
        if kind == "looped" else {}
    cfg = tiny_train_config(tmp_path, out_dir=str(out_dir), init_from="resume", max_iters=8, eval_interval=4, **extra)
    losses = train.train(cfg)
    with open(os.path.join(resume, f"{kind}_resumed_step8.json")) as f:
        assert losses == pytest.approx(json.load(f), rel=1e-6)  # float rounding differs between CPUs
