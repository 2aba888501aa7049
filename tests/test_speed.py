import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import train
from training import StepOptions, train_step
from conftest import ROOT, tiny_train_config
from muon import Muon, orthogonalize


def val_losses(cfg):
    with open(os.path.join(cfg["out_dir"], "metrics.jsonl")) as f:
        return [(r["step"], r["val_loss"]) for r in map(json.loads, f) if "val_loss" in r]


def test_newton_schulz_makes_singular_values_near_one():
    G = torch.randn(64, 32) @ torch.diag(torch.logspace(-1, 1, 32))  # singular values over 100x
    s = torch.linalg.svdvals(orthogonalize(G))
    assert s.min() > 0.5 and s.max() < 1.3


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", optimizer="muon", muon_lr=0.02)
    muon, decayed = opt.param_groups  # no vector parameters: the norms have no gains
    assert isinstance(opt, Muon) and muon["muon"] and muon["lr"] == 0.02
    assert len(muon["params"]) == 2 * 5  # per layer: q, kv and out projections, MLP in and out
    assert decayed["params"] == [model.wte.weight] and not decayed["muon"]  # tied with the head
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_muon_trains_a_tiny_model_and_resumes_exactly(tiny_data):
    muon = dict(optimizer="muon", muon_lr=0.02, dropout=0.0)
    whole = tiny_train_config(tiny_data, out_dir=str(tiny_data / "whole"), **muon)
    train.train(whole)
    evals = val_losses(whole)
    assert evals[-1][1] < evals[0][1] - 0.5
    split = tiny_train_config(tiny_data, out_dir=str(tiny_data / "split"), max_iters=10, lr_decay_iters=20, **muon)
    train.train(split)
    train.train(split | {"max_iters": 20, "init_from": "resume"})
    assert val_losses(whole) == val_losses(split)


def test_resuming_with_another_optimizer_is_refused(tiny_cfg):
    train.train(tiny_cfg | {"max_iters": 2})
    with pytest.raises(SystemExit, match="optimizer=adamw"):
        train.train(tiny_cfg | {"init_from": "resume", "optimizer": "muon"})


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tiny_data, optimizer):
    # two gloo processes with 2 accumulation steps in all (1 each) see the same data as one process with 2:
    # the validation losses must agree to float rounding
    common = dict(dropout=0.0, max_iters=6, eval_interval=3, gradient_accumulation_steps=2, optimizer=optimizer)
    single = tiny_train_config(tiny_data, out_dir=str(tiny_data / "one"), **common)
    train.train(single)
    ddp = tiny_train_config(tiny_data, out_dir=str(tiny_data / "two"), **common)
    args = [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in ddp.items()]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # its own session, so a hang kills the launcher and both workers, never leaving orphans behind
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env | {"OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail("two-process DDP run hung for 120 s:\n" + out[-2000:] + err[-2000:])
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    one, two = val_losses(single), val_losses(ddp)
    assert [s for s, _ in one] == [s for s, _ in two] == [0, 3, 6]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(one, two)), (one, two)
    assert one[-1][1] < one[0][1]


def test_a_failing_bench_part_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    import bench
    def broken(cfg, b, device):
        raise SystemExit("loss is not finite at step 7")  # how train.py stops a diverging run
    monkeypatch.setitem(bench.PARTS, "cpu_quick", broken)
    monkeypatch.setitem(bench.PARTS, "nanogpt_recipe", lambda cfg, b, device: {"recipe": {"tokens_per_s": 5.0}})
    out = tmp_path / "bench.json"
    bench.main(["--suite=cpu", "--parts=cpu_quick,nanogpt_recipe", f"--out={out}"])  # the rest: minutes, untested here
    results = json.loads(out.read_text())["results"]
    assert "not finite" in results["cpu_quick"]["error"] and results["recipe"]["tokens_per_s"] == 5.0


