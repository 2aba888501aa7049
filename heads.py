"""
Hydra heads (research notes 003): each head's output scaled by a learned sigmoid gate, per-layer head
counts, and growth that adds a head to a layer whose gates all stay open and drops heads whose gates stay
shut. Measured within noise of the plain model (EXPERIMENTS.md, per-layer shapes); kept so the result can
be reproduced.

    python train.py config/shakespeare_char.py --head_gates=True --grow_heads=True

architecture.py builds a GatedAttention for every layer when head_gates is on; train.py calls
`update_heads` after each step when grow_heads is on.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from model import CausalSelfAttention

GATE_SCALE = 10.0  # a head gate is sigmoid(10 c): Adam moves c by about lr a step, so gates move 10x faster than weights


@dataclass
class HeadConfig:
    head_gates: bool = False
    layer_heads: list = field(default_factory=list)  # live heads of each layer (head size n_embd // n_head); growth rewrites it
    grow_heads: bool = False     # add a head to a layer whose gates all stay open, drop a head whose gate stays shut
    grow_above: float = 0.9      # "open": every gate of the layer above this ...
    prune_below: float = 0.1     # "shut": a gate below this ...
    grow_patience: int = 100     # ... for this many consecutive training steps
    max_heads: int = 16          # growth stops at this many heads in a layer

    def check(self, core):
        if self.layer_heads and len(self.layer_heads) != core.n_layer:
            raise ValueError(f"layer_heads has {len(self.layer_heads)} entries but the model has "
                             f"n_layer={core.n_layer} layers: give one per layer, or [] for all alike")
        if self.layer_heads and core.n_kv_head:
            raise ValueError("layer_heads with n_kv_head (grouped-query attention) is not supported: set n_kv_head=0")
        if any(not 1 <= h <= self.max_heads for h in self.layer_heads):
            raise ValueError(f"layer_heads={self.layer_heads}: each layer needs 1..max_heads={self.max_heads} heads")
        if self.grow_heads and not self.head_gates:
            raise ValueError("grow_heads needs head_gates=True: growth and pruning read the gates")
        if self.grow_heads and core.n_kv_head:
            raise ValueError("grow_heads with n_kv_head (grouped-query attention) is not supported: set n_kv_head=0")
        if self.grow_heads:  # growth records the live heads here, in a list of its own (never the caller's)
            self.layer_heads = list(self.layer_heads) or [core.n_head] * core.n_layer

    def heads(self, layer):
        """The layer's own head count, or None where it has the model's n_head."""
        return self.layer_heads[layer] if self.layer_heads else None


class GatedAttention(CausalSelfAttention):
    """Attention whose heads are each scaled by sigmoid(GATE_SCALE * c_h), so growth sees which heads work
    hard and which idle; with growth it counts how long the gates stay open or shut."""

    def __init__(self, config, layer_idx, n_head=None, window=0, grow=False):
        super().__init__(config, layer_idx, n_head, window)
        self.head_gate = nn.Parameter(torch.zeros(self.n_head))
        if grow:  # consecutive steps the layer's gates were all open / each head's gate was shut
            self.register_buffer("open_streak", torch.zeros((), dtype=torch.long))
            self.register_buffer("shut_streak", torch.zeros(self.n_head, dtype=torch.long))

    def merge_heads(self, y):
        return super().merge_heads(y * torch.sigmoid(GATE_SCALE * self.head_gate)[:, None, None])

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


@torch.no_grad()
def update_heads(model, heads, optimizers):
    """After a training step (grow_heads): a layer whose gates all stayed open for grow_patience steps
    gains a head; heads whose gates stayed shut that long are dropped (one head always stays).
    Returns a line per change; heads.layer_heads (HeadConfig) follows, so checkpoints record the live heads."""
    changes = []
    for i, block in enumerate(model.blocks):
        attn = block.attn
        gates = attn.gates()
        attn.open_streak.copy_((attn.open_streak + 1) * (gates > heads.grow_above).all())
        attn.shut_streak.copy_((attn.shut_streak + 1) * (gates < heads.prune_below))
        shut = (attn.shut_streak >= heads.grow_patience).nonzero().flatten().tolist()
        if shut and attn.n_head > 1:
            keep = [h for h in range(attn.n_head) if h not in shut] or [int(gates.argmax())]
            changes.append(f"layer {i}: pruned {attn.n_head - len(keep)} shut head(s), {len(keep)} left")
            attn.edit_heads(keep, 0, optimizers)
        elif attn.open_streak >= heads.grow_patience and attn.n_head < heads.max_heads:
            attn.edit_heads(list(range(attn.n_head)), 1, optimizers)
            attn.open_streak.zero_()
            changes.append(f"layer {i}: gates all open, grew to {attn.n_head} heads")
        heads.layer_heads[i] = attn.n_head
    return changes
