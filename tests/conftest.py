import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# the tests run in two processes on two cores (pytest -n 2): one torch thread each, here and in every script they
# start, rather than each script measuring the machine again (runtime.auto_threads); a test of the automatic
# choice removes it
os.environ.setdefault("OMP_NUM_THREADS", "1")

import prepare  # noqa: E402
import train  # noqa: E402
from configurator import configure  # noqa: E402


def tiny_train_config(tmp_path, **overrides):
    """A model small enough to train a few steps in well under a second on a CPU."""
    cfg = configure(train.DEFAULTS, [])
    cfg.update(out_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), dataset="tiny", device="cpu",
               n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, max_iters=20, eval_interval=10,
               eval_iters=2, log_interval=1, warmup_iters=2, learning_rate=3e-3, dropout=0.1)
    cfg.update(overrides)
    return cfg


@pytest.fixture
def tiny_data(tmp_path):
    """A small character dataset under tmp_path/data/tiny."""
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))
    src = tmp_path / "tiny.txt"
    src.write_text(text)
    cfg = configure(prepare.DEFAULTS, [f"--dataset={src}", "--name=tiny", "--tokenizer=char",
                                       f"--data_dir={tmp_path / 'data'}"])
    prepare.prepare(cfg)
    return tmp_path


@pytest.fixture
def tiny_cfg(tiny_data):
    return tiny_train_config(tiny_data)


@pytest.fixture
def tiny_policy(tmp_path):
    """A real policy checkpoint, untrained and tiny: its actions are nonsense, but every path runs
    (the swarm tests' real workers)."""
    import dataclasses

    import torch

    import tasks
    from checkpoint import save_checkpoint
    from model import GPT, GPTConfig
    from tokenizer import CharTokenizer
    torch.manual_seed(0)
    tokenizer = CharTokenizer(tasks.ALPHABET)
    config = GPTConfig(vocab_size=tokenizer.n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=16)
    path = str(tmp_path / "policy.pt")
    save_checkpoint(path, {"model_args": dataclasses.asdict(config), "model": GPT(config).state_dict(),
                           "tokenizer": tokenizer.meta()})
    return path
