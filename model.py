"""
µLM: one GPT, read top to bottom.

Small pieces first (rotary, attention, MLP), then the Block that wires them, then the GPT with its
forward pass, generation with a KV cache, and the optimizer builder. The feed-forward of each block
is chosen per layer by `make_ffn`, the one seam where other kinds of layer plug in.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0  # 0 means n_head (plain multi-head); fewer means grouped-query attention
    n_embd: int = 768
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    memory_layers: list = field(default_factory=list)  # layers whose MLP becomes a memory layer

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head size {self.n_embd // self.n_head} must be even for rotary embeddings")
        if self.n_kv_head < 0 or self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        for layer in self.memory_layers:
            if not 0 <= layer < self.n_layer:
                raise ValueError(f"memory layer {layer} is outside the model's {self.n_layer} layers")

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


class KVCache:
    """Keys and values of every layer, preallocated for the whole context at a fixed shape.

    New entries are written at their positions and attention reads the whole cache through a mask that
    hides the slots not yet written: every decode step then has the same shapes, which is what lets
    torch.compile(mode="reduce-overhead") replay it as one CUDA graph.
    """

    def __init__(self, config, batch_size, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.kv_heads, config.block_size, hs)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.slots = torch.arange(config.block_size, device=device)  # the position each slot holds

    def update(self, layer, k, v, positions):
        """Write k, v (B, nkv, T, hs) at positions (T,); return the whole cache (B, nkv, block_size, hs)."""
        self.k[layer].index_copy_(2, positions, k)
        self.v[layer].index_copy_(2, positions, v)
        return self.k[layer], self.v[layer]


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.head_size = config.n_embd // config.n_head
        self.q_proj = nn.Linear(config.n_embd, config.n_head * self.head_size, bias=False)
        self.kv_proj = nn.Linear(config.n_embd, 2 * self.n_kv_head * self.head_size, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x, rotary, positions, cache=None):
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_head, self.head_size).permute(2, 0, 3, 1, 4)  # (B, nkv, T, hs)
        # QK-norm: keeps attention logits bounded at high learning rates (Henry et al. 2020)
        q, k = rotary(norm(q), positions), rotary(norm(k), positions)
        if cache is None:  # training: a fresh sequence, the flash-attention causal path
            mask, is_causal = None, True
        else:  # a query sees the cached slots up to its own position; shapes stay static for CUDA graphs
            k, v = cache.update(self.layer_idx, k, v, positions)  # (B, nkv, block_size, hs)
            mask, is_causal = cache.slots <= positions[:, None], False  # (T, block_size)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    """Squared-ReLU feed-forward (Primer, So et al. 2021): cheaper than GELU, trains better."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


