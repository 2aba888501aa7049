"""
µLM's GPT, read top to bottom: the config, norm, rotary, attention, MLP, Block, then the GPT itself.

This file is the core every reader needs. Research mechanisms live beside it, one module each, and plug
in through two seams: `make_block` builds each layer (memory.py puts a memory layer in place of an MLP,
heads.py gates the heads, layer_shapes.py sets per-layer widths and windows) and `GPT.run_blocks` runs
the layers (looped.py and feedback.py override it). architecture.py builds the model a config or a
checkpoint describes; generation.py samples from it (KV cache, compiled decode step). No disk I/O here.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import generation
import speed


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0           # 0 means n_head; fewer means grouped-query attention (Ainslie et al. 2023)
    n_embd: int = 768
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    # memory and speed options (bench.py measures each), off by default
    checkpoint_activations: bool = False  # keep only each block's input, recompute the rest in backward:
                                          # ~1/3 more compute for a fraction of the activation memory
    bf16_residual: bool = False  # under bf16 autocast the residual stream is bf16 too (as in modded-nanogpt)
    ce_chunks: int = 0           # > 0: the head and cross-entropy fused over this many row chunks (speed.py)
    liger_ce: bool = False       # the head and cross-entropy by Liger Kernel's fused Triton kernels (speed.py; CUDA)
    attention: str = "sdpa"      # sdpa | flex (FlexAttention's compiled kernel for the causal path, speed.py)
    attn_scale: float = 0.0      # > 0: attention logits are this times q.k (0: 1/sqrt(head size)). With QK-norm a
                                 # logit is at most scale x head size, sqrt(head size) by default (5.7 at 32): too
                                 # flat to pick one key among a hundred (modded-nanogpt's QK-norm uses 0.12 at 128)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head size {self.n_embd // self.n_head} must be even for rotary embeddings")
        if self.n_kv_head < 0 or self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.ce_chunks < 0:
            raise ValueError(f"ce_chunks={self.ce_chunks} must be 0 (off) or a number of row chunks")
        if self.ce_chunks and self.liger_ce:
            raise ValueError("ce_chunks and liger_ce are two fused heads + losses: set one of them")
        if self.attention not in ("sdpa", "flex"):
            raise ValueError(f"attention must be 'sdpa' or 'flex', got {self.attention!r}")
        if self.attn_scale < 0 or (self.attn_scale and self.attention == "flex"):
            raise ValueError(f"attn_scale={self.attn_scale} must be 0 (1/sqrt(head size)) or > 0, "
                             f"with attention='sdpa'")

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def padded_vocab_size(self):
        # a multiple of 64 lets the embedding and head matmuls use full tensor-core tiles
        return 64 * math.ceil(self.vocab_size / 64)


def norm(x):
    """RMSNorm without a gain (as in modded-nanogpt): nothing to learn, and bf16 inputs keep the fused kernel."""
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021): attention then depends only on relative position."""

    def __init__(self, head_size, max_len, base):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2).float() / head_size))
        angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (max_len, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x, positions):
        # x: (B, nh, T, hs), positions: (T,); rotate channel pairs (i, i + hs/2) by each position's angle
        cos = self.cos[positions].to(x.dtype)  # (T, hs/2)
        sin = self.sin[positions].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with rotary positions and QK-norm; n_head and window may differ per layer."""

    def __init__(self, config, layer_idx, n_head=None, window=0):
        super().__init__()
        self.layer_idx = layer_idx
        # a layer of its own head count (layer_shapes.py) has as many key/value heads: no GQA there
        self.n_head, self.n_kv_head = (n_head, n_head) if n_head else (config.n_head, config.kv_heads)
        self.head_size = config.n_embd // config.n_head
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_size, bias=False)
        self.kv_proj = nn.Linear(config.n_embd, 2 * self.n_kv_head * self.head_size, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_size, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.flex = config.attention == "flex"
        self.window = window  # > 0: a sliding window of this many positions (Longformer, Beltagy et al. 2020)
        self.scale = config.attn_scale or None  # None: SDPA's own 1/sqrt(head size)

    def forward(self, x, rotary, positions, cache=None, mask=None):
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_head, self.head_size).permute(2, 0, 3, 1, 4)  # (B, nkv, T, hs)
        # QK-norm: keeps attention logits bounded at high learning rates (Henry et al. 2020)
        q, k = rotary(norm(q), positions), rotary(norm(k), positions)
        key_positions = positions
        if cache is not None:  # the cache's whole (static) length: shapes never change, for CUDA graphs
            k, v = cache.update(self.layer_idx, k, v, positions)  # (B, nkv, cache length, hs)
            key_positions = cache.slots
        if mask is None and (cache is not None or self.window):
            mask = key_positions <= positions[:, None]  # (T, keys): a query sees keys up to its own position
            if self.window:  # a band: only the last `window` positions, its own included
                mask = mask & (key_positions > positions[:, None] - self.window)
        # no mask at all: a fresh causal sequence, the flash-attention path training takes
        if self.flex and mask is None and not (self.training and self.dropout):
            y = speed.flex_causal_attention(q, k, v)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
                                               enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hs)
        return self.c_proj(self.merge_heads(y))

    def merge_heads(self, y):
        """(B, nh, T, hs) -> (B, T, nh * hs); heads.py's gated attention scales each head first."""
        B, nh, T, hs = y.shape
        return y.transpose(1, 2).contiguous().view(B, T, nh * hs)


