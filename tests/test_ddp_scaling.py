import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import ddp_scaling  # noqa: E402

TINY = """dataset = "tiny"
n_layer = 2
n_head = 2
n_embd = 32
block_size = 16
batch_size = 4
gradient_accumulation_steps = 2
compile = False
"""


def tiny_model(tmp_path, speed_steps=3):
    config = tmp_path / "tiny_config.py"
    config.write_text(TINY)
    return "--models={'tiny': {'config': '%s', 'speed_steps': %d, 'loss_accum': 2}}" % (config, speed_steps)


def test_two_gloo_processes_train_the_same_model_as_one(tmp_path, tiny_data):
    out = tmp_path / "ddp"
    ddp_scaling.main([tiny_model(tmp_path), "--device=cpu", f"--out={out}", f"--data_dir={tiny_data / 'data'}",
                      "--loss_steps=6", "--loss_evals=2", "--loss_eval_iters=2", f"--scratch={tmp_path / 'scratch'}"])
    report = json.loads((out / "ddp_scaling.json").read_text())
    speed, loss = report["report"]["tiny"]["speed"], report["report"]["tiny"]["loss"]
    assert speed["ratio"] > 0 and speed["estimate"] == "median" and speed["ratio_mean"] > 0
    # seed A on one process and on two sees the same windows: only rounding separates them
    assert loss["step"] == 6 and loss["ddp_gap"] < 1e-4 < loss["seed_gap"] and loss["within_noise"]
    assert all(code == 0 for code in (r["exit_code"] for r in report["runs"].values()))
    assert not os.listdir(tmp_path / "scratch")  # checkpoints deleted, numbers kept beside the logs
    assert (out / "runs" / "tiny_loss_2gpu_seed1337" / "metrics.jsonl").exists()
    assert (out / "ddp_scaling.png").exists()


def test_a_run_printed_but_not_kept_is_read_from_its_log(tmp_path):
    # a run stopped before its metrics.jsonl left scratch still has its evaluations in its log
    run = tmp_path / "runs" / "m_speed_2gpu"
    run.mkdir(parents=True)
    config = {"batch_size": 8, "block_size": 1024, "gradient_accumulation_steps": 64, "compile": True}
    run.joinpath("log.txt").write_text(f"config: {json.dumps(config)}\nstep 0: train 11.0490, val 11.0373 (0.0 s of "
                                       "training)\nstep 5: train 9.6697, val 9.8280 (20.4 s of training)\nwarning\n")
    got = ddp_scaling.read_run({"out": str(tmp_path)}, "m_speed_2gpu")
    assert got["val"] == [(0, 11.0373), (5, 9.828)] and got["from_log"]
    assert got["mean_tokens_per_s"] == pytest.approx(8 * 1024 * 64 * 4 / 20.4)  # steps 2-5: step 1 compiled


def test_a_stopped_experiment_leaves_no_training_processes_and_reports_what_ran(tmp_path, tiny_data):
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments", "ddp_scaling.py"),
                             tiny_model(tmp_path, speed_steps=10 ** 6), "--device=cpu", f"--out={out}",
                             f"--data_dir={tiny_data / 'data'}", "--parts=['speed']"],
                            env=env | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    log = out / "runs" / "tiny_speed_1gpu" / "log.txt"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and "step 0:" in log.read_text()):
        time.sleep(0.5)
    time.sleep(2)  # a few training steps logged
    proc.send_signal(signal.SIGTERM)  # what a time limit sends
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ddp_scaling.py did not stop on SIGTERM")
    assert proc.returncode != 0 and "stopped before every run finished" in output
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not left, f"training processes left running: {left}"
    report = json.loads((out / "ddp_scaling.json").read_text())
    assert report["runs"]["tiny_speed_1gpu"]["exit_code"] is None  # stopped, not finished
    assert "tiny_speed_2gpu" not in report["runs"]  # never started
    assert (out / "runs" / "tiny_speed_1gpu" / "metrics.jsonl").exists()


@pytest.mark.parametrize("models, message", [
    ("{'m': {'config': 'config/gpu_124m.py', 'speed_steps': 3, 'loss_accum': 2, 'seqs': 1}}", "unknown keys"),
    ("{'m': {'config': 'config/nope.py', 'speed_steps': 3, 'loss_accum': 2}}", "an existing file"),
    ("{'m': {'config': 'config/gpu_124m.py', 'speed_steps': 3, 'loss_accum': 3}}", "multiple of gpus=2"),
])
def test_bad_models_are_refused_before_anything_runs(tmp_path, models, message):
    with pytest.raises(SystemExit, match=message):
        ddp_scaling.main([f"--models={models}", "--device=cpu", f"--out={tmp_path / 'ddp'}"])
    assert not (tmp_path / "ddp").exists()
