"""
An LLM GAN, the auto Turing test (issue 33, item 3; research note 002): "pit two LLMs against each other
... the Discriminator being a classifier which tries to guess if the Generator's predictions were from a
human".

    python experiments/turing.py config/turing_shakespeare_char.py

The discriminator is a µLM with a one-logit head on the mean of its last hidden states; it starts as a
copy of the generator (the model against itself: it already knows the language, and only has to learn
what gives the generator away). Rounds alternate: the discriminator learns to tell real training windows
from the generator's continuations of real prompts, then the generator learns from the discriminator's
score by REINFORCE (Williams 1992: the score's log-odds minus the batch mean, times the log-likelihood of
its own sample) with the language-model loss on real text beside it as an anchor. Text is sampled, so
no gradient passes from discriminator to generator (Yu et al. 2017, SeqGAN, take the same route).

The discriminator reads the training split only (TRAIN): val stays a held-out measure of the generator.
"""
import copy
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import get_batch
from model import GPT

TRAIN = "train"  # the only split the discriminator (and the generator's updates) ever read


@dataclasses.dataclass
class Adversarial:
    """One round's settings."""
    length: int = 64            # tokens the discriminator reads: a real prompt, then real text or a sample
    prompt: int = 16            # real tokens a sample continues (the same for both classes)
    batch_size: int = 32        # real and fake windows per discriminator step; samples per generator step
    d_steps: int = 2            # discriminator steps per round
    g_steps: int = 1            # generator steps per round
    d_lr: float = 1e-4
    g_lr: float = 3e-5
    adv_weight: float = 1.0     # the REINFORCE term's weight (0: the generator learns only the language-model loss)
    lm_weight: float = 1.0      # the anchor: the language-model loss on a real batch
    temperature: float = 1.0    # the generator samples at this temperature
    d_init: str = "copy"        # the discriminator's body: a copy of the generator, or "fresh" (new weights, same shape)
    d_warmup: int = 0           # discriminator steps before the first round (0: none); why: started as a copy of
                                # the generator with a zero head, it stayed at chance through 120 alternating steps
                                # (EXPERIMENTS.md), so its rewards were ~0 and the generator's REINFORCE term did nothing

    def __post_init__(self):
        if not 0 < self.prompt < self.length:
            raise ValueError(f"prompt={self.prompt} must be at least 1 and shorter than length={self.length}")
        for name in ("batch_size", "d_steps", "g_steps", "d_lr", "g_lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.d_init not in ("copy", "fresh"):
            raise ValueError(f"d_init must be copy or fresh, got {self.d_init!r}")
        if self.d_warmup < 0:
            raise ValueError(f"d_warmup must be >= 0, got {self.d_warmup!r}")
        if self.adv_weight < 0 or self.lm_weight < 0:
            raise ValueError(f"adv_weight and lm_weight must be >= 0, got {self.adv_weight}, {self.lm_weight}")


class Discriminator(nn.Module):
    """A µLM body (a copy of a generator) with a one-logit head on the mean of its final hidden states:
    the log-odds that a window is real text."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)  # starts undecided (0.5) rather than with a random opinion
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_generator(cls, generator, init="copy"):
        """init="fresh": new weights of the generator's shape. Why: a calibrated generator's own samples look
        typical to it, so a copy may start from features that do not tell them from real text."""
        if init == "copy":
            return cls(copy.deepcopy(generator))
        if type(generator) is not GPT:
            raise ValueError(f"d_init=fresh builds a plain GPT of the generator's shape; this generator is a "
                             f"{type(generator).__name__}: use d_init=copy")
        return cls(GPT(generator.config).to(next(generator.parameters()).device))

    def forward(self, idx):
        h = self.body.hidden(idx)  # (B, T, C)
        return self.head(h.mean(1)).squeeze(-1)  # (B,)


def real_windows(meta, n, length, generator, device):
    """n windows of the training split (n, length)."""
    x, _ = get_batch(meta, TRAIN, n, length, generator, device)
    return x


@torch.no_grad()
def samples(model, prompts, length, temperature, seed):
    """The generator's continuations of prompts (B, P) to `length` tokens (B, length)."""
    was_training = model.training
    model.eval()
    out = model.generate(prompts, length - prompts.size(1), temperature=temperature, seed=seed)
    model.train(was_training)
    return out


def discriminator_step(disc, optimizer, real, fake):
    """One binary cross-entropy step on real (label 1) and fake (label 0) windows; returns (loss, accuracy)."""
    disc.train()
    logits = disc(torch.cat([real, fake]))  # (2B,)
    labels = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).to(logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), ((logits > 0).float() == labels).float().mean().item()


