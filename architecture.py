"""
Every model option, and the one function that builds the GPT they describe.

model.py's GPTConfig holds the core options; each research mechanism keeps its own in a dataclass of its
module (looped.py, memory.py, layer_shapes.py, heads.py, feedback.py, shim.py, widths.py), which validates
them. A checkpoint's model_args and train.py's config hold one flat dict of all of them: `build_model` splits
it, checks the combinations no single module can see, and builds the model. Its block factory picks each layer's attention
and feed-forward; the model class picks how the layers run (plain, looped, with feedback, between tokenizer
shims, or in a stream of changing width).
"""
import dataclasses
import difflib
import functools

from feedback import FeedbackBlock, FeedbackConfig, FeedbackGPT
from heads import GatedAttention, HeadConfig  # noqa: F401 (HeadConfig: options_of's argument)
from layer_shapes import ShapeConfig
from looped import LoopConfig, LoopedGPT
from memory import MemoryConfig, make_memory_layer
from model import GPT, MLP, Block, CausalSelfAttention, GPTConfig
from shim import ShimConfig, ShimGPT
from widths import WidthConfig, WidthGPT

OPTION_CLASSES = (GPTConfig, MemoryConfig, LoopConfig, ShapeConfig, HeadConfig, FeedbackConfig, ShimConfig, WidthConfig)
DEFAULTS = {f.name: getattr(cls(), f.name) for cls in OPTION_CLASSES for f in dataclasses.fields(cls)}
MODEL_KEYS = list(DEFAULTS)


def split_options(model_args):
    """{option class: its instance} from a flat dict; an unknown key is a ValueError naming the closest."""
    unknown = [k for k in model_args if k not in DEFAULTS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], MODEL_KEYS, n=1)
        raise ValueError(f"unknown model option {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return {cls: cls(**{f.name: model_args[f.name] for f in dataclasses.fields(cls) if f.name in model_args})
            for cls in OPTION_CLASSES}


def check_combinations(core, memory, loop, shapes, heads, feedback, shim, widths):
    for options in (memory, loop, shapes, heads, feedback, shim, widths):
        options.check(core)
    if loop.n_core and memory.memory == "knn" and any(layer in loop.core_layers() for layer in memory.memory_layers):
        raise ValueError("a kNN memory layer cannot sit in the looped core (each loop would write its store "
                         "again): move it to the prelude or coda")
    if loop.n_core and (heads.layer_heads or heads.grow_heads or feedback.feedback):
        raise ValueError("layer_heads, grow_heads and feedback are not supported with a looped core (n_core > 0)")
    if loop.prefix_token >= 0 and any(shapes.attn_windows):
        raise ValueError("prefix_token (a prefix-LM mask) and attn_windows (sliding windows) cannot be combined")
    stacks = [name for name, on in (("a looped core (n_core)", loop.n_core), ("feedback", feedback.feedback),
                                    ("shim", shim.shim), ("residual_root/residual_widths", widths.active)) if on]
    if len(stacks) > 1:  # each runs the layers its own way (a GPT subclass): one at a time
        raise ValueError(f"{' and '.join(stacks)} cannot be combined: set one of them")
    if widths.residual_widths and (heads.layer_heads or heads.grow_heads):
        raise ValueError("residual_widths sets each layer's heads from its width: drop layer_heads and grow_heads")


def make_block(core, layer, memory, shapes, heads, feedback):
    """One layer: attention (gated where head_gates is on) and an MLP or a memory layer, with the layer's shape."""
    n_head, window = heads.heads(layer), shapes.window(layer)
    attn = GatedAttention(core, layer, n_head, window, heads.grow_heads) if heads.head_gates else \
        CausalSelfAttention(core, layer, n_head, window)
    ffn = make_memory_layer(memory, core.n_embd) if layer in memory.memory_layers else \
        MLP(core, shapes.mlp_hidden(layer, core.n_embd))
    if feedback.feedback:
        return FeedbackBlock(core, layer, feedback.source(layer, core.n_layer), attn, ffn)
    return Block(core, layer, attn, ffn)


def build_model(model_args):
    """The GPT (untrained) that a flat dict of options describes; a bad combination is a ValueError."""
    options = split_options(model_args)
    core, memory, loop, shapes, heads, feedback, shim, widths = (options[cls] for cls in OPTION_CLASSES)
    check_combinations(core, memory, loop, shapes, heads, feedback, shim, widths)
    blocks = functools.partial(make_block, memory=memory, shapes=shapes, heads=heads, feedback=feedback)
    if loop.n_core:
        model = LoopedGPT(core, loop, blocks)
    elif feedback.feedback:
        model = FeedbackGPT(core, feedback, blocks)
    elif shim.shim:
        model = ShimGPT(core, shim, blocks)
    elif widths.active:
        model = WidthGPT(core, widths, blocks)
    else:
        model = GPT(core, blocks)
    model.options = [core, memory, loop, shapes, heads, feedback, shim, widths]  # a checkpoint records every option
    return model


def model_args(model):
    """The flat options a checkpoint records: the model as it is now (head growth rewrites layer_heads)."""
    return {k: v for options in model.options for k, v in dataclasses.asdict(options).items()}


def options_of(model, cls):
    """The model's options of one mechanism (cls, e.g. HeadConfig), or that class's defaults."""
    return next((o for o in model.options if isinstance(o, cls)), None) or cls()
