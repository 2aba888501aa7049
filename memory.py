"""
Memory layers in place of a layer's MLP (research notes 003): product-key memory, a large table of which
each token reads a few rows, and a kNN memory over a store kept outside the weights.

    python train.py config/shakespeare_char.py --memory_layers=[2] --memory_slots=65536

architecture.py asks `make_memory_layer` for the feed-forward of each layer named in memory_layers. The
value tables train at their own learning rate (`value_groups`), sparsely by SparseAdam by default;
kNN stores are saved beside a checkpoint by checkpoint.py.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import norm


@dataclass
class MemoryConfig:
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

    def check(self, core):
        for layer in self.memory_layers:
            if not 0 <= layer < core.n_layer:
                raise ValueError(f"memory layer {layer} is outside the model's {core.n_layer} layers")
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


class ProductKeyMemory(nn.Module):
    """Product-key memory (Lample et al. 2019; Berges et al. 2024, "Memory Layers at Scale").

    A feed-forward is a key-value memory with few slots, all read (Geva et al. 2021). This one holds
    N = n_keys**2 value rows and reads only top-k per head: each query half scores n_keys sub-keys,
    and the best k of the k*k sums of the two halves' top-k are exactly the best k of all N slots.
    Compute grows with sqrt(N), parameters with N.
    """

    def __init__(self, config, n_embd):
        super().__init__()
        C, H, D = n_embd, config.memory_heads, config.memory_key_dim
        self.n_keys, self.heads, self.topk = math.isqrt(config.memory_slots), H, config.memory_topk
        self.query = nn.Linear(C, H * D, bias=False)
        self.keys = nn.Parameter(torch.randn(H, 2, self.n_keys, D // 2) / math.sqrt(D // 2))
        # the value table: EmbeddingBag sums the k weighted rows of each token without materialising them
        self.values = nn.EmbeddingBag(config.memory_slots, C, mode="sum", sparse=config.memory_sparse)
        nn.init.normal_(self.values.weight, std=C ** -0.5)  # Lample et al.'s value init
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
            # Wrapped here, not by a decorator, so importing memory.py does not import dynamo (which made
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

    def __init__(self, config, n_embd):
        super().__init__()
        C = n_embd
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


def make_memory_layer(config, n_embd):
    """The memory layer that replaces an MLP: product keys or a kNN store."""
    return ProductKeyMemory(config, n_embd) if config.memory == "pkm" else KNNMemory(config, n_embd)


def knn_stores(model):
    """{layer index: KNNStore} of the kNN memory layers (empty for other models)."""
    return {i: block.ffn.store for i, block in enumerate(model.blocks) if isinstance(block.ffn, KNNMemory)}


@torch.no_grad()
def memorize(model, idx):
    """Write the (key, value) pairs of idx (B, T) into every kNN memory's store, as training forwards do."""
    layers = [block.ffn for block in model.blocks if isinstance(block.ffn, KNNMemory)]
    for layer in layers:
        layer.writing = True
    try:
        model.hidden(idx)
    finally:
        for layer in layers:
            layer.writing = False


def value_groups(model, learning_rate, betas, lr_scale):
    """The product-key value tables' optimizer settings: ([dense group] for GPT.configure_optimizers, the
    sparse tables' weights, their SparseAdam or None). Values train at lr * lr_scale without decay: each row sees few
    updates. A sparse table gets only the rows a batch read updated (Lample et al. 2019); AdamW cannot take
    sparse gradients, hence a second optimizer."""
    tables = [m.values for m in model.modules() if isinstance(m, ProductKeyMemory) and m.values.weight.requires_grad]
    dense = [t.weight for t in tables if not t.sparse]
    sparse = [t.weight for t in tables if t.sparse]
    groups = [{"params": dense, "weight_decay": 0.0, "lr_scale": lr_scale}] if dense else []
    optimizer = torch.optim.SparseAdam([{"params": sparse, "lr_scale": lr_scale}], lr=learning_rate, betas=betas) \
        if sparse else None
    return groups, sparse, optimizer
