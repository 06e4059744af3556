"""The GPT: token embeddings + positions -> L pre-norm transformer blocks -> norm -> logits.

    x = embed(tokens) (+ position embedding, unless RoPE rotates Q/K inside attention)
    for each block:   x = x + attention(norm(x))      # tokens exchange information
                      x = x + feed_forward(norm(x))   # each token thinks on its own
    logits = lm_head(norm(x))                         # a score for every vocabulary entry

Parameter names follow the Hugging Face Llama layout (embed_tokens, layers.N.attn_norm, ...,
lm_head) so export is a rename, not a rewrite.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchlm.errors import UserError
from scratchlm.model import accounting
from scratchlm.model.attention import CausalSelfAttention, KVCache, rope_tables
from scratchlm.model.config import ModelConfig


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain (no mean, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.d_model) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.d_model, bias=cfg.bias)


class FeedForward(nn.Module):
    """GELU MLP (GPT-2): down(gelu(up(x))). SwiGLU (Llama): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.ffn == "swiglu"
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x) if self.swiglu else F.gelu(self.up_proj(x), approximate="tanh")
        return self.dropout(self.down_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = make_norm(cfg)
        self.ffn = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, mask=None, cache=None, layer=0):
        x = x + self.dropout(self.attn(self.attn_norm(x), rope=rope, mask=mask, cache=cache, layer=layer))
        x = x + self.ffn(self.ffn_norm(x))
        return x


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """The fixed positional encoding of "Attention Is All You Need"."""
    pos = torch.arange(max_len).float()[:, None]
    div = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size < 1:
            raise UserError("model.vocab_size is 0: set it, or let the tokenizer set it")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos_encoding == "learned":
            self.pos_embed = nn.Embedding(cfg.context_length, cfg.d_model)
        elif cfg.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.context_length, cfg.d_model), persistent=False)
        else:
            cos, sin = rope_tables(cfg.head_dim, cfg.context_length, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # input and output share one matrix
        self.apply(self._init_weights)
        # Residual projections add to the stream once per layer; scale them down so the
        # stream's variance does not grow with depth (GPT-2's 1/sqrt(2L)).
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, loss_mask: torch.Tensor | None = None):
        """idx: (B, T) token ids. Returns (logits, loss); loss is None without targets, and when
        training (targets given, gradients on) logits are None: the loss is computed chunk by chunk.

        positions: (B, T) position ids (default 0..T-1, offset by the cache); mask: (B, 1, T, Tk)
        boolean attention mask for padded batches; loss_mask: (B, T), 1 where the loss counts."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.context_length:
            raise UserError(f"sequence of {start + T} tokens is longer than the context length "
                            f"{self.cfg.context_length}; shorten it or raise model.context_length")
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device).unsqueeze(0)
        x = self.embed_tokens(idx)
        rope = None
        if self.cfg.pos_encoding == "learned":
            x = x + self.pos_embed(positions)
        elif self.cfg.pos_encoding == "sinusoidal":
            x = x + self.pos_table[positions]
        else:
            rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))
        x = self.dropout(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope=rope, mask=mask, cache=cache, layer=i)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x[:, -1:, :]) if cache is not None else self.lm_head(x), None
        # (The fused head makes its gradients on the way forward: only worth it when they are wanted.)
        if torch.is_grad_enabled() and type(self.lm_head) is nn.Linear and type(self.lm_head.weight) is nn.Parameter:
            # Training: never build the (tokens x vocab) logits at all, see head_cross_entropy.
            return None, head_cross_entropy(x, self.lm_head.weight, targets, loss_mask)
        logits = self.lm_head(x)
        loss = lm_loss(logits, targets, loss_mask)
        return logits, loss

    # --- accounting ---------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.cfg.pos_encoding == "learned":
            n -= self.pos_embed.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N + 12 · layers · width · context (see model/accounting.py;
        N leaves out lookup tables, so an untied token embedding costs nothing)."""
        return accounting.flops_per_token(self.cfg)

    def memory_estimate(self, batch_size: int, precision: str = "fp32") -> dict:
        """Training memory on one device: fp32 weights + grads + AdamW moments (16 B/param) plus
        the activations of `batch_size` sequences (model/accounting.py; `scratchlm plan` has more)."""
        params = self.num_params() * 16
        acts = accounting.activation_bytes(self.cfg, batch_size * self.cfg.context_length, precision).total
        return {"params_bytes": params, "activations_bytes": acts, "total_bytes": params + acts}

    def new_cache(self, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
        c = self.cfg
        p = next(self.parameters())
        return KVCache(c.n_layers, batch, c.kv_heads, max_len or c.context_length, c.head_dim,
                       device=p.device, dtype=dtype or p.dtype)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions that count (all, or where loss_mask is 1)."""
    flat = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    if loss_mask is None:
        return flat.mean()
    m = loss_mask.reshape(-1).float()
    return (flat * m).sum() / m.sum().clamp(min=1)


class _HeadCrossEntropy(torch.autograd.Function):
    """Output head + cross-entropy in row chunks, gradients computed on the way forward.

    The plain path materialises the logits (N x V), an fp32 copy, its log-softmax and, in the
    backward pass, a gradient of the same size: for 4,096 tokens and a 50k vocabulary that is
    ~0.8 GB per tensor, streamed through memory several times. Here a chunk of rows at a time
    computes its logits, their log-sum-exp (fp32), its loss and d loss / d logits = w (softmax - onehot),
    and immediately turns that into the chunk's input gradient and its share of the weight
    gradient. Since the loss is the last op, the gradients can be made before backward asks;
    backward only scales them by the incoming gradient (1 for loss.backward()).
    Same matmuls as the plain path (logits, dx, dW); only the memory traffic shrinks."""

    @staticmethod
    def forward(ctx, x, weight, targets, row_weights, chunk):
        N, V = x.size(0), weight.size(0)
        dx = torch.empty_like(x)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        # One chunk's buffers, reused by every chunk: a fresh tensor of this size (1024 x 50k fp32 is 200 MB)
        # costs its page faults on every use, about half of this loop's eager time on the small shape.
        rows = min(chunk, N)
        low = torch.empty(rows, V, dtype=x.dtype, device=x.device)     # logits as the matmul makes them, then g
        high = torch.empty(rows, V, dtype=torch.float32, device=x.device)
        scratch = torch.empty_like(high)
        dw_part = torch.empty(weight.shape, dtype=x.dtype, device=x.device)
        for s in range(0, N, chunk):
            xs, t, w = x[s:s + chunk], targets[s:s + chunk], row_weights[s:s + chunk]
            n = xs.size(0)
            logits = high[:n].copy_(torch.mm(xs, weight.t(), out=low[:n]))  # fp32
            lse = _logsumexp(logits, scratch[:n])
            loss += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * w).sum()
            g = logits.sub_(lse[:, None]).exp_()                             # softmax, in place
            if torch.compiler.is_compiling():
                # The same numbers (bit for bit where N is a multiple of chunk), as a comparison instead
                # of an indexed write: Inductor fuses a kernel that holds an indexed write into scalar
                # loops; this way the exp, the -1 and the cast below are one vectorised pass (1024 x 50k:
                # 137 -> 52 ms). Eager is the other way round: the write touches one element per row,
                # the comparison all of them.
                g = g - (torch.arange(V, device=g.device)[None, :] == t[:, None]).to(g.dtype)
            else:
                g[torch.arange(n, device=g.device), t] -= 1.0
            g = low[:n].copy_(g.mul_(w[:, None]))                            # in x's dtype
            torch.mm(g, weight, out=dx[s:s + n])
            dw += torch.mm(g.t(), xs, out=dw_part)
        ctx.save_for_backward(dx, dw.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad):
        dx, dw = ctx.saved_tensors
        return dx * grad.to(dx.dtype), dw * grad.to(dw.dtype), None, None, None


def _logsumexp(logits: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(logits, -1), the same steps and so the same numbers, with its (rows x V) temporary
    written into `scratch` instead of a fresh tensor."""
    m = logits.amax(-1, keepdim=True)
    m.masked_fill_(m.abs() == float("inf"), 0.0)  # an all -inf (or +inf) row: no inf - inf
    return torch.sub(logits, m, out=scratch).exp_().sum(-1).log_().add_(m.squeeze(-1))


def head_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       loss_mask: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """lm_loss(x @ weightᵀ, targets, loss_mask) without materialising the logits (see above).
    Under autocast the matmuls run in its dtype (weight cast once, not per chunk), as the plain path's do."""
    x = x.reshape(-1, x.size(-1))
    targets = targets.reshape(-1)
    if loss_mask is None:
        rows = torch.full((x.size(0),), 1.0 / max(x.size(0), 1), device=x.device)
    else:
        m = loss_mask.reshape(-1).float()
        rows = m / m.sum().clamp(min=1)
    ignored = targets < 0  # cross_entropy's ignore_index (-100): no loss, still counted in the mean
    rows = rows.masked_fill(ignored, 0.0)
    targets = targets.masked_fill(ignored, 0)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return _HeadCrossEntropy.apply(x.to(dtype), weight.to(dtype), targets, rows, chunk)
    return _HeadCrossEntropy.apply(x, weight.to(x.dtype), targets, rows, chunk)