def test_bench_names_what_it_cannot_do(tmp_path):
    import bench
    with pytest.raises(SystemExit, match="unknown parts"):
        bench.main(["--suite=cpu", "--parts=train", f"--out={tmp_path / 'b.json'}"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            bench.main(["--suite=gpu", f"--out={tmp_path / 'b.json'}"])


# ----------------------------------------------------------------------------- issue 16's speed levers

def twin_models(**options):
    """A tiny GPT and a copy with the same weights built with the given speed options."""
    torch.manual_seed(0)
    args = dict(vocab_size=70, block_size=16, n_layer=2, n_head=2, n_embd=32)
    from model import GPT, GPTConfig
    plain, fast = GPT(GPTConfig(**args)), GPT(GPTConfig(**args, **options))  # speed options are the core's
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def test_chunked_cross_entropy_matches_the_full_loss_and_gradients():
    plain, chunked = twin_models(ce_chunks=4)
    x, y = torch.randint(70, (3, 15)), torch.randint(70, (3, 15))  # 45 rows: chunks of 12, 12, 12 and 9
    y[0, :5] = -1  # ignored targets (input noise makes them) count in neither
    logits, loss = plain(x, y)
    no_logits, chunked_loss = chunked(x, y)
    assert logits is not None and no_logits is None  # the fused path never makes the logits
    loss.backward()
    chunked_loss.backward()
    assert torch.allclose(loss, chunked_loss, atol=1e-6)
    for p, q in zip(plain.parameters(), chunked.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    with torch.no_grad():  # evaluation takes the full path: logits and the same loss
        eval_logits, eval_loss = chunked(x, y)
    assert eval_logits is not None and torch.allclose(eval_loss, loss, atol=1e-6)


def test_chunked_cross_entropy_traces_into_one_compiled_graph():
    _, chunked = twin_models(ce_chunks=2)
    x = torch.randint(70, (2, 16))
    compiled = torch.compile(chunked, backend="aot_eager", fullgraph=True)  # a graph break would raise
    loss = compiled(x, x)[1]
    loss.backward()
    assert torch.allclose(loss, chunked(x, x)[1], atol=1e-6)


def test_flex_attention_matches_sdpa():
    plain, flex = twin_models(attention="flex")
    x = torch.randint(70, (2, 16))
    with torch.no_grad():  # FlexAttention has no backward on the CPU; the GPU lever trains with it
        assert torch.allclose(plain(x, x)[1], flex(x, x)[1], atol=1e-5)


def test_static_gradients_step_like_the_default(tiny_cfg):
    # CUDA graphs need gradients zeroed in place, not set to None: the step must not change
    models = twin_models()
    for model in models:
        model.train()
    optimizers = [m.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu") for m in models]
    batches = [(torch.randint(70, (2, 16)), torch.randint(70, (2, 16))) for _ in range(6)]
    for model, opt, static in zip(models, optimizers, (False, True)):
        source = iter(batches)
        batch = next(source)
        for _ in range(2):
            _, batch = train_step(model, [opt], batch, lambda: next(source, batches[0]),
                                  StepOptions(2, 1.0, torch.autocast("cpu", enabled=False), keep_grads=static))
    assert all(p.grad is None for p in models[0].parameters())
    assert all(p.grad is not None and not p.grad.any() for p in models[1].parameters())
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.allclose(p, q, atol=1e-6)


def test_best_lever_combines_the_levers_that_beat_default(monkeypatch, tmp_path):
    import bench
    speeds = {(): 100.0, (("batch_size", 32),): 120.0, (("ce_chunks", 8),): 100.5,
              (("compile_options", "triton.cudagraphs"),): 110.0}

    def fake(cfg, b, device, lever):
        key = tuple((k, next(iter(v)) if isinstance(v, dict) else v) for k, v in lever.items())
        return dict(tokens_per_s=speeds.get(key, 150.0), ms_per_step=1.0)
    monkeypatch.setattr(bench, "measure_lever", fake)
    results = dict(bench.part_levers({}, {"levers": "batch32,ce_chunks8,cudagraphs,best", "lever_budget_s": 0}, "cpu"))
    # ce_chunks8's 0.5% is noise; the two others join, their Inductor options united
    assert results["lever_best"]["lever"] == dict(compile_options={"triton.cudagraphs": True}, batch_size=32)
    assert results["lever_best"]["ratio_to_default"] == 1.5
    assert results["lever_batch32"]["ratio_to_default"] == 1.2


def test_compile_options_need_compile(tiny_cfg):
    tiny_cfg.update(compile_options={"triton.cudagraphs": True})
    with pytest.raises(SystemExit, match="compile=True"):
        train.train(tiny_cfg)


def test_char_best_runs_and_summarises_each_config(tmp_path, tiny_data):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import char_best
    out = tmp_path / "char_best"
    char_best.main(["--smoke=True", "--device=cpu", f"--out={out}", f"--data_dir={tiny_data / 'data'}",
                    "--configs={'plain': ['--dataset=tiny'], 'broken': ['--dataset=tiny', '--dropout=2.0']}",
                    "--seeds=[1]", "--parallel=2", "--stagger_s=0"])
    report = json.loads((out / "char_best.json").read_text())
    assert report["configs"]["plain"]["seeds"] == 1 and report["configs"]["plain"]["mean"] > 0
    assert report["configs"]["broken"]["mean"] is None and "dropout" in report["runs"]["broken"]["1"]["error"]
    assert report["runs"]["plain"]["1"]["finished"] and report["configs"]["plain"]["stopped_early"] == 0
    assert (out / "char_best.png").exists()


def test_bf16_residual_acts_only_under_autocast():
    plain, bf16 = twin_models(bf16_residual=True)
    x = torch.randint(70, (2, 16))
    assert torch.equal(plain(x, x)[1], bf16(x, x)[1])  # no autocast: the same fp32 model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain.hidden(x).dtype == torch.float32 and bf16.hidden(x).dtype == torch.bfloat16
        assert abs(plain(x, x)[1].item() - bf16(x, x)[1].item()) < 0.01


def test_parity_runs_see_the_same_windows_in_training_and_evaluation(monkeypatch):
    import bench
    runs = {}

    def fake(config, b, device, target, overrides, name):
        runs[name] = overrides
        return {name: dict(curve=[(0, 0.0, 10.0), (50, 1.0, 9.0 if name == "parity_default" else 9.01)])}
    monkeypatch.setattr(bench, "time_to_loss", fake)
    monkeypatch.setattr(bench, "plot_runs", lambda dirs, png: None)
    results = bench.part_parity({"batch_size": 12}, {"parity_lever": {"ce_chunks": 8, "batch_size": 48},
                                                     "parity_steps": 300, "smoke": False, "out_dir": "o", "out": "b.json",
                                                     "config": "config/gpu_124m.py"},
                                "cpu")
    default, lever = runs["parity_default"], runs["parity_lever"]
    assert lever["ce_chunks"] == 8 and default["dataset"] == lever["dataset"] == "shakespeare"
    assert 12 * default["gradient_accumulation_steps"] == 48 * lever["gradient_accumulation_steps"]
    assert 12 * default["eval_iters"] == 48 * lever["eval_iters"]
    assert results["parity_max_val_difference"] == pytest.approx(0.01)
    with pytest.raises(SystemExit, match="must divide"):
        bench.part_parity({"batch_size": 12}, {"parity_lever": {"batch_size": 40}, "parity_steps": 300, "smoke": False}, "cpu")


def test_char_best_retries_a_run_out_of_memory_once_and_stops_runs_at_the_deadline(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import char_best
    marker = tmp_path / "tried"
    first_oom = (f"import os, sys, time; p = {str(marker)!r}\n"
                 "if not os.path.exists(p): open(p, 'w').close(); print('CUDA out of memory'); sys.exit(1)")
    commands = {"oom_once": first_oom, "slow": "import time; time.sleep(60)"}
    monkeypatch.setattr(char_best, "run_command", lambda cfg, name, seed: (
        [sys.executable, "-c", commands[name]], str(tmp_path / name)))
    cfg = dict(configs={"oom_once": [], "slow": []}, seeds=[1], parallel=2, out=str(tmp_path), deadline_s=4, stagger_s=0)
    done = char_best.run_all(cfg)
    assert done[("oom_once", 1)][0] == 0  # the second start succeeded
    assert done[("slow", 1)][0] != 0 and done[("slow", 1)][2] < 30  # stopped at the deadline, not after 60 s


def test_shakespeare_char_noise_config_is_the_measured_char_best_candidate():
    """config/shakespeare_char_noise.py read after shakespeare_char_best.py is the char_best.py run behind the
    1.3960 in BENCHMARKS.md (noise_block1024_3000), key for key but the out_dir."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import char_best
    from configurator import parse_value, read_config_file
    best = read_config_file(os.path.join(ROOT, "config", "shakespeare_char_best.py"))
    shipped = best | read_config_file(os.path.join(ROOT, "config", "shakespeare_char_noise.py"))
    measured = dict(best)
    for arg in char_best.DEFAULTS["configs"]["noise_block1024_3000"]:
        key, value = arg[2:].split("=", 1)
        measured[key] = parse_value(value)
    shipped.pop("out_dir"), measured.pop("out_dir")
    assert shipped == measured


def test_decode_lengths_times_each_length_twice_and_writes_its_json(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import decode_lengths
    monkeypatch.chdir(ROOT)  # it measures the tree it is run from
    out = tmp_path / "lengths.json"
    decode_lengths.main(["--device=cpu", "--dtype=float32", "--n_layer=1", "--n_head=2", "--n_embd=16",
                         "--block_size=64", "--vocab_size=32", "--lengths=[3, 20]", f"--out={out}"])
    result = json.loads(out.read_text())
    assert [c["new_tokens"] for c in result["first_pass"] + result["second_pass"]] == [3, 20, 3, 20]
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert result["code"]["commit"] == head  # the checkout whose model.py ran
    assert result["second_pass_s"] == pytest.approx(sum(c["seconds"] for c in result["second_pass"]))
    with pytest.raises(SystemExit, match="dtype must be"):
        decode_lengths.main(["--device=cpu", "--dtype=float64", f"--out={out}"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device here"):
            decode_lengths.main([f"--out={out}"])


def test_code_version_names_the_checkout_holding_the_measured_file_and_whether_it_is_dirty(tmp_path):
    from runtime import code_version
    repo = tmp_path / "tree"
    repo.mkdir()
    (repo / "model.py").write_text("x = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q"], ["add", "model.py"], ["commit", "-qm", "one file"]):
        subprocess.run(git + args, check=True, capture_output=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert code_version(str(repo / "model.py")) == {"commit": head, "dirty": False, "tree": str(repo)}
    (repo / "notes.txt").write_text("not code")  # untracked and not .py: still clean
    assert code_version(str(repo / "model.py"))["dirty"] is False
    (repo / "model.py").write_text("x = 2\n")
    assert code_version(str(repo / "model.py"))["dirty"] is True
    copy = repo / "before"  # a tree unpacked by git archive inside another checkout: not that checkout's commit
    copy.mkdir()
    (copy / "model.py").write_text("x = 0\n")
    assert code_version(str(copy / "model.py"))["commit"] is None
    outside = tmp_path / "loose.py"  # in no checkout at all
    outside.write_text("")
    assert code_version(str(outside)) == {"commit": None, "dirty": None, "tree": str(tmp_path)}
