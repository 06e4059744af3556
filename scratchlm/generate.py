"""Text generation: sampling strategies, a KV cache, batched prompts, stop conditions.

One step: run the model, take the logits of the last position, turn them into a distribution
(temperature, top-k, top-p), pick a token, append it. With the KV cache the model only processes
the new token; without it, the whole sequence again (same result, the tests check). When every row
sits at the same position (one prompt, or prompts of one length) each new token goes through
model/decode.py's lean step: GPT.forward's numbers, bit for bit, in fewer PyTorch operations.

Prompts of different lengths are left-padded; padded keys are masked out and positions start at
0 at each row's first real token, so every row gets exactly what it would get alone.

A model's output layer may be wider than the tokenizer's vocabulary (GPT-2's 50,257 tokens padded
to 50,304 for faster matmuls); the padding ids mean nothing, so sampling never picks them.

When a sequence reaches the context length we slide the window: keep the most recent 3/4 of
the context, rebuild the cache from it, and go on. Old text falls out of view; nothing crashes.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from scratchlm.errors import UserError
from scratchlm.model.decode import Decoder
from scratchlm.model.gpt import GPT


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0       # 0 = greedy
    top_k: int = 0                 # 0 = off
    top_p: float = 1.0             # 1 = off
    seed: int | None = None
    stop_tokens: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    use_cache: bool = True


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None,
                vocab_size: int | None = None) -> torch.Tensor:
    """logits: (B, V) -> (B,) next token ids, all below vocab_size (the tokenizer's) if given."""
    if vocab_size is not None and vocab_size < logits.size(-1):  # padded output ids decode to nothing
        logits = logits.clone()
        logits[:, vocab_size:] = float("-inf")
    if cfg.temperature <= 0:  # (fp32 holds every bf16 value exactly, and its argmax is ~3x faster on a CPU)
        return logits.float().argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1.0:
        # Keep the smallest set of tokens whose probability adds up to top_p (always >= 1 token).
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > cfg.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _batch_inputs(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad; return ids, positions (0 at each row's first real token), key-valid flags."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        valid[i, T - len(s):] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), positions.to(device), valid.to(device)


def _prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    T = valid.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    mask = causal[None, None] & valid[:, None, None, :]
    return mask | torch.eye(T, dtype=torch.bool, device=valid.device)[None, None]  # pads see themselves: no NaN


@torch.inference_mode()
def generate_ids(model: GPT, prompts: list[list[int]], cfg: SamplingConfig,
                 on_token: Callable[[int, int], None] | None = None,
                 stop_check: Callable[[int, list[int]], bool] | None = None,
                 truncate_prompt: bool = False, vocab_size: int | None = None, lean: bool = True) -> list[list[int]]:
    """Generate continuations for a batch of token-id prompts; returns the new ids per prompt.
    vocab_size: the tokenizer's, when the model's output is padded wider. lean=False decodes with
    GPT.forward instead of model/decode.py's Decoder (the same tokens; for tests and benchmarks)."""
    model.eval()
    ctx = model.cfg.context_length
    V = model.cfg.vocab_size
    for p in prompts:
        if not p:
            raise UserError("empty prompt: give at least one token")
        if max(p) >= V or min(p) < 0:
            raise UserError(f"prompt has token id {max(p)} outside the model's vocabulary ({V})")
        if len(p) > ctx and not truncate_prompt:
            raise UserError(f"prompt is {len(p)} tokens, longer than the model's context of {ctx}; shorten it")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    keep = max(ctx * 3 // 4, 1)
    seqs = [list(p[-ctx:]) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    cache = None
    valid = positions = None
    padded = False
    decoder = None
    for _ in range(cfg.max_new_tokens):
        if cfg.use_cache and cache is not None and cache.pos < ctx:
            # One new token per row. Nothing is built per token that can be kept: the ids are the
            # sampled tensor itself, the key mask a view of a buffer filled once per (re)fill, and
            # an unpadded batch needs no mask at all (a single query sees every cached key).
            if decoder is not None:  # rows side by side at one position: the lean step, same numbers
                logits = decoder.step(nxt_ids.view(-1, 1))
            else:
                positions = positions[:, -1:] + 1
                mask = valid_buf[:, None, None, :cache.pos + 1] if padded else None
                logits, _ = model(nxt_ids.view(-1, 1), positions=positions, mask=mask, cache=cache)
        else:  # first step, no cache, or the window is full: (re)process the recent context
            seqs = [s[-keep:] if len(s) > ctx else s for s in seqs]
            ids, positions, valid = _batch_inputs(seqs, device)
            cache = model.new_cache(len(seqs)) if cfg.use_cache else None
            padded = not bool(valid.all())
            valid_buf = torch.ones(len(seqs), ctx, dtype=torch.bool, device=device)
            valid_buf[:, :valid.size(1)] = valid
            logits, _ = model(ids, positions=positions, mask=_prefill_mask(valid), cache=cache)
            decoder = Decoder(model, cache) if cache is not None and not padded and lean else None
        nxt_ids = sample_next(logits[:, -1, :], cfg, gen, vocab_size)
        nxt = nxt_ids.tolist()
        for i, t in enumerate(nxt):
            seqs[i].append(t)
            if done[i]:
                continue
            if t in cfg.stop_tokens:
                done[i] = True
                continue
            new[i].append(t)
            if on_token:
                on_token(i, t)
            if stop_check and stop_check(i, new[i]):
                done[i] = True
        if all(done):
            break
    return new


def generate(model: GPT, tokenizer, prompts: str | list[str], cfg: SamplingConfig | None = None,
             stream: bool = False, truncate_prompt: bool = False) -> list[str]:
    """Generate text for one prompt or a batch; stops at <|endoftext|> and any stop string. An
    empty prompt starts from <|endoftext|>, as a new document would. With stream=True the first
    prompt's text is written to stdout as it grows, never past a stop string."""
    cfg = cfg or SamplingConfig()
    if not cfg.stop_tokens:  # a copy: the caller's config stays as it was
        cfg = dataclasses.replace(cfg, stop_tokens=[tokenizer.eot_id])
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    ids = [tokenizer.encode(p, allowed_special="all") or [tokenizer.eot_id] for p in prompts]
    out_tokens: list[list[int]] = [[] for _ in prompts]
    printed = 0

    def stop_check(i: int, toks: list[int]) -> bool:
        return bool(cfg.stop_strings) and any(s in tokenizer.decode(toks) for s in cfg.stop_strings)

    def track(i: int, t: int) -> None:
        nonlocal printed
        out_tokens[i].append(t)
        if stream and i == 0:
            text = tokenizer.decode(out_tokens[0])
            safe = printable(text, cfg.stop_strings)
            if safe > printed:
                sys.stdout.write(text[printed:safe])
                sys.stdout.flush()
                printed = safe

    new = generate_ids(model, ids, cfg, on_token=track, stop_check=stop_check, truncate_prompt=truncate_prompt,
                       vocab_size=tokenizer.vocab_size)
    texts = [trim_at_stop(tokenizer.decode(toks), cfg.stop_strings) for toks in new]
    if stream:
        sys.stdout.write(texts[0][printed:] + "\n")
        sys.stdout.flush()
    return texts


def trim_at_stop(text: str, stop_strings: list[str]) -> str:
    cut = min((text.index(s) for s in stop_strings if s in text), default=len(text))
    return text[:cut]


def printable(text: str, stop_strings: list[str]) -> int:
    """How much of `text` can be shown while generation goes on: not a character still being
    decoded (a trailing \ufffd), not a stop string, not an end that may become one."""
    cut = len(text.rstrip("\ufffd"))
    for s in stop_strings:
        if s in text:
            cut = min(cut, text.index(s))
        for k in range(min(len(s) - 1, len(text)), 0, -1):  # the end of text is the start of s
            if text.endswith(s[:k]):
                cut = min(cut, len(text) - k)
                break
    return cut
