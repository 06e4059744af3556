"""Instruction fine-tuning (SFT): learn to write the response, and to stop.

One example's ids are built piece by piece by the template (`encode_conversation`):

    ids  = encode(prompt) + encode(response) + [end]
    mask =   0 ... 0      +   1 ... 1        +  1        (train_on_prompt: all 1)

and the model learns next-token prediction where the *target* is a masked-in token. So:
- the end token always carries loss: it is how the model learns to stop. Padding is masked by
  position (a pad is never a target), so pad id == end-of-text id cannot hide the end token;
- the loss is a sum over response tokens and a count; the trainer divides by the count of the
  whole optimizer step, so under gradient accumulation every response token weighs the same
  (a per-micro-batch mean would weigh tokens of short answers more);
- an example longer than the context loses tokens from the *start* of its prompt (counted and
  reported); one whose last response does not fit at all is skipped (counted) — the end token is
  never cut off silently.

With `packing`, several examples share one sequence; positions restart and attention stays within
each example (a block-diagonal causal mask), so packing changes speed, not the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchlm.errors import UserError
from scratchlm.finetune.base import FinetuneObjective
from scratchlm.finetune.data import Conversation, pad_id, pad_right
from scratchlm.finetune.templates import Template, check_tokenizer, encode_conversation
from scratchlm.generate import SamplingConfig, generate_ids


@dataclass
class Encoded:
    ids: list[int]
    mask: list[bool]       # mask[i]: ids[i] is a target that carries loss


@dataclass
class EncodeReport:
    kept: int = 0
    truncated: int = 0     # lost tokens from the start of the prompt
    skipped: int = 0       # the last response alone does not fit

    def warning(self, max_length: int) -> str | None:
        if not (self.truncated or self.skipped):
            return None
        return (f"warning: {self.truncated} example(s) longer than {max_length} tokens were cut from the start of "
                f"the prompt; {self.skipped} skipped because the response alone does not fit "
                f"(raise model.context_length or finetune.max_length)")


def encode_examples(tok, template: Template, convs: list[Conversation], max_length: int,
                    train_on_prompt: bool = False) -> tuple[list[Encoded], EncodeReport]:
    """Encode conversations into at most max_length ids each (truncating prompts from the left)."""
    check_tokenizer(tok, template)
    out, rep = [], EncodeReport()
    for c in convs:
        ids, response = encode_conversation(tok, template, c.messages)
        mask = [True] * len(ids) if train_on_prompt else response
        if len(ids) > max_length:
            cut = len(ids) - max_length
            last_start = max(i for i, m in enumerate(response) if m and (i == 0 or not response[i - 1]))
            if cut >= last_start:  # at least one prompt token must stay to predict the response from
                rep.skipped += 1
                continue
            ids, mask = ids[cut:], mask[cut:]
            rep.truncated += 1
        out.append(Encoded(ids, mask))
    rep.kept = len(out)
    return out, rep


def collate(examples: list[Encoded], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs/targets; `loss_mask` is 1 where the target is a real, masked-in token."""
    ids, real = pad_right([e.ids for e in examples], pad)
    m, _ = pad_right([[int(x) for x in e.mask] for e in examples], 0)
    m = m.bool() & real
    return {"input": ids[:, :-1], "target": ids[:, 1:], "loss_mask": m[:, 1:]}


def pack(examples: list[Encoded], length: int, pad: int) -> dict[str, torch.Tensor]:
    """Greedily place examples (in order) into rows of `length` + 1 ids; every example keeps its own
    positions (from 0) and attends only to itself."""
    rows: list[list[tuple[int, Encoded]]] = [[]]
    used = 0
    for e in examples:
        if used + len(e.ids) > length + 1 and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append((len(rows[-1]), e))
        used += len(e.ids)
    ids, mask, seg, pos = [], [], [], []
    for row in rows:
        ids.append([t for _, e in row for t in e.ids])
        mask.append([int(x) for _, e in row for x in e.mask])
        seg.append([k + 1 for k, e in row for _ in e.ids])
        pos.append([p for _, e in row for p in range(len(e.ids))])
    ids_t, real = pad_right(ids, pad)
    m, _ = pad_right(mask, 0)
    s, _ = pad_right(seg, 0)
    p, _ = pad_right(pos, 0)
    s_in = s[:, :-1]
    T = s_in.size(1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = (s_in[:, :, None] == s_in[:, None, :]) & (s_in[:, :, None] > 0)
    attn = (causal & same) | torch.eye(T, dtype=torch.bool)  # a pad attends to itself: no NaN rows
    # A target counts only inside the same example as its input position.
    same_next = (s[:, 1:] == s[:, :-1]) & (s[:, :-1] > 0)
    return {"input": ids_t[:, :-1], "target": ids_t[:, 1:], "loss_mask": m[:, 1:].bool() & real[:, 1:] & same_next,
            "positions": p[:, :-1], "attn_mask": attn[:, None]}


def forward_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    if "attn_mask" in batch:
        logits, _ = model(batch["input"], positions=batch["positions"], mask=batch["attn_mask"])
    else:
        logits, _ = model(batch["input"])
    return logits


def token_losses(model: nn.Module, batch: dict) -> torch.Tensor:
    """(B, T) cross-entropy per target, 0 where the target does not count."""
    logits = forward_logits(model, batch)
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch["target"].flatten(), reduction="none")
    return ce.view_as(batch["target"]) * batch["loss_mask"]


