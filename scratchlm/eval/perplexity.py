"""Perplexity and bits-per-byte.

loss        mean cross-entropy per token, in nats
perplexity  exp(loss): "as unsure as a uniform choice among this many tokens"
bits/byte   total loss in bits / total UTF-8 bytes of the predicted text. Unlike loss and
            perplexity it does not depend on the tokenizer (a bigger vocabulary makes fewer, harder
            predictions), so it compares models with different tokenizers. Special tokens (the
            <|endoftext|> separators) carry no text: they are left out of both sums.

Long texts are scored with a sliding window: windows of `context_length` move by `stride`, and
only the tokens not scored by an earlier window count, so every token gets at least
`context_length - stride` tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from scratchlm.errors import UserError


@dataclass
class PerplexityResult:
    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes}


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 length of every token id; 0 for special tokens."""
    lengths = [len(b) for b in tokenizer.vocab] + [0] * len(tokenizer.special_tokens)
    return torch.tensor(lengths, dtype=torch.long)


@torch.inference_mode()
def evaluate_tokens(model, tokens: np.ndarray, token_bytes: torch.Tensor, stride: int | None = None,
                    max_windows: int = 0, batch_size: int = 8, autocast=None) -> PerplexityResult:
    """Score a token array with a sliding window (see module docstring)."""
    T = model.cfg.context_length
    stride = stride or T
    if not 0 < stride <= T:
        raise UserError(f"stride must be in 1..{T}, got {stride}")
    n = len(tokens)
    if n < 2:
        raise UserError("need at least 2 tokens to evaluate")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # window k covers tokens [s, s+T] (inputs s..s+T-1); it scores targets from `first_new` on
    starts = list(range(0, max(n - 1 - T, 0) + 1, stride))
    if starts[-1] + T < n - 1:
        starts.append(n - 1 - T)
    if max_windows:
        starts = starts[:max_windows]
    sum_nats = sum_bits_nats = 0.0
    count = nbytes = 0
    scored_until = 0  # targets at index < scored_until (in token positions) are already counted
    for b in range(0, len(starts), batch_size):
        group = starts[b:b + batch_size]
        L = min(T, n - 1)
        x = torch.stack([torch.from_numpy(np.asarray(tokens[s:s + L], dtype=np.int64)) for s in group]).to(device)
        y = torch.stack([torch.from_numpy(np.asarray(tokens[s + 1:s + L + 1], dtype=np.int64)) for s in group]).to(device)
        with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
            logits, _ = model(x)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none").view(y.shape)
        for row, s in enumerate(group):
            first = max(scored_until - (s + 1), 0)  # skip targets an earlier window scored
            t_nll = nll[row, first:]
            t_y = y[row, first:]
            nb = token_bytes[t_y.cpu()]
            sum_nats += t_nll.sum().item()
            count += t_nll.numel()
            text = nb > 0
            sum_bits_nats += t_nll[text.to(t_nll.device)].sum().item()
            nbytes += int(nb.sum())
            scored_until = s + 1 + L
    if was_training:
        model.train()
    loss = sum_nats / max(count, 1)
    bpb = sum_bits_nats / math.log(2) / max(nbytes, 1)
    return PerplexityResult(loss=loss, perplexity=math.exp(min(loss, 700)), bits_per_byte=bpb,
                            tokens=count, bytes=nbytes)
