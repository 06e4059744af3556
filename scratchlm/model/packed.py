"""bf16 Linear layers in oneDNN's packed weight layout, for faster decoding on a CPU.

Decoding one token multiplies a single vector by every weight matrix, so its speed is how fast the
weights stream from memory. PyTorch's plain bf16 `F.linear` reads an (out, in) matrix at about
half the speed that the same product reaches once the matrix is reordered, once, into the blocked
layout oneDNN's kernels read sequentially (what `torch.compile`'s CPU "freezing" does to Linear
weights). Same kernel family, same fp32 accumulation: the outputs are bit-identical to F.linear's
(tests/test_packed.py checks it, and that greedy decoding picks the same tokens).

Inference only: the packed matrix is an opaque oneDNN tensor with no gradient, and the module keeps
no plain copy (that would double the memory). Module names do not change, so a packed model prints
and indexes as before; it cannot be saved or trained any more (load the checkpoint again for that).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def can_pack(weight: torch.Tensor) -> bool:
    """True where packing keeps the numbers exactly: a bf16 CPU weight on a CPU oneDNN runs bf16 on."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """y = x Wᵀ + b with W in oneDNN's packed layout (bf16, CPU, inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The layout is chosen for one row at a time (decoding); bigger batches run on it too.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.register_buffer("bias", linear.bias.detach().clone() if linear.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def weight_bytes(self) -> int:
        return self.in_features * self.out_features * 2

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 oneDNN-packed"


def pack_linears(model: nn.Module) -> int:
    """Replace every bf16 CPU nn.Linear of `model` (in place) with a PackedLinear; returns how many.
    A model whose weights are not bf16 on a CPU, or a CPU without bf16 oneDNN, is left as it is (0).
    A tied output head gets its own packed copy; the embedding keeps the shared matrix."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and can_pack(m.weight)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, PackedLinear(linear))
    if targets:
        model.eval().requires_grad_(False)
    return len(targets)
