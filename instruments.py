"""
Instruments for watching a model learn, read off the validation batches train.py already evaluates.

    python train.py config/shakespeare_char.py --eval_position_loss=True --eval_token_watch=True

- Loss by position: the mean val loss at each position of the context (in position_buckets buckets).
  In-context learning shows as a curve that bends down with position (research notes, 002).
- Token-probability watch: the model's mean predicted distribution over the vocabulary against the
  val text's unigram distribution (KL both ways, the entropy of each), the mean entropy of the
  per-token predictions and the mean probability of the correct token, all over the real vocabulary
  (the distribution sampling draws from). Early training should go from
  flat (high entropy) to unigram-like (small KL) to context-dependent (per-token entropy far below the
  unigram's while the mean distribution stays unigram-like).
Both add metrics to the eval rows of metrics.jsonl and draw <out_dir>/instruments.png.
`--tensorboard=True` also writes every scalar to TensorBoard (<out_dir>/tensorboard) when it is installed.
"""
import math
import os

import numpy as np
import torch

from metrics import save_figure

UNIGRAM_MAX_TOKENS = 1 << 26  # the unigram is counted on at most this many val tokens (seconds, not minutes)


def unigram(meta, split="val"):
    """The token frequencies (V,) of a split of a prepared dataset, as probabilities."""
    data = np.memmap(os.path.join(meta["folder"], f"{split}.bin"), dtype=meta["dtype"], mode="r")
    counts = np.bincount(data[:UNIGRAM_MAX_TOKENS], minlength=meta["vocab_size"])[:meta["vocab_size"]]
    return torch.from_numpy(counts / counts.sum()).float()


def position_losses(token_losses, targets):
    """Sum and count of the loss at each position (T,), over the rows whose target is real (not -1)."""
    if targets is None:
        raise ValueError("loss by position needs targets: give the text whose loss to measure")
    valid = (targets >= 0).float()
    return (token_losses.float() * valid).sum(0), valid.sum(0)


def entropy(p, dim=-1):
    return -(p * p.clamp_min(1e-30).log()).sum(dim)


def kl(p, q):
    """KL(p || q) in nats; q is floored at 1e-12 so a token the unigram never saw costs a finite amount."""
    return (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-12).log())).sum()


class EvalInstruments:
    """Accumulates loss by position and the token-probability watch over an evaluation's batches."""

    def __init__(self, block_size, buckets, position_loss, token_watch, unigram_probs=None):
        if token_watch and unigram_probs is None:
            raise ValueError("the token-probability watch needs the corpus unigram distribution")
        self.block_size, self.buckets = block_size, max(1, min(buckets, block_size))
        self.position_loss, self.token_watch, self.unigram = position_loss, token_watch, unigram_probs
        self.reset()

    def reset(self):
        self.pos_sum = self.pos_count = self.mean_probs = None
        self.n_tokens = 0
        self.entropy_sum = self.p_correct_sum = 0.0

    @torch.no_grad()
    def update(self, logits, targets, token_losses):
        """One batch: logits (B, T, V), targets (B, T), token_losses (B, T) (cross-entropy per token)."""
        if self.position_loss:
            s, c = position_losses(token_losses, targets)
            self.pos_sum = s if self.pos_sum is None else self.pos_sum + s
            self.pos_count = c if self.pos_count is None else self.pos_count + c
        if self.token_watch:
            valid = targets.flatten() >= 0
            probs = logits.float().flatten(0, 1)[valid].softmax(-1)  # (N, V)
            total = probs.sum(0)
            self.mean_probs = total if self.mean_probs is None else self.mean_probs + total
            self.entropy_sum += entropy(probs).sum()
            self.p_correct_sum += probs.gather(1, targets.flatten()[valid, None]).sum()
            self.n_tokens += int(valid.sum())

    def summary(self):
        """The metrics of the batches seen since the last reset (then resets)."""
        row = {}
        if self.position_loss and self.pos_sum is not None:
            edges = np.linspace(0, self.pos_sum.numel(), self.buckets + 1).round().astype(int)
            s, c = self.pos_sum.cpu(), self.pos_count.cpu()
            row["position_loss"] = [(s[a:b].sum() / c[a:b].sum().clamp_min(1)).item() for a, b in zip(edges, edges[1:])]
            row["position_edges"] = edges.tolist()
        if self.token_watch and self.n_tokens:
            mean = (self.mean_probs / self.n_tokens).cpu()
            uni = self.unigram.to(mean.device)
            row.update(kl_unigram_model=kl(uni, mean).item(), kl_model_unigram=kl(mean, uni).item(),
                       entropy_mean_prediction=entropy(mean).item(), entropy_unigram=entropy(uni).item(),
                       entropy_per_token=float(self.entropy_sum / self.n_tokens),
                       p_correct=float(self.p_correct_sum / self.n_tokens))
        self.reset()
        return row


