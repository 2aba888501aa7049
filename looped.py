"""
Looped depth (recurrent-depth models: Geiping et al. 2025 "Huginn"; Dehghani et al. 2019 Universal
Transformers): n_prelude distinct layers, then n_core layers applied `loops` times with shared weights,
re-reading the prelude's output every loop, then n_coda distinct layers. More loops at test time is
thinking longer per token. n_prelude = n_coda = 0 is ALBERT.

    python train.py config/loops_shakespeare_char.py --n_prelude=1 --n_core=2 --n_coda=1 --loops=3

architecture.py builds a LoopedGPT when n_core > 0; its `loops` option reaches run_blocks from forward,
generate and sample.py's --loops.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from generation import KVCache
from model import GPT, Block, norm


@dataclass
class LoopConfig:
    n_prelude: int = 0
    n_core: int = 0
    n_coda: int = 0
    loops: int = 1               # loop count r in evaluation, and the training mean
    loops_sampling: str = "fixed"  # fixed | uniform (loops_min..loops_max per step) | poisson_lognormal (mean loops, Huginn)
    loops_min: int = 1
    loops_max: int = 0           # 0 means 2 * loops
    backprop_loops: int = 0      # k > 0: gradients through the last k loops only, earlier loops run under no_grad
    inject: str = "add"          # how the core re-reads the prelude's output e each loop: add | concat | none
    exit_tol: float = 0.0        # > 0: a token stops looping once its state moves less than this (relative), no-cache eval only

    @property
    def max_loops(self):
        return self.loops_max or 2 * self.loops

    def check(self, core):
        if not self.n_core:
            if self.n_prelude or self.n_coda or self.loops != 1 or self.backprop_loops or self.exit_tol:
                raise ValueError("n_prelude, n_coda, loops, backprop_loops and exit_tol need a looped core: set n_core > 0")
            return
        if min(self.n_prelude, self.n_coda, self.n_core) < 0 or self.n_prelude + self.n_core + self.n_coda != core.n_layer:
            raise ValueError(f"n_prelude + n_core + n_coda = {self.n_prelude} + {self.n_core} + {self.n_coda} must "
                             f"equal n_layer={core.n_layer}")
        if self.loops < 1 or not 1 <= self.loops_min <= self.loops <= self.max_loops:
            raise ValueError(f"need 1 <= loops_min ({self.loops_min}) <= loops ({self.loops}) <= loops_max "
                             f"({self.max_loops})")
        if self.loops_sampling not in ("fixed", "uniform", "poisson_lognormal"):
            raise ValueError(f"loops_sampling must be fixed, uniform or poisson_lognormal, got {self.loops_sampling!r}")
        if self.inject not in ("add", "concat", "none"):
            raise ValueError(f"inject must be add, concat or none, got {self.inject!r}")
        if not 0 <= self.backprop_loops <= self.max_loops:
            raise ValueError(f"backprop_loops={self.backprop_loops} must be between 0 (all loops) and loops_max")
        if self.exit_tol < 0:
            raise ValueError(f"exit_tol={self.exit_tol} must be >= 0 (0 disables the adaptive exit)")

    def core_layers(self):
        return range(self.n_prelude, self.n_prelude + self.n_core)


class LoopedGPT(GPT):
    """The GPT whose middle layers run as a loop: prelude, core x loops, coda."""

    def __init__(self, config, loop, make_block=Block):
        super().__init__(config, make_block)
        self.loop = loop
        self.options.append(loop)
        if loop.inject == "concat":
            # input injection by concatenation: [h, e] projected back to C each loop (Geiping et al. 2025),
            # starting as h + e, so concat begins where add does
            self.inject = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)
            with torch.no_grad():
                self.inject.weight.copy_(torch.cat((torch.eye(config.n_embd), torch.eye(config.n_embd)), dim=1))
        self.mean_loops = None  # loops per token the last adaptive-exit (exit_tol) forward used

    def run_blocks(self, x, positions, cache=None, loops=None):
        """Prelude, the core applied `loops` times re-reading the prelude's output, coda (B, T, C)."""
        loop = self.loop
        if loops is None:
            loops = self.sample_loops() if self.training else loop.loops
        if loops < 1:
            raise ValueError(f"loops={loops} must be >= 1")
        if cache is not None and len(cache.k) != self.cache_layers(loops):
            raise ValueError(f"the KV cache was made for another loop count than loops={loops}")
        if loop.exit_tol and (cache is not None or self.training):
            raise ValueError("exit_tol (adaptive exit) works in no-cache evaluation only: use use_cache=False "
                             "or exit_tol=0")
        prelude, core = self.blocks[:loop.n_prelude], self.blocks[loop.n_prelude:loop.n_prelude + loop.n_core]
        coda = self.blocks[loop.n_prelude + loop.n_core:]
        for block in prelude:
            x = self.run_block(block, x, positions, cache)
        e = x  # the prelude's output, re-read every loop so a long loop does not drift from its input
        h = torch.zeros_like(e) if loop.inject != "none" else e
        active = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # (B, T) tokens still looping
        used = torch.zeros(x.shape[:2], device=x.device)  # (B, T) loops each token ran
        # truncated backprop through depth: only the last k loops keep a graph, so memory stays flat in r
        no_grad_loops = loops - loop.backprop_loops if loop.backprop_loops and self.training else 0
        for i in range(loops):
            if cache is not None:
                cache.layer_offset = i * loop.n_core
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= no_grad_loops):
                u = self.reread(h, e)
                for block in core:
                    u = self.run_block(block, u, positions, cache)
            if loop.exit_tol:  # per-token exit (a thresholded ACT, Graves 2016): a settled token keeps its state
                used += active
                u = torch.where(active[..., None], u, h)
                active &= (u - h).norm(dim=-1) > loop.exit_tol * h.norm(dim=-1).clamp_min(1e-6)
            h = u
            if loop.exit_tol and not active.any():
                break
        if loop.exit_tol:
            self.mean_loops = used.mean().item()
        if cache is not None:
            cache.layer_offset = (loops - 1) * loop.n_core
        for block in coda:
            h = self.run_block(block, h, positions, cache)
        if cache is not None:
            cache.layer_offset = 0
        return h

    def reread(self, h, e):
        """The core's input for one loop: the state h with the prelude's output e re-read. The state re-enters
        normalised, so its scale cannot grow with the loop count (norm(0) = 0)."""
        if self.loop.inject == "none":
            return h
        if self.loop.inject == "add":
            return norm(h) + e
        return self.inject(torch.cat((norm(h), e), -1))

    def sample_loops(self):
        """A training step's loop count: fixed, uniform in [loops_min, loops_max], or Poisson with a
        log-normal rate of mean `loops` (Geiping et al. 2025), clipped to [loops_min, loops_max]."""
        loop = self.loop
        if loop.loops_sampling == "uniform":
            return int(torch.randint(loop.loops_min, loop.max_loops + 1, ()))
        if loop.loops_sampling == "poisson_lognormal":
            sigma = 0.5
            rate = torch.exp(torch.randn(()) * sigma + math.log(loop.loops) - sigma ** 2 / 2)  # mean loops
            return int(min(max(torch.poisson(rate).item(), loop.loops_min), loop.max_loops))
        return loop.loops

    def cache_layers(self, loops=None):
        """Attention layers a KV cache needs: every application of a core block has its own keys and values."""
        return self.config.n_layer + self.loop.n_core * ((loops or self.loop.loops) - 1)

    def make_cache(self, batch_size, length, device, dtype, loops=None):
        kv_heads = [self.config.kv_heads] * self.cache_layers(loops)
        return KVCache(kv_heads, self.config.n_embd // self.config.n_head, batch_size, length, device, dtype)

    def flops_per_token(self):
        # a looped core's parameters and attention count once per loop
        core = sum(p.numel() for p in self.blocks[self.loop.n_prelude:self.loop.n_prelude + self.loop.n_core].parameters())
        return (6 * (self.num_params(non_embedding=False) + core * (self.loop.loops - 1))
                + 12 * self.cache_layers() * self.config.n_embd * self.config.block_size)
