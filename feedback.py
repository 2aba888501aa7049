"""
Layerwise feedback (research notes 003): layer l also reads layer l + k's output at the previous position,
a recurrence past the context window (Feedback Transformer, Fan et al. 2020, per layer pair and unpooled).
Measured 8x slower to train and no better per step (EXPERIMENTS.md, per-layer shapes); kept so the result
can be reproduced.

    python train.py config/shakespeare_char.py --feedback=2

Position t reads outputs at t - 1, so they come from an exact recurrent pass, one token at a time, without
gradient (`FeedbackGPT.feedback_pass`); the parallel pass after it recomputes the same outputs with
gradients for the rest. The feedback is an input: no backpropagation through time.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from generation import KVCache
from model import GPT, Block, norm, refuse_options


@dataclass
class FeedbackConfig:
    feedback: int = 0  # k > 0: layer l also reads layer l+k's output at the previous position

    def check(self, core):
        if not 0 <= self.feedback < core.n_layer:
            raise ValueError(f"feedback={self.feedback} must be 0 (off) or a layer offset below n_layer={core.n_layer}")

    def source(self, layer, n_layer):
        """The layer whose previous-position output this layer reads, or None."""
        source = layer + self.feedback
        return source if self.feedback and source < n_layer else None


class FeedbackCache(KVCache):
    """A KV cache that also holds each layer's output at every position, one slot ahead (slot p + 1 holds
    position p), so slot 0 is the state before position 0: zeros, or a previous window's last output."""

    def __init__(self, kv_heads, head_size, batch_size, length, device, dtype, n_embd):
        super().__init__(kv_heads, head_size, batch_size, length, device, dtype)
        self.outputs = [torch.zeros(batch_size, length + 1, n_embd, device=device, dtype=dtype) for _ in kv_heads]

    def write_output(self, layer, x, positions):
        self.outputs[layer].index_copy_(1, positions + 1, x.detach().to(self.outputs[layer].dtype))

    def previous_output(self, layer, positions):
        """The layer's output (B, T, C) at each position before `positions`."""
        return self.outputs[layer][:, positions]

    def tensors(self):
        return super().tensors() + self.outputs

    def rows(self, start, stop):
        view = super().rows(start, stop)
        view.outputs = [t[start:stop] for t in self.outputs]
        return view


class FeedbackBlock(Block):
    """A block whose sublayers' inputs also get a projection of a higher layer's previous output."""

    def __init__(self, config, layer_idx, source, attn=None, ffn=None):
        super().__init__(config, layer_idx, attn, ffn)
        self.layer_idx, self.source = layer_idx, source
        self.feedback_proj = None if source is None else nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, rotary, positions, cache=None, outputs=None):
        fb = None
        if self.feedback_proj is not None:
            fb = self.feedback_proj(norm(outputs.previous_output(self.source, positions)))
        # the feedback joins each sublayer's normalised input, at its scale: added to the raw stream (RMS 0.02
        # at layer 0) it drowned the tokens (shakespeare_char val 3.3 against dense 2.3, EXPERIMENTS.md)
        x = x + self.dropout(self.attn(norm(x) if fb is None else norm(x) + fb, rotary, positions, cache))
        x = x + self.dropout(self.ffn(norm(x) if fb is None else norm(x) + fb))
        if cache is not None:  # for the layers that read this one at the next position
            cache.write_output(self.layer_idx, x, positions)
        return x


class FeedbackGPT(GPT):
    """The GPT whose blocks (FeedbackBlocks) read higher layers' outputs at the previous position."""

    def __init__(self, config, feedback, make_block):
        super().__init__(config, make_block)
        self.options.append(feedback)
        for block in self.blocks:
            if block.feedback_proj is not None:
                nn.init.zeros_(block.feedback_proj.weight)  # feedback starts silent: the model begins as the plain one

    def hidden(self, idx, cache=None, pos=0, **options):
        refuse_options(options)
        return super().hidden(idx, cache, pos, outputs=self.feedback_pass(idx, cache, pos))

    def run_blocks(self, x, positions, cache=None, outputs=None):
        for block in self.blocks:
            x = self.run_block(block, x, positions, cache, outputs=outputs)
        return x

    def make_cache(self, batch_size, length, device, dtype, **options):
        refuse_options(options)
        kv_heads = [block.attn.n_kv_head for block in self.blocks]
        return FeedbackCache(kv_heads, self.config.n_embd // self.config.n_head, batch_size, length, device, dtype,
                             self.config.n_embd)

    def feedback_pass(self, idx, cache=None, pos=0):
        """A cache holding every layer's output at each position before idx's, from a recurrent pass."""
        if cache is not None and idx.size(1) == 1:  # a decode step: the cache already holds the past
            return cache
        if cache is None:  # as generate: an int8 export has no wte.weight, the rotary tables carry the dtype
            cache = self.make_cache(idx.size(0), self.config.block_size, idx.device, self.rotary.cos.dtype)
        with torch.no_grad():
            for t in range(idx.size(1)):
                self.hidden(idx[:, t:t + 1], cache, pos + t)
        return cache
