"""The shape of a GPT, as one dataclass. Every architectural variant is a field here."""

from __future__ import annotations

from dataclasses import dataclass

from scratchlm.errors import UserError


@dataclass
class ModelConfig:
    vocab_size: int = 4096         # set from the tokenizer when 0
    context_length: int = 128      # the longest sequence the model sees (positions)
    d_model: int = 128             # width: embedding dimension
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0            # 0 = n_heads (plain multi-head); fewer = grouped-query attention
    d_ff: int = 512                # feed-forward hidden width
    pos_encoding: str = "learned"  # learned | sinusoidal | rope
    rope_theta: float = 10000.0
    norm: str = "layernorm"        # layernorm | rmsnorm
    ffn: str = "gelu"              # gelu | swiglu
    bias: bool = False
    dropout: float = 0.0           # on the embeddings, each residual branch and (below) the attention weights
    # Dropout on the attention weights; -1 = model.dropout. On CPU any attention dropout sends SDPA from its
    # fused kernel to the plain (T x T weights) path: a d=192 step took 655 instead of 586 ms (Muon; 476 vs 388
    # with AdamW; experiments/dropout_speed.py).
    attn_dropout: float = -1.0
    tie_embeddings: bool = True
    attention: str = "sdpa"        # sdpa (fused) | explicit (the teaching path; same numbers)
    qk_norm: bool = False          # RMSNorm each head's q and k (learned gain per channel) before attention

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attention_dropout(self) -> float:
        return self.dropout if self.attn_dropout < 0 else self.attn_dropout

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> "ModelConfig":
        """Refuse shapes that cannot work, with the fix in the message."""
        checks = [
            (self.vocab_size >= 0, f"model.vocab_size must be >= 0, got {self.vocab_size}"),
            (self.context_length >= 1, f"model.context_length must be >= 1, got {self.context_length}"),
            (self.n_layers >= 1 and self.n_heads >= 1 and self.d_model >= 1 and self.d_ff >= 1,
             "model.n_layers, n_heads, d_model and d_ff must all be >= 1"),
            (self.d_model % self.n_heads == 0,
             f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}; "
             f"pick heads that divide the width"),
            (self.n_heads % self.kv_heads == 0 and self.kv_heads <= self.n_heads,
             f"model.n_kv_heads={self.kv_heads} must divide model.n_heads={self.n_heads}"),
            (self.pos_encoding in ("learned", "sinusoidal", "rope"),
             f"model.pos_encoding must be learned, sinusoidal or rope, got {self.pos_encoding!r}"),
            (self.pos_encoding != "rope" or self.head_dim % 2 == 0,
             f"RoPE needs an even head size, got d_model/n_heads = {self.head_dim}"),
            (self.norm in ("layernorm", "rmsnorm"), f"model.norm must be layernorm or rmsnorm, got {self.norm!r}"),
            (self.ffn in ("gelu", "swiglu"), f"model.ffn must be gelu or swiglu, got {self.ffn!r}"),
            (self.attention in ("sdpa", "explicit"), f"model.attention must be sdpa or explicit, got {self.attention!r}"),
            (0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}"),
            (self.attn_dropout == -1.0 or 0.0 <= self.attn_dropout < 1.0,
             f"model.attn_dropout must be in [0, 1), or -1 for model.dropout; got {self.attn_dropout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self
