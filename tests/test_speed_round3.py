"""Round three's levers and bench parts (issue 32), on the CPU: each lever's seam, its parity with the default on a
tiny model where the CPU can run it, and the parts' bookkeeping (results saved as they come, one failure recorded
while the rest run). The GPU numbers come from experiments/speed_round3_gpu.sh."""
import json
import sys
import types

import pytest
import torch

import bench
import speed
from model import GPT, GPTConfig
from muon import Muon


def tiny(**options):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=70, block_size=16, n_layer=2, n_head=2, n_embd=32, **options))


def test_liger_ce_takes_the_loss_through_speed_and_matches_the_full_loss(monkeypatch):
    # Liger's kernels need a GPU; a stand-in with its contract (h (B, T, C), weight, targets -> mean loss) shows the
    # seam hands it the same tensors the full path uses, so the loss and gradients match
    calls = []

    def stand_in(h, weight, targets):
        calls.append(h.shape)
        return speed.chunked_cross_entropy(h, weight, targets, 3)
    monkeypatch.setattr(speed, "liger_cross_entropy", stand_in)
    plain, fused = tiny(), tiny(liger_ce=True)
    x, y = torch.randint(70, (2, 16)), torch.randint(70, (2, 16))
    y[0, :4] = -1
    logits, loss = plain(x, y)
    none, fused_loss = fused(x, y)
    loss.backward()
    fused_loss.backward()
    assert none is None and calls == [(2, 16, 32)] and torch.allclose(loss, fused_loss, atol=1e-5)
    for p, q in zip(plain.parameters(), fused.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5)
    with torch.no_grad():  # evaluation keeps its logits
        assert fused(x, y)[0] is not None


def test_liger_ce_without_liger_kernel_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", None)
    model = tiny(liger_ce=True)
    with pytest.raises(SystemExit, match="pip install liger-kernel"):
        model(torch.randint(70, (1, 8)), torch.randint(70, (1, 8)))
    with pytest.raises(ValueError, match="set one of them"):
        tiny(liger_ce=True, ce_chunks=4)


def test_float8_training_asks_torchao_for_the_named_recipe(monkeypatch):
    import runtime
    asked = []
    float8 = types.ModuleType("torchao.float8")
    float8.Float8LinearConfig = types.SimpleNamespace(from_recipe_name=lambda name: asked.append(name) or name)
    float8.convert_to_float8_training = lambda model, module_filter_fn, config: (model, config)
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.float8", float8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    model = tiny()
    assert runtime.float8_training(model) == (model, "tensorwise")  # the default path, as before
    assert runtime.float8_training(model, recipe="rowwise")[1] == "rowwise" and asked == ["tensorwise", "rowwise"]


def test_an_sdpa_lever_holds_its_backend_while_it_runs_and_then_lets_go():
    from torch.nn.attention import SDPBackend
    before = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()
    with bench.lever_context(dict(sdpa="math")):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        assert not torch._functorch.config.enable_autograd_cache  # its key leaves the backend out
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == before
    assert speed.sdpa_backends("cudnn") == [SDPBackend.CUDNN_ATTENTION]
    with pytest.raises(ValueError, match="sdpa backend"):
        speed.sdpa_backends("fastest")


def test_an_activation_budget_lever_sets_the_partitioners_budget_only_while_it_runs():
    budget = torch._functorch.config.activation_memory_budget
    with bench.lever_context(dict(activation_budget=0.5)):
        assert torch._functorch.config.activation_memory_budget == 0.5
    assert torch._functorch.config.activation_memory_budget == budget


def test_regional_compilation_compiles_each_block_and_trains_like_the_whole_model(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(type(self).__name__))
    cfg = bench.script_config("train.py", ["config/gpu_124m.py"])
    cfg.update(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=2)
    b = dict(data_dir="/nonexistent")
    run = bench.build(cfg, b, torch.device("cpu"), True, lever=dict(compile_blocks=True))
    assert compiled == ["Block", "Block"] and run["model"] is run["raw"]


