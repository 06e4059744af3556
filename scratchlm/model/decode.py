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

The serving engine's rows are not side by side: each request sits in its own slot of the cache, at its
own length. Then "cache[pos]" is each row's own slot and position, and when the lengths differ a key
mask keeps a shorter row from the keys past its end (what GPT.forward's mask argument does there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scratchlm.model.attention import KVCache, apply_rope, explicit_attention
from scratchlm.model.gpt import GPT


class Decoder:
    """One new token for each of B rows of `cache` (GPT.new_cache, or the serving engine's slot cache).

    `step`: every row of the cache at position cache.pos (an unpadded batch, what generate_ids runs);
    the cache advances by one. `step_rows`: row b is cache slot slots[b], which holds lengths[b]
    positions (the serving engine: requests join and leave at different times); the caller keeps the
    lengths. Both run the one per-layer body, `_run`, told where each row writes and reads."""

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
        pos = self.cache.pos
        if pos >= self.cache.max_len:
            raise ValueError(f"KV cache full: {pos} + 1 > {self.cache.max_len}")
        every = slice(None)
        logits = self._run(ids, pos, write=(every, every, slice(pos, pos + 1)),
                           read=(every, every, slice(None, pos + 1)))
        self.cache.advance(1)
        return logits

    @torch.inference_mode()
    def step_rows(self, ids: torch.Tensor, slots: list[int], lengths: list[int]) -> torch.Tensor:
        """ids: (B, 1), row b's token, at position lengths[b] of cache slot slots[b] (slots ascending).
        Returns the logits, (B, 1, V): bit for bit those of the engine's GPT.forward step, a masked step
        included (the same calls on the same numbers; tests/test_decode.py checks every case below)."""
        end = max(lengths) + 1                                       # the keys the longest row sees
        if end > self.cache.max_len:
            raise ValueError(f"KV cache full: {end} > {self.cache.max_len}")
        dev, every = ids.device, slice(None)
        adjacent = slots == list(range(slots[0], slots[0] + len(slots)))
        rows = slice(slots[0], slots[-1] + 1) if adjacent else torch.tensor(slots, device=dev)
        one_length = len(set(lengths)) == 1
        if adjacent and one_length:  # a lone row, always: `step`'s plain slices
            pos = lengths[0]
            return self._run(ids, pos, write=(rows, every, slice(pos, pos + 1)), read=(rows, every, slice(None, end)))
        at = torch.tensor(lengths, device=dev)[:, None]                              # (B, 1)
        # Three index tensors that broadcast to (B, Hkv, 1), k's own shape less its last dim:
        # row b's new key lands in slot slots[b], every head, position lengths[b].
        write = (torch.tensor(slots, device=dev)[:, None, None], torch.arange(self.Hkv, device=dev)[None, :, None],
                 at[:, :, None])
        read = (rows, every, slice(None, end))
        if one_length:
            return self._run(ids, lengths[0], write, read)
        # A shorter row must not see the keys past its own end: another request's, or zeros.
        mask = (torch.arange(end, device=dev) <= at)[:, None, None, :]            # (B, 1, 1, end)
        return self._run(ids, at, write, read, mask)

    def _run(self, ids: torch.Tensor, pos: int | torch.Tensor, write: tuple, read: tuple,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """The step itself. pos: one position for every row, or (B, 1) positions; write/read: the
        cache indices of the new key and of the keys attended to; mask: (B, 1, 1, keys) or None."""
        m, c = self.model, self.cfg
        B, H, Hkv, d = ids.size(0), self.H, self.Hkv, self.d
        x = F.embedding(ids, m.embed_tokens.weight)                  # (B, 1, C)
        rope = None
        if c.pos_encoding == "learned":
            x = x + m.pos_embed.weight[pos]                          # one row broadcast over B, or (B, 1, C)
        elif c.pos_encoding == "sinusoidal":
            x = x + m.pos_table[pos]
        else:
            p = pos if isinstance(pos, int) else pos[:, :, None]     # per-row angles broadcast over the heads
            rope = m.rope_cos[p], m.rope_sin[p]                      # (d/2,) or (B, 1, 1, d/2) each
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
            k_cache[write] = k
            v_cache[write] = v
            k, v = k_cache[read], v_cache[read]
            if Hkv != H:
                k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
            if c.attention == "explicit":
                y = explicit_attention(q, k, v, mask)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + out(y.reshape(B, 1, H * d))                      # (B, H, 1, d) is (B, 1, C) in memory
            h = ffn_norm(x)
            h = F.silu(gate(h)) * up(h) if gate is not None else F.gelu(up(h), approximate="tanh")
            x = x + down(h)
        return self.head(self.norm(x))