def plot_instruments(rows, png):
    """Heatmap of loss by position x step, its curves at a few steps, and the token watch over steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pos_rows = [r for r in rows if "position_loss" in r]
    watch_rows = [r for r in rows if "p_correct" in r]
    panels = (2 if pos_rows else 0) + (2 if watch_rows else 0)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    axes = list(np.atleast_1d(axes))
    if pos_rows:
        ax = axes.pop(0)
        grid = np.array([r["position_loss"] for r in pos_rows]).T  # (buckets, evals)
        edges = pos_rows[-1]["position_edges"]
        steps = [r["step"] for r in pos_rows]
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                       extent=(-0.5, len(steps) - 0.5, edges[0], edges[-1]))
        ax.set_xticks(range(len(steps))[::max(1, len(steps) // 6)], steps[::max(1, len(steps) // 6)])
        ax.set_xlabel("training step")
        ax.set_ylabel("position in context")
        ax.set_title("val loss by position")
        fig.colorbar(im, ax=ax, label="loss (nats/token)")
        ax = axes.pop(0)
        centres = [(a + b - 1) / 2 for a, b in zip(edges, edges[1:])]
        picks = sorted({round(i) for i in np.linspace(0, len(pos_rows) - 1, min(5, len(pos_rows)))})
        for i in picks:
            ax.plot(centres, pos_rows[i]["position_loss"], marker=".", label=f"step {pos_rows[i]['step']}")
        ax.set_xlabel("position in context")
        ax.set_ylabel("val loss (nats/token)")
        ax.set_title("loss by position at a few steps")
        ax.grid(alpha=0.3)
        ax.legend()
    if watch_rows:
        steps = [r["step"] for r in watch_rows]
        ax = axes.pop(0)
        for key, label in (("entropy_per_token", "per-token prediction"), ("entropy_mean_prediction", "mean prediction"),
                           ("entropy_unigram", "val unigram")):
            ax.plot(steps, [r[key] / math.log(2) for r in watch_rows], marker=".", label=label)
        ax.set_xlabel("training step")
        ax.set_ylabel("entropy (bits)")
        ax.set_title("flat -> unigram -> context")
        ax.grid(alpha=0.3)
        ax.legend()
        ax = axes.pop(0)
        ax.plot(steps, [r["kl_unigram_model"] for r in watch_rows], marker=".", label="KL(unigram || mean prediction)")
        ax.plot(steps, [r["kl_model_unigram"] for r in watch_rows], marker=".", label="KL(mean prediction || unigram)")
        ax.set_xlabel("training step")
        ax.set_ylabel("KL (nats)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(steps, [r["p_correct"] for r in watch_rows], color="C3", marker=".", label="mean p(correct token)")
        twin.set_ylabel("mean p(correct token)")
        twin.set_ylim(0, 1)
        lines = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
        ax.set_title("mean prediction vs unigram")
    fig.tight_layout()
    save_figure(fig, png)


def open_tensorboard(out_dir):
    """A TensorBoard SummaryWriter into out_dir/tensorboard, or None (with a message) when not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("--tensorboard=True but TensorBoard is not installed (pip install tensorboard); "
              "metrics go to metrics.jsonl and the PNGs only")
        return None
    return SummaryWriter(os.path.join(out_dir, "tensorboard"))


def log_scalars(writer, row):
    """Every number of a metrics row as a TensorBoard scalar at its step; position losses as one group."""
    step = row["step"]
    for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key, value, step)
    if "position_loss" in row:
        writer.add_scalars("position_loss", {f"pos_{a}": v for a, v in zip(row["position_edges"], row["position_loss"])}, step)
    writer.flush()
