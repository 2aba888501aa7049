"""The residual stream's root and per-layer widths (widths.py, issue 33 item 4)."""
import pytest
import torch

import train
from architecture import build_model
from checkpoint import load_checkpoint, load_model
from widths import WidthGPT

BASE = dict(vocab_size=20, block_size=16, n_layer=3, n_head=2, n_embd=32)  # head size 16


def tiny(**kw):
    torch.manual_seed(0)
    return build_model(BASE | kw).eval()


def test_each_layer_has_its_width_and_the_models_head_size():
    model = tiny(residual_widths=[16, 48, 16], residual_root=True)
    assert isinstance(model, WidthGPT)
    assert [b.attn.n_head for b in model.blocks] == [1, 3, 1]
    assert [b.ffn.c_fc.in_features for b in model.blocks] == [16, 48, 16]
    idx = torch.randint(0, 20, (2, 9))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 9, 20) and model.hidden(idx).shape == (2, 9, 32) and torch.isfinite(loss)


def test_widths_of_n_embd_everywhere_are_the_plain_gpt():
    idx = torch.randint(0, 20, (2, 9))
    plain, same = tiny(), tiny(residual_widths=[32, 32, 32])
    assert torch.equal(plain(idx)[0], same(idx)[0])


def test_a_zero_root_makes_the_first_layer_see_the_embedding():
    model = tiny(residual_root=True)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    idx = torch.randint(0, 20, (2, 9))
    model(idx)
    assert torch.equal(seen[0], model.embed(idx))


@pytest.mark.parametrize("options", [dict(residual_widths=[16, 48, 16]), dict(residual_root=True),
                                     dict(residual_widths=[48, 16, 32], residual_root=True)])
def test_cached_generation_matches_uncached(options):
    model = tiny(**options)
    with torch.no_grad():
        model.root.normal_() if model.root is not None else None
    idx = torch.randint(0, 20, (1, 3))
    cached = model.generate(idx, 15, temperature=0.0, use_cache=True)  # past block_size: the refill path too
    assert torch.equal(cached, model.generate(idx, 15, temperature=0.0, use_cache=False))


@pytest.mark.parametrize("options, message", [
    (dict(residual_widths=[16, 48]), "one per layer"),
    (dict(residual_widths=[16, 40, 16]), "multiple of the head size"),
    (dict(residual_widths=[16, 48, 16], n_kv_head=1), "n_kv_head"),
    (dict(residual_root=True, n_prelude=1, n_core=1, n_coda=1), "cannot be combined"),
    (dict(residual_widths=[16, 48, 16], layer_heads=[1, 1, 1]), "layer_heads"),
])
def test_impossible_width_settings_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        build_model(BASE | options)


def test_a_trained_width_model_reloads_to_the_same_logits(tiny_cfg):
    cfg = tiny_cfg | {"residual_widths": [16, 48], "residual_root": True, "max_iters": 3, "eval_interval": 3}
    train.train(cfg)
    state = load_checkpoint(f"{cfg['out_dir']}/ckpt.pt")
    model = load_model(state)
    idx = torch.randint(0, model.config.vocab_size, (2, 8))
    reloaded = load_model(load_checkpoint(f"{cfg['out_dir']}/ckpt.pt"))
    assert torch.equal(model(idx)[0], reloaded(idx)[0]) and model.root.abs().sum() > 0  # the root trained
