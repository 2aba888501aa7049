import pytest
import torch

from architecture import build_model
from generation import cache_length, sample_next_token
from model import GPT, GPTConfig, Rotary


def tiny_model(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=32) | kw
    return GPT(GPTConfig(**args)).eval()


def test_changing_a_future_token_never_changes_earlier_logits():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 50
    a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_rope_scores_depend_only_on_relative_position():
    rotary = Rotary(head_size=16, max_len=64, base=10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    def score(m, n):
        return (rotary(q, torch.tensor([m])) * rotary(k, torch.tensor([n]))).sum()
    assert torch.allclose(score(3, 1), score(40, 38), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


@pytest.mark.parametrize("n_kv_head", [0, 2])
def test_kv_cache_generation_matches_no_cache_token_for_token(n_kv_head):
    model = tiny_model(n_kv_head=n_kv_head)
    idx = torch.randint(0, 50, (3, 5))
    # 40 new tokens run past block_size=32, so the cache refill path is covered too
    cached = model.generate(idx, 40, temperature=0.0, use_cache=True)
    plain = model.generate(idx, 40, temperature=0.0, use_cache=False)
    assert torch.equal(cached, plain)


def test_cached_chunks_match_full_forward():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 12))
    full = model.hidden(idx)
    cache = model.make_cache(2, model.config.block_size, "cpu", torch.float32)
    parts = [model.hidden(idx[:, :5], cache, 0), model.hidden(idx[:, 5:9], cache, 5),
             model.hidden(idx[:, 9:], cache, torch.tensor([9]))]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_compiled_decode_step_matches_eager_without_recompiling():
    torch._dynamo.reset()
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 4))
    eager = model.generate(idx, 12, temperature=0.0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = model.generate(idx, 12, temperature=0.0, compile=True)
        # another length in the same power of two reuses the compiled step (16 cache slots both times)
        shorter = model.generate(idx, 10, temperature=0.0, compile=True)
    assert torch.equal(compiled, eager) and torch.equal(shorter, eager[:, :14])


def test_cache_length_rounds_what_a_generation_needs_up_to_a_power_of_two():
    assert cache_length(20, 1024) == 32 and cache_length(32, 1024) == 32 and cache_length(33, 1024) == 64
    assert cache_length(528, 1024) == 1024 and cache_length(900, 600) == 600  # never past the context


def test_per_token_losses_average_to_the_mean_loss():
    model = tiny_model()
    idx, targets = torch.randint(0, 50, (2, 10)), torch.randint(0, 50, (2, 10))
    per_token = model(idx, targets, reduction="none")[1]
    assert per_token.shape == (2, 10)
    assert torch.allclose(per_token.mean(), model(idx, targets)[1])


def test_sequence_longer_than_block_size_is_a_clear_error():
    with pytest.raises(ValueError, match="block_size"):
        tiny_model()(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("kw, match", [(dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"),
                                       (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_out_of_range_sampling_settings_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_model().generate(torch.zeros(1, 1, dtype=torch.long), 2, **kw)


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next_token(logits, 1.0, 1, None), greedy)
    assert torch.equal(sample_next_token(logits, 1.0, None, 1e-6), greedy)


def test_seeded_sampling_repeats_and_stop_token_ends_generation():
    model = tiny_model()
    idx = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(idx, 10, temperature=1.0, seed=7)
    assert torch.equal(a, model.generate(idx, 10, temperature=1.0, seed=7))
    stop = int(a[0, 3])
    b = model.generate(idx, 10, temperature=1.0, seed=7, stop_token=stop)
    assert int(b[0, -1]) == stop and b.size(1) <= 4


def test_weight_decay_applies_to_matrices_only():
    model = tiny_model()
    model.extra_gain = torch.nn.Parameter(torch.ones(32))  # stands for any vector parameter
    decayed, plain = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and plain["params"] == [model.extra_gain]


def test_tied_embeddings_share_one_matrix_and_counts_follow():
    tied, untied = tiny_model(), tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.num_params(False) - tied.num_params(False) == 64 * 32  # padded vocab x n_embd
    assert tied.num_params() == untied.num_params()
    assert 0 < tied.estimate_mfu(tokens_per_iter=1000, dt=1.0) < 1


@pytest.mark.parametrize("kw", [dict(n_embd=30, n_head=4), dict(n_head=4, n_kv_head=3), dict(memory_layers=[5])])
def test_impossible_shapes_are_rejected(kw):
    with pytest.raises(ValueError):
        build_model(dict(n_layer=2, n_embd=32, n_head=4) | kw)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    plain = GPT(config)
    checkpointed = GPT(GPTConfig(**{**config.__dict__, "checkpoint_activations": True}))
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randint(0, 50, (2, 16))
    losses = [m(x, x)[1] for m in (plain, checkpointed)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_attn_scale_is_the_logit_scale_and_zero_keeps_sdpas_own():
    idx = torch.randint(0, 50, (2, 16))
    default, explicit = tiny_model()(idx)[0], tiny_model(attn_scale=(32 // 4) ** -0.5)(idx)[0]
    assert torch.allclose(default, explicit, atol=1e-5)  # 1/sqrt(head size) is SDPA's default
    assert not torch.allclose(default, tiny_model(attn_scale=0.5)(idx)[0], atol=1e-3)
    with pytest.raises(ValueError, match="attn_scale"):
        tiny_model(attn_scale=-1.0)
    with pytest.raises(ValueError, match="attn_scale"):
        tiny_model(attn_scale=0.5, attention="flex")
