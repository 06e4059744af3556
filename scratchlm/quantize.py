"""Int8 weight-only quantization, for faster generation on a CPU.

Decoding one token at a time reads every weight once per token and does only two FLOPs per weight
read, so its speed is the memory bandwidth divided by the bytes of the weights. Storing the
weights as int8 halves those bytes (vs bf16); the activations stay in the model's dtype.

Per-channel symmetric scheme: each output row of a Linear gets its own scale,
    scale_n = max_k |W[n, k]| / 127,   Q[n, k] = round(W[n, k] / scale_n)  in [-127, 127],
so y = x Wᵀ ≈ (x Qᵀ) * scale: the scale comes out of the dot product, and the int8 matrix is
the only thing read in full. One scale per row keeps a row of small weights from being crushed
by another row's outliers (a single scale for the whole matrix would).

The matrix product runs in PyTorch's int8-weight kernel (`torch._weight_int8pack_mm`, the one
gpt-fast uses on CPU); where it is missing or does not take the dtype, the int8 matrix is converted
on the fly (same numbers, slower). Only the Linear layers are quantized (attention, feed-forward and
the output head); embeddings and norms stay as they are: a token reads one embedding row, not all.
Module names do not change (layers.N.attn.qkv is still there), so a quantized model prints,
loads and exports under the same names.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchlm.errors import UserError
from scratchlm.model.packed import PackedLinear

_KERNEL = hasattr(torch, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one scale per output channel (inference only)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # (out, in) int8
        self.register_buffer("scale", scale)    # (out,) in the activations' dtype
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(q, scale.to(linear.weight.dtype), bias)

    def dequantized(self) -> torch.Tensor:
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if _KERNEL and x2.device.type == "cpu" and x2.dtype == self.scale.dtype:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scale)
        else:
            y = F.linear(x2, self.weight.to(x2.dtype)) * self.scale.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) with an Int8Linear; returns the model, in eval mode.

    A tied output head gets its own int8 copy; the embedding keeps the original matrix (a token
    looks up one row of it). The model is for inference from then on: int8 weights have no gradient."""
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise UserError("nothing to quantize: the model has no Linear layers (already quantized?)")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear.from_linear(linear))
    return model.eval().requires_grad_(False)


def decode_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one batch-1 decoding step reads: every Linear (weights, scales, biases) and
    norm in full, one row of each embedding table."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            total += m.weight[0].numel() * m.weight.element_size()
        elif isinstance(m, PackedLinear):
            total += m.weight_bytes() + (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
        elif isinstance(m, (nn.Linear, Int8Linear)) or m.__class__.__name__ in ("LayerNorm", "RMSNorm"):
            tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total
