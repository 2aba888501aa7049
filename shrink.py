"""
Shrunken models: int8 / int4 weight-only layers, pruning masks, layers with heads or neurons removed.

compress.py makes the files; this module is what loading and training them needs:
`build_export_model` (checkpoint.load_model, for an inference export), `fit_to_state_dict` (a pruned
checkpoint's smaller layers and masks, before its state dict loads) and `masked_weights` +
`apply_masks` (train.py keeps a pruned model's zeros at zero after every optimizer step).

Formats, stored as plain tensors so a file loads with weights_only=True on any device:
    int8  per output channel, symmetric:  w ~ q * scale,                     |error| <= scale / 2
    int4  per group of input columns:     w ~ (q - 8) * scale + zero, q in 0..15, |error| <= scale / 2
          (tinygemm's convention; scales and zeros stored as one (K/gs, N, 2) tensor, the layout torch's
          int4 kernels read, so loading converts only the packed weights, in place on the CPU)
int4 matmuls run in torch's own kernels (_weight_int4pack_mm: tinygemm on CUDA, and its CPU twin), not
torchao: torchao 0.18 (checked with torch 2.13 CPU) needs the CUDA-only mslk package for int4, so it has
no CPU path at all. int8 needs no kernel: eager, it dequantises cache-sized slabs and calls the float
matmul (8x faster than aten._weight_int8pack_mm on our CPU); in a compiled decode step it is a
multiply-and-sum inductor fuses with the int8 read: one byte of memory traffic per weight, 1.5x bf16 on an
H100 and 2-4x float32 on our CPU (experiments/compress_gpu.py's decode part compares it with torchao's int8
weight-only, on either device).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from architecture import build_model
from model import Rotary

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes torch's int4 kernels take
CPU_CONVERT_ROWS = 256  # a multiple of the CPU int4 layout's row block (64 with AVX-512, 32 without)


# ----------------------------------------------------------------------------- formats

def quantize_int8(w):
    """(q int8 (N, K), scale (N,)) of a weight (N, K), one scale per output row."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q, scale):
    return q.float() * scale.float()[:, None]


def quantize_int4(w, group_size):
    """(packed uint8 (N, K/2), scales_and_zeros (K/gs, N, 2)) of a weight (N, K): min-max per group."""
    N, K = w.shape
    groups = w.float().reshape(N, K // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(N, K)
    packed = (q[:, ::2] << 4) | q[:, 1::2]  # two columns per byte, the even one in the high nibble
    return packed, torch.stack((scale, lo + 8 * scale), dim=-1).transpose(0, 1).contiguous()


def unpack_int4(packed):
    return torch.stack((packed >> 4, packed & 15), dim=-1).reshape(packed.size(0), -1)  # (N, K) in 0..15


def dequantize_int4(packed, scales_and_zeros):
    q = unpack_int4(packed).float()
    N, K = q.shape
    scale, zero = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, K/gs) each
    groups = (q - 8).reshape(N, scale.size(1), -1) * scale[..., None] + zero[..., None]
    return groups.reshape(N, K)


# ----------------------------------------------------------------------------- quantized layers

# weights an eager int8 matmul dequantises at once, never a whole head: on the CPU a slab that stays in L2
# until the matmul reads it (on the 2-core CPU, 256K: 8 tok/s for 12 x 1024 where 4M gave 3-6 and
# _weight_int8pack_mm 1); on a GPU fewer, larger slabs (each costs three kernel launches)
DEQUANT_SLAB_CPU, DEQUANT_SLAB_GPU = 2 ** 18, 2 ** 22