class MLP(nn.Module):
    """Squared-ReLU feed-forward (Primer, So et al. 2021): cheaper than GELU, trains better."""

    def __init__(self, config, hidden=None):
        super().__init__()
        hidden = hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config, layer_idx, attn=None, ffn=None):
        super().__init__()
        self.attn = attn or CausalSelfAttention(config, layer_idx)
        self.ffn = ffn or MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rotary, positions, cache=None, mask=None):
        x = x + self.dropout(self.attn(norm(x), rotary, positions, cache, mask))
        return x + self.dropout(self.ffn(norm(x)))


def refuse_options(options):
    """A plain GPT runs its layers one way: a research stack's options (looped.py's loops) must be unset."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}={options[given[0]]} needs a looped model (n_core > 0)")


class GPT(nn.Module):

    def __init__(self, config, make_block=Block):
        super().__init__()
        self.config = config
        self.options = [config]  # every option dataclass that shaped this model (architecture.model_args)
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.rotary = Rotary(config.n_embd // config.n_head, config.block_size, config.rope_base)
        self.blocks = nn.ModuleList(make_block(config, i) for i in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one matrix reads and writes tokens (Press & Wolf 2017)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                # residual writes scaled by depth so the stream's variance stays put (GPT-2 paper)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def hidden(self, idx, cache=None, pos=0, **options):
        """Final normalised hidden states (B, T, C) of tokens at positions pos..pos+T-1.

        With a cache, the tokens' keys and values are written into it and they attend to every cached
        position before theirs. pos is an int, or a (1,) tensor in the compiled decode step (a tensor
        changes without recompiling). options go to run_blocks (looped.py's `loops`).
        """
        B, T = idx.size()
        if isinstance(pos, int) and pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens is longer than block_size={self.config.block_size}")
        positions = pos + torch.arange(T, device=idx.device)  # (T,)
        return norm(self.run_blocks(self.embed(idx), positions, cache, **options))

    def embed(self, idx):
        """The residual stream's start (B, T, C): the tokens' embeddings."""
        x = self.drop(self.wte(idx))
        if self.config.bf16_residual and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # the blocks' bf16 outputs then keep it bf16
        return x

    def run_blocks(self, x, positions, cache=None, **options):
        """The layers in order (B, T, C): the seam where looped.py and feedback.py run them their own way."""
        refuse_options(options)
        for block in self.blocks:
            x = self.run_block(block, x, positions, cache)
        return x

    def run_block(self, block, x, positions, cache=None, **inputs):
        """One block (inputs: a research block's extra ones); under checkpoint_activations its activations
        are recomputed in backward, not kept."""
        if self.config.checkpoint_activations and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, self.rotary, positions, cache, use_reentrant=False,
                                                     **inputs)
        return block(x, self.rotary, positions, cache, **inputs)

    def forward(self, idx, targets=None, reduction="mean", **options):
        """Logits (B, T, V) over the real vocabulary; with targets also the cross-entropy: mean, or per
        token (B, T) with reduction='none'. With ce_chunks or liger_ce, a training forward's mean loss comes from
        the fused chunked head, and the logits are None."""
        h = self.hidden(idx, **options)  # (B, T, C)
        if (self.config.ce_chunks or self.config.liger_ce) and targets is not None and reduction == "mean" \
                and torch.is_grad_enabled():
            if self.config.liger_ce:
                return None, speed.liger_cross_entropy(h, self.lm_head.weight, targets)
            return None, speed.chunked_cross_entropy(h, self.lm_head.weight, targets, self.config.ce_chunks)
        logits = self.lm_head(h)  # (B, T, padded V)
        return logits[..., :self.config.vocab_size], self.loss(logits, targets, reduction)

    def loss(self, logits, targets, reduction="mean"):
        """Cross-entropy of padded logits (B, T, padded V) against targets (B, T) (-1 is ignored), or None."""
        if targets is None:
            return None
        # the padding columns never appear as targets, so training pushes them down
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                               reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss

    def next_logits(self, idx, cache=None, pos=0, **options):
        """Logits (B, V) of the token that follows each row of idx (B, T), whose first token is at pos.

        In a cached decode step idx is (B, 1) and pos a (1,) tensor: the shapes never change from step
        to step, so torch.compile(mode="reduce-overhead") captures the step as one CUDA graph.
        """
        return self.lm_head(self.hidden(idx, cache, pos, **options)[:, -1, :]).float()[:, :self.config.vocab_size]

    def make_cache(self, batch_size, length, device, dtype, **options):
        """An empty KV cache of `length` slots for every attention layer (generation.py fills it)."""
        refuse_options(options)
        kv_heads = [block.attn.n_kv_head for block in self.blocks]  # a pruned layer may have fewer
        return generation.KVCache(kv_heads, self.config.n_embd // self.config.n_head, batch_size, length, device, dtype)

    def generate(self, idx, max_new_tokens, **sampling):
        """idx (B, T) followed by up to max_new_tokens sampled tokens (B, T + n); see generation.py."""
        return generation.generate(self, idx, max_new_tokens, **sampling)

    def generate_stream(self, idx, max_new_tokens, **sampling):
        """Yield the next token (B,) for each step; see generation.py."""
        return generation.generate_stream(self, idx, max_new_tokens, **sampling)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per parameter (forward + backward) plus attention's two matmuls."""
        cfg = self.config
        return 6 * self.num_params(non_embedding=False) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops=989e12):
        """Model FLOPs utilisation: achieved training FLOP/s over peak (H100 bf16 dense by default)."""
        return self.flops_per_token() * tokens_per_iter / dt / peak_flops

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer="adamw", muon_lr=0.02,
                             own_groups=(), exclude=()):
        """AdamW; weight decay on matrices only (embeddings and linear weights), never on vectors.

        optimizer="muon": Muon (muon_lr) for the blocks' linear weights, AdamW for the rest.
        own_groups: parameter groups a mechanism sets itself (memory.py's dense value tables), appended last;
        exclude: parameters another optimizer trains (memory.py's sparse value tables).
        Each group's lr_scale is what the training loop multiplies the schedule's learning rate by.
        """
        taken = {id(p) for group in own_groups for p in group["params"]} | {id(p) for p in exclude}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in taken]
        if optimizer == "muon":
            from muon import Muon
            hidden = {id(m.weight) for m in self.blocks.modules() if isinstance(m, nn.Linear)}
            matrices = [p for p in params if id(p) in hidden]
            rest = [p for p in params if id(p) not in hidden]
            groups = [{"params": matrices, "muon": True, "lr": muon_lr, "lr_scale": muon_lr / learning_rate},
                      {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                      {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}, *own_groups]
            return Muon([g for g in groups if g["params"]], lr=learning_rate, betas=betas)
        if optimizer != "adamw":
            raise ValueError(f"optimizer must be adamw or muon, got {optimizer!r}")
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}, *own_groups]
        groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")
