"""
µLM: one GPT, read top to bottom.

Small pieces first (norm, rotary, KV cache, attention, MLP), then the Block that wires them and the
chunked head loss (a speed option), then the GPT with its forward pass (where looped depth and layerwise
feedback live), generation with a KV cache, and the optimizer builder. After the GPT come the
optional memory layers (product keys, a kNN store): `make_ffn` puts one in place of a layer's MLP.
Sampling helpers close the file. No disk I/O here: checkpoint.py saves and loads.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


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
    memory: str = "pkm"          # pkm: product-key memory | knn: associative store outside the weights
    memory_slots: int = 65536    # pkm value rows N, a perfect square (N = n_keys**2)
    memory_heads: int = 4        # pkm query heads, all reading the one value table
    memory_key_dim: int = 128    # pkm query/key size, split in two halves for the product keys
    memory_topk: int = 32        # slots (pkm) or stored pairs (knn) each query reads
    memory_gate: bool = False    # pkm output gated by silu(W x), then projected (Memory+, Berges et al. 2024)
    memory_sparse: bool = True   # pkm value gradients touch only the rows read (SparseAdam updates them)
    knn_capacity: int = 65536    # knn store size; the least recently used pair is evicted beyond it
    knn_key_dim: int = 64
    knn_threshold: float = 0.01  # knn writes a pair only if its key is farther than this from every stored key
    checkpoint_activations: bool = False  # training keeps only each block's input and recomputes the rest in
                                          # backward: ~1/3 more compute for a fraction of the activation memory
    # looped depth (recurrent-depth models: Geiping et al. 2025 "Huginn"; Dehghani et al. 2019 Universal
    # Transformers): n_prelude distinct layers, then n_core layers applied `loops` times with shared
    # weights, then n_coda distinct layers. n_core = 0 is the plain stack; n_prelude = n_coda = 0 is ALBERT.
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
    # per-layer shapes (research notes 002): empty lists mean every layer alike
    mlp_ratios: list = field(default_factory=list)    # MLP width of each layer, as a multiple of n_embd (default 4)
    attn_windows: list = field(default_factory=list)  # sliding attention window of each layer in tokens; 0 = full
    feedback: int = 0            # k > 0: layer l also reads layer l+k's output at the previous position (notes 003)
    # hydra heads (notes 003): each head's output scaled by a learned sigmoid gate; growth adds and prunes heads
    head_gates: bool = False
    layer_heads: list = field(default_factory=list)  # live heads of each layer (head size n_embd // n_head); growth rewrites it
    grow_heads: bool = False     # add a head to a layer whose gates all stay open, drop a head whose gate stays shut
    grow_above: float = 0.9      # "open": every gate of the layer above this ...
    prune_below: float = 0.1     # "shut": a gate below this ...
    grow_patience: int = 100     # ... for this many consecutive training steps
    max_heads: int = 16          # growth stops at this many heads in a layer
    # speed options (issue 16; bench.py's levers part measures each): off by default
    ce_chunks: int = 0           # > 0: the training loss is the head and cross-entropy fused over this many row
                                 # chunks, so the (B*T, V) logits never exist whole (the forward then returns no logits)
    attention: str = "sdpa"      # sdpa | flex (FlexAttention's compiled kernel for the causal training path)
    bf16_residual: bool = False  # under bf16 autocast the residual stream is bf16 too (as in modded-nanogpt):
                                 # half the memory traffic for the norms, rotary and residual adds

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
        if self.memory not in ("pkm", "knn"):
            raise ValueError(f"memory must be 'pkm' or 'knn', got {self.memory!r}")
        if math.isqrt(self.memory_slots) ** 2 != self.memory_slots:
            raise ValueError(f"memory_slots={self.memory_slots} must be a perfect square (n_keys**2)")
        if self.memory_key_dim % 2:
            raise ValueError(f"memory_key_dim={self.memory_key_dim} must be even (two product-key halves)")
        if self.memory == "pkm" and not 1 <= self.memory_topk <= math.isqrt(self.memory_slots):
            raise ValueError(f"memory_topk={self.memory_topk} must be between 1 and sqrt(memory_slots)")
        if self.memory == "knn" and not 1 <= self.memory_topk <= self.knn_capacity:
            raise ValueError(f"memory_topk={self.memory_topk} must be between 1 and knn_capacity")
        if self.ce_chunks < 0:
            raise ValueError(f"ce_chunks={self.ce_chunks} must be 0 (off) or a number of row chunks")
        if self.attention not in ("sdpa", "flex"):
            raise ValueError(f"attention must be 'sdpa' or 'flex', got {self.attention!r}")
        self.check_loops()
        self.check_shapes()

    def check_loops(self):
        if not self.n_core:
            if self.n_prelude or self.n_coda or self.loops != 1 or self.backprop_loops or self.exit_tol:
                raise ValueError("n_prelude, n_coda, loops, backprop_loops and exit_tol need a looped core: set n_core > 0")
            return
        if min(self.n_prelude, self.n_coda, self.n_core) < 0 or self.n_prelude + self.n_core + self.n_coda != self.n_layer:
            raise ValueError(f"n_prelude + n_core + n_coda = {self.n_prelude} + {self.n_core} + {self.n_coda} must "
                             f"equal n_layer={self.n_layer}")
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
        core = range(self.n_prelude, self.n_prelude + self.n_core)
        if self.memory == "knn" and any(layer in core for layer in self.memory_layers):
            raise ValueError("a kNN memory layer cannot sit in the looped core (each loop would write its store "
                             "again): move it to the prelude or coda")

    @property
    def max_loops(self):
        return self.loops_max or 2 * self.loops

    def cache_layers(self, loops):
        """Attention layers a KV cache needs: every application of a core block has its own keys and values."""
        return self.n_layer + self.n_core * ((loops or self.loops) - 1)

    def check_shapes(self):
        for name in ("mlp_ratios", "attn_windows", "layer_heads"):
            if getattr(self, name) and len(getattr(self, name)) != self.n_layer:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but the model has "
                                 f"n_layer={self.n_layer} layers: give one per layer, or [] for all alike")
        if any(not r > 0 for r in self.mlp_ratios):
            raise ValueError(f"mlp_ratios={self.mlp_ratios}: every ratio must be > 0")
        for w in self.attn_windows:
            if w is not None and not 0 <= w <= self.block_size:
                raise ValueError(f"attention window {w} is outside 0..block_size={self.block_size} "
                                 f"(0 or None means full context)")
        if not 0 <= self.feedback < self.n_layer:
            raise ValueError(f"feedback={self.feedback} must be 0 (off) or a layer offset below n_layer={self.n_layer}")
        if self.layer_heads and self.n_kv_head:
            raise ValueError("layer_heads with n_kv_head (grouped-query attention) is not supported: set n_kv_head=0")
        if any(not 1 <= h <= self.max_heads for h in self.layer_heads):
            raise ValueError(f"layer_heads={self.layer_heads}: each layer needs 1..max_heads={self.max_heads} heads")
        if self.grow_heads and not self.head_gates:
            raise ValueError("grow_heads needs head_gates=True: growth and pruning read the gates")
        if self.grow_heads and self.n_kv_head:
            raise ValueError("grow_heads with n_kv_head (grouped-query attention) is not supported: set n_kv_head=0")
        if self.n_core and (self.layer_heads or self.grow_heads or self.feedback):
            raise ValueError("layer_heads, grow_heads and feedback are not supported with a looped core (n_core > 0)")
        if self.grow_heads:  # growth records the live heads here, in a list of its own (never the caller's)
            self.layer_heads = list(self.layer_heads) or [self.n_head] * self.n_layer

    def heads(self, layer):
        """(query heads, key/value heads) of one layer; layer_heads, where set, overrides n_head (no GQA then)."""
        if self.layer_heads:
            return self.layer_heads[layer], self.layer_heads[layer]
        return self.n_head, self.kv_heads

    def window(self, layer):
        """The layer's sliding attention window in tokens, or 0 for the full context."""
        return (self.attn_windows[layer] or 0) if self.attn_windows else 0

    def feedback_source(self, layer):
        """The layer whose previous-position output this layer reads, or None."""
        source = layer + self.feedback
        return source if self.feedback and source < self.n_layer else None

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

    def __init__(self, config, batch_size, device, dtype, loops=None, kv_heads=None, length=None):
        hs = config.n_embd // config.n_head
        length = length or config.block_size  # slots: a generation that needs fewer holds fewer (cache_length)
        n = config.cache_layers(loops)  # per-layer heads and feedback need a plain stack (check_shapes), so n = n_layer there
        # kv heads per cache layer: per-layer head counts, or fewer where pruning removed heads
        kv_heads = kv_heads or [config.heads(min(i, config.n_layer - 1))[1] for i in range(n)]
        shapes = [(batch_size, h, length, hs) for h in kv_heads]
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.slots = torch.arange(length, device=device)  # the position each slot holds
        self.shift = 0  # a looped model's loop i writes its core layers shift = i * n_core entries further on
        # layerwise feedback: each layer's output at every position, one slot ahead (slot p + 1 holds
        # position p), so slot 0 is the state before position 0: zeros, or a previous window's last output
        self.outputs = [torch.zeros(batch_size, length + 1, config.n_embd, device=device, dtype=dtype)
                        for _ in range(config.n_layer)] if config.feedback else []

    def update(self, layer, k, v, positions):
        """Write k, v (B, nkv, T, hs) at positions (T,); return the whole cache (B, nkv, block_size, hs)."""
        layer += self.shift
        self.k[layer].index_copy_(2, positions, k.to(self.k[layer].dtype))  # autocast may hand in bf16
        self.v[layer].index_copy_(2, positions, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def write_output(self, layer, x, positions):
        self.outputs[layer].index_copy_(1, positions + 1, x.detach().to(self.outputs[layer].dtype))

    def previous_output(self, layer, positions):
        """The layer's output (B, T, C) at each position before `positions`."""
        return self.outputs[layer][:, positions]


def flex_causal_attention(q, k, v):
    """Causal attention by FlexAttention (Dong et al. 2024), a Triton kernel that torch.compile generates;
    the block mask lets it skip the tiles above the diagonal. Under torch.compile the mask is built in the graph."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # here: it imports dynamo
    T = q.size(2)
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, T, T, device=q.device)
    return flex_attention(q, k, v, block_mask=mask, enable_gqa=k.size(1) != q.size(1))


GATE_SCALE = 10.0  # a head gate is sigmoid(10 c): Adam moves c by about lr a step, so gates move 10x faster than weights


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.heads(layer_idx)
        self.head_size = config.n_embd // config.n_head
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_size, bias=False)
        self.kv_proj = nn.Linear(config.n_embd, 2 * self.n_kv_head * self.head_size, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_size, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.flex = config.attention == "flex"
        # sliding window: early layers that parse need little context (research notes 002; Longformer, Beltagy et al. 2020)
        self.window = config.window(layer_idx)
        # hydra gates: sigmoid(c_h) scales head h, so growth sees which heads work hard and which idle (notes 003)
        self.head_gate = nn.Parameter(torch.zeros(self.n_head)) if config.head_gates else None
        if config.grow_heads:  # consecutive steps the layer's gates were all open / each head's gate was shut
            self.register_buffer("open_streak", torch.zeros((), dtype=torch.long))
            self.register_buffer("shut_streak", torch.zeros(self.n_head, dtype=torch.long))

    def forward(self, x, rotary, positions, cache=None):
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_head, self.head_size).permute(2, 0, 3, 1, 4)  # (B, nkv, T, hs)
        # QK-norm: keeps attention logits bounded at high learning rates (Henry et al. 2020)
        q, k = rotary(norm(q), positions), rotary(norm(k), positions)
        if cache is None and not self.window:  # training: a fresh sequence, the flash-attention causal path
            mask, is_causal = None, True
        else:  # a query sees the cached slots up to its own position; shapes stay static for CUDA graphs
            key_positions = positions
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v, positions)  # (B, nkv, block_size, hs)
                key_positions = cache.slots
            mask, is_causal = key_positions <= positions[:, None], False  # (T, block_size or T)
            if self.window:  # a band: only the last `window` positions, its own included
                mask = mask & (key_positions > positions[:, None] - self.window)
        if self.flex and is_causal and not (self.training and self.dropout):
            y = flex_causal_attention(q, k, v)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               dropout_p=self.dropout if self.training else 0.0,
                                               enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hs)
        if self.head_gate is not None:
            y = y * torch.sigmoid(GATE_SCALE * self.head_gate)[:, None, None]
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, nh * hs): a pruned layer may have fewer heads
        return self.c_proj(y)

    def gates(self):
        return torch.sigmoid(GATE_SCALE * self.head_gate.detach())

    def edit_heads(self, keep, add, optimizers):
        """Keep the heads `keep` (a list of indices), then append `add` new heads; in place, optimizer state included.

        A new head's q/k/v rows are drawn from the mean and std of the existing ones and its output columns
        start at zero, so the layer computes the same function at the moment it grows.
        """
        C, hs, nh = self.c_proj.out_features, self.head_size, self.n_head
        keep = torch.tensor(keep, dtype=torch.long, device=self.c_proj.weight.device)

        def drawn(w):  # (add, hs, C) rows with w's mean and std
            return torch.randn(add, hs, C, device=w.device, dtype=w.dtype) * w.std() + w.mean()
        half = self.kv_proj.weight.size(0) // 2  # keys' rows, then values' rows
        # (module, tensor name, its shape with a head axis, that axis, flat shape after the edit, the new heads' slices)
        edits = [(self.q_proj, "weight", (nh, hs, C), 0, (-1, C), drawn(self.q_proj.weight)),
                 (self.kv_proj, "weight", (2, nh, hs, C), 1, (-1, C),
                  torch.stack((drawn(self.kv_proj.weight[:half]), drawn(self.kv_proj.weight[half:])))),
                 (self.c_proj, "weight", (C, nh, hs), 1, (C, -1), self.c_proj.weight.new_zeros(C, add, hs)),
                 (self, "head_gate", (nh,), 0, (-1,), self.head_gate.new_zeros(add))]
        if hasattr(self, "shut_streak"):
            edits.append((self, "shut_streak", (nh,), 0, (-1,), self.shut_streak.new_zeros(add)))
        for module, name, view, axis, flat, extra in edits:
            def resize(t, extra):
                return torch.cat((t.reshape(view).index_select(axis, keep), extra), axis).reshape(flat)
            old = getattr(module, name)
            # a new Parameter (autograd keeps a leaf's shape), put where the old one was in every optimizer
            new = nn.Parameter(resize(old.detach(), extra)) if isinstance(old, nn.Parameter) else resize(old, extra)
            setattr(module, name, new)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["params"] = [new if p is old else p for p in group["params"]]
                if old in opt.state:  # the moments follow their heads; a new head's start at zero
                    opt.state[new] = {k: resize(m, torch.zeros_like(extra)) if torch.is_tensor(m) and m.shape == old.shape
                                      else m for k, m in opt.state.pop(old).items()}
        self.n_head = self.n_kv_head = len(keep) + add


class MLP(nn.Module):
    """Squared-ReLU feed-forward (Primer, So et al. 2021): cheaper than GELU, trains better."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        # per-layer width: do early (parsing) and late (writing) layers need as much as the middle? (notes 002)
        hidden = round(config.mlp_ratios[layer_idx] * config.n_embd) if config.mlp_ratios else 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ffn = make_ffn(config, layer_idx)
        self.dropout = nn.Dropout(config.dropout)
        # layerwise feedback: a higher layer's output at the previous position enters as input, a recurrence
        # past the context window (Feedback Transformer, Fan et al. 2020, per layer pair and unpooled: notes 003)
        self.layer_idx, self.feedback_source = layer_idx, config.feedback_source(layer_idx)
        self.feedback_proj = None if self.feedback_source is None else nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, rotary, positions, cache=None, feedback=None):
        fb = None
        if self.feedback_proj is not None:  # feedback: a cache holding every layer's earlier outputs
            fb = self.feedback_proj(norm(feedback.previous_output(self.feedback_source, positions)))
        # the feedback joins each sublayer's normalised input, at its scale: added to the raw stream (RMS 0.02
        # at layer 0) it drowned the tokens (shakespeare_char val 3.3 against dense 2.3, EXPERIMENTS.md)
        x = x + self.dropout(self.attn(norm(x) if fb is None else norm(x) + fb, rotary, positions, cache))
        x = x + self.dropout(self.ffn(norm(x) if fb is None else norm(x) + fb))
        if cache is not None and cache.outputs:  # for the layers that read this one at the next position
            cache.write_output(self.layer_idx, x, positions)
        return x


