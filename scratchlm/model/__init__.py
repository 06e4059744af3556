"""The GPT model. Read `config.py` (its shape), `attention.py` (where tokens talk), `gpt.py` (the rest)."""

from scratchlm.model.attention import CausalSelfAttention, KVCache, explicit_attention
from scratchlm.model.config import ModelConfig
from scratchlm.model.gpt import GPT, lm_loss

__all__ = ["GPT", "ModelConfig", "CausalSelfAttention", "KVCache", "explicit_attention", "lm_loss"]
