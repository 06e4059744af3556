"""What a model costs, from its config alone: parameters, FLOPs per token, training memory.

Nothing here builds the model, so a 7B config is counted as fast as a tiny one. The tests check
every count against the real `GPT` (parameters) and against the tensors autograd actually saves
for the backward pass (activations), so the planner (`scratchlm plan`) cannot drift from the code.

    counts = param_counts(cfg)                     # total, embeddings, matmul parameters
    flops_per_token(cfg)                           # 6N + 12·L·d·T
    activation_bytes(cfg, tokens=B*T, precision="bf16")
"""

from __future__ import annotations

from dataclasses import dataclass

from scratchlm.model.config import ModelConfig


@dataclass
class ParamCounts:
    total: int
    token_embedding: int      # the V×d lookup table (with tied weights it is also the output head)
    position_embedding: int   # the T×d learned position table, 0 otherwise
    output_head: int          # a separate V×d output matrix when untied, 0 when tied
    per_block: int            # one transformer block
    block_matrices: int       # the 2-D weights in one block (attention and MLP): what Muon trains
    n_layers: int
    tied: bool

    @property
    def non_embedding(self) -> int:
        """Kaplan et al.'s N: without the token table, the position table and an untied head."""
        return self.total - self.token_embedding - self.position_embedding - self.output_head

    @property
    def matmul(self) -> int:
        """The parameters a token is multiplied by (what 6N counts). A lookup table costs no FLOPs,
        but a tied table is also the output head, so it counts once (nanoGPT, llm.c, nanochat)."""
        return self.total - self.position_embedding - (0 if self.tied else self.token_embedding)

    @property
    def outside_blocks(self) -> int:
        """Embeddings, final norm and head: under FSDP the root module, gathered for the whole step."""
        return self.total - self.n_layers * self.per_block


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Count exactly what `GPT(cfg)` allocates (the tests compare with `num_params()`)."""
    d, f, V, T = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.context_length
    bias = 1 if cfg.bias else 0
    norm = d * (2 if cfg.norm == "layernorm" and cfg.bias else 1)   # RMSNorm has no bias
    qkv_out = (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim
    attn = d * qkv_out + bias * qkv_out + d * d + bias * d
    n_up = 2 if cfg.ffn == "swiglu" else 1                            # SwiGLU adds a gate matrix
    ffn = n_up * (d * f + bias * f) + f * d + bias * d
    matrices = d * qkv_out + d * d + n_up * d * f + f * d
    qk_norm = 2 * cfg.head_dim if cfg.qk_norm else 0                  # q and k gains, shared by the heads
    block = 2 * norm + attn + ffn + qk_norm
    token = V * d
    position = T * d if cfg.pos_encoding == "learned" else 0
    head = 0 if cfg.tie_embeddings else V * d
    total = token + position + cfg.n_layers * block + norm + head
    return ParamCounts(total, token, position, head, block, matrices, cfg.n_layers, cfg.tie_embeddings)


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6N for the weight matmuls (forward 2N: a multiply and an add
    per weight; backward 4N: gradients for the input and for the weight) plus attention's two
    matmuls, Q·Kᵀ and weights·V, at 2·T·d each per layer, x3 for backward: 12·L·d·T. This is
    the PaLM paper's appendix B formula that nanoGPT and nanochat report MFU with; the causal
    mask, which skips half the scores, is not subtracted."""
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cfg.context_length
    return 6 * param_counts(cfg).matmul + attention


def act_bytes(precision: str) -> int:
    """Bytes of one activation: bf16 autocast computes matmuls in 2 bytes, fp32 in 4."""
    return 2 if precision == "bf16" else 4


def norm_bytes_per_token(cfg: ModelConfig) -> int:
    """A norm keeps its fp32 input and statistics. LayerNorm is one fused op (mean and 1/std);
    `F.rms_norm` runs as separate ops in eager PyTorch, which also keep the normalised x."""
    d = cfg.d_model
    return 4 * d + 8 if cfg.norm == "layernorm" else 8 * d + 4