class SFTObjective(FinetuneObjective):
    def __init__(self, tok, template: Template, train: list[Encoded], val: list[Encoded], meta: dict,
                 val_prompts: list[list[int]] = (), context_length: int = 0, packing: bool = False,
                 eval_batch: int = 16, sample_tokens: int = 48):
        self.tokenizer, self.template = tok, template
        self.train_set, self.val_set, self.meta = train, val, meta
        self.val_prompts = list(val_prompts)
        self.packing, self.length = packing, context_length
        self.eval_batch, self.sample_tokens = eval_batch, sample_tokens
        self.pad = pad_id(tok)
        self.end_id = tok.special_tokens[template.end_token]

    def setup(self, rank: int, world_size: int, micro_batch: int, seed: int) -> None:
        self._start_sampler(rank, world_size, micro_batch, seed)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self.packing:
            return collate([self.train_set[i] for i in self.sampler.take(self.micro_batch)], self.pad)
        # Packing: take examples until micro_batch rows of context_length tokens are filled.
        budget = self.micro_batch * (self.length + 1)
        chosen, used = [], 0
        while used < budget * 0.9:
            e = self.train_set[self.sampler.take(1)[0]]
            chosen.append(e)
            used += len(e.ids)
        return pack(chosen, self.length, self.pad)

    def count(self, batch: dict) -> int:
        return int(batch["loss_mask"].sum())

    def tokens(self, batch: dict) -> int:
        return int(batch["input"].numel())

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return token_losses(model, batch).sum(), {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"val_loss": response_loss(model, self.val_set, self.pad, self.eval_batch)}

    def samples(self, model: nn.Module) -> dict[str, str]:
        if not self.val_prompts:
            return {}
        new = generate_ids(model, self.val_prompts[:2], SamplingConfig(
            max_new_tokens=self.sample_tokens, temperature=0, stop_tokens=[self.end_id]), truncate_prompt=True,
            vocab_size=self.tokenizer.vocab_size)
        model.train()
        return {"..." + self.tokenizer.decode(p)[-60:]: self.tokenizer.decode(t) for p, t in zip(self.val_prompts, new)}


@torch.no_grad()
def response_loss(model: nn.Module, examples: list[Encoded], pad: int, batch: int = 16) -> float:
    """Mean cross-entropy over every loss-carrying token of `examples` (response tokens + end)."""
    if not examples:
        return math.nan
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for i in range(0, len(examples), batch):
        b = {k: v.to(device) for k, v in collate(examples[i:i + batch], pad).items()}
        total += float(token_losses(model, b).sum())
        n += int(b["loss_mask"].sum())
    return total / max(n, 1)


@torch.no_grad()
def answer(model: nn.Module, tok, template: Template, prompts: list[list[dict]], max_new_tokens: int = 128,
           batch: int = 16) -> list[tuple[str, bool]]:
    """Greedy answers to conversations that end with a user turn: (text, ended with the end token)."""
    end_id = tok.special_tokens[template.end_token]
    out = []
    for i in range(0, len(prompts), batch):
        ids = [tok.encode(template.prompt(m), allowed_special="all") for m in prompts[i:i + batch]]
        new = generate_ids(model, ids, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0,
                                                      stop_tokens=[end_id]), truncate_prompt=True,
                           vocab_size=tok.vocab_size)
        # generate_ids leaves the stop token out: fewer than max_new_tokens means it stopped on it.
        out += [(tok.decode(t), len(t) < max_new_tokens) for t in new]
    return out


def prompt_messages(conv: Conversation) -> list[dict]:
    """The conversation up to (not including) its last assistant turn."""
    last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
    if last == 0:
        raise UserError(f"{conv.where}: the conversation starts with the assistant; nothing to answer")
    return conv.messages[:last]
