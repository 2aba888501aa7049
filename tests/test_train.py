import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import plot
import prepare
import train
from training import lr_at
from checkpoint import load_checkpoint, save_checkpoint
from configurator import configure
from conftest import ROOT, tiny_train_config


def metrics(cfg):
    with open(os.path.join(cfg["out_dir"], "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses_by_step(rows):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def test_training_lowers_the_loss_and_writes_the_run_folder(tiny_cfg):
    train.train(tiny_cfg)
    rows = metrics(tiny_cfg)
    evals = [r for r in rows if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    for name in ("ckpt.pt", "best.pt", "config.json", "loss.png"):
        assert os.path.exists(os.path.join(tiny_cfg["out_dir"], name))
    assert load_checkpoint(os.path.join(tiny_cfg["out_dir"], "ckpt.pt"))["step"] == 20


def test_resume_continues_exactly(tiny_data):
    whole = tiny_train_config(tiny_data, out_dir=str(tiny_data / "whole"))
    train.train(whole)
    split = tiny_train_config(tiny_data, out_dir=str(tiny_data / "split"), max_iters=10, lr_decay_iters=20)
    train.train(split)
    train.train(split | {"max_iters": 20, "init_from": "resume"})
    a, b = losses_by_step(metrics(whole)), losses_by_step(metrics(split))
    assert a == b  # same steps, same losses, bit for bit (CPU)


def test_lr_schedules_warm_up_then_decay():
    lrs = [lr_at(s, 1.0, 0.1, 10, 100) for s in range(101)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and abs(lrs[100] - 0.1) < 1e-9
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    wsd = [lr_at(s, 1.0, 0.1, 10, 100, "wsd", 0.2) for s in range(101)]
    assert wsd[50] == 1.0 and wsd[79] == 1.0 and wsd[90] < 1.0 and abs(wsd[100] - 0.1) < 1e-9


def test_missing_dataset_says_which_prepare_command_creates_it(tmp_path):
    cfg = tiny_train_config(tmp_path, dataset="shakespeare_char")
    with pytest.raises(SystemExit, match="python prepare.py --dataset=shakespeare_char"):
        train.train(cfg)


def test_corpus_shorter_than_block_size_is_a_clear_error(tiny_data):
    with pytest.raises(SystemExit, match="too few for block_size=100000"):
        train.train(tiny_train_config(tiny_data, block_size=100000))


def test_resuming_with_a_larger_block_size_is_refused(tiny_cfg):
    train.train(tiny_cfg | {"max_iters": 2})
    with pytest.raises(SystemExit, match="larger than the checkpoint model's 16"):
        train.train(tiny_cfg | {"init_from": "resume", "block_size": 32})


def test_missing_truncated_and_foreign_checkpoints_explain_and_keep_files(tiny_cfg, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        train.train(tiny_cfg | {"init_from": "resume"})
    path = os.path.join(tiny_cfg["out_dir"], "ckpt.pt")
    os.makedirs(tiny_cfg["out_dir"], exist_ok=True)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(SystemExit, match="not a µLM checkpoint"):
        train.train(tiny_cfg | {"init_from": "resume"})
    save_checkpoint(path, {"x": torch.zeros(1000)})
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        train.train(tiny_cfg | {"init_from": "resume"})
    assert open(path, "rb").read() == data[: len(data) // 2]  # the bad file is reported, not replaced


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_cfg):
    train.train(tiny_cfg | {"max_iters": 10})
    path = os.path.join(tiny_cfg["out_dir"], "ckpt.pt")
    before = open(path, "rb").read()
    with pytest.raises(SystemExit, match="not finite"):
        train.train(tiny_cfg | {"init_from": "resume", "learning_rate": 1e30, "min_lr": 1e30, "warmup_iters": 0,
                                "grad_clip": 0.0, "max_iters": 30})
    assert open(path, "rb").read() == before


def start_training(cfg, lines=5):
    """train.py in a subprocess, returned once metrics.jsonl has `lines` rows."""
    args = [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in cfg.items()]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_path = os.path.join(cfg["out_dir"], "metrics.jsonl")
    deadline = time.time() + 60
    while time.time() < deadline and (not os.path.exists(metrics_path) or len(open(metrics_path).readlines()) < lines):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_save_a_checkpoint_that_resumes(tiny_data, sig):
    cfg = tiny_train_config(tiny_data, max_iters=100000, eval_interval=100000)
    proc = start_training(cfg)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "resume with --init_from=resume" in out
    assert load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"))["step"] > 0


def test_a_second_run_in_one_out_dir_is_refused_and_a_killed_run_frees_it(tiny_data):
    cfg = tiny_train_config(tiny_data, max_iters=100000, eval_interval=100000)
    proc = start_training(cfg)
    try:
        with pytest.raises(SystemExit, match="in use by a running job"):
            train.train(cfg | {"init_from": "resume"})
    finally:
        proc.kill()  # kill -9: the lock dies with the process
        proc.communicate(timeout=60)
    assert train.train(cfg | {"init_from": "resume", "max_iters": 2})  # ckpt.pt from step 0 resumes to step 2


def test_a_fresh_run_never_replaces_a_trained_one(tiny_cfg):
    train.train(tiny_cfg | {"max_iters": 10})
    ckpt, best = (os.path.join(tiny_cfg["out_dir"], n) for n in ("ckpt.pt", "best.pt"))
    before = open(best, "rb").read(), open(ckpt, "rb").read()
    with pytest.raises(SystemExit, match="already holds a run.*--init_from=resume.*--overwrite=True"):
        train.train(tiny_cfg | {"max_iters": 2})
    assert (open(best, "rb").read(), open(ckpt, "rb").read()) == before
    train.train(tiny_cfg | {"max_iters": 2, "overwrite": True})  # on purpose: the old run is moved aside
    [aside] = [d for d in os.listdir(tiny_cfg["out_dir"]) if d.startswith("replaced-")]
    assert open(os.path.join(tiny_cfg["out_dir"], aside, "best.pt"), "rb").read() == before[0]
    assert load_checkpoint(ckpt)["step"] == 2 and metrics(tiny_cfg)[0]["step"] == 0


def test_disk_full_while_saving_is_clear_and_keeps_the_good_checkpoint(tiny_cfg, monkeypatch):
    train.train(tiny_cfg | {"max_iters": 10})
    path = os.path.join(tiny_cfg["out_dir"], "ckpt.pt")
    before = open(path, "rb").read()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match="no space left on device while saving .*the previous file is kept"):
        train.train(tiny_cfg | {"init_from": "resume"})
    monkeypatch.undo()
    assert not [n for n in os.listdir(tiny_cfg["out_dir"]) if n.endswith(".tmp")]
    assert open(path, "rb").read() == before
    assert train.train(tiny_cfg | {"init_from": "resume"})  # the next resume is not blocked


def test_resume_refuses_a_remapped_character_vocabulary(tiny_cfg, tiny_data):
    train.train(tiny_cfg | {"max_iters": 2})
    path = os.path.join(tiny_cfg["out_dir"], "ckpt.pt")
    before = open(path, "rb").read()
    src = tiny_data / "tiny.txt"
    text = src.read_text()
    src.write_text(text.translate(str.maketrans("abcdefgh", "ABCDEFGH")))  # same vocabulary size, other characters
    prepare.prepare(configure(prepare.DEFAULTS, [f"--dataset={src}", "--name=tiny", "--tokenizer=char",
                                                 f"--data_dir={tiny_data / 'data'}"]))
    with pytest.raises(SystemExit, match="different character vocabulary"):
        train.train(tiny_cfg | {"init_from": "resume"})
    assert open(path, "rb").read() == before


def test_resume_flags_that_change_the_model_are_errors_naming_the_key(tiny_cfg):
    train.train(tiny_cfg | {"max_iters": 2})
    with pytest.raises(SystemExit, match=r"n_layer=3 \(checkpoint: 2\)"):
        train.train(tiny_cfg | {"init_from": "resume", "n_layer": 3})
    # keys left at their defaults take the checkpoint's values, and config.json records those
    plain = tiny_cfg | {k: train.DEFAULTS[k] for k in train.MODEL_KEYS if k != "block_size"}
    train.train(plain | {"init_from": "resume", "max_iters": 4})
    recorded = json.load(open(os.path.join(tiny_cfg["out_dir"], "config.json")))
    assert recorded["n_layer"] == 2 and recorded["dropout"] == tiny_cfg["dropout"]
    # dropout and activation checkpointing shape training, not the weights: a resume may change them
    train.train(tiny_cfg | {"init_from": "resume", "max_iters": 6, "dropout": 0.2, "checkpoint_activations": True})
    recorded = json.load(open(os.path.join(tiny_cfg["out_dir"], "config.json")))
    assert recorded["dropout"] == 0.2 and recorded["model_args"]["checkpoint_activations"] is True


def test_out_of_memory_says_which_setting_to_lower(tiny_cfg, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
    monkeypatch.setattr(train, "train_step", oom)
    with pytest.raises(SystemExit, match="out of memory with batch_size=4.*lower --batch_size"):
        train.train(tiny_cfg)


def test_resume_tolerates_a_torn_last_metrics_line(tiny_cfg, capsys):
    train.train(tiny_cfg | {"max_iters": 10})
    with open(os.path.join(tiny_cfg["out_dir"], "metrics.jsonl"), "a") as f:
        f.write('{"step": 11, "lo')  # killed mid-write
    train.train(tiny_cfg | {"init_from": "resume"})
    assert "torn last line" in capsys.readouterr().err
    assert [r["step"] for r in metrics(tiny_cfg) if "val_loss" in r] == [0, 10, 20]
    with open(os.path.join(tiny_cfg["out_dir"], "metrics.jsonl"), "a") as f:
        f.write('{"step": 21, "lo')
    plot.main([tiny_cfg["out_dir"], f"--out={tiny_cfg['out_dir']}/again.png"])  # plot.py skips it too
    assert os.path.exists(os.path.join(tiny_cfg["out_dir"], "again.png"))


def test_ctrl_c_twice_quits_at_once_with_a_message():
    from runtime import StopRequest
    said = []
    stop = StopRequest(say=said.append)
    stop._handle(signal.SIGINT, None)
    assert stop.requested and "saving a checkpoint" in said[0]
    with pytest.raises(SystemExit) as quit_now:
        stop._handle(signal.SIGINT, None)
    assert quit_now.value.code == 130 and "without saving" in said[1]


def test_fine_tuning_starts_a_fresh_run_from_another_runs_weights(tiny_cfg, tmp_path):
    train.train(tiny_cfg | {"max_iters": 10})
    source = load_checkpoint(os.path.join(tiny_cfg["out_dir"], "ckpt.pt"))
    tuned = tiny_cfg | {"out_dir": str(tmp_path / "tuned"), "init_from": tiny_cfg["out_dir"], "max_iters": 4,
                        "eval_interval": 2, "learning_rate": 1e-3}
    train.train(tuned | {"max_iters": 0})  # an evaluation only: the weights are the source's, unchanged
    start = load_checkpoint(os.path.join(tuned["out_dir"], "ckpt.pt"))
    assert start["step"] == 0 and all(torch.equal(v, source["model"][k]) for k, v in start["model"].items())
    train.train(tuned | {"overwrite": True})
    state = load_checkpoint(os.path.join(tuned["out_dir"], "ckpt.pt"))
    assert state["step"] == 4 and state["config"]["init_from"] == tiny_cfg["out_dir"]
    with open(os.path.join(tuned["out_dir"], "config.json")) as f:
        assert json.load(f)["init_from"] == tiny_cfg["out_dir"]


def test_fine_tuning_without_a_block_size_takes_the_checkpoints(tiny_cfg, tmp_path):
    train.train(tiny_cfg | {"max_iters": 2})
    tuned = tiny_cfg | {"out_dir": str(tmp_path / "tuned"), "init_from": tiny_cfg["out_dir"], "max_iters": 2,
                        "block_size": train.DEFAULTS["block_size"]}  # not set: the source's 16, not 1024
    train.train(tuned)
    assert load_checkpoint(os.path.join(tuned["out_dir"], "ckpt.pt"))["config"]["block_size"] == 16


def test_fine_tuning_on_another_tokenizer_or_from_an_int8_export_is_refused(tiny_cfg, tmp_path):
    import compress
    train.train(tiny_cfg | {"max_iters": 2})
    other = tmp_path / "other.txt"
    other.write_text("ABCDEFGHIJKLMNOPQRSTUVWXYZ " * 400)
    prepare.prepare(configure(prepare.DEFAULTS, [f"--dataset={other}", "--name=other", "--tokenizer=char",
                                                 f"--data_dir={tiny_cfg['data_dir']}"]))
    with pytest.raises(SystemExit, match="does not match the checkpoint"):
        train.train(tiny_cfg | {"dataset": "other", "out_dir": str(tmp_path / "a"), "init_from": tiny_cfg["out_dir"]})
    ckpt = os.path.join(tiny_cfg["out_dir"], "ckpt.pt")
    compress.export(configure(compress.DEFAULTS, [f"--ckpt={ckpt}", "--format=int8", "--measure=False"]))
    with pytest.raises(SystemExit, match="int8 inference export"):
        train.train(tiny_cfg | {"out_dir": str(tmp_path / "b"), "init_from": ckpt.replace(".pt", "_int8.pt")})
    with pytest.raises(SystemExit, match="does not exist"):
        train.train(tiny_cfg | {"out_dir": str(tmp_path / "c"), "init_from": str(tmp_path / "nowhere")})


def test_fine_tuning_from_a_float_export_on_new_text_of_the_same_characters(tiny_cfg, tmp_path):
    import compress
    train.train(tiny_cfg | {"max_iters": 4})
    source = os.path.join(tiny_cfg["out_dir"], "ckpt.pt")
    exported = compress.export(configure(compress.DEFAULTS, [f"--ckpt={source}", "--format=float32",
                                                             "--measure=False"]))
    text = (tmp_path / "tiny.txt").read_text()[::-1]  # other text, the same character set
    (tmp_path / "reversed.txt").write_text(text)
    prepare.prepare(configure(prepare.DEFAULTS, [f"--dataset={tmp_path / 'reversed.txt'}", "--name=reversed",
                                                 "--tokenizer=char", f"--data_dir={tiny_cfg['data_dir']}"]))
    tuned = tiny_cfg | {"dataset": "reversed", "out_dir": str(tmp_path / "tuned"), "init_from": exported,
                        "max_iters": 0}
    train.train(tuned)
    start, weights = load_checkpoint(os.path.join(tuned["out_dir"], "ckpt.pt")), load_checkpoint(source)["model"]
    assert start["step"] == 0 and start["config"]["init_from"] == exported
    assert all(torch.equal(v, weights[k]) for k, v in start["model"].items())


def test_resuming_an_export_or_a_checkpoint_without_optimizer_state_says_why(tiny_cfg):
    train.train(tiny_cfg | {"max_iters": 2})
    path = os.path.join(tiny_cfg["out_dir"], "ckpt.pt")
    state = load_checkpoint(path)
    save_checkpoint(path, {k: v for k, v in state.items() if k not in ("format", "kind", "rng")})
    with pytest.raises(SystemExit, match="cannot be resumed: it has no rng"):
        train.train(tiny_cfg | {"init_from": "resume"})
    save_checkpoint(path, {k: v for k, v in state.items() if k not in ("format", "kind")}, kind="export")
    with pytest.raises(SystemExit, match="inference export"):
        train.train(tiny_cfg | {"init_from": "resume"})
    broken = dict(state["model"])
    broken.pop(next(iter(broken)))
    save_checkpoint(path, {k: v for k, v in state.items() if k not in ("format", "kind")} | {"model": broken})
    with pytest.raises(SystemExit, match="does not match the model"):
        train.train(tiny_cfg | {"init_from": "resume"})
