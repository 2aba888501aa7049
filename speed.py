"""
Speed options the core GPT can call into, off by default (bench.py's levers part measures each; BENCHMARKS.md
has the numbers): the head and cross-entropy fused over row chunks, and FlexAttention for the causal path.
"""
import torch


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


def flex_causal_attention(q, k, v):
    """Causal attention by FlexAttention (Dong et al. 2024), a Triton kernel that torch.compile generates;
    the block mask lets it skip the tiles above the diagonal. Under torch.compile the mask is built in the graph."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # here: it imports dynamo
    T = q.size(2)
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, T, T, device=q.device)
    return flex_attention(q, k, v, block_mask=mask, enable_gqa=k.size(1) != q.size(1))