class Int8Linear(nn.Module):
    """y = x W^T with W stored int8 per output row; the per-row scale applies after the matmul."""

    def __init__(self, q, scale):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def forward(self, x):
        if torch.compiler.is_compiling() and x.numel() == x.size(-1):
            return self.matvec(x)
        return self.chunked_matmul(x)

    def matvec(self, x):
        """One row: multiply and sum, which inductor fuses with the int8 read into one pass over the weight
        (cast-then-matmul writes and rereads a bf16 copy of every weight at every decode step)."""
        return (x.unsqueeze(-2).float() * self.q).sum(-1).to(x.dtype) * self.scale.to(x.dtype)

    def chunked_matmul(self, x):
        """Dequantise a slab of rows at a time, then matmul: all at once, a 50K-row head's float copy would
        double its memory, and a slab still in cache makes this faster than torch's int8 CPU kernel."""
        rows = max(1, (DEQUANT_SLAB_CPU if x.device.type == "cpu" else DEQUANT_SLAB_GPU) // self.q.size(1))
        # one output allocated first, each slab and its result freed before the next: a list of results
        # interleaved with freed slabs left the CPU heap holding a float copy of the head (+200 MB at 203M)
        y = x.new_empty(*x.shape[:-1], self.q.size(0))
        for start in range(0, self.q.size(0), rows):
            y[..., start:start + rows] = F.linear(x, self.q[start:start + rows].to(x.dtype))
        return y.mul_(self.scale.to(x.dtype))


class Int8Embedding(nn.Module):
    """Token embedding rows stored int8, one scale per row (the tied head reads the same tensors)."""

    def __init__(self, q, scale):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def forward(self, idx):
        return self.q[idx].to(self.scale.dtype) * self.scale[idx][..., None]


class Int8EmbeddingBag(nn.Module):
    """A product-key value table stored int8 per row: reads only the rows a token's heads picked."""
    sparse = False

    def __init__(self, q, scale):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def forward(self, index, per_sample_weights):
        rows = self.q[index].to(per_sample_weights.dtype) * self.scale[index].to(per_sample_weights.dtype)[..., None]
        return (rows * per_sample_weights[..., None]).sum(dim=1)  # (bags, C)


class Int4Linear(nn.Module):
    """y = x W^T with W stored int4 in groups of group_size input columns.

    The file keeps the portable packing (scales and zeros already in the kernels' layout); `prepare`
    converts the packed weights once into the layout of the device's int4 kernel (CPU or CUDA tinygemm),
    after the layer has moved to its device.
    """

    def __init__(self, packed, scales_and_zeros):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    @property
    def group_size(self):
        return 2 * self.packed.size(1) // self.scales_and_zeros.size(0)

    def prepare(self):
        """Replace the file's packing by the kernel's layout; the file's tensors are freed as each layer is done."""
        device, group_size, scales_and_zeros = self.packed.device, self.group_size, self.scales_and_zeros
        if device.type == "cpu":
            # in place, a block of rows at a time: the CPU layout interleaves 64 rows at most and keeps each
            # block's bytes where its rows were, so no second copy of the layer and only a few MiB of the
            # int32 staging the op wants (a whole layer's would be 8 bytes per weight)
            weight = self.packed
            for rows in range(0, weight.size(0), CPU_CONVERT_ROWS):
                block = weight[rows:rows + CPU_CONVERT_ROWS]
                block.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(block).to(torch.int32), 1))
            self.matmul = torch.ops.aten._weight_int4pack_mm_for_cpu
        elif device.type == "cuda":  # tinygemm: bf16 activations, scales and zeros
            K = 2 * self.packed.size(1)
            inner_k_tiles = next(t for t in (8, 4, 2) if K % (t * 16) == 0)
            weight = torch.ops.aten._convert_weight_to_int4pack(self.packed.contiguous(), inner_k_tiles)
            self.matmul, scales_and_zeros = torch.ops.aten._weight_int4pack_mm, scales_and_zeros.to(torch.bfloat16)
        else:
            raise SystemExit(f"int4 has no kernel on {device.type}: export with --format=int8, or run on cpu or cuda")
        del self.packed, self.scales_and_zeros  # the kernel's layout replaces them
        self.group = group_size
        self.register_buffer("kernel_weight", weight, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)

    def forward(self, x):
        x2 = x.reshape(-1, x.size(-1)).to(self.scales_and_zeros.dtype)
        y = self.matmul(x2, self.kernel_weight, self.group, self.scales_and_zeros)
        return y.to(x.dtype).view(*x.shape[:-1], -1)


def quantize_model(model, fmt, group_size, dtype):
    """Replace every linear layer, the embedding/head and product-key value tables by quantized ones, in place.

    int4 takes the blocks' linear layers; the embedding, head and value tables stay int8 in both formats
    (they are read row by row, and the head sets every logit). Scales are stored in dtype.
    """
    def int8(weight):
        q, scale = quantize_int8(weight.detach())
        return q, scale.to(dtype)

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            if fmt == "int4" and name.startswith("blocks."):
                packed, scales_and_zeros = quantize_int4(module.weight.detach(), group_size)
                new = Int4Linear(packed, scales_and_zeros.to(dtype))
            else:
                new = Int8Linear(*int8(module.weight))
        elif isinstance(module, nn.EmbeddingBag):
            new = Int8EmbeddingBag(*int8(module.weight))
        else:
            continue
        set_submodule(model, name, new)
    tied = model.lm_head.weight is model.wte.weight
    model.wte = Int8Embedding(*int8(model.wte.weight))
    model.lm_head = Int8Linear(model.wte.q, model.wte.scale) if tied else Int8Linear(*int8(model.lm_head.weight))
    return model


