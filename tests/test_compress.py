import hashlib
import os

import pytest
import torch

import compress
import sample
import train
from checkpoint import load_checkpoint, load_model
from configurator import configure
from conftest import tiny_train_config
from model import GPT, GPTConfig
from shrink import (Int4Linear, Int8Linear, dequantize_int4, dequantize_int8, masked_weights, quantize_int4,
                    quantize_int8, two_four_mask)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny character model trained briefly (widths 64 and 256, so int4 groups of 32 fit)."""
    import prepare
    root = tmp_path_factory.mktemp("compress")
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))
    (root / "tiny.txt").write_text(text)
    prepare.prepare(configure(prepare.DEFAULTS, [f"--dataset={root / 'tiny.txt'}", "--name=tiny",
                                                 "--tokenizer=char", f"--data_dir={root / 'data'}"]))
    cfg = tiny_train_config(root, n_embd=64, n_head=4, max_iters=60, eval_interval=60, dropout=0.0)
    train.train(cfg)
    return cfg


def compress_cfg(**overrides):
    cfg = configure(compress.DEFAULTS, [])
    cfg.update(device="cpu", eval_iters=4, eval_batch_size=8, gen_tokens=16, measure=False, **overrides)
    return cfg


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def greedy(model, n=12):
    return model.generate(torch.zeros(1, 1, dtype=torch.long), n, temperature=0.0)[0].tolist()


def test_quantize_dequantize_error_is_within_half_a_step():
    w = torch.randn(48, 256)
    q, scale = quantize_int8(w)
    assert ((dequantize_int8(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-6).all()
    packed, scales_and_zeros = quantize_int4(w, 32)
    assert packed.shape == (48, 128) and packed.dtype == torch.uint8
    step = scales_and_zeros[..., 0].T.repeat_interleave(32, dim=1)  # each group's scale, per weight
    assert ((dequantize_int4(packed, scales_and_zeros) - w).abs() <= step / 2 + 1e-5).all()


def test_quantized_layers_compute_the_dequantized_matmul():
    w, x = torch.randn(64, 128), torch.randn(2, 3, 128)
    q, scale = quantize_int8(w)
    torch.testing.assert_close(Int8Linear(q, scale)(x), x @ dequantize_int8(q, scale).T, atol=1e-4, rtol=1e-4)
    layer = Int4Linear(*quantize_int4(w, 32))
    reference = x @ dequantize_int4(layer.packed, layer.scales_and_zeros).T
    layer.prepare()
    torch.testing.assert_close(layer(x), reference, atol=1e-3, rtol=1e-3)


def test_int8_gpu_paths_compute_the_dequantized_matmul(monkeypatch):
    """The eager slab-by-slab dequantise and the compiled decode's matvec (run here on the CPU)."""
    import shrink
    monkeypatch.setattr(shrink, "DEQUANT_SLAB_CPU", 64 * 5)  # 5 rows a slab: 24 rows take 5 slabs
    w, x = torch.randn(24, 64), torch.randn(2, 3, 64)
    layer = Int8Linear(*quantize_int8(w))
    reference = x @ dequantize_int8(layer.q, layer.scale).T
    torch.testing.assert_close(layer.chunked_matmul(x), reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.matvec(x[:1, :1]), reference[:1, :1], atol=1e-4, rtol=1e-4)


