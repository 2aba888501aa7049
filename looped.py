"""
Looped depth (recurrent-depth models: Geiping et al. 2025 "Huginn"; Dehghani et al. 2019 Universal
Transformers): n_prelude distinct layers, then n_core layers applied `loops` times with shared weights,
re-reading the prelude's output every loop, then n_coda distinct layers. More loops at test time is
thinking longer. n_prelude = n_coda = 0 is ALBERT.

    python train.py config/loops_shakespeare_char.py --n_prelude=1 --n_core=2 --n_coda=1 --loops=3

Thinking by iterating (issue 28; experiments/thinking.py) adds, all off by default:
  - step training: a loss at every loop (deep supervision), or the progressive loss of Bansal et al. 2022
    (n loops without gradient, then k with, the loss at the end), so every loop learns to continue from a
    partial state rather than to settle;
  - a random initial state and noise on the state in training (Huginn), so the loop cannot count on one start;
  - a halting probe: a head on each loop's readout trained to predict "this loop's answer is right"; in
    evaluation a row stops looping once the probe is confident, and `loops_used` says how many loops it ran;
  - a prefix-LM: positions up to the first `prefix_token` (the problem) attend both ways, the answer causally.

architecture.py builds a LoopedGPT when n_core > 0; its `loops` option reaches run_blocks from forward,
generate and sample.py's --loops.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from generation import KVCache
from model import GPT, Block, norm

LOOP_LOSSES = ("last", "every", "progressive")


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
    # thinking by iterating (issue 28): off by default
    loop_loss: str = "last"      # last | every (the mean loss over every loop's answer) | progressive (Bansal et al. 2022)
    progressive_alpha: float = 0.5  # progressive: (1 - alpha) * the loss after all loops + alpha * the progressive loss
    init_state: str = "zero"     # zero | random (the state starts as Gaussian noise, in training and evaluation)
    state_noise: float = 0.0     # > 0: training adds Gaussian noise of this size (relative to the state's RMS) each loop
    halt: bool = False           # a probe predicting whether each loop's answer is right (trained with loop_loss)
    halt_threshold: float = 0.9  # evaluation with halting: a row stops once the probe says right with this probability
    halt_rule: str = "all"       # at every answering position (all) or on their mean probability (mean)
    prefix_token: int = -1       # >= 0: positions up to this token's first occurrence attend both ways (prefix-LM)

    @property
    def max_loops(self):
        return self.loops_max or 2 * self.loops

    def check(self, core):
        if not self.n_core:
            if self.n_prelude or self.n_coda or self.loops != 1 or self.backprop_loops or self.exit_tol or \
                    self.loop_loss != "last" or self.halt or self.prefix_token >= 0 or self.init_state != "zero":
                raise ValueError("n_prelude, n_coda, loops, backprop_loops, exit_tol, loop_loss, halt, init_state and "
                                 "prefix_token need a looped core: set n_core > 0")
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
        self.check_thinking(core)

    def check_thinking(self, core):
        if self.loop_loss not in LOOP_LOSSES:
            raise ValueError(f"loop_loss must be one of {', '.join(LOOP_LOSSES)}, got {self.loop_loss!r}")
        if self.loop_loss != "last" and self.backprop_loops:
            raise ValueError("loop_loss every/progressive chooses where gradients flow itself: set backprop_loops=0")
        if not 0 <= self.progressive_alpha <= 1:
            raise ValueError(f"progressive_alpha={self.progressive_alpha} must be between 0 and 1")
        if self.init_state not in ("zero", "random"):
            raise ValueError(f"init_state must be zero or random, got {self.init_state!r}")
        if self.state_noise < 0:
            raise ValueError(f"state_noise={self.state_noise} must be >= 0")
        if self.halt and self.loop_loss == "last":
            raise ValueError("halt needs loop_loss=every or progressive: the probe learns from several loops' answers")
        if not 0 < self.halt_threshold < 1:
            raise ValueError(f"halt_threshold={self.halt_threshold} must be between 0 and 1")
        if self.halt_rule not in ("all", "mean"):
            raise ValueError(f"halt_rule must be 'all' or 'mean', got {self.halt_rule!r}")
        if not -1 <= self.prefix_token < core.vocab_size:
            raise ValueError(f"prefix_token={self.prefix_token} must be -1 (off) or a token id below "
                             f"vocab_size={core.vocab_size}")

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
        if loop.halt:  # the probe reads each loop's normalised readout; it starts at p = 0.5 everywhere
            self.halt_head = nn.Linear(config.n_embd, 1)
            nn.init.zeros_(self.halt_head.weight)
            nn.init.zeros_(self.halt_head.bias)
        self.mean_loops = None  # loops per token the last adaptive-exit (exit_tol) forward used
        self.loops_used = None  # (B,) loops each row ran in the last halting forward

    # ------------------------------------------------------------------------- one loop and its parts

    def hidden(self, idx, cache=None, pos=0, loops=None, halt=None):
        return super().hidden(idx, cache, pos, loops=loops, halt=halt, prefix_end=self.prefix_end(idx, pos))

    def prefix_end(self, idx, pos=0):
        """(B,) the position after each row's first prefix_token: the problem's end (0 where a row has none),
        or None without a prefix-LM. In a decode step (pos > 0) the problem lies in the cache already."""
        if self.loop.prefix_token < 0:
            return None
        is_end = idx == self.loop.prefix_token
        return torch.where(is_end.any(1), pos + is_end.int().argmax(1) + 1, 0)

    def prefix_mask(self, prefix_end, positions, cache=None):
        """(B, 1, T, keys): causal, except that each row's problem positions (below prefix_end) see each
        other both ways. An answer position never shows itself to a problem position."""
        q = positions.view(1, 1, -1, 1)
        k = cache.slots if cache is not None else positions
        k = k.view(1, 1, 1, -1) if k.dim() == 1 else k  # serve.py's rows keep slots of their own (B, 1, 1, L)
        end = prefix_end.view(-1, 1, 1, 1)
        return (k <= q) | ((k < end) & (q < end))

    def begin(self, x, positions, cache, mask):
        """The prelude's output e (re-read every loop so a long loop does not drift from its input) and the
        starting state."""
        for block in self.blocks[:self.loop.n_prelude]:
            x = self.run_block(block, x, positions, cache, mask=mask)
        if self.loop.inject == "none":
            return x, x
        return x, torch.randn_like(x) if self.loop.init_state == "random" else torch.zeros_like(x)

    def think(self, h, e, positions, cache, mask, i):
        """Loop i: the core once over the state h re-reading e. The state re-enters normalised, so its scale
        cannot grow with the loop count (norm(0) = 0)."""
        if cache is not None:
            cache.layer_offset = i * self.loop.n_core
        u = h if self.loop.inject == "none" else norm(h) + e if self.loop.inject == "add" else \
            self.inject(torch.cat((norm(h), e), -1))
        for block in self.blocks[self.loop.n_prelude:self.loop.n_prelude + self.loop.n_core]:
            u = self.run_block(block, u, positions, cache, mask=mask)
        if self.loop.state_noise and self.training:  # a state the loop must clean up, not rely on exactly
            u = u + self.loop.state_noise * u.pow(2).mean(-1, keepdim=True).sqrt() * torch.randn_like(u)
        return u

    def finish(self, h, positions, cache, mask, loops):
        """The coda over the final state (B, T, C), un-normalised as run_blocks returns it."""
        if cache is not None:
            cache.layer_offset = (loops - 1) * self.loop.n_core
        for block in self.blocks[self.loop.n_prelude + self.loop.n_core:]:
            h = self.run_block(block, h, positions, cache, mask=mask)
        if cache is not None:
            cache.layer_offset = 0
        return h

    # ------------------------------------------------------------------------- running the loop

    def run_blocks(self, x, positions, cache=None, loops=None, halt=None, prefix_end=None):
        """Prelude, the core applied `loops` times, coda (B, T, C). halt: a probability threshold (True: the
        config's) at which a row stops looping early (no-cache evaluation only; loops is then the cap).
        prefix_end (B,): where each row's problem ends, for the prefix-LM mask."""
        loop = self.loop
        if loops is None:
            loops = self.sample_loops() if self.training else loop.loops
        if loops < 1:
            raise ValueError(f"loops={loops} must be >= 1")
        if cache is not None and len(cache.k) != self.cache_layers(loops):
            raise ValueError(f"the KV cache was made for another loop count than loops={loops}")
        if (loop.exit_tol or halt) and (cache is not None or self.training):
            raise ValueError("exit_tol and halt (an early exit) work in no-cache evaluation only: use "
                             "use_cache=False, or exit_tol=0 and halt=None")
        if halt is not None and not loop.halt:
            raise ValueError("halt needs a model trained with a halting probe (halt=True)")
        mask = None if prefix_end is None else self.prefix_mask(prefix_end, positions, cache)
        e, h = self.begin(x, positions, cache, mask)
        if halt is not None:
            threshold = loop.halt_threshold if halt is True else halt
            # the positions whose prediction is an answer: from the last problem position on (all without one)
            answering = torch.ones_like(positions, dtype=torch.bool)[None] if prefix_end is None else \
                positions[None] >= prefix_end[:, None] - 1
            return self.halting(h, e, positions, mask, loops, threshold, answering)
        active = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # (B, T) tokens still looping
        used = torch.zeros(x.shape[:2], device=x.device)  # (B, T) loops each token ran
        # truncated backprop through depth: only the last k loops keep a graph, so memory stays flat in r
        no_grad_loops = loops - loop.backprop_loops if loop.backprop_loops and self.training else 0
        for i in range(loops):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= no_grad_loops):
                u = self.think(h, e, positions, cache, mask, i)
            if loop.exit_tol:  # per-token exit (a thresholded ACT, Graves 2016): a settled token keeps its state
                used += active
                u = torch.where(active[..., None], u, h)
                active &= (u - h).norm(dim=-1) > loop.exit_tol * h.norm(dim=-1).clamp_min(1e-6)
            h = u
            if loop.exit_tol and not active.any():
                break
        if loop.exit_tol:
            self.mean_loops = used.mean().item()
        return self.finish(h, positions, cache, mask, loops)

    def halting(self, h, e, positions, mask, max_loops, threshold, answering):
        """Loop until the probe is confident at every answering position (B, T), or on their mean with
        halt_rule=mean, at most max_loops; a stopped row keeps its state. loops_used records each row's count.
        Why a mean: under "all" one unsure position keeps a long row looping to the cap, the likely reason one
        seed's probe never stopped (issue 28's halting, EXPERIMENTS.md; not yet tested with this rule)."""
        B = h.size(0)
        active = torch.ones(B, dtype=torch.bool, device=h.device)
        self.loops_used = torch.zeros(B, dtype=torch.long, device=h.device)
        for i in range(max_loops):
            u = self.think(h, e, positions, None, mask, i)
            h = torch.where(active[:, None, None], u, h)
            self.loops_used += active
            readout = norm(self.finish(h, positions, None, mask, i + 1))
            right = torch.sigmoid(self.halt_head(readout)[..., 0])  # (B, T)
            if self.loop.halt_rule == "mean":
                scored = answering.expand_as(right)
                done = (right * scored).sum(1) / scored.sum(1).clamp_min(1) >= threshold
            else:
                done = ((right >= threshold) | ~answering).all(dim=1)
            active &= ~done
            if not active.any():
                break
        return self.finish(h, positions, None, mask, max_loops)

    # ------------------------------------------------------------------------- step training

    def forward(self, idx, targets=None, reduction="mean", loops=None, halt=None):
        """GPT.forward; a training forward with loop_loss every/progressive returns that loss (logits None),
        plus the halting probe's loss when the model has one."""
        stepwise = self.loop.loop_loss != "last" and targets is not None and self.training and \
            torch.is_grad_enabled() and reduction == "mean"
        if not stepwise:
            return super().forward(idx, targets, reduction, loops=loops, halt=halt)
        return None, self.step_loss(idx, targets, loops or self.sample_loops())

    def step_loss(self, idx, targets, loops):
        """The mean loss over every loop's answer (every), or Bansal's progressive mix (progressive)."""
        B, T = idx.size()
        positions = torch.arange(T, device=idx.device)
        prefix_end = self.prefix_end(idx)
        mask = None if prefix_end is None else self.prefix_mask(prefix_end, positions)
        e, h0 = self.begin(self.embed(idx), positions, None, mask)
        answers = []  # (loss, readout) of each supervised loop
        watched = []  # the halting probe's readouts: every loop's, so it sees early wrong answers as well as late ones

        def answer(h, n):
            readout = norm(self.finish(h, positions, None, mask, n))
            answers.append((self.loss(self.lm_head(readout), targets), readout))

        def watch(h, n):
            if self.loop.halt:
                with torch.no_grad():
                    watched.append(norm(self.finish(h, positions, None, mask, n)))

        if self.loop.loop_loss == "every":
            h = h0
            for i in range(loops):
                h = self.think(h, e, positions, None, mask, i)
                answer(h, i + 1)
            loss = sum(a[0] for a in answers) / loops
        else:
            alpha = self.loop.progressive_alpha
            n = int(torch.randint(0, loops, ()))  # loops run without gradient, then k with it
            k = int(torch.randint(1, loops - n + 1, ()))
            h = h0
            with torch.no_grad():
                for i in range(n):
                    h = self.think(h, e, positions, None, mask, i)
                    watch(h, i + 1)
            h = h.detach()
            for i in range(n, n + k):
                h = self.think(h, e, positions, None, mask, i)
            answer(h, n + k)
            loss = alpha * answers[0][0]
            if alpha < 1:  # the loss after all loops, gradients through every one
                h = h0
                for i in range(loops):
                    h = self.think(h, e, positions, None, mask, i)
                    if i < loops - 1 and i >= n:  # loops 1..n were watched above
                        watch(h, i + 1)
                answer(h, loops)
                loss = loss + (1 - alpha) * answers[1][0]
        if self.loop.halt:
            loss = loss + self.probe_loss([readout for _, readout in answers] + watched, targets)
        return loss

    def probe_loss(self, readouts, targets):
        """Binary cross-entropy of the halting probe on each readout (detached: the probe watches, it does not
        steer) against whether that loop's answer is right, at the scored positions."""
        scored = targets != -1
        losses = []
        for readout in readouts:
            readout = readout.detach()
            right = (self.lm_head(readout)[..., :self.config.vocab_size].argmax(-1) == targets).float()
            logit = self.halt_head(readout)[..., 0]
            losses.append(F.binary_cross_entropy_with_logits(logit[scored], right[scored]))
        return sum(losses) / len(losses)

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

    def make_cache(self, batch_size, length, device, dtype, loops=None, halt=None):
        if halt is not None:
            raise ValueError("halt works without the KV cache only: use use_cache=False")
        kv_heads = [self.config.kv_heads] * self.cache_layers(loops)
        return KVCache(kv_heads, self.config.n_embd // self.config.n_head, batch_size, length, device, dtype)

    def flops_per_token(self):
        # a looped core's parameters and attention count once per loop
        core = sum(p.numel() for p in self.blocks[self.loop.n_prelude:self.loop.n_prelude + self.loop.n_core].parameters())
        return (6 * (self.num_params(non_embedding=False) + core * (self.loop.loops - 1))
                + 12 * self.cache_layers() * self.config.n_embd * self.config.block_size)
