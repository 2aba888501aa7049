"""Every script's bad values, from one table: each must stop with a non-zero exit and a message naming
the key or file, never a traceback, and leave everything under the run and data folders as it was.

A row is (script, arguments, a phrase the message must contain). In the arguments {run} is a trained
run folder, {data} its data folder, {tmp} a scratch folder holding the bad files made below.
"""
import os
import subprocess
import sys

import pytest

import bench
import plot
import prepare
import sample
import swarm
import train
import world
from checkpoint import save_checkpoint
from conftest import ROOT, tiny_train_config

TRAIN = ["--data_dir={data}", "--dataset=tiny", "--out_dir={run}", "--device=cpu", "--n_layer=2", "--n_head=2",
         "--n_embd=32", "--block_size=16", "--batch_size=4", "--eval_iters=2"]
RESUME = [*TRAIN, "--init_from=resume"]
FRESH = [*TRAIN, "--out_dir={tmp}/fresh"]  # errors found after the out_dir is claimed
WORLD = ["--out_dir={tmp}/world", "--device=cpu"]
SWARM = ["--out_dir={tmp}/swarm", "--checkpoints=['{tmp}/ok.txt']"]  # a file: these errors come before any worker

CASES = [
    # train.py
    ("train", [*TRAIN, "--batch_size=0"], "batch_size must be at least 1"),
    ("train", [*TRAIN, "--overwrite=True", "--n_head=3"], "bad model shape"),  # the old run stays where it is
    ("train", [*TRAIN, "--liger_ce=True", "--teacher={run}"], "liger_ce (a fused head + loss) makes no logits"),
    ("train", [*TRAIN, "--out_dir={tmp}/ok.txt/run"], "cannot write to"),
    ("prepare", ["--dataset={tmp}/ok.txt", "--name=x", "--data_dir={tmp}/ok.txt"], "cannot write to"),
    ("train", [*TRAIN, "--eval_interval=0"], "eval_interval must be at least 1"),
    ("train", [*TRAIN, "--eval_iters=0"], "eval_iters must be at least 1"),
    ("train", [*TRAIN, "--n_head=0"], "n_head must be at least 1"),
    ("train", [*TRAIN, "--gradient_accumulation_steps=0"], "gradient_accumulation_steps must be at least 1"),
    ("train", [*TRAIN, "--optimizer=sgd"], "optimizer must be adamw or muon"),
    ("train", [*TRAIN, "--schedule=linear"], "schedule must be cosine or wsd"),
    ("train", [*TRAIN, "--learning_rate=-0.001"], "learning_rate must not be negative"),
    ("train", [*TRAIN, "--max_iters=-5"], "max_iters must not be negative"),
    ("train", [*FRESH, "--fp8=True"], "fp8=True needs a CUDA GPU"),  # no GPU here (and in CI)
    ("train", [*TRAIN, "--init_from=restart"], "init_from must be scratch, resume, or a checkpoint"),
    ("train", [*TRAIN, "--dropout=1.5"], "dropout must be in [0, 1)"),
    ("train", [*FRESH, "--n_embd=33"], "n_embd=33 is not divisible by n_head=2"),
    ("train", [*TRAIN, "--bach_size=3"], "did you mean 'batch_size'"),
    ("train", [*TRAIN, "--batch_size=2.5"], "'batch_size' expects int"),
    ("train", [*TRAIN, "{tmp}/no_such_config.py"], "cannot read config file"),
    ("train", [*FRESH, "--device=tpu"], "device must be"),
    ("train", [*FRESH, "--dataset=nope"], "no dataset at"),
    ("train", [*FRESH, "--block_size=100000"], "too few for block_size=100000"),
    ("train", TRAIN, "already holds a run"),
    ("train", [*RESUME, "--n_layer=3"], "n_layer=3 (checkpoint: 2)"),
    ("train", [*RESUME, "--optimizer=muon"], "optimizer=adamw"),
    ("train", [*RESUME, f"--batch_size={10 ** 12}"], "out of memory with batch_size=1000000000000"),
    ("train", [*RESUME, "--out_dir={tmp}/empty_run"], "no checkpoint at"),
    ("train", [*RESUME, "--out_dir={tmp}/damaged_run"], "damaged µLM checkpoint: it has no model_args"),
    # prepare.py
    ("prepare", ["--data_dir={data}", "--dataset={tmp}/ok.txt", "--val_fraction=0.0"], "val_fraction must be"),
    ("prepare", ["--data_dir={data}", "--dataset={tmp}/ok.txt", "--val_fraction=1.5"], "val_fraction must be"),
    ("prepare", ["--data_dir={data}", "--dataset={tmp}/ok.txt", "--tokenizer=bpe"], "tokenizer must be gpt2 or char"),
    ("prepare", ["--data_dir={data}", "--dataset={tmp}/nope.txt"], "nope.txt' is neither a known name"),
    ("prepare", ["--data_dir={data}", "--dataset={tmp}/bad.jsonl"], "bad.jsonl:2: not a JSON line"),
    ("prepare", ["--data_dir={data}", "--dataset={tmp}/nofield.jsonl"], "nofield.jsonl:1: no text field 'text'"),
    ("prepare", ["--data_dir={data}", "--dataset={tmp}/latin.txt"], "latin.txt is not UTF-8"),
    ("prepare", ["--data_dir={data}", "--dataset={tmp}/empty.txt"], "empty.txt: too little text"),
    ("prepare", ["--data_dir={data}", "--dataset=tinystories", "--tokenizer=char"], "a character tokenizer"),
    # sample.py
    ("sample", ["--out_dir={run}", "--device=cpu", "--top_k=0"], "top_k must be"),
    ("sample", ["--out_dir={run}", "--device=cpu", "--top_p=1.5"], "top_p must be"),
    ("sample", ["--out_dir={run}", "--device=cpu", "--temperature=-1.0"], "temperature must be"),
    ("sample", ["--out_dir={run}", "--device=cpu", "--num_samples=0"], "num_samples and max_new_tokens"),
    ("sample", ["--out_dir={run}", "--device=cpu", "--start=FILE:{tmp}"], "is a folder, not a file"),
    ("sample", ["--out_dir={run}", "--device=cpu", "--start=FILE:{tmp}/nope.txt"], "nope.txt does not exist"),
    ("sample", ["--out_dir={run}", "--device=cpu", "--start=FILE:{tmp}/latin.txt"], "latin.txt is not UTF-8"),
    ("sample", ["--out_dir={run}", "--device=cpu", "--start=ZZZ~"], "not in this character vocabulary"),
    ("sample", ["--out_dir={tmp}/empty_run", "--device=cpu"], "no checkpoint at"),
    ("sample", ["--ckpt={tmp}/garbage.pt", "--device=cpu"], "garbage.pt is unreadable"),
    ("sample", ["--ckpt={run}", "--device=cpu"], "is a folder; give a checkpoint file"),
    ("sample", ["--ckpt={tmp}/damaged_run/ckpt.pt", "--device=cpu"], "damaged µLM checkpoint: it has no model_args"),
    # plot.py
    ("plot", ["--out={tmp}/x.png"], "usage: python plot.py RUN_DIR"),
    ("plot", ["{tmp}/nope", "--out={tmp}/x.png"], "no metrics at"),
    ("plot", ["{run}", "--out={tmp}/x.png", "--x=time"], "x must be step or train_time"),
    ("plot", ["{tmp}/broken_run", "--out={tmp}/x.png"], "metrics.jsonl:2: not a JSON line"),
    # bench.py
    ("bench", ["--suite=tpu", "--device=cpu", "--out={tmp}/b.json"], "suite must be gpu or cpu"),
    ("bench", ["--suite=cpu", "--parts=nope", "--device=cpu", "--out={tmp}/b.json"], "unknown parts ['nope']"),
    ("bench", ["--suite=gpu", "--device=cpu", "--out={tmp}/b.json"], "the gpu suite needs a CUDA device"),
    # world.py
    ("world", [*WORLD, "--mode=dream"], "mode must be one of evaluate"),
    ("world", [*WORLD, "--mode=imitate"], "mode must be one of evaluate"),
    ("world", [*WORLD, "--eval_interval=0"], "eval_interval must be at least 1"),
    ("world", [*WORLD, "--episodes_per_update=0"], "episodes_per_update must be at least 1"),
    ("world", [*WORLD, "--learning_rate=-0.1"], "learning_rate must not be negative"),
    ("world", [*WORLD, "--teacher_noise=1.5"], "teacher_noise must be between 0 and 1"),
    ("world", [*WORLD, "--replay_size=10"], "replay_recent_window=256 is larger than replay_size=10"),
    # ({{ and }} are braces: the arguments go through str.format)
    ("world", [*WORLD, "--tasks={{'arith': {{'colour': 'red'}}}}"], "bad options"),
    ("world", [*WORLD, "--tasks={{'chess': {{}}}}"], "unknown task 'chess'"),
    ("world", [*WORLD, "--changes=[(5, 'guess', {{'low': 1}})]"], "bad options"),
    ("world", [*WORLD, "--init_from=resume"], "nothing to resume"),
    ("world", [*WORLD, "--init_from={tmp}/nope.pt"], "no policy at"),
    ("world", [*WORLD, "--init_from={tmp}/garbage.pt"], "garbage.pt is unreadable"),
    ("world", [*WORLD, "--init_from={run}"], "its character vocabulary lacks"),  # a model trained on other text
    ("world", [*WORLD, "--episods=3"], "did you mean 'episodes'"),
    # swarm.py
    ("swarm", [*SWARM, "--temperatures=[1.0, -1]"], "temperatures must be numbers >= 0"),
    ("swarm", [*SWARM, "--task_options={{'colour': 'red'}}"], "bad options"),
    ("swarm", [*SWARM, "--task=chess"], "unknown task 'chess'"),
    ("swarm", [*SWARM, "--workers=0"], "workers must be at least 1"),
    ("swarm", [*SWARM, "--checkpoints=['{tmp}/nope.pt']"], "no checkpoint at"),
    ("swarm", [*SWARM, "--aggregators=['vote']"], "unknown aggregator 'vote'"),
    ("swarm", [*SWARM, "--aggregators=['guide']"], "needs --guide"),
    ("swarm", [*SWARM, "--reply_timeout=0.0"], "reply_timeout and start_timeout must be positive"),
]
MAINS = {"train": train.main, "prepare": prepare.main, "sample": sample.main, "plot": plot.main, "bench": bench.main,
         "world": world.main, "swarm": swarm.main}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A trained tiny run, its data, and a scratch folder of bad files; shared by every row."""
    base = tmp_path_factory.mktemp("bad_input")
    tmp = base / "tmp"
    tmp.mkdir()
    (tmp / "tiny.txt").write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n"
                                          for i in range(200)))
    prepare.main([f"--dataset={tmp / 'tiny.txt'}", "--name=tiny", "--tokenizer=char", f"--data_dir={base / 'data'}"])
    train.train(tiny_train_config(base, out_dir=str(base / "run"), max_iters=2))
    (tmp / "ok.txt").write_text("some text\n" * 20)
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp / "nofield.jsonl").write_text('{"body": "no text key"}\n')
    (tmp / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp / "empty.txt").write_text("")
    (tmp / "garbage.pt").write_bytes(b"not a checkpoint at all")
    save_checkpoint(str(tmp / "damaged_run" / "ckpt.pt"), {"model": {}})  # the format tag, but no model_args
    (tmp / "broken_run").mkdir()
    (tmp / "broken_run" / "metrics.jsonl").write_text('{"step": 0, "val_loss": 3.0}\n{"step": 1,\n{"step": 2}\n')
    return {"run": str(base / "run"), "data": str(base / "data"), "tmp": str(tmp), "base": base}


def snapshot(base):
    """Every file's bytes under base (the .lock files that hold no data aside)."""
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("script, args, phrase", CASES, ids=[f"{c[0]} {' '.join(c[1][-1:])}" for c in CASES])
def test_bad_input_stops_with_a_message_and_changes_nothing(folders, script, args, phrase, capsys):
    before = snapshot(folders["base"])
    argv = [a.format(**folders) for a in args]
    with pytest.raises(SystemExit) as stop:  # any other exception would be a traceback for the user
        MAINS[script](argv)
    message = str(stop.value.code)
    assert stop.value.code not in (0, None), message
    assert phrase in message, message
    assert snapshot(folders["base"]) == before


def test_a_bad_value_on_the_command_line_prints_no_traceback(folders):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--batch_size=0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "batch_size must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr
