"""Tokenizer shims (shim.py, issue 33 item 1): shapes, a swap to another tokenizer that leaves the blocks
bitwise as they were, and clear errors for what cannot work."""
import pytest
import torch

import prepare
import train
from architecture import build_model
from checkpoint import load_checkpoint
from configurator import configure
from conftest import tiny_train_config
from shim import ShimGPT, is_tokenizer_param


def tiny_shim_model(**kw):
    torch.manual_seed(0)
    return build_model(dict(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32, shim=True, **kw))


def test_shim_model_keeps_the_gpts_shapes():
    model = tiny_shim_model(shim_hidden=48)
    idx = torch.randint(0, 20, (3, 7))
    logits, loss = model(idx, idx)
    assert isinstance(model, ShimGPT) and logits.shape == (3, 7, 20) and torch.isfinite(loss)
    assert model.hidden(idx).shape == (3, 7, 32)
    assert model.shim_in.c_fc.weight.shape == (48, 32) and model.shim_out.c_proj.weight.shape == (32, 48)
    cached = model.generate(idx[:1], 12, temperature=0.0, use_cache=True)
    assert torch.equal(cached, model.generate(idx[:1], 12, temperature=0.0, use_cache=False))


@pytest.mark.parametrize("options, message", [
    (dict(n_prelude=1, n_core=1), "cannot be combined"),
    (dict(feedback=1), "cannot be combined"),
    (dict(residual_root=True), "cannot be combined"),
    (dict(shim_hidden=-1), "shim_hidden"),
])
def test_impossible_shim_combinations_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        tiny_shim_model(**options)
    with pytest.raises(ValueError, match="set shim=True"):
        build_model(dict(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32, shim_hidden=8))


def bpe_data(tmp_path):
    """The tiny text of conftest's tiny_data, in GPT-2 BPE as data/tiny_bpe."""
    cfg = configure(prepare.DEFAULTS, [f"--dataset={tmp_path / 'tiny.txt'}", "--name=tiny_bpe", "--tokenizer=gpt2",
                                       f"--data_dir={tmp_path / 'data'}"])
    prepare.prepare(cfg)


def test_retraining_the_shims_for_another_tokenizer_leaves_the_blocks_bitwise_frozen(tiny_data):
    char = tiny_train_config(tiny_data, shim=True, max_iters=4, eval_interval=4, dropout=0.0)
    train.train(char)
    bpe_data(tiny_data)
    swap = tiny_train_config(tiny_data, dataset="tiny_bpe", init_from=char["out_dir"], train_only="shim",
                             out_dir=str(tiny_data / "swap"), max_iters=3, eval_interval=3, dropout=0.0,
                             optimizer="muon")
    train.train(swap)
    before = load_checkpoint(f"{char['out_dir']}/ckpt.pt")
    after = load_checkpoint(f"{swap['out_dir']}/ckpt.pt")
    assert after["tokenizer"]["tokenizer"] == "gpt2" and after["model_args"]["vocab_size"] == 50257
    blocks = [k for k in before["model"] if not is_tokenizer_param(k)]
    assert blocks and all(torch.equal(before["model"][k], after["model"][k]) for k in blocks)
    assert not torch.equal(before["model"]["shim_in.c_fc.weight"], after["model"]["shim_in.c_fc.weight"])
    assert after["model"]["wte.weight"].shape[0] == 50304  # a fresh BPE embedding, padded to a multiple of 64
    # resuming the swap keeps the blocks frozen too
    train.train(swap | {"init_from": "resume", "max_iters": 5})
    resumed = load_checkpoint(f"{swap['out_dir']}/ckpt.pt")
    assert resumed["step"] == 5 and all(torch.equal(before["model"][k], resumed["model"][k]) for k in blocks)


def test_train_only_shim_refuses_a_model_without_shims_and_a_fresh_start(tiny_cfg):
    train.train(tiny_cfg | {"max_iters": 2, "eval_interval": 2})
    with pytest.raises(SystemExit, match="shim=True"):
        train.train(tiny_cfg | {"init_from": tiny_cfg["out_dir"], "train_only": "shim",
                                "out_dir": tiny_cfg["out_dir"] + "_swap"})
    with pytest.raises(SystemExit, match="init_from"):
        train.train(tiny_cfg | {"train_only": "shim", "out_dir": tiny_cfg["out_dir"] + "_fresh"})


def test_another_tokenizer_without_train_only_shim_is_still_refused(tiny_data):
    cfg = tiny_train_config(tiny_data, shim=True, max_iters=2, eval_interval=2)
    train.train(cfg)
    bpe_data(tiny_data)
    with pytest.raises(SystemExit, match="does not match the checkpoint"):
        train.train(cfg | {"dataset": "tiny_bpe", "init_from": cfg["out_dir"], "out_dir": cfg["out_dir"] + "_ft"})