def layer_bytes_per_token(cfg: ModelConfig, precision: str) -> int:
    """What one block saves for backward, per token. Under autocast the residual stream and the
    norms stay fp32 (4 B); the matmuls' inputs and outputs are bf16 (2 B)."""
    a, d, f, h = act_bytes(precision), cfg.d_model, cfg.d_ff, cfg.n_heads
    kv = cfg.kv_heads * cfg.head_dim
    rope, gqa = cfg.pos_encoding == "rope", cfg.kv_heads != cfg.n_heads
    linear_inputs = 2 * a * d                                 # qkv and up-projection inputs
    if cfg.ffn == "swiglu" and precision == "bf16":
        linear_inputs += a * d                                # gate and up cast the input separately
    attention = 0
    if not (rope and gqa) or (cfg.qk_norm and precision != "bf16"):
        attention += a * (d + 2 * kv)                         # the qkv output, which q, k, v view
    if cfg.qk_norm:                                           # fp32 input copy (bf16 only), normalised x, 1/rms
        attention += (8 if precision == "bf16" else 4) * (d + kv) + 4 * (h + cfg.kv_heads)
        if not rope:                                          # normalised q, k are new tensors attention keeps,
            attention += a * d + (0 if gqa else a * kv) + a * d  # and its output needs a copy (as with RoPE)
    if rope:
        attention += a * d + (0 if gqa else a * kv)           # rotated q (and k) are new tensors
    if gqa:
        attention += a * 2 * d                                # k and v repeated to every head
    attention += a * d + 4 * h                                # attention output (+ log-sum-exp)
    if rope:
        attention += a * d                                    # heads side by side again: a copy
    if cfg.attention == "explicit":                           # the T×T probabilities, per head
        attention += (4 + (a if precision == "bf16" else 0)) * h * cfg.context_length
    mlp = (4 if cfg.ffn == "swiglu" else 2) * a * f           # gelu: input, output; swiglu: 4 of them
    dropout = 2 * d if cfg.dropout > 0 else 0                 # 1-byte masks after attention and MLP
    return 2 * norm_bytes_per_token(cfg) + linear_inputs + attention + mlp + dropout


def head_bytes_per_token(cfg: ModelConfig, precision: str, fused_head: bool = True) -> int:
    """Outside the blocks, saved for backward, per token: the token ids (int64), the final norm's
    input, and then
      fused head (model/gpt.py `head_cross_entropy`, the default): the gradient of the head's
      input, computed chunk by chunk in the forward pass (the weight's gradient, a fixed V·d,
      is counted in `head_fixed_bytes`);
      plain head (FSDP, a LoRA-wrapped head): the targets (int64), the head's input and the fp32
      log-probabilities of the loss."""
    a, d = act_bytes(precision), cfg.d_model
    common = 8 + norm_bytes_per_token(cfg) + (d if cfg.dropout > 0 else 0)
    if fused_head:
        return common + a * d
    return common + 8 + a * d + 4 * cfg.vocab_size


def head_fixed_bytes(cfg: ModelConfig, precision: str, fused_head: bool = True) -> int:
    """The fused head keeps the output matrix's gradient (in the compute dtype) from forward to backward.
    In bf16 that takes the place of the head's bf16 weight copy, which `weight_copies` already counts
    (the fused head keeps the gradient instead of the copy): nothing more to add."""
    return 4 * cfg.vocab_size * cfg.d_model if fused_head and precision != "bf16" else 0


def logits_bytes_per_token(cfg: ModelConfig, precision: str, fused_head: bool = True) -> int:
    """Not saved but alive at the loss: the plain head's logits and their fp32 gradient. (The fused
    head holds only one chunk of 1,024 rows of them at a time: counted as nothing per token.)"""
    return 0 if fused_head else (act_bytes(precision) + 4) * cfg.vocab_size


@dataclass
class ActivationMemory:
    saved: int             # tensors autograd keeps for backward (the tests measure this one)
    logits: int            # logits and their gradient around the loss
    weight_copies: int     # bf16 copies of the weights that autocast makes and backward keeps

    @property
    def total(self) -> int:
        return self.saved + self.logits + self.weight_copies


def activation_bytes(cfg: ModelConfig, tokens: int, precision: str,
                     checkpointing: bool = False, fused_head: bool = True) -> ActivationMemory:
    """Activation memory of one micro-batch of `tokens` tokens (sequences x context length).

    With activation checkpointing each block keeps only its fp32 input and recomputes the rest
    during backward, one block at a time: L·4d + one block's activations, and only one block's
    bf16 weight copies at a time.

    Counted for eager PyTorch with fused attention (the tests measure it on CPU within 2%).
    With attention dropout > 0 (cfg.attention_dropout), CUDA's fused attention still keeps no T×T matrix and that is what we
    count; PyTorch's CPU attention then falls back to one that does (~14·heads·T bytes per
    token per layer more)."""
    counts = param_counts(cfg)
    layer = layer_bytes_per_token(cfg, precision)
    head = head_bytes_per_token(cfg, precision, fused_head)
    if checkpointing:
        saved = tokens * (cfg.n_layers * 4 * cfg.d_model + layer + head)
        copies = counts.per_block + (counts.matmul - cfg.n_layers * counts.per_block)
    else:
        saved = tokens * (cfg.n_layers * layer + head)
        copies = counts.matmul
    weight_copies = 2 * copies if precision == "bf16" else 0
    saved += head_fixed_bytes(cfg, precision, fused_head)
    return ActivationMemory(saved, tokens * logits_bytes_per_token(cfg, precision, fused_head), weight_copies)