def make_ffn(config, layer_idx):
    """The feed-forward for one layer: the seam where a memory layer replaces the MLP."""
    if layer_idx in config.memory_layers:
        raise NotImplementedError("memory layers are not part of this build yet")
    return MLP(config)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ffn = make_ffn(config, layer_idx)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rotary, positions, cache=None):
        x = x + self.dropout(self.attn(norm(x), rotary, positions, cache))
        x = x + self.dropout(self.ffn(norm(x)))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.rotary = Rotary(config.n_embd // config.n_head, config.block_size, config.rope_base)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
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

    def hidden(self, idx, cache=None, pos=0):
        """Final normalised hidden states (B, T, C) of tokens at positions pos..pos+T-1.

        Without a cache pos is 0; with one, the tokens' keys and values are written into it and they
        attend to every cached position before theirs. pos is an int, or a (1,) tensor in the compiled
        decode step (a tensor changes without recompiling).
        """
        B, T = idx.size()
        if isinstance(pos, int) and pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens is longer than block_size={self.config.block_size}")
        positions = pos + torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx))  # (B, T, C)
        for block in self.blocks:
            x = block(x, self.rotary, positions, cache)
        return norm(x)

    def forward(self, idx, targets=None, reduction="mean"):
        """Logits (B, T, V); with targets also the cross-entropy: mean, or per token (B, T) with reduction='none'."""
        logits = self.lm_head(self.hidden(idx))  # (B, T, padded V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=-1, reduction=reduction)
        return logits, loss.view(targets.shape) if reduction == "none" else loss

    def next_logits(self, idx, cache=None, pos=0):
        """Logits (B, V) of the token that follows each row of idx (B, T), whose first token is at pos.

        In a cached decode step idx is (B, 1) and pos a (1,) tensor: the shapes never change from step
        to step, so torch.compile(mode="reduce-overhead") captures the step as one CUDA graph and
        replays it, with no Python or kernel-launch overhead per layer.
        """
        return self.lm_head(self.hidden(idx, cache, pos)[:, -1, :]).float()[:, :self.config.vocab_size]

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        stop_token=None, seed=None, use_cache=True, compile=False):
        """Yield the next token (B,) for each step; temperature 0 is greedy decoding.

        compile=True compiles the cached decode step with CUDA graphs (worth it on a GPU, for long samples).
        """
        check_sampling_args(temperature, top_k, top_p)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(seed)
        block_size = self.config.block_size
        decode_step = self.next_logits
        if compile:
            decode_step = torch.compile(self.next_logits, mode="reduce-overhead", fullgraph=True, dynamic=False)
        cache, pos = None, 0  # pos: positions filled in the cache
        # the decode step's inputs live in fixed buffers, so its input shapes and strides never change
        last = torch.zeros(idx.size(0), 1, dtype=torch.long, device=idx.device)  # (B, 1) the newest token
        pos_t = torch.zeros(1, dtype=torch.long, device=idx.device)  # (1,) its position
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self.next_logits(idx[:, -block_size:])
            elif cache is None or pos + 1 > block_size:
                # (re)fill the cache from the last block_size tokens: the same context the no-cache
                # path sees, so both paths produce identical tokens
                cache = KVCache(self.config, idx.size(0), idx.device, self.wte.weight.dtype)
                if compile:  # the cache's buffers keep their addresses, so the CUDA graph may write them
                    for t in cache.k + cache.v:
                        torch._dynamo.mark_static_address(t)
                context = idx[:, -block_size:]
                pos = context.size(1)
                logits = self.next_logits(context, cache)
            else:
                last.copy_(idx[:, -1:])
                pos_t.fill_(pos)
                logits = decode_step(last, cache, pos_t).clone()  # clone: the graph reuses its output
                pos += 1
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
            if stop_token is not None:
                next_token = torch.where(finished, torch.full_like(next_token, stop_token), next_token)
                finished |= next_token == stop_token
            idx = torch.cat((idx, next_token[:, None]), dim=1)
            yield next_token
            if stop_token is not None and bool(finished.all()):
                return

    def generate(self, idx, max_new_tokens, **sampling):
        """idx (B, T) followed by up to max_new_tokens sampled tokens (B, T + n)."""
        new = list(self.generate_stream(idx, max_new_tokens, **sampling))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops=989e12):
        """Model FLOPs utilisation: achieved training FLOP/s over peak (H100 bf16 dense by default)."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        # 6 FLOPs per parameter per token (forward + backward) plus attention's score and value matmuls
        flops_per_token = 6 * self.num_params(non_embedding=False) + 12 * L * H * Q * T
        return flops_per_token * tokens_per_iter / dt / peak_flops

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer="adamw", muon_lr=0.02):
        """AdamW; weight decay on matrices only (embeddings and linear weights), never on vectors.

        optimizer="muon": Muon (muon_lr) for the blocks' linear weights, AdamW for the rest.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        if optimizer == "muon":
            from muon import Muon
            hidden = {id(m.weight) for m in self.blocks.modules() if isinstance(m, nn.Linear)}
            matrices = [p for p in params if id(p) in hidden]
            rest = [p for p in params if id(p) not in hidden]
            # lr_scale: the training loop multiplies the schedule's learning rate by it
            groups = [{"params": matrices, "muon": True, "lr": muon_lr, "lr_scale": muon_lr / learning_rate},
                      {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                      {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
            return Muon([g for g in groups if g["params"]], lr=learning_rate, betas=betas)
        if optimizer != "adamw":
            raise ValueError(f"optimizer must be adamw or muon, got {optimizer!r}")
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


def check_sampling_args(temperature, top_k, top_p):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next_token(logits, temperature, top_k, top_p, generator=None):
    """One token per row of logits (B, V): greedy at temperature 0, else top-k then nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the tokens before it already cover top_p (the first is always kept)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
