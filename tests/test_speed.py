import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import train
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
    bench.main(["--suite=cpu", f"--out={out}"])
    results = json.loads(out.read_text())["results"]
    assert "not finite" in results["cpu_quick"]["error"] and results["recipe"]["tokens_per_s"] == 5.0


def test_bench_names_what_it_cannot_do(tmp_path):
    import bench
    with pytest.raises(SystemExit, match="unknown parts"):
        bench.main(["--suite=cpu", "--parts=train", f"--out={tmp_path / 'b.json'}"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            bench.main(["--suite=gpu", f"--out={tmp_path / 'b.json'}"])