def test_compiled_int8_decode_on_the_cpu_gives_the_eager_tokens(trained, tmp_path):
    """sample.py --compile on a CPU: inductor's int8 matvec decodes the eager int8 model's greedy tokens."""
    torch._dynamo.reset()  # a decode step compiled by an earlier test would count as a recompile here
    out = compress.export(compress_cfg(ckpt=os.path.join(trained["out_dir"], "ckpt.pt"), format="int8",
                                       out=str(tmp_path / "int8.pt")))
    model = load_model(load_checkpoint(out))
    idx = torch.zeros(1, 1, dtype=torch.long)
    eager = model.generate(idx, 12, temperature=0.0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = model.generate(idx, 12, temperature=0.0, compile=True)
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_loaded_export_holds_each_weight_once(trained, tmp_path, fmt):
    """The model takes the file's tensors (int4 converts them in place): no second copy stays behind."""
    out = compress.export(compress_cfg(ckpt=os.path.join(trained["out_dir"], "ckpt.pt"), format=fmt, group_size=32,
                                       out=str(tmp_path / f"{fmt}.pt")))
    state = load_checkpoint(out)
    file_bytes = compress.weight_bytes(state["model"])
    model = load_model(state)
    assert "model" not in state  # the loader keeps no reference to the file's tensors
    tensors = [*model.parameters(), *model.buffers()]
    held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    assert held <= file_bytes + model.rotary.cos.nbytes + model.rotary.sin.nbytes
    assert model.lm_head.q is model.wte.q  # the tied head reads the embedding's int8 rows


def test_generation_cache_holds_the_tokens_it_needs_rounded_up_to_a_power_of_two(monkeypatch):
    import generation
    sizes = []
    real = generation.KVCache

    def recording(*args, **kwargs):
        cache = real(*args, **kwargs)
        sizes.append(cache.k[0].size(2))
        return cache
    monkeypatch.setattr(generation, "KVCache", recording)
    gpt = GPT(GPTConfig(vocab_size=32, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    gpt.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=0.0)
    gpt.generate(torch.zeros(1, 3, dtype=torch.long), 6, temperature=0.0)
    gpt.generate(torch.zeros(1, 3, dtype=torch.long), 100, temperature=0.0)  # past the context: block_size slots
    assert sizes[:2] == [8, 16] and sizes[-1] == 64


def test_int4_without_a_kernel_on_the_device_is_a_clear_error():
    layer = Int4Linear(*(t.to("meta") for t in quantize_int4(torch.randn(8, 64), 32)))
    with pytest.raises(SystemExit, match="int4 has no kernel on meta"):
        layer.prepare()


@pytest.mark.parametrize("fmt,max_loss_increase", [("int8", 0.02), ("int4", 0.15)])
def test_export_generates_like_the_float_model(trained, fmt, max_loss_increase):
    src = os.path.join(trained["out_dir"], "ckpt.pt")
    before = digest(src)
    out = compress.export(compress_cfg(ckpt=src, format=fmt, group_size=32))
    assert digest(src) == before  # the source is never modified
    state = load_checkpoint(out)
    assert state["kind"] == "export" and "optimizer" not in state
    assert os.path.getsize(out) < os.path.getsize(src) / 3
    quantized, dense = load_model(state), load_model(load_checkpoint(src))
    cfg = compress_cfg()
    loss_q, loss_f = (compress.val_loss_of(m, state, cfg, torch.device("cpu")) for m in (quantized, dense))
    assert loss_q - loss_f < max_loss_increase
    if fmt == "int8":
        assert greedy(quantized)[:8] == greedy(dense)[:8]


def test_export_round_trips_through_sample_and_the_measure_report(trained, capsys):
    out = compress.export(compress_cfg(ckpt=os.path.join(trained["out_dir"], "ckpt.pt"), format="int8",
                                       out=os.path.join(trained["out_dir"], "model_int8.pt")))
    sample.main([f"--ckpt={out}", "--max_new_tokens=8", "--device=cpu", "--start=line"])
    assert "8 tokens" in capsys.readouterr().err
    result = compress.measure(compress_cfg(ckpt=out))
    assert result["format"] == "int8" and result["decode_tokens_per_s"] > 0 and result["val_loss"] is not None


def test_float_export_keeps_the_tied_embedding_one_tensor(trained, tmp_path):
    out = compress.export(compress_cfg(ckpt=os.path.join(trained["out_dir"], "ckpt.pt"), format="bfloat16",
                                       out=str(tmp_path / "bf16.pt")))
    model = load_model(load_checkpoint(out))
    assert model.lm_head.weight is model.wte.weight and model.wte.weight.dtype == torch.bfloat16
    assert os.path.getsize(out) < 1.2 * compress.weight_bytes(load_checkpoint(out)["model"])


def test_bad_input_is_a_clear_error_and_keeps_the_source(trained, tmp_path):
    src = os.path.join(trained["out_dir"], "ckpt.pt")
    before = digest(src)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(SystemExit, match="not a µLM checkpoint"):
        compress.export(compress_cfg(ckpt=str(foreign)))
    with pytest.raises(SystemExit, match="does not divide"):
        compress.export(compress_cfg(ckpt=src, format="int4", group_size=128))
    with pytest.raises(SystemExit, match="group_size must be one of"):
        compress.export(compress_cfg(ckpt=src, format="int4", group_size=48))
    with pytest.raises(SystemExit, match="format must be"):
        compress.export(compress_cfg(ckpt=src, format="int3"))
    for sparsity in (1.0, -0.1):
        with pytest.raises(SystemExit, match=r"sparsity must be in \[0, 1\)"):
            compress.prune(compress_cfg(mode="prune", ckpt=src, sparsity=sparsity, out_dir=str(tmp_path / "p")))
    exported = compress.export(compress_cfg(ckpt=src, format="int8", out=str(tmp_path / "e.pt")))
    with pytest.raises(SystemExit, match="already an inference export"):
        compress.export(compress_cfg(ckpt=exported, format="int4", group_size=32))
    assert digest(src) == before


def test_magnitude_masks_survive_retraining_and_resume(trained, tmp_path):
    out_dir = str(tmp_path / "pruned")
    compress.prune(compress_cfg(mode="prune", ckpt=os.path.join(trained["out_dir"], "ckpt.pt"),
                                method="magnitude", sparsity=0.5, out_dir=out_dir))
    cfg = {**trained, "out_dir": out_dir, "init_from": "resume", "max_iters": 4, "eval_interval": 2}
    train.train(cfg)
    train.train({**cfg, "max_iters": 6})
    model = load_model(load_checkpoint(os.path.join(out_dir, "ckpt.pt")))
    masked = masked_weights(model)
    assert len(masked) == 5 * trained["n_layer"]  # q, kv, c_proj; c_fc, c_proj
    for weight, mask in masked:
        assert (weight[~mask] == 0).all() and (weight[mask] != 0).all()
        assert abs((~mask).float().mean().item() - 0.5) < 0.01


def test_two_four_mask_keeps_two_of_every_four():
    mask = two_four_mask(torch.randn(8, 32))
    assert (mask.view(8, -1, 4).sum(-1) == 2).all()


def test_pruned_heads_and_neurons_are_really_gone():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_embd=32)).eval()
    masked = GPT(model.config).eval()
    masked.load_state_dict(model.state_dict())
    # the masked model: zero the value rows and output columns of the heads, and the neurons, pruning drops
    with torch.no_grad():
        for block, twin in zip(model.blocks, masked.blocks):
            keep_heads = compress.head_scores(block.attn).topk(2).indices
            keep_neurons = compress.neuron_scores(block.ffn).topk(64).indices
            hs = block.attn.head_size
            for h in set(range(4)) - set(keep_heads.tolist()):
                twin.attn.kv_proj.weight[4 * hs + h * hs:4 * hs + (h + 1) * hs] = 0
                twin.attn.c_proj.weight[:, h * hs:(h + 1) * hs] = 0
            drop = torch.ones(128, dtype=torch.bool)
            drop[keep_neurons] = False
            twin.ffn.c_fc.weight[drop] = 0
    n_before = sum(p.numel() for p in model.parameters())
    compress.structured_prune(model, 0.5)
    assert sum(p.numel() for p in model.parameters()) < n_before
    assert model.blocks[0].attn.n_head == 2 and model.blocks[0].ffn.c_fc.weight.shape == (64, 32)
    idx = torch.randint(0, 32, (2, 10))
    torch.testing.assert_close(model(idx)[0], masked(idx)[0], atol=1e-5, rtol=1e-5)
    assert greedy(model) == greedy(masked)  # the KV cache takes the pruned layers' fewer heads


def test_structured_pruned_checkpoint_retrains_and_loads(trained, tmp_path):
    out_dir = str(tmp_path / "structured")
    compress.prune(compress_cfg(mode="prune", ckpt=os.path.join(trained["out_dir"], "ckpt.pt"),
                                method="structured", sparsity=0.5, out_dir=out_dir))
    train.train({**trained, "out_dir": out_dir, "init_from": "resume", "max_iters": 4, "eval_interval": 4})
    state = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    model = load_model(state)
    assert model.blocks[0].attn.n_head == 2 and state["step"] == 4
    assert len(greedy(model)) == 13


def test_a_quantized_feedback_model_runs():
    # feedback's recurrent pass sizes its cache from the rotary buffer: an int8 embedding has no .weight
    import shrink
    from architecture import build_model
    torch.manual_seed(0)
    model = build_model(dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, feedback=1)).eval()
    quantized = shrink.quantize_model(model, "int8", 32, torch.float32)
    assert quantized(torch.randint(0, 64, (1, 5)))[0].shape == (1, 5, 64)