class ChunkedCrossEntropy(torch.autograd.Function):
    """The head matmul and mean cross-entropy, a chunk of rows at a time, gradients made in the forward
    (Liger Kernel's fused linear cross-entropy, Hsu et al. 2024): the (N, V) logits, 12,288 x 50,304 for
    gpu_124m, never exist whole in bf16 or fp32; only one chunk's do. Targets of -1 are ignored.
    The padding columns are in the softmax, as in the full path."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunks):
        # h: (N, C), weight: (V, C), targets: (N,); under autocast the three matmuls run in bf16
        total, grad_h, grad_w = torch.zeros((), device=h.device), [], torch.zeros_like(weight)
        for hc, tc in zip(h.chunk(chunks), targets.chunk(chunks)):
            logits = (hc @ weight.t()).float()  # (n, V)
            valid, safe = (tc != -1)[:, None], tc.clamp_min(0)[:, None]  # (n, 1)
            lse = logits.logsumexp(-1, keepdim=True)  # (n, 1)
            total += ((lse - logits.gather(1, safe)) * valid).sum()
            # d loss / d logits = softmax - onehot(target), zero where the target is ignored; all elementwise,
            # so the compiler makes it one kernel that reads the logits once and writes the gradient once
            onehot = torch.arange(logits.size(1), device=logits.device) == safe  # (n, V)
            grad = ((logits - lse).exp() - onehot.float()) * valid  # (n, V)
            grad_h.append(grad @ weight)  # (n, C)
            grad_w += grad.t() @ hc  # (V, C)
        count = (targets != -1).sum()
        ctx.save_for_backward(torch.cat(grad_h).to(h.dtype) / count, grad_w / count)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None


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
        if config.n_core and config.inject == "concat":
            # input injection by concatenation: [h, e] projected back to C each loop (Geiping et al. 2025)
            self.inject = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)
        self.mean_loops = None  # loops per token the last adaptive-exit (exit_tol) forward used
        self.apply(self._init_weights)
        if config.n_core and config.inject == "concat":
            with torch.no_grad():  # starts as h + e, so concat begins where add does
                self.inject.weight.copy_(torch.cat((torch.eye(config.n_embd), torch.eye(config.n_embd)), dim=1))
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                # residual writes scaled by depth so the stream's variance stays put (GPT-2 paper)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
            if name.endswith("feedback_proj.weight"):
                nn.init.zeros_(p)  # feedback starts silent: the model begins as the plain one

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

    def hidden(self, idx, cache=None, pos=0, loops=None):
        """Final normalised hidden states (B, T, C) of tokens at positions pos..pos+T-1.

        Without a cache pos is 0; with one, the tokens' keys and values are written into it and they
        attend to every cached position before theirs. pos is an int, or a (1,) tensor in the compiled
        decode step (a tensor changes without recompiling). loops: a looped model's loop count (default:
        sampled in training, config.loops in evaluation); a cache must have been made for the same count.
        """
        B, T = idx.size()
        if isinstance(pos, int) and pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens is longer than block_size={self.config.block_size}")
        positions = pos + torch.arange(T, device=idx.device)  # (T,)
        feedback = self.feedback_pass(idx, cache, pos) if self.config.feedback else None
        x = self.drop(self.wte(idx))  # (B, T, C)
        if self.config.bf16_residual and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # the blocks' bf16 outputs then keep it bf16
        if self.config.n_core:
            return norm(self.looped(x, positions, cache, loops))
        if loops is not None:
            raise ValueError(f"loops={loops} needs a looped model (n_core > 0)")
        for block in self.blocks:
            x = self.run_block(block, x, positions, cache, feedback)
        return norm(x)

    def run_block(self, block, x, positions, cache, feedback=None):
        """One block; under checkpoint_activations its activations are recomputed in backward, not kept."""
        if self.config.checkpoint_activations and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, self.rotary, positions, cache, feedback,
                                                     use_reentrant=False)
        return block(x, self.rotary, positions, cache, feedback)

    def feedback_pass(self, idx, cache=None, pos=0):
        """A KV cache holding every layer's output at each position before idx's (layerwise feedback).

        Position t reads outputs at t - 1, so they come from an exact recurrent pass, one token at a time,
        without gradient. Approximation (training only): the feedback is an input, with no backpropagation
        through time; the pass after this recomputes the same outputs in parallel, with gradients for the rest.
        """
        if cache is not None and idx.size(1) == 1:  # a decode step: the cache already holds the past
            return cache
        if cache is None:
            cache = KVCache(self.config, idx.size(0), idx.device, self.rotary.cos.dtype)  # as generate: an int8 export has no wte.weight
        with torch.no_grad():
            for t in range(idx.size(1)):
                self.hidden(idx[:, t:t + 1], cache, pos + t)
        return cache

    def looped(self, x, positions, cache, loops):
        """Prelude, the core applied `loops` times re-reading the prelude's output, coda (B, T, C)."""
        cfg = self.config
        if loops is None:
            loops = self.sample_loops() if self.training else cfg.loops
        if loops < 1:
            raise ValueError(f"loops={loops} must be >= 1")
        if cache is not None and len(cache.k) != cfg.cache_layers(loops):
            raise ValueError(f"the KV cache was made for another loop count than loops={loops}")
        if cfg.exit_tol and (cache is not None or self.training):
            raise ValueError("exit_tol (adaptive exit) works in no-cache evaluation only: use use_cache=False "
                             "or exit_tol=0")
        prelude, core = self.blocks[:cfg.n_prelude], self.blocks[cfg.n_prelude:cfg.n_prelude + cfg.n_core]
        coda = self.blocks[cfg.n_prelude + cfg.n_core:]
        for block in prelude:
            x = self.run_block(block, x, positions, cache)
        e = x  # the prelude's output, re-read every loop so a long loop does not drift from its input
        h = torch.zeros_like(e) if cfg.inject != "none" else e
        active = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # (B, T) tokens still looping
        used = torch.zeros(x.shape[:2], device=x.device)  # (B, T) loops each token ran
        # truncated backprop through depth: only the last k loops keep a graph, so memory stays flat in r
        no_grad_loops = loops - cfg.backprop_loops if cfg.backprop_loops and self.training else 0
        for i in range(loops):
            if cache is not None:
                cache.shift = i * cfg.n_core
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= no_grad_loops):
                # the state re-enters normalised, so its scale cannot grow with the loop count (norm(0) = 0)
                u = h if cfg.inject == "none" else norm(h) + e if cfg.inject == "add" else \
                    self.inject(torch.cat((norm(h), e), -1))
                for block in core:
                    u = self.run_block(block, u, positions, cache)
            if cfg.exit_tol:  # per-token exit (a thresholded ACT, Graves 2016): a settled token keeps its state
                used += active
                u = torch.where(active[..., None], u, h)
                active &= (u - h).norm(dim=-1) > cfg.exit_tol * h.norm(dim=-1).clamp_min(1e-6)
            h = u
            if cfg.exit_tol and not active.any():
                break
        if cfg.exit_tol:
            self.mean_loops = used.mean().item()
        if cache is not None:
            cache.shift = (loops - 1) * cfg.n_core
        for block in coda:
            h = self.run_block(block, h, positions, cache)
        if cache is not None:
            cache.shift = 0
        return h

    def sample_loops(self):
        """A training step's loop count: fixed, uniform in [loops_min, loops_max], or Poisson with a
        log-normal rate of mean `loops` (Geiping et al. 2025), clipped to [loops_min, loops_max]."""
        cfg = self.config
        if cfg.loops_sampling == "uniform":
            return int(torch.randint(cfg.loops_min, cfg.max_loops + 1, ()))
        if cfg.loops_sampling == "poisson_lognormal":
            sigma = 0.5
            rate = torch.exp(torch.randn(()) * sigma + math.log(cfg.loops) - sigma ** 2 / 2)  # mean loops
            return int(min(max(torch.poisson(rate).item(), cfg.loops_min), cfg.max_loops))
        return cfg.loops

    def forward(self, idx, targets=None, reduction="mean", loops=None):
        """Logits (B, T, V) over the real vocabulary; with targets also the cross-entropy: mean, or per
        token (B, T) with reduction='none'. loops: a looped model's test-time loop count.
        With ce_chunks, a training forward's mean loss comes from the fused chunked head, and logits are None."""
        h = self.hidden(idx, loops=loops)  # (B, T, C)
        if self.config.ce_chunks and targets is not None and reduction == "mean" and torch.is_grad_enabled():
            return None, ChunkedCrossEntropy.apply(h.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                                   self.config.ce_chunks)
        logits = self.lm_head(h)  # (B, T, padded V)
        loss = None
        if targets is not None:  # the padding columns never appear as targets, so training pushes them down
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1, reduction=reduction)
            loss = loss.view(targets.shape) if reduction == "none" else loss
        return logits[..., :self.config.vocab_size], loss  # a view: callers never see the padding

    def next_logits(self, idx, cache=None, pos=0, loops=None):
        """Logits (B, V) of the token that follows each row of idx (B, T), whose first token is at pos.

        In a cached decode step idx is (B, 1) and pos a (1,) tensor: the shapes never change from step
        to step, so torch.compile(mode="reduce-overhead") captures the step as one CUDA graph and
        replays it, with no Python or kernel-launch overhead per layer.
        """
        return self.lm_head(self.hidden(idx, cache, pos, loops)[:, -1, :]).float()[:, :self.config.vocab_size]

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        stop_token=None, seed=None, use_cache=True, compile=False, loops=None):
        """Yield the next token (B,) for each step; temperature 0 is greedy decoding.

        loops: a looped model's test-time loop count (default config.loops): thinking longer per token.

        compile=True compiles the cached decode step: with CUDA graphs on a GPU (worth it for long samples); on
        a CPU into inductor's C++, where an int8 export's matvecs read each weight byte once.
        """
        check_sampling_args(temperature, top_k, top_p)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(seed)
        block_size = self.config.block_size
        decode_step = self.next_logits
        if compile and idx.device.type == "cpu":
            # no CUDA graphs on a CPU; inductor would fold each norm and residual add into every output row of
            # an int8 matvec and redo it per row; materialised, the int8 step runs at 2.1x float32's (BENCHMARKS.md)
            decode_step = torch.compile(self.next_logits, fullgraph=True, dynamic=False,
                                        options={"realize_opcount_threshold": 0})
        elif compile:
            decode_step = torch.compile(self.next_logits, mode="reduce-overhead", fullgraph=True, dynamic=False)
        cache, pos = None, 0  # pos: positions filled in the cache
        # the decode step's inputs live in fixed buffers, so its input shapes and strides never change
        last = torch.zeros(idx.size(0), 1, dtype=torch.long, device=idx.device)  # (B, 1) the newest token
        pos_t = torch.zeros(1, dtype=torch.long, device=idx.device)  # (1,) its position
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self.next_logits(idx[:, -block_size:], loops=loops)
            elif cache is None or pos + 1 > block_size:
                # (re)fill the cache from the last block_size tokens: the same context the no-cache
                # path sees, so both paths produce identical tokens
                # the rotary tables carry the float dtype (a quantized model's embedding is int8); a pruned
                # (never looped) model's layers may have fewer kv heads each
                kv_heads = None if self.config.n_core else [block.attn.n_kv_head for block in self.blocks]
                length = cache_length(idx.size(1) + max_new_tokens, block_size)
                cache = KVCache(self.config, idx.size(0), idx.device, self.rotary.cos.dtype, loops, kv_heads, length)
                if compile:  # the cache's buffers keep their addresses, so the CUDA graph may write them
                    for t in cache.k + cache.v + cache.outputs:
                        torch._dynamo.mark_static_address(t)
                context = idx[:, -block_size:]
                pos = context.size(1)
                logits = self.next_logits(context, cache, loops=loops)
            else:
                last.copy_(idx[:, -1:])
                pos_t.fill_(pos)
                logits = decode_step(last, cache, pos_t, loops).clone()  # clone: the graph reuses its output
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
        L, H, Q, T = cfg.cache_layers(None), cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        # 6 FLOPs per parameter per token (forward + backward) plus attention's score and value matmuls;
        # a looped core's parameters count once per loop
        core = sum(p.numel() for p in self.blocks[cfg.n_prelude:cfg.n_prelude + cfg.n_core].parameters())
        flops_per_token = 6 * (self.num_params(non_embedding=False) + core * (cfg.loops - 1)) + 12 * L * H * Q * T
        return flops_per_token * tokens_per_iter / dt / peak_flops

    @torch.no_grad()
    def memorize(self, idx):
        """Write the (key, value) pairs of idx (B, T) into every kNN memory's store, as training forwards do."""
        layers = [block.ffn for block in self.blocks if isinstance(block.ffn, KNNMemory)]
        for layer in layers:
            layer.writing = True
        try:
            self.hidden(idx)
        finally:
            for layer in layers:
                layer.writing = False

    def knn_stores(self):
        """{layer index: KNNStore} of the kNN memory layers (empty for other models)."""
        return {i: block.ffn.store for i, block in enumerate(self.blocks) if isinstance(block.ffn, KNNMemory)}

    @torch.no_grad()
    def update_heads(self, optimizers):
        """After a training step (grow_heads): a layer whose gates all stayed open for grow_patience steps
        gains a head; heads whose gates stayed shut that long are dropped (one head always stays).
        Returns a line per change; config.layer_heads follows, so checkpoints record the live heads."""
        cfg, changes = self.config, []
        for i, block in enumerate(self.blocks):
            attn = block.attn
            gates = attn.gates()
            attn.open_streak.copy_((attn.open_streak + 1) * (gates > cfg.grow_above).all())
            attn.shut_streak.copy_((attn.shut_streak + 1) * (gates < cfg.prune_below))
            shut = (attn.shut_streak >= cfg.grow_patience).nonzero().flatten().tolist()
            if shut and attn.n_head > 1:
                keep = [h for h in range(attn.n_head) if h not in shut] or [int(gates.argmax())]
                changes.append(f"layer {i}: pruned {attn.n_head - len(keep)} shut head(s), {len(keep)} left")
                attn.edit_heads(keep, 0, optimizers)
            elif attn.open_streak >= cfg.grow_patience and attn.n_head < cfg.max_heads:
                attn.edit_heads(list(range(attn.n_head)), 1, optimizers)
                attn.open_streak.zero_()
                changes.append(f"layer {i}: gates all open, grew to {attn.n_head} heads")
            cfg.layer_heads[i] = attn.n_head
        return changes

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer="adamw", muon_lr=0.02,
                             memory_lr_scale=1.0):
        """AdamW; weight decay on matrices only (embeddings and linear weights), never on vectors.

        optimizer="muon": Muon (muon_lr) for the blocks' linear weights, AdamW for the rest.
        Product-key value tables with dense gradients get a group of their own at lr * memory_lr_scale
        without decay; sparse ones are left to configure_memory_optimizer.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        values = [p for p in params if getattr(p, "is_memory_value", False)]
        params = [p for p in params if not getattr(p, "is_memory_value", False)]
        # lr_scale: the training loop multiplies the schedule's learning rate by it
        memory_group = {"params": [] if self.config.memory_sparse else values, "weight_decay": 0.0,
                        "lr_scale": memory_lr_scale}
        if optimizer == "muon":
            from muon import Muon
            hidden = {id(m.weight) for m in self.blocks.modules() if isinstance(m, nn.Linear)}
            matrices = [p for p in params if id(p) in hidden]
            rest = [p for p in params if id(p) not in hidden]
            groups = [{"params": matrices, "muon": True, "lr": muon_lr, "lr_scale": muon_lr / learning_rate},
                      {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                      {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}, memory_group]
            return Muon([g for g in groups if g["params"]], lr=learning_rate, betas=betas)
        if optimizer != "adamw":
            raise ValueError(f"optimizer must be adamw or muon, got {optimizer!r}")
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}, memory_group]
        groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    def configure_memory_optimizer(self, learning_rate, betas, memory_lr_scale=1.0):
        """SparseAdam for product-key value tables with sparse gradients (memory_sparse), or None.

        Only the rows a batch read get a gradient, and only they are updated (Lample et al. 2019); AdamW
        cannot take sparse gradients, hence a second optimizer. Its group's lr_scale is memory_lr_scale.
        """
        values = [p for p in self.parameters() if getattr(p, "is_memory_value", False) and p.requires_grad]
        if not values or not self.config.memory_sparse:
            return None
        return torch.optim.SparseAdam([{"params": values, "lr_scale": memory_lr_scale}], lr=learning_rate, betas=betas)


# ----------------------------------------------------------------------------- optional memory layers
# make_ffn (above, in Block) puts one of these in place of a layer's MLP when config.memory_layers names it.

class ProductKeyMemory(nn.Module):
    """Product-key memory (Lample et al. 2019; Berges et al. 2024, "Memory Layers at Scale").

    A feed-forward is a key-value memory with few slots, all read (Geva et al. 2021). This one holds
    N = n_keys**2 value rows and reads only top-k per head: each query half scores n_keys sub-keys,
    and the best k of the k*k sums of the two halves' top-k are exactly the best k of all N slots.
    Compute grows with sqrt(N), parameters with N.
    """

    def __init__(self, config):
        super().__init__()
        C, H, D = config.n_embd, config.memory_heads, config.memory_key_dim
        self.n_keys, self.heads, self.topk = math.isqrt(config.memory_slots), H, config.memory_topk
        self.query = nn.Linear(C, H * D, bias=False)
        self.keys = nn.Parameter(torch.randn(H, 2, self.n_keys, D // 2) / math.sqrt(D // 2))
        # the value table: EmbeddingBag sums the k weighted rows of each token without materialising them
        self.values = nn.EmbeddingBag(config.memory_slots, C, mode="sum", sparse=config.memory_sparse)
        nn.init.normal_(self.values.weight, std=C ** -0.5)  # Lample et al.'s value init
        self.values.weight.is_memory_value = True  # configure_optimizers gives it its own learning rate
        self.gate = nn.Linear(C, C, bias=False) if config.memory_gate else None
        self.c_proj = nn.Linear(C, C, bias=False) if config.memory_gate else None

    def lookup(self, x):
        """Scores and slot indices (BT, heads, topk) of the best slots for each token of x (B, T, C)."""
        q = self.query(x).view(-1, self.heads, 2, self.keys.size(-1))  # (BT, H, 2, D/2)
        q = norm(q)  # normalised halves keep the scores' scale fixed while keys and queries train (Berges et al. 2024)
        half_scores = torch.einsum("bhsd,hsnd->bhsn", q, self.keys)  # (BT, H, 2, n_keys)
        s, i = half_scores.topk(self.topk, dim=-1)  # (BT, H, 2, k) per half
        # all k*k pairs of one candidate from each half; their score is the sum of the halves'
        pair_scores = s[:, :, 0, :, None] + s[:, :, 1, None, :]  # (BT, H, k, k)
        pair_index = i[:, :, 0, :, None] * self.n_keys + i[:, :, 1, None, :]  # (BT, H, k, k)
        scores, best = pair_scores.flatten(2).topk(self.topk, dim=-1)  # (BT, H, k)
        return scores, pair_index.flatten(2).gather(-1, best)

    def forward(self, x):
        B, T, C = x.size()
        scores, index = self.lookup(x)  # (BT, H, k)
        weights = scores.float().softmax(dim=-1).to(x.dtype)
        # one bag per token holding all heads' slots: the heads' reads are summed (Lample et al. 2019)
        read = self.values
        if self.values.sparse and torch.is_grad_enabled():
            # inductor cannot compile the sparse gradient of an EmbeddingBag (torch 2.13): read eagerly.
            # Wrapped here, not by a decorator, so importing model.py does not import dynamo (which made
            # two-process gloo DDP runs hang now and then)
            read = torch.compiler.disable(self.values)
        y = read(index.view(B * T, -1), per_sample_weights=weights.view(B * T, -1))  # (BT, C)
        y = y.view(B, T, C).to(x.dtype)
        if self.gate is not None:
            y = self.c_proj(y * F.silu(self.gate(x)))
        return y


class KNNStore:
    """(key, value) pairs kept outside the weights: exact top-k search, novelty-gated writes, LRU eviction.

    Not a parameter and not in the state dict: checkpoint.py saves it beside a checkpoint as numpy
    arrays and memory-maps it on load, so a trained model can run with another store.
    """

    def __init__(self, capacity, key_dim, value_dim, threshold, chunk=65536):
        self.capacity, self.threshold, self.chunk = capacity, threshold, chunk
        self.keys = torch.zeros(0, key_dim)
        self.values = torch.zeros(0, value_dim)
        self.last_used = torch.zeros(0, dtype=torch.long)  # the clock tick of each pair's last write or read
        self.clock = 0

    def __len__(self):
        return self.keys.size(0)

    def to(self, device):
        if self.keys.device != torch.device(device):
            self.keys, self.values, self.last_used = (t.to(device) for t in (self.keys, self.values, self.last_used))
        return self

    def clear(self):
        self.keys, self.values, self.last_used = self.keys[:0], self.values[:0], self.last_used[:0]

    def search(self, queries, k):
        """Scores (n, k') and indices (n, k') of the stored keys with the largest dot product, k' = min(k, size)."""
        best_s = queries.new_full((queries.size(0), 0), float("-inf"))
        best_i = torch.zeros(queries.size(0), 0, dtype=torch.long, device=queries.device)
        # chunked over the store, so memory stays (n, chunk) however large the store grows
        for start in range(0, len(self), self.chunk):
            s = queries @ self.keys[start:start + self.chunk].to(queries.dtype).T  # (n, chunk)
            s, i = s.topk(min(k, s.size(1)), dim=-1)
            best_s, order = torch.cat((best_s, s), 1).topk(min(k, best_s.size(1) + s.size(1)), dim=-1)
            best_i = torch.cat((best_i, i + start), 1).gather(1, order)
        return best_s, best_i

    def touch(self, index):
        self.clock += 1
        self.last_used[index.flatten()] = self.clock

    def write(self, keys, values):
        """Insert the pairs whose key is farther than threshold from the store and from earlier keys here."""
        keys, values = keys.detach().float(), values.detach().float()
        # keys are unit vectors, so squared distance is 2 - 2 * dot product
        far = torch.ones(keys.size(0), dtype=torch.bool, device=keys.device)
        if len(self):
            far &= 2 - 2 * self.search(keys, 1)[0][:, 0] > self.threshold ** 2
        near_earlier = (2 - 2 * keys @ keys.T <= self.threshold ** 2).tril(diagonal=-1).any(dim=1)
        keys, values = keys[far & ~near_earlier], values[far & ~near_earlier]
        keys, values = keys[-self.capacity:], values[-self.capacity:]
        self.clock += 1
        room = self.capacity - len(self)
        if keys.size(0) > room:  # evict the least recently used pairs to make room
            keep = self.last_used.topk(len(self) - (keys.size(0) - room)).indices
            self.keys, self.values, self.last_used = self.keys[keep], self.values[keep], self.last_used[keep]
        stamp = torch.full((keys.size(0),), self.clock, dtype=torch.long, device=self.last_used.device)
        self.keys = torch.cat((self.keys, keys.to(self.keys.device)))
        self.values = torch.cat((self.values, values.to(self.values.device)))
        self.last_used = torch.cat((self.last_used, stamp))