@torch.no_grad()
def accuracy(disc, real, fake):
    """The share of real and fake windows the discriminator labels right (0.5: it cannot tell)."""
    disc.eval()
    return 0.5 * ((disc(real) > 0).float().mean() + (disc(fake) <= 0).float().mean()).item()


def generator_step(model, optimizer, disc, prompts, lm_batch, settings, seed):
    """One generator step: REINFORCE on the discriminator's log-odds for its own samples (a batch-mean
    baseline), per sampled token, plus the language-model loss on the real batch lm_batch (x, y).
    Returns {"reward": the samples' mean log-odds of being real, "pg": the REINFORCE loss, "lm": the LM loss}."""
    fake = samples(model, prompts, settings.length, settings.temperature, seed)  # (B, length)
    disc.eval()
    with torch.no_grad():
        reward = disc(fake)  # (B,)
    advantage = reward - reward.mean()
    model.train()
    P = prompts.size(1)
    _, nll = model(fake[:, :-1].contiguous(), fake[:, 1:].contiguous(), reduction="none")  # (B, length - 1)
    log_likelihood = -nll[:, P - 1:].mean(1)  # (B,): per sampled token, the prompt's tokens left out
    pg = -(advantage * log_likelihood).mean()
    lm = model(*lm_batch)[1]
    loss = settings.adv_weight * pg + settings.lm_weight * lm
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return {"reward": reward.mean().item(), "pg": pg.item(), "lm": lm.item()}


def fake_windows(model, meta, settings, generator, seed):
    """batch_size of the generator's continuations of real training prompts (B, length)."""
    device = next(model.parameters()).device
    prompts = real_windows(meta, settings.batch_size, settings.length, generator, device)[:, :settings.prompt]
    return samples(model, prompts, settings.length, settings.temperature, seed)


def discriminator_steps(model, disc, d_opt, meta, settings, generator, seed, steps):
    """`steps` discriminator steps on fresh real and sampled windows; returns [(loss, accuracy)]."""
    device = next(model.parameters()).device
    return [discriminator_step(disc, d_opt, real_windows(meta, settings.batch_size, settings.length, generator, device),
                               fake_windows(model, meta, settings, generator, seed + k)) for k in range(steps)]


def adversarial_round(model, disc, g_opt, d_opt, meta, settings, generator, seed):
    """One round: the discriminator's accuracy on fresh windows (before it learns this round), its steps,
    then the generator's. generator: a torch.Generator for the data windows; seed: the sampling seeds'
    base. Reads the training split only. Returns the round's numbers."""
    device = next(model.parameters()).device
    B, L, P = settings.batch_size, settings.length, settings.prompt
    row = {"accuracy": accuracy(disc, real_windows(meta, B, L, generator, device),
                                fake_windows(model, meta, settings, generator, seed * 1000))}
    d = discriminator_steps(model, disc, d_opt, meta, settings, generator, seed * 1000 + 1, settings.d_steps)
    row |= {"d_loss": sum(x[0] for x in d) / len(d), "d_train_accuracy": sum(x[1] for x in d) / len(d)}
    g = []
    for k in range(settings.g_steps):
        prompts = real_windows(meta, B, L, generator, device)[:, :P]
        lm_batch = get_batch(meta, TRAIN, B, L, generator, device)
        g.append(generator_step(model, g_opt, disc, prompts, lm_batch, settings, seed * 1000 + 500 + k))
    return row | {key: sum(x[key] for x in g) / len(g) for key in g[0]}


# ----------------------------------------------------------------------------- outside measures of the samples

def ngrams(text, n):
    return [text[i:i + n] for i in range(len(text) - n + 1)]


def distinct_n(texts, n):
    """Unique n-grams over all n-grams of the texts (Li et al. 2016): low when samples repeat themselves."""
    grams = [g for t in texts for g in ngrams(t, n)]
    return len(set(grams)) / max(1, len(grams))


def overlap(texts, reference, n):
    """The share of the texts' n-grams that occur in the reference set (held-out text's n-grams): how much
    of what the generator writes is something a human (Shakespeare) also wrote."""
    grams = [g for t in texts for g in ngrams(t, n)]
    return sum(g in reference for g in grams) / max(1, len(grams))
