import json

import numpy as np
import pytest
import torch

import adversarial
from adversarial import Adversarial, Discriminator
from data import open_dataset
from model import GPT, GPTConfig


def tiny_dataset(tmp_path):
    """train.bin of tokens 0-9, val.bin of tokens 10-19: a read of val shows in the tokens."""
    folder = tmp_path / "toy"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(0, 10, 4000).astype(np.uint16).tofile(folder / "train.bin")
    rng.integers(10, 20, 1000).astype(np.uint16).tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 20, "train_tokens": 4000,
                                                  "val_tokens": 1000}))
    return open_dataset(str(tmp_path), "toy", 16)


def tiny_generator():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16))


SETTINGS = Adversarial(length=16, prompt=4, batch_size=4, d_steps=2, g_steps=1, d_lr=1e-3, g_lr=1e-3)


def test_discriminator_scores_each_window_and_starts_undecided():
    disc = Discriminator.from_generator(tiny_generator())
    logits = disc(torch.randint(0, 20, (3, 16)))
    assert logits.shape == (3,) and torch.all(logits == 0)


def test_the_discriminator_is_a_copy_not_the_generator_itself():
    generator = tiny_generator()
    disc = Discriminator.from_generator(generator)
    assert not set(map(id, disc.parameters())) & set(map(id, generator.parameters()))


def test_a_round_runs_learns_and_reads_only_the_training_split(tmp_path, monkeypatch):
    meta = tiny_dataset(tmp_path)
    seen = []
    real_get_batch = adversarial.get_batch

    def watched(meta, split, *args, **kwargs):
        x, y = real_get_batch(meta, split, *args, **kwargs)
        seen.append((split, int(x.max())))
        return x, y
    monkeypatch.setattr(adversarial, "get_batch", watched)
    generator = tiny_generator()
    disc = Discriminator.from_generator(generator)
    before = [p.detach().clone() for p in generator.parameters()]
    g_opt = torch.optim.AdamW(generator.parameters(), lr=SETTINGS.g_lr)
    d_opt = torch.optim.AdamW(disc.parameters(), lr=SETTINGS.d_lr)
    row = adversarial.adversarial_round(generator, disc, g_opt, d_opt, meta, SETTINGS, torch.Generator().manual_seed(0), 0)
    assert {"accuracy", "d_loss", "reward", "pg", "lm"} <= set(row) and 0 <= row["accuracy"] <= 1
    assert seen and all(split == "train" and top < 10 for split, top in seen)  # never a val token
    assert any(not torch.equal(a, b) for a, b in zip(before, generator.parameters()))
    assert disc.head.weight.abs().sum() > 0


def test_discriminator_warmup_trains_the_discriminator_alone_on_training_windows(tmp_path, monkeypatch):
    meta = tiny_dataset(tmp_path)
    seen = []
    real_get_batch = adversarial.get_batch

    def watched(meta, split, *args, **kwargs):
        seen.append(split)
        return real_get_batch(meta, split, *args, **kwargs)
    monkeypatch.setattr(adversarial, "get_batch", watched)
    generator = tiny_generator()
    disc = Discriminator.from_generator(generator)
    before = [p.detach().clone() for p in generator.parameters()]
    d_opt = torch.optim.AdamW(disc.parameters(), lr=SETTINGS.d_lr)
    steps = adversarial.discriminator_steps(generator, disc, d_opt, meta, SETTINGS, torch.Generator().manual_seed(0),
                                            0, 3)
    assert len(steps) == 3 and all(0 <= accuracy <= 1 for _, accuracy in steps)
    assert seen and set(seen) == {"train"}
    assert all(torch.equal(a, b) for a, b in zip(before, generator.parameters()))  # the generator is untouched
    assert disc.head.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="d_warmup"):
        Adversarial(d_warmup=-1)
    with pytest.raises(ValueError, match="d_init"):
        Adversarial(d_init="random")
    fresh = Discriminator.from_generator(generator, "fresh")
    assert all(a.shape == b.shape for a, b in zip(fresh.body.parameters(), generator.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(fresh.body.parameters(), generator.parameters()))


def test_without_the_adversarial_term_the_generator_gets_the_lm_gradient_only(tmp_path):
    """adv_weight=0 (the control arm): the step equals a plain LM step, whatever the discriminator says."""
    meta = tiny_dataset(tmp_path)
    grads = []
    for bias in (0.0, 5.0):
        generator = tiny_generator()
        disc = Discriminator.from_generator(generator)
        torch.nn.init.normal_(disc.head.weight)
        disc.head.bias.data.fill_(bias)
        prompts = torch.zeros(4, 4, dtype=torch.long)
        lm_batch = adversarial.get_batch(meta, "train", 4, 16, torch.Generator().manual_seed(1), torch.device("cpu"))
        opt = torch.optim.SGD(generator.parameters(), lr=0.0)
        adversarial.generator_step(generator, opt, disc, prompts, lm_batch,
                                   Adversarial(length=16, prompt=4, adv_weight=0.0), seed=0)
        grads.append(torch.cat([p.grad.flatten() for p in generator.parameters()]))
    assert torch.allclose(grads[0], grads[1])


def test_outside_measures():
    assert adversarial.distinct_n(["abab"], 2) == pytest.approx(2 / 3)
    assert adversarial.overlap(["abcd"], {"ab", "cd"}, 2) == pytest.approx(2 / 3)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="prompt=16"):
        Adversarial(length=16, prompt=16)