class KNNMemory(nn.Module):
    """Associative memory over a store outside the weights (Memorizing Transformers, Wu et al. 2022).

    Each position t becomes a pair: key = its normalised query, value = the layer's input at t + 1
    (what came next, as in kNN-LM, Khandelwal et al. 2020). A query reads its top-k nearest stored
    keys and attends over them plus an empty slot, so an unmatched query reads nothing. Training
    forwards write their pairs after reading them (so a batch never reads its own future); eval
    forwards only read unless `writing` is set (GPT.memorize).
    """

    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.topk = config.memory_topk
        # keys and queries share one projection: a stored key is the query its context produced
        self.q_proj = nn.Linear(C, config.knn_key_dim, bias=False)
        # values are stored raw; this projection applies after the weighted sum (the two commute), so it
        # trains through retrieved pairs even though the store itself is detached
        self.c_proj = nn.Linear(C, C, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # learned inverse temperature of the cosine scores
        self.empty_score = nn.Parameter(torch.zeros(()))  # the logit of reading nothing
        self.store = KNNStore(config.knn_capacity, config.knn_key_dim, C, config.knn_threshold)
        self.writing = False

    def forward(self, x):
        # the store changes size every call, so compiled code would recompile each time: run eagerly
        return torch.compiler.disable(self.read_and_write)(x)

    def read_and_write(self, x):
        B, T, C = x.size()
        q = F.normalize(self.q_proj(x).float(), dim=-1).view(B * T, -1)  # (BT, dk)
        y = torch.zeros(B * T, C, device=x.device, dtype=torch.float32)
        self.store.to(x.device)
        if len(self.store):
            with torch.no_grad():
                _, index = self.store.search(q, self.topk)  # (BT, k)
                self.store.touch(index)
            keys, values = self.store.keys[index], self.store.values[index]  # (BT, k, dk), (BT, k, C)
            # straight-through: for a good match the stored key is about the query, so the key's gradient
            # flows into the query as if the key had been recomputed (the store itself stays detached)
            keys = keys + (q - q.detach())[:, None, :]
            scores = torch.einsum("nd,nkd->nk", q, keys) * self.log_scale.exp()  # (BT, k)
            scores = torch.cat((scores, self.empty_score.expand(B * T, 1)), dim=1)  # (BT, k + 1)
            weights = scores.softmax(dim=-1)[:, :-1]  # the empty slot's value is zero
            y = torch.einsum("nk,nkc->nc", weights, values)  # (BT, C)
        if self.training or self.writing:
            # pair (key at t, input at t + 1); the last position has no successor yet
            self.store.write(q.view(B, T, -1)[:, :-1].reshape(-1, q.size(-1)), x[:, 1:].reshape(-1, C))
        return self.c_proj(y.to(x.dtype).view(B, T, C))


def make_ffn(config, layer_idx):
    """The feed-forward for one layer: the seam where a memory layer replaces the MLP."""
    if layer_idx in config.memory_layers:
        return ProductKeyMemory(config) if config.memory == "pkm" else KNNMemory(config)
    return MLP(config, layer_idx)


# ----------------------------------------------------------------------------- sampling

def check_sampling_args(temperature, top_k, top_p):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def cache_length(needed, block_size):
    """KV cache slots for a generation that needs `needed` positions, rounded up to a power of two (at most
    twice its memory), so it is never refilled before its last token. A decode step is specialised to the
    cache's shape: a compiled one captures it in its graph, and on a GPU the eager step's attention builds a
    cuDNN plan for each new length (0.1-1 s on an H100: inside a 512-token timing it read 0.82x). Rounded,
    generations of 60 or 64 new tokens share one graph and one plan (BENCHMARKS.md, target 4)."""
    return min(block_size, 1 << (needed - 1).bit_length())


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
