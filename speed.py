"""
Speed options the core GPT can call into, off by default (bench.py's levers part measures each; BENCHMARKS.md
has the numbers): the head and cross-entropy fused over row chunks (ours, or Liger Kernel's), and FlexAttention
for the causal path.
"""
import torch

LIGER_CE_CHUNKS = 4  # row chunks of Liger's fused head + loss: its own default at 768 wide would be 48 (one chunk per
                     # ~1.5 MB of logits), each a few host launches: launch-bound where a few large chunks are not


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


def chunked_cross_entropy(h, weight, targets, chunks):
    """Mean cross-entropy of the head weight (V, C) applied to h (B, T, C) against targets (B, T)."""
    return ChunkedCrossEntropy.apply(h.flatten(0, 1), weight, targets.flatten(), chunks)


def liger_cross_entropy(h, weight, targets):
    """Mean cross-entropy of the head weight (V, C) applied to h (B, T, C) against targets (B, T), by Liger
    Kernel's fused linear cross-entropy (Hsu et al. 2024): Triton kernels, LIGER_CE_CHUNKS row chunks, each
    chunk's logits turned into their gradient in place. Targets of -1 are ignored; the padding columns are in
    the softmax, as in the full path. CUDA only. Its forward reads the count of targets on the host (one sync per
    micro-batch, and a graph break under torch.compile): bench.py's levers part measures whether it pays anyway."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        raise SystemExit("liger_ce=True needs Liger Kernel on a CUDA GPU: pip install liger-kernel "
                         "(requirements-extras.txt)")
    C, V = h.size(-1), weight.size(0)
    # Liger sizes its chunks to hold at most chunk_mem_const x (rows x C) logits
    return liger_fused_linear_cross_entropy(h.reshape(-1, C), weight, targets.reshape(-1), ignore_index=-1,
                                            chunk_mem_const=-(-V // (LIGER_CE_CHUNKS * C)))


def sdpa_backends(name):
    """The scaled_dot_product_attention backend that torch.nn.attention.sdpa_kernel(...) should allow, by name
    (bench.py's sdpa levers; by default torch picks one per call: cuDNN's for gpu_124m's training step on an H100)."""
    from torch.nn.attention import SDPBackend
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    if name not in backends:
        raise ValueError(f"sdpa backend must be one of {', '.join(backends)}, got {name!r}")
    return [backends[name]]


def flex_causal_attention(q, k, v):
    """Causal attention by FlexAttention (Dong et al. 2024), a Triton kernel that torch.compile generates;
    the block mask lets it skip the tiles above the diagonal. Under torch.compile the mask is built in the graph."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # here: it imports dynamo
    T = q.size(2)
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, T, T, device=q.device)
    return flex_attention(q, k, v, block_mask=mask, enable_gqa=k.size(1) != q.size(1))
