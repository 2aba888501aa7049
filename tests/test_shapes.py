"""Per-layer shapes, layerwise feedback and growing heads (issue 10, parts 2-4): tiny CPU models."""
import os

import pytest
import torch

import train
from checkpoint import load_checkpoint, load_model
from conftest import tiny_train_config
from architecture import HeadConfig, build_model, options_of
from heads import update_heads

LAYOUTS = {
    "widths": dict(mlp_ratios=[1, 6.5]),
    "windows": dict(attn_windows=[3, 0]),
    "feedback": dict(feedback=1),
    "feedback_windows_widths": dict(feedback=1, attn_windows=[2, 5], mlp_ratios=[2, 3]),
    "gated_heads": dict(head_gates=True, layer_heads=[1, 3]),
}


def tiny_model(block_size=16, **kw):
    torch.manual_seed(0)
    model = build_model(dict(vocab_size=20, block_size=block_size, n_layer=2, n_head=4, n_embd=32, **kw)).eval()
    with torch.no_grad():  # feedback and new heads start silent; wake them so the tests can see them
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cached_generation_matches_uncached_under_every_layout(layout):
    model = tiny_model(block_size=8, **LAYOUTS[layout])
    idx = torch.randint(0, 20, (2, 3))
    # 9 new tokens run past block_size=8, so the cache refill path is covered too
    cached = model.generate(idx, 9, temperature=0.0, use_cache=True)
    plain = model.generate(idx, 9, temperature=0.0, use_cache=False)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_changing_a_future_token_never_changes_earlier_logits_under_every_layout(layout):
    model = tiny_model(**LAYOUTS[layout])
    idx = torch.randint(0, 20, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 20
    a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_a_token_outside_a_layers_window_leaves_its_output_unchanged():
    torch.manual_seed(0)
    model = build_model(dict(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16, attn_windows=[4])).eval()
    idx = torch.randint(0, 20, (1, 12))
    base = model(idx)[0][0, 10]  # the window of position 10 is positions 7..10
    for position, inside in ((6, False), (7, True)):
        changed = idx.clone()
        changed[0, position] = (changed[0, position] + 1) % 20
        assert torch.allclose(model(changed)[0][0, 10], base, atol=1e-6) != inside


def test_feedback_carries_state_past_every_attention_window():
    # windows of one token: without feedback position 10 sees only itself; with it, a recurrence reaches token 0
    idx = torch.randint(0, 20, (1, 11))
    changed = idx.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 20
    for feedback, reaches in ((0, False), (1, True)):
        model = tiny_model(attn_windows=[1, 1], feedback=feedback)
        assert torch.allclose(model(idx)[0][0, 10], model(changed)[0][0, 10], atol=1e-6) != reaches


def test_feedback_parallel_pass_equals_token_by_token_recurrence():
    model = tiny_model(feedback=1)
    idx = torch.randint(0, 20, (2, 9))
    parallel = model(idx)[0]
    cache = model.make_cache(2, model.config.block_size, "cpu", torch.float32)
    steps = torch.stack([model.next_logits(idx[:, t:t + 1], cache, t) for t in range(9)], 1)
    assert torch.allclose(parallel, steps, atol=1e-5)


def test_feedback_trains_under_bf16_autocast():
    # the GPU path: the recurrent pass's cache takes the autocast dtype (it was float32, and index_copy_ failed)
    model = tiny_model(feedback=1).train()
    x = torch.randint(0, 20, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, x)[1]
    loss.backward()
    assert torch.isfinite(loss)


def adamw_step(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 20, (2, 8))
    model(x, x)[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer, x


def test_growing_a_head_keeps_the_function_and_extends_optimizer_state():
    model = tiny_model(head_gates=True, grow_heads=True, layer_heads=[2, 2])
    optimizer, x = adamw_step(model)
    before = model(x)[0]
    attn = model.blocks[0].attn
    attn.edit_heads([0, 1], 1, [optimizer])
    assert attn.q_proj.weight.shape == (3 * 8, 32) and attn.kv_proj.weight.shape == (2 * 3 * 8, 32)
    assert attn.c_proj.weight.shape == (32, 3 * 8) and optimizer.state[attn.c_proj.weight]["exp_avg"].shape == (32, 24)
    assert torch.allclose(model(x)[0], before, atol=1e-6)  # same function at the moment of growth
    model(x, x)[1].backward()  # and training goes on
    optimizer.step()
    assert not torch.allclose(model(x)[0], before, atol=1e-4)


def test_update_heads_grows_open_layers_and_prunes_shut_heads():
    model = tiny_model(head_gates=True, grow_heads=True, layer_heads=[2, 2], grow_patience=2)
    optimizer, x = adamw_step(model)
    with torch.no_grad():
        model.blocks[0].attn.head_gate.fill_(1.0)  # sigmoid(10) > 0.9: all open
        model.blocks[1].attn.head_gate.copy_(torch.tensor([1.0, -1.0]))  # head 1 shut
    heads = options_of(model, HeadConfig)
    assert update_heads(model, heads, [optimizer]) == []  # patience: one step is not sustained
    update_heads(model, heads, [optimizer])
    assert heads.layer_heads == [3, 1]
    assert model.blocks[1].attn.head_gate.tolist() == [1.0]
    model(x, x)[1].backward()
    optimizer.step()


def test_resume_after_growth_equals_an_uninterrupted_run_and_samples(tiny_data):
    # grow_above=0: gates always count as open, so each layer grows every 3 steps up to 3 heads
    growth = dict(head_gates=True, grow_heads=True, layer_heads=[1, 1], grow_above=0.0, grow_patience=3,
                  max_heads=3, max_iters=12, eval_interval=6, dropout=0.0)
    whole = tiny_train_config(tiny_data, out_dir=str(tiny_data / "whole"), **growth)
    train.train(whole)
    split = tiny_train_config(tiny_data, out_dir=str(tiny_data / "split"), **growth | dict(max_iters=6),
                              lr_decay_iters=12)
    train.train(split)
    assert load_checkpoint(os.path.join(split["out_dir"], "ckpt.pt"))["model_args"]["layer_heads"] == [3, 3]
    train.train(split | {"max_iters": 12, "init_from": "resume"})
    a = [load_checkpoint(os.path.join(c["out_dir"], "ckpt.pt")) for c in (whole, split)]
    for name, tensor in a[0]["model"].items():
        assert torch.equal(tensor, a[1]["model"][name]), name
    model = load_model(a[1])
    idx = torch.zeros(1, 2, dtype=torch.long)
    assert torch.equal(model.generate(idx, 20, temperature=0.0), model.generate(idx, 20, temperature=0.0, use_cache=False))


def test_growth_with_compile_is_refused_with_the_reason(tiny_cfg):
    with pytest.raises(SystemExit, match="torch.compile"):
        train.train(tiny_cfg | dict(head_gates=True, grow_heads=True, compile=True))


@pytest.mark.parametrize("kw, match", [
    (dict(mlp_ratios=[4]), "mlp_ratios has 1 entries but the model has n_layer=2"),
    (dict(attn_windows=[4, 0, 4]), "attn_windows has 3 entries"),
    (dict(attn_windows=[17, 0]), "window 17 is outside 0..block_size=16"),
    (dict(mlp_ratios=[4, 0]), "every ratio must be > 0"),
    (dict(feedback=2), "feedback=2 must be 0"),
    (dict(grow_heads=True), "grow_heads needs head_gates=True"),
    (dict(layer_heads=[2, 2], n_kv_head=2), "grouped-query"),
    (dict(layer_heads=[2, 0]), "1..max_heads"),
])
def test_impossible_shapes_say_why(kw, match):
    with pytest.raises(ValueError, match=match):
        build_model(dict(vocab_size=20, block_size=16, n_layer=2, n_head=4, n_embd=32, **kw))
