"""
Muon (Keller Jordan, modded-nanogpt, 2024): momentum SGD whose update for each 2-D hidden matrix is
orthogonalised by a Newton-Schulz iteration, so every direction of the matrix moves at the same rate.

    optimizer = Muon([{"params": matrices, "muon": True, "lr": 0.02}, {"params": others, "lr": 1e-3}])

Groups marked "muon" get Muon; the rest (embeddings, the head, norm gains) get plain AdamW, in the
same optimizer, so the training loop, its learning-rate schedule and its checkpoints see one object.
torch has no Muon of its own in the versions we support, hence these few lines.
"""
import torch


def orthogonalize(G, steps=5):
    """The nearest semi-orthogonal matrix to G (roughly U V^T of its SVD), by a quintic Newton-Schulz
    iteration whose coefficients are tuned for speed over exactness (singular values end near 0.7-1.2)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)  # bf16 is stable here and twice as fast on GPU
    if G.size(-2) > G.size(-1):  # iterate on the wide orientation: X @ X^T is then the smaller product
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= 1, where the iteration converges
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the groups marked "muon", AdamW (decoupled weight decay) for the others."""

    def __init__(self, param_groups, lr=0.02, momentum=0.95, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                 ns_steps=5):
        defaults = dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay,
                        ns_steps=ns_steps, muon=False)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups must hold 2-D matrices only")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon_step(params, group)
            else:
                self._adamw_step(params, group)

    def _muon_step(self, params, group):
        lr, momentum = group["lr"], group["momentum"]
        by_shape = {}
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            by_shape.setdefault(p.shape, []).append((p, p.grad.lerp(buf, momentum)))  # Nesterov momentum
        for (rows, cols), pairs in by_shape.items():
            # one batched Newton-Schulz per shape: a few large matmuls instead of many small ones
            updates = orthogonalize(torch.stack([u for _, u in pairs]), group["ns_steps"])
            # an orthogonal update has unit singular values; scaling by sqrt(rows/cols) for tall matrices
            # keeps the per-element step the same across shapes (modded-nanogpt)
            scale = -lr * max(1.0, rows / cols) ** 0.5
            for (p, _), update in zip(pairs, updates):
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=scale)

    def _adamw_step(self, params, group):
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (exp_avg_sq / (1 - beta2 ** state["step"])).sqrt_().add_(eps)
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** state["step"]))
