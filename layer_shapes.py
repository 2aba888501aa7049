"""
Per-layer shapes (research notes 002): do early (parsing) and late (writing) layers need as much MLP width
and context as the middle ones? Each layer may get its own MLP width and a sliding attention window.
Measured without effect at equal parameters (EXPERIMENTS.md, per-layer shapes); kept so the result can be
reproduced.

    python train.py config/shakespeare_char.py --mlp_ratios=[2,4,4,6,4,2] --attn_windows=[32,64,0,0,0,0]

architecture.py reads `mlp_hidden` and `window` when it builds each layer.
"""
from dataclasses import dataclass, field


@dataclass
class ShapeConfig:
    mlp_ratios: list = field(default_factory=list)    # MLP width of each layer, as a multiple of n_embd (default 4)
    attn_windows: list = field(default_factory=list)  # sliding attention window of each layer in tokens; 0 = full

    def check(self, core):
        for name in ("mlp_ratios", "attn_windows"):
            if getattr(self, name) and len(getattr(self, name)) != core.n_layer:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but the model has "
                                 f"n_layer={core.n_layer} layers: give one per layer, or [] for all alike")
        if any(not r > 0 for r in self.mlp_ratios):
            raise ValueError(f"mlp_ratios={self.mlp_ratios}: every ratio must be > 0")
        for w in self.attn_windows:
            if w is not None and not 0 <= w <= core.block_size:
                raise ValueError(f"attention window {w} is outside 0..block_size={core.block_size} "
                                 f"(0 or None means full context)")

    def mlp_hidden(self, layer, n_embd):
        """The layer's MLP width, or None for the default 4 * n_embd."""
        return round(self.mlp_ratios[layer] * n_embd) if self.mlp_ratios else None

    def window(self, layer):
        """The layer's sliding attention window in tokens, or 0 for the full context."""
        return (self.attn_windows[layer] or 0) if self.attn_windows else 0
