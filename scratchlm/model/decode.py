"""A lean decoding step: GPT.forward for one new token per row, in fewer PyTorch operations.

At batch 1 a decoding step of a small model is a few milliseconds of weight reading (the matrix-vector
products) plus a fixed cost per PyTorch operation (~2-10 us each: argument parsing, the dispatcher,
allocating the result). GPT.forward is written to be read and to serve every case (training, prefill,
padded batches), and spends ~40 operations per layer; for one new token per row with no padding most of
them are bookkeeping: views and transposes to split heads, slices to reach a layer's cache, masks,
dropout and module calls. This step runs the same math with only the operations that compute:

    x = embedding(token) + position row
    per layer:  h = norm(x);  q, k, v = views of qkv(h);  (QK-norm, RoPE);  cache[pos] = k, v
                x += out(attention(q, cache[:pos+1]));  x += ffn(norm(x))
    logits = head(norm(x))

Every product, norm and activation is the same call on the same numbers as in GPT.forward, so the
logits are bit-identical and greedy decoding picks the same tokens (tests/test_decode.py checks it for
each model variant). It reads the model's modules; it keeps no copy of any weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scratchlm.model.attention import KVCache, apply_rope, explicit_attention
from scratchlm.model.gpt import GPT


class Decoder:
    """One new token for each of B rows that are all at the same position (an unpadded batch),
    with the keys and values in `cache` (GPT.new_cache). `step` advances the cache by one."""

    def __init__(self, model: GPT, cache: KVCache):
        c = model.cfg
        self.model, self.cache, self.cfg = model, cache, c
        self.H, self.Hkv, self.d = c.n_heads, c.kv_heads, c.head_dim
        # Bound `forward`s skip nn.Module.__call__ (hook checks) on the hot path: ~1 us each, ~70 per step.
        self.layers = [(blk.attn_norm.forward, blk.attn.qkv.forward, blk.attn.out.forward, blk.ffn_norm.forward,
                        blk.ffn.up_proj.forward, blk.ffn.gate_proj.forward if c.ffn == "swiglu" else None,
                        blk.ffn.down_proj.forward,
                        (blk.attn.q_norm.forward, blk.attn.k_norm.forward) if c.qk_norm else None,
                        cache.k[i], cache.v[i]) for i, blk in enumerate(model.layers)]
        self.norm, self.head = model.norm.forward, model.lm_head.forward

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (B, 1) token ids at position cache.pos. Returns the logits, (B, 1, V)."""
        m, c, pos = self.model, self.cfg, self.cache.pos
        if pos >= self.cache.max_len:
            raise ValueError(f"KV cache full: {pos} + 1 > {self.cache.max_len}")
        B, H, Hkv, d = ids.size(0), self.H, self.Hkv, self.d
        x = F.embedding(ids, m.embed_tokens.weight)                  # (B, 1, C)
        rope = None
        if c.pos_encoding == "learned":
            x = x + m.pos_embed.weight[pos]                          # one row, broadcast over B
        elif c.pos_encoding == "sinusoidal":
            x = x + m.pos_table[pos]
        else:
            rope = m.rope_cos[pos], m.rope_sin[pos]                  # (d/2,) each
        for attn_norm, qkv, out, ffn_norm, up, gate, down, qk_norm, k_cache, v_cache in self.layers:
            # One token: (B, 1, (H + 2 Hkv) d) is already laid out as (B, heads, 1, d); no transposes.
            heads = qkv(attn_norm(x)).view(B, H + 2 * Hkv, 1, d)
            q, k, v = heads[:, :H], heads[:, H:H + Hkv], heads[:, H + Hkv:]
            if qk_norm is not None:
                q, k = qk_norm[0](q), qk_norm[1](k)
            if rope is not None:  # elementwise, so q and k rotate in one call when they sit side by side
                if qk_norm is None:
                    qk = apply_rope(heads[:, :H + Hkv], *rope)
                    q, k = qk[:, :H], qk[:, H:]
                else:
                    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            k_cache[:, :, pos:pos + 1] = k
            v_cache[:, :, pos:pos + 1] = v
            k, v = k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1]
            if Hkv != H:
                k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
            y = explicit_attention(q, k, v, None) if c.attention == "explicit" else F.scaled_dot_product_attention(q, k, v)
            x = x + out(y.reshape(B, 1, H * d))                      # (B, H, 1, d) is (B, 1, C) in memory
            h = ffn_norm(x)
            h = F.silu(gate(h)) * up(h) if gate is not None else F.gelu(up(h), approximate="tanh")
            x = x + down(h)
        self.cache.advance(1)
        return self.head(self.norm(x))
