"""Multi-head causal self-attention, with rotary positions, grouped-query heads and a KV cache.

The math, for one head, in one line:   softmax(Q Kᵀ / √d + causal_mask) V
`explicit_attention` below spells it out; `F.scaled_dot_product_attention` computes the same
numbers with a fused kernel (the tests check they agree). Everything else here is bookkeeping:
splitting the width into heads, rotating Q and K for RoPE, and caching K and V for generation.

QK-norm (model.qk_norm, as in OLMo 2, Qwen 3, nanochat): each head's q and k are RMS-normalised
before the dot product, so an attention logit is bounded by the learned gains instead of growing
with the weights; large logits that saturate the softmax are a classic cause of loss spikes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchlm.model.config import ModelConfig


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """The teaching path. q: (B, H, Tq, d); k, v: (B, H, Tk, d); mask: True = may attend.
    dropout_p: drop attention weights at random in training (what SDPA's dropout_p does)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))        # (B, H, Tq, Tk) similarities
    if mask is None:  # plain causal: query t sees keys 0..t
        Tq, Tk = q.size(-2), k.size(-2)
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    scores = scores.masked_fill(~mask, float("-inf"))                # no peeking at the future
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)      # each row sums to 1
    weights = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
    return weights @ v                                               # weighted mix of the values


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of position * frequency, for rotating pairs of channels (RoPE)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(max_len, device=device).float(), freqs)  # (T, d/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (first-half, second-half) channel pair by its position's angle.
    x: (B, H, T, d); cos/sin: (B or 1, 1, T, d/2). The half-split layout matches HF Llama."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class KVCache:
    """Preallocated keys/values for every layer: generation appends one position at a time
    instead of recomputing the whole prefix. Shape per layer: (B, kv_heads, max_len, head_dim)."""

    def __init__(self, n_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (n_layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # how many positions are filled (same for every layer)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.size(2)
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} > {self.max_len}")
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        end = self.pos + T
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        self.pos += T


class HeadNorm(nn.Module):
    """RMSNorm over one head's channels, with a learned gain per channel (QK-norm). Computed in fp32
    and returned in the input's dtype, so that under bf16 autocast attention still runs in bf16."""

    def __init__(self, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        # One matmul produces Q (n_heads) and K, V (kv_heads each); with kv_heads < n_heads
        # several query heads share a key/value head (grouped-query attention: a smaller cache).
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.attention_dropout
        self.explicit = cfg.attention == "explicit"
        if cfg.qk_norm:  # one gain per channel of a head, shared by the heads (Qwen 3's q_norm/k_norm)
            self.q_norm, self.k_norm = HeadNorm(cfg.head_dim), HeadNorm(cfg.head_dim)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split([self.n_heads * self.head_dim, self.kv_heads * self.head_dim,
                                     self.kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)   # (B, H, T, d)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:  # before RoPE and before the cache: cached keys are already normalised
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if self.kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
        dropout = self.dropout if self.training else 0.0
        if self.explicit:
            y = explicit_attention(q, k, v, mask, dropout)
        elif mask is None and k.size(2) == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        elif mask is None and T == 1:  # one query, the newest position: it may see every key
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            if mask is None:  # queries are the last T positions of the keys
                mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=k.size(2) - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads back side by side
        return self.out(y)
