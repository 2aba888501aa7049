"""Nothing lost, clear errors: compress.py writes exports beside training checkpoints, never over one;
sample.py says what is wrong with a truncated or damaged export; prepare.py says when it cannot write its
data_dir; a repeated SIGTERM (a parent-death signal can come several times) still saves."""
import errno
import hashlib
import os
import signal
import string

import pytest
import torch

import compress
import prepare
import sample
from architecture import build_model, model_args
from checkpoint import save_checkpoint
from configurator import configure
from runtime import StopRequest
from tokenizer import CharTokenizer

TOKENIZER = CharTokenizer(string.ascii_lowercase + " ")


@pytest.fixture
def run(tmp_path):
    """A run folder with a training checkpoint (a tiny random model; int4 groups of 32 fit its widths)."""
    model = build_model(dict(vocab_size=TOKENIZER.n_vocab, block_size=32, n_layer=2, n_head=2, n_embd=64))
    path = tmp_path / "run" / "ckpt.pt"
    path.parent.mkdir()
    save_checkpoint(str(path), {"model_args": model_args(model), "model": model.state_dict(), "step": 3,
                                "tokenizer": {**TOKENIZER.meta(), "vocab_size": TOKENIZER.n_vocab,
                                              "eot": TOKENIZER.eot}})
    return path


def export(src, out="", fmt="int8"):
    cfg = configure(compress.DEFAULTS, [])
    return compress.export({**cfg, "ckpt": str(src), "out": str(out), "format": fmt, "group_size": 32,
                            "device": "cpu", "measure": False})


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_an_export_never_overwrites_a_training_checkpoint(run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("ckpt.pt", "best.pt"):
        (other / name).write_bytes(run.read_bytes())
    before = {name: digest(other / name) for name in ("ckpt.pt", "best.pt")}
    for target in (other / "ckpt.pt", other / "best.pt", other / "ckpt_new.pt", other):
        if target.name == "ckpt_new.pt":
            target.write_bytes(run.read_bytes())  # a training checkpoint under any name
        with pytest.raises(SystemExit, match="--out="):
            export(run, out=target)
    assert {name: digest(other / name) for name in before} == before
    beside = export(run)  # the default: beside its source, named by its format
    assert os.path.basename(beside) == "ckpt_int8.pt" and os.path.dirname(beside) == str(run.parent)
    assert export(run, out=other / "model.pt") and export(run, out=other / "model.pt", fmt="int4")  # an export may be redone


def test_pruning_into_a_folder_another_process_holds_is_refused(run, tmp_path):
    from runtime import claim_out_dir
    held = claim_out_dir(str(tmp_path / "pruned"), resuming=True)  # a run starting there right now
    cfg = configure(compress.DEFAULTS, [])
    state = torch.load(run, weights_only=True)
    state["config"] = {"optimizer": "adamw", "weight_decay": 0.1, "learning_rate": 1e-3, "beta1": 0.9,
                       "beta2": 0.95, "muon_lr": 0.02, "memory_lr_scale": 10.0, "seed": 1}
    save_checkpoint(str(run), {k: v for k, v in state.items() if k not in ("format", "kind")})
    try:
        with pytest.raises(SystemExit, match="in use"):
            compress.prune({**cfg, "mode": "prune", "ckpt": str(run), "out_dir": str(tmp_path / "pruned"),
                            "method": "magnitude", "sparsity": 0.5, "device": "cpu", "eval_iters": 0,
                            "measure": False})
    finally:
        held.close()
    assert not (tmp_path / "pruned" / "ckpt.pt").exists()


def test_sample_says_what_is_wrong_with_a_truncated_or_damaged_export(run, tmp_path):
    out = export(run)
    data = open(out, "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        sample.main([f"--ckpt={truncated}", "--device=cpu", "--max_new_tokens=2"])
    state = torch.load(out, weights_only=True)
    state["model"]["blocks.0.attn.q_proj.q"] = state["model"]["blocks.0.attn.q_proj.q"][:-1]
    torch.save(state, tmp_path / "misshaped.pt")
    with pytest.raises(SystemExit, match="damaged or was edited"):
        sample.main([f"--ckpt={tmp_path / 'misshaped.pt'}", "--device=cpu", "--max_new_tokens=2"])
    del state["model"]["blocks.0.attn.q_proj.q"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(SystemExit, match="do not fit"):
        sample.main([f"--ckpt={tmp_path / 'missing.pt'}", "--device=cpu", "--max_new_tokens=2"])


def unwritable_folder(tmp_path):
    """A folder this process cannot create files in (root may write anywhere but /sys)."""
    if os.geteuid() == 0:
        if not os.path.isdir("/sys"):
            pytest.skip("running as root without /sys: no folder is read-only here")
        return "/sys/ulm-test-data"
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder)


def test_prepare_into_a_read_only_data_dir_is_a_clear_error(tmp_path):
    (tmp_path / "text.txt").write_text("some words to learn from\n" * 50)
    cfg = configure(prepare.DEFAULTS, [f"--dataset={tmp_path / 'text.txt'}", "--tokenizer=char",
                                       f"--data_dir={unwritable_folder(tmp_path)}"])
    with pytest.raises(SystemExit, match="cannot write .*--data_dir"):
        prepare.prepare(cfg)


def test_other_os_errors_of_prepare_are_not_disguised(tmp_path, monkeypatch):
    (tmp_path / "text.txt").write_text("some words to learn from\n" * 50)
    monkeypatch.setattr(prepare, "build", lambda cfg: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        prepare.prepare(configure(prepare.DEFAULTS, [f"--dataset={tmp_path / 'text.txt'}"]))


def test_sigterm_again_still_saves_while_ctrl_c_again_quits():
    said = []
    stop = StopRequest(say=said.append)
    stop._handle(signal.SIGTERM, None)
    stop._handle(signal.SIGTERM, None)  # a dying server's threads each hand the job on, each with a signal
    assert stop.requested and len(said) == 1 and "saving a checkpoint" in said[0]
    with pytest.raises(SystemExit):
        stop._handle(signal.SIGINT, None)  # a person pressing Ctrl-C again still quits at once
