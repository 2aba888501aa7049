"""
The residual stream's root and width (research notes 002): "Could the residual stream start with a learned
value instead of the last token? Would this allow changing the residual stream size throughout the model?"

    python train.py config/cpu_quick.py --residual_root=True                     # the token enters through a read
    python train.py config/cpu_quick.py --residual_widths=[96,160,160,96]        # small-large-small stream

- residual_root: the stream starts at a learned vector, and the token embedding e is read into it before every
  layer (x = x + read(e)), as looped.py's core re-reads its input each loop: the token is an input the layers
  consult, not the stream itself.
- residual_widths: the stream's width at each layer. A linear map moves the stream between widths (from the
  embedding's n_embd into the first layer, between layers, and back to n_embd for the head), initialised to
  carry the shared channels over unchanged. Every layer keeps the model's head size (n_embd // n_head), so a
  wider layer has more heads and one rotary table serves all.

architecture.py builds a WidthGPT when either is set; experiments/residual_widths.py measures both.
"""
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from model import GPT, Block, refuse_options


@dataclass
class WidthConfig:
    residual_root: bool = False  # the stream starts at a learned vector; every layer reads the token into it
    residual_widths: list = field(default_factory=list)  # the stream's width at each layer; [] = n_embd everywhere

    @property
    def active(self):
        return self.residual_root or bool(self.residual_widths)

    def check(self, core):
        if not self.residual_widths:
            return
        if len(self.residual_widths) != core.n_layer:
            raise ValueError(f"residual_widths has {len(self.residual_widths)} entries but the model has "
                             f"n_layer={core.n_layer} layers: give one per layer, or [] for n_embd everywhere")
        head_size = core.n_embd // core.n_head
        bad = [w for w in self.residual_widths if not (isinstance(w, int) and w > 0 and w % head_size == 0)]
        if bad:
            raise ValueError(f"residual_widths={self.residual_widths}: every width must be a positive multiple of "
                             f"the head size n_embd // n_head = {head_size} (each layer keeps the head size), not {bad}")
        if core.n_kv_head:
            raise ValueError("residual_widths gives each layer as many heads as its width holds: grouped-query "
                             "attention (n_kv_head) cannot follow; set n_kv_head=0")

    def width(self, layer, n_embd):
        return self.residual_widths[layer] if self.residual_widths else n_embd


def carry_over(d_in, d_out):
    """A linear map between widths that starts by copying the channels both share (identity where equal)."""
    if d_in == d_out:
        return nn.Identity()
    proj = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(d_out, d_in))
    return proj


class WidthGPT(GPT):
    """The GPT whose stream may start at a learned root and change width from layer to layer."""

    def __init__(self, config, widths, make_block=Block):
        head_size = config.n_embd // config.n_head
        sizes = [widths.width(i, config.n_embd) for i in range(config.n_layer)]

        def layer_of_width(core, i):  # the layer's own width, and as many heads of the model's size as it holds
            return make_block(dataclasses.replace(core, n_embd=sizes[i], n_head=sizes[i] // head_size), i)

        super().__init__(config, layer_of_width)
        self.options.append(widths)
        self.moves = nn.ModuleList(carry_over(a, b) for a, b in zip([config.n_embd] + sizes, sizes))
        self.move_out = carry_over(sizes[-1], config.n_embd)
        # at zero the root makes layer 0 see exactly the embedding; later layers see it added again
        self.root = nn.Parameter(torch.zeros(config.n_embd)) if widths.residual_root else None
        self.reads = nn.ModuleList(carry_over(config.n_embd, w) for w in sizes) if widths.residual_root else None

    def run_blocks(self, x, positions, cache=None, **options):
        refuse_options(options)
        e = x  # (B, T, n_embd) the tokens' embeddings
        if self.root is not None:
            x = self.root.to(e.dtype).expand_as(e)
        for i, block in enumerate(self.blocks):
            x = self.moves[i](x)  # (B, T, width of layer i)
            if self.root is not None:
                x = x + self.reads[i](e)
            x = self.run_block(block, x, positions, cache)
        return self.move_out(x)  # (B, T, n_embd)