def test_a_part_that_yields_keeps_each_result_when_it_fails_midway(tmp_path, monkeypatch):
    def part(cfg, b, device):
        yield "first", {"tokens_per_s": 1.0}
        raise RuntimeError("compile ran out of time")
    monkeypatch.setitem(bench.PARTS, "cpu_quick", part)
    monkeypatch.setitem(bench.PARTS, "nanogpt_recipe", lambda cfg, b, device: {"recipe": {"tokens_per_s": 5.0}})
    out = tmp_path / "bench.json"
    bench.main(["--suite=cpu", "--parts=cpu_quick,nanogpt_recipe", f"--out={out}"])
    results = json.loads(out.read_text())["results"]
    assert results["first"]["tokens_per_s"] == 1.0 and "out of time" in results["cpu_quick"]["error"]
    assert results["recipe"]["tokens_per_s"] == 5.0


def test_gpu_1b_levers_are_each_measured_against_the_first_and_a_failing_one_is_recorded(monkeypatch):
    seen = []

    def fake(cfg, b, device, fast, steps, batch_size=None, lever=None, **shape):
        seen.append((batch_size, dict(lever), shape["checkpoint_activations"], cfg["gradient_accumulation_steps"]))
        if lever.get("fp8"):
            raise SystemExit("fp8=True needs a CUDA GPU")
        return dict(tokens_per_s=100.0 if lever.get("compile_blocks") and shape["checkpoint_activations"] else 130.0,
                    mfu=0.4)
    monkeypatch.setattr(bench, "measure_training", fake)
    b = dict(smoke=True, gpu_1b_accum=16, levers_1b="blocks,fp8,batch4_no_ckpt")
    results = dict(bench.part_gpu_1b({}, b, "cpu"))
    assert results["gpu_1b_blocks"]["ratio_to_first"] == 1.0
    assert results["gpu_1b_batch4_no_ckpt"]["ratio_to_first"] == 1.3
    assert "CUDA" in results["gpu_1b_fp8"]["error"]
    assert seen[2][0] == 4 and seen[2][2] is False and all(s[3] == 16 for s in seen)
    assert seen[0][1]["optimizer"] == "muon"  # gpu_1b's own optimizer in every lever
    with pytest.raises(SystemExit, match="unknown levers_1b"):
        dict(bench.part_gpu_1b({}, b | {"levers_1b": "fastest"}, "cpu"))


def test_torch_muon_updates_like_ours():
    torch.manual_seed(0)
    weights = [torch.randn(32, 16) * 0.02, torch.randn(16, 48) * 0.02]
    grads = [torch.randn_like(w) for w in weights]
    ours, theirs = ([torch.nn.Parameter(w.clone()) for w in weights] for _ in range(2))
    for a, b, g in zip(ours, theirs, grads):
        a.grad, b.grad = g.clone(), g.clone()
    with torch.no_grad():
        Muon([{"params": ours, "muon": True, "lr": 0.02}], momentum=0.95).step()
    torch.optim.Muon(theirs, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, adjust_lr_fn="original").step()
    for a, b, w in zip(ours, theirs, weights):  # theirs orthogonalises in bf16, ours in fp32 on a CPU
        a, b = a.detach(), b.detach()
        assert float((a - w).sub(b - w).norm() / (a - w).norm()) < 0.03, (a - b).norm()


def test_decode_part_times_each_mode_and_checks_its_tokens_against_the_first(tmp_path):
    out = tmp_path / "decode.json"
    bench.main(["--suite=gpu", "--smoke=True", "--device=cpu", "--parts=decode", "--decode_modes=eager,graph",
                f"--out={out}"])
    results = json.loads(out.read_text())["results"]
    assert results["decode_b1_eager"]["tokens_per_s"] > 0 and results["decode_b16_graph"]["same_tokens_as_first_mode"]
    assert results["decode_sampled_b1_graph"]["same_64_tokens_as_first_mode"]
    bench.main(["--suite=gpu", "--smoke=True", "--device=cpu", "--parts=decode", "--decode_modes=warp", f"--out={out}"])
    assert "unknown decode_modes" in json.loads(out.read_text())["results"]["decode"]["error"]


def test_sample_py_part_runs_sample_py_in_each_tree_and_gives_the_ratio(tmp_path):
    out = tmp_path / "sample.json"
    bench.main(["--suite=cpu", "--parts=sample_py", "--new_tokens=20", "--sample_rounds=1", "--before_tree=.",
                f"--out_dir={tmp_path}", f"--out={out}", "--config=config/cpu_quick.py"])
    results = json.loads(out.read_text())["results"]
    assert results["sample_py"]["tokens_per_s"] > 0 and len(results["sample_py"]["rounds"][0]) == 2
    assert results["sample_py_before_tree"]["ratio_to_sample_py"] > 0
