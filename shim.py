"""
A tokenizer shim (research notes 002): a small learned map between the token embedding and the blocks, and
its mirror between the blocks and the output head, so that a change of tokenizer retrains only the
tokenizer's end of the model (embedding, head, shims) while the blocks stay as they were.

    python train.py config/cpu_quick.py --shim=True --out_dir=out/shim_char             # char model with shims
    python prepare.py --dataset=shakespeare                                             # the same text in GPT-2 BPE
    python train.py config/cpu_quick.py --dataset=shakespeare --init_from=out/shim_char \\
        --train_only=shim --out_dir=out/shim_bpe                                        # swap: blocks frozen

architecture.py builds a ShimGPT when shim=True; train.py's train_only=shim freezes every weight but the
TOKENIZER_PARAMS and, fine-tuning onto a dataset of another tokenizer, loads the checkpoint's blocks only.
experiments/tokenizer_shim.py measures how much of a char model survives the swap to BPE.
"""
from dataclasses import dataclass

import torch.nn as nn

from model import GPT, MLP, Block, norm

# what belongs to the tokenizer: the embedding, the head (tied or not) and the two shims
TOKENIZER_PARAMS = ("wte.", "lm_head.", "shim_in.", "shim_out.")


@dataclass
class ShimConfig:
    shim: bool = False           # a residual MLP after the token embedding and another before the head
    shim_hidden: int = 0         # the shims' hidden width; 0 means 4 * n_embd

    def check(self, core):
        if self.shim_hidden < 0:
            raise ValueError(f"shim_hidden={self.shim_hidden} must be >= 0 (0 means 4 * n_embd)")
        if self.shim_hidden and not self.shim:
            raise ValueError(f"shim_hidden={self.shim_hidden} sizes the tokenizer shims: set shim=True too")


class ShimGPT(GPT):
    """The GPT with a shim on each side of the blocks: x + MLP(norm(x)) after the embedding and before the head.
    Residual, so a fresh shim is close to the identity and a model with shims trains as one without."""

    def __init__(self, config, shim, make_block=Block):
        super().__init__(config, make_block)
        self.options.append(shim)
        self.shim_in = MLP(config, shim.shim_hidden or None)
        self.shim_out = MLP(config, shim.shim_hidden or None)
        for mlp in (self.shim_in, self.shim_out):
            mlp.apply(self._init_weights)
            nn.init.normal_(mlp.c_proj.weight, mean=0.0, std=0.02 / (2 * config.n_layer) ** 0.5)

    def embed(self, idx):
        x = super().embed(idx)  # (B, T, C)
        return x + self.shim_in(norm(x))

    def run_blocks(self, x, positions, cache=None, **options):
        x = super().run_blocks(x, positions, cache, **options)  # (B, T, C)
        return x + self.shim_out(norm(x))


def is_tokenizer_param(name):
    return name.startswith(TOKENIZER_PARAMS)


def train_only_shims(model):
    """Freeze every weight but the embedding, head and shims; returns how many parameters still train."""
    if not isinstance(model, ShimGPT):
        raise ValueError("train_only=shim retrains a model's tokenizer shims, and this model has none: train one "
                         "with shim=True first")
    for name, p in model.named_parameters():
        p.requires_grad_(is_tokenizer_param(name))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def without_token_rows(state_dict):
    """A checkpoint's weights less the embedding and head, whose rows meant another tokenizer's tokens: a model
    loading the rest (strict=False) keeps its fresh embedding and head, and the checkpoint's blocks and shims."""
    return {k: v for k, v in state_dict.items() if not k.startswith(("wte.", "lm_head."))}
