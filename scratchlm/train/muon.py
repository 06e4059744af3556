"""Muon: momentum, then orthogonalise the update of each weight matrix (Keller Jordan, 2024).

Why. SGD and Adam's updates for a weight matrix are dominated by a few directions: their singular
values span orders of magnitude, so a step mostly pushes along the directions that were already
large, and the rare directions barely learn. Muon replaces the (momentum-averaged) gradient
G = U S Vᵀ by its nearest orthogonal matrix U Vᵀ: every direction moves by the same amount, and
the step size is set per matrix by the learning rate alone. nanochat and modded-nanoGPT train the
transformer's matrices this way and reach a target loss in markedly fewer steps than with AdamW.

Computing U Vᵀ by an SVD is slow; five Newton-Schulz iterations of the odd quintic
    X ← a·X + b·(X Xᵀ) X + c·(X Xᵀ)² X,   (a, b, c) = (3.4445, -4.7750, 2.0315)
after scaling X to norm 1 push every singular value towards 1 quickly (not exactly to 1: the
coefficients trade accuracy for speed and leave them within about 0.7-1.2, which trains as well;
a direction weaker than ~1/500 of the matrix's norm is only partly lifted in five steps).

Muon is only for 2-D matrices inside the blocks (attention and MLP). Embeddings, the output head,
norm gains and biases stay with AdamW (`MuonAdamW` below steps both as one optimizer). No weight
decay on the Muon matrices, as in nanochat.
"""

from __future__ import annotations

import torch

from scratchlm.errors import UserError


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """≈ U Vᵀ for g = U S Vᵀ, by Newton-Schulz. bf16 on GPU (fast, good enough), fp32 elsewhere."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix X Xᵀ
        x = x.T
    x = x / (x.norm() + 1e-7)  # every singular value <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then each matrix's update orthogonalised and scaled by
    sqrt(max(1, rows / cols)) so tall matrices (the MLP's up-projection) take an RMS-sized step.

    row_splits (a per-group option): orthogonalise these row blocks separately; the fused q, k, v
    projection is three matrices that happen to be stored as one."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      row_splits=None))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])                      # buf = m·buf + (1-m)·g
                g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf  # look ahead
                blocks = g.split(group["row_splits"]) if group["row_splits"] else (g,)
                update = torch.cat([orthogonalize(b, group["ns_steps"]) * max(1.0, b.size(0) / b.size(1)) ** 0.5
                                    for b in blocks])
                p.add_(update, alpha=-group["lr"])


class MuonAdamW:
    """Muon and AdamW stepped, zeroed and checkpointed as one optimizer. The trainer sees the
    param groups of both (it sets each group's LR, clips over all parameters)."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups  # fresh: load_state_dict replaces the groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise UserError("the checkpoint's optimizer state is AdamW's, this run uses train.optimizer=muon; "
                            "resume with train.optimizer=adamw or start a new run")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