# ----------------------------------------------------------------------------- rebuilding from a state dict

def set_submodule(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def fit_to_state_dict(model, weights):
    """Make model's layers the shapes and kinds that weights hold, so load_state_dict takes them.

    A pruned model has attention layers with fewer heads and MLPs with fewer neurons (a smaller
    nn.Linear), and fixed masks (a `weight_mask` buffer beside a weight); an export has quantized
    layers. A plain checkpoint's weights leave the model as it is.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Linear, nn.Embedding, nn.EmbeddingBag)):
            shape = weights.get(f"{name}.weight", module.weight).shape
            if f"{name}.packed" in weights:
                new = Int4Linear(*(torch.empty_like(weights[f"{name}.{k}"], device="meta") for k in ("packed", "scales_and_zeros")))
            elif f"{name}.q" in weights:
                cls = {nn.Linear: Int8Linear, nn.Embedding: Int8Embedding, nn.EmbeddingBag: Int8EmbeddingBag}[type(module)]
                new = cls(*(torch.empty_like(weights[f"{name}.{k}"], device="meta") for k in ("q", "scale")))
            elif isinstance(module, nn.Linear) and shape != module.weight.shape:
                new = nn.Linear(shape[1], shape[0], bias=False, device=module.weight.device)
            else:
                new = module
            if f"{name}.weight_mask" in weights:  # only float layers carry masks (an export drops them)
                new.register_buffer("weight_mask", torch.ones(shape, dtype=torch.bool, device=new.weight.device))
            if new is not module:
                set_submodule(model, name, new)
    for block in model.blocks:  # the heads a pruned attention layer kept
        attn = block.attn
        attn.n_head = out_features(attn.q_proj) // attn.head_size
        attn.n_kv_head = out_features(attn.kv_proj) // (2 * attn.head_size)
    return model


def out_features(layer):
    return next(t for t in (getattr(layer, k, None) for k in ("weight", "q", "packed")) if t is not None).size(0)


def build_export_model(model_args, weights, device):
    """The GPT of an inference export: built on the meta device (no float copy of the weights is ever
    made), its layers given the file's tensors themselves, then readied for the device's kernels.

    weights is emptied: afterwards the model holds the only reference to each tensor, so a layer's file
    tensors are freed as soon as int4 has converted them, and peak memory stays near the file's size.
    """
    if model_args.get("memory_layers") and model_args.get("memory") == "knn":
        raise SystemExit("kNN memory models cannot be exported (their store lives beside the checkpoint)")
    with torch.device("meta"):
        model = build_model(model_args)
    config = model.config
    fit_to_state_dict(model, weights)
    model.load_state_dict(weights, assign=True)
    float_dtype = next(t.dtype for t in weights.values() if t.is_floating_point())
    weights.clear()
    if config.tie_embeddings and isinstance(model.lm_head, nn.Linear):  # assign loaded two parameters: one again
        model.lm_head.weight = model.wte.weight
    # the rotary tables are not saved: rebuild them off the meta device
    model.rotary = Rotary(config.n_embd // config.n_head, config.block_size, config.rope_base).to(float_dtype)
    # a tied int8 head reads the embedding's tensors (one storage in the file): it moves with the embedding
    head, wte = model.lm_head, model.wte
    tied = isinstance(head, Int8Linear) and head.q.untyped_storage().data_ptr() == wte.q.untyped_storage().data_ptr()
    for module in model.modules():  # a layer at a time: memory holds the file plus one layer's conversion
        if not list(module.children()) and not (tied and module is head):
            module.to(device)
            if isinstance(module, Int4Linear):
                module.prepare()
    if tied:
        head.q, head.scale = wte.q, wte.scale
    return model.to(device).eval()  # what the containers hold themselves (head gates, norms' weights)


# ----------------------------------------------------------------------------- masks

def two_four_mask(weight):
    """Keep the 2 largest of every 4 consecutive input weights: the 2:4 pattern sparse tensor cores run."""
    if weight.size(1) % 4:
        raise SystemExit(f"2:4 sparsity needs layer widths divisible by 4, got {weight.size(1)}")
    groups = weight.abs().view(weight.size(0), -1, 4)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return mask.view_as(weight)


def masked_weights(model):
    """[(weight, mask)] of the layers a pruning fixed at zero (empty for an unpruned model)."""
    return [(m.weight, m.weight_mask) for m in model.modules() if hasattr(m, "weight_mask")]


@torch.no_grad()
def apply_masks(masked):
    """Zero the pruned weights again (after an optimizer step moved them)."""
    for weight, mask in masked:
        weight.mul_(mask)
