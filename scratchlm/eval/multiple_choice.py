"""Multiple-choice scoring by log-likelihood, the way lm-evaluation-harness does it.

For each choice, score log P(target_delimiter + choice | context) under the model: the sum of the
log-probabilities of the continuation's tokens.
    acc       the choice with the highest summed log-prob is right
    acc_norm  the same after dividing each sum by the choice's length in characters (so long
              answers are not punished for having more tokens)
The tokenization of (context, continuation) follows lm-eval: trailing spaces of the context move
to the continuation, the continuation's tokens are those of encode(context + continuation) past
the tokens of encode(context), and an empty context is preceded by <|endoftext|>.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scratchlm.errors import UserError
from scratchlm.eval.tasks import MCItem


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode_ordinary(context + continuation)
    ctx = tokenizer.encode_ordinary(context)
    cont = whole[len(ctx):]
    if not ctx:
        ctx = [tokenizer.eot_id]
    return ctx, cont


def fits(tokenizer, item: MCItem, context_length: int, target_delimiter: str = " ") -> bool:
    """Whether every choice of `item` fits in the model's window, so `score_items` can score it."""
    return all(len(encode_pair(tokenizer, item.context, target_delimiter + c)[1]) <= context_length
               for c in item.choices)


@torch.inference_mode()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16,
                   autocast=None) -> list[tuple[float, bool]]:
    """For each (context_ids, continuation_ids): (sum of log-probs of the continuation, whether
    greedy decoding would have produced it). Longest first, batched, right-padded."""
    T = model.cfg.context_length
    too_long = max((len(cont) for _, cont in requests), default=0)
    if too_long > T:  # the context is left-truncated to fit; a continuation cannot be
        raise UserError(f"an answer is {too_long} tokens, longer than the model's {T}-token context, so it "
                        f"cannot be scored; use a model with a longer context (a char-level one needs ~4x BPE's)")
    device = next(model.parameters()).device
    model.eval()
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for b in range(0, len(order), batch_size):
        idxs = order[b:b + batch_size]
        rows, spans = [], []
        for i in idxs:
            ctx, cont = requests[i]
            full = (ctx + cont)[-(T + 1):]          # left-truncate to the context window
            inp = full[:-1]
            rows.append(inp)
            spans.append((len(inp) - len(cont), len(cont)))
        L = max(len(r) for r in rows)
        x = torch.zeros(len(rows), L, dtype=torch.long)
        for r, row in enumerate(rows):
            x[r, :len(row)] = torch.tensor(row)
        with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
            logits, _ = model(x.to(device))
        logp = F.log_softmax(logits.float(), dim=-1)
        for r, i in enumerate(idxs):
            start, n = spans[r]
            cont = torch.tensor(requests[i][1], device=device)
            lp = logp[r, start:start + n]
            total = lp.gather(-1, cont[:, None]).sum().item()
            greedy = bool((lp.argmax(dim=-1) == cont).all())
            results[i] = (total, greedy)
    return results  # type: ignore[return-value]


@dataclass
class MCResult:
    n: int
    acc: float
    acc_norm: float
    acc_stderr: float
    acc_norm_stderr: float
    random_baseline: float
    per_subject: dict

    def ci95(self, norm: bool = False) -> tuple[float, float]:
        m, s = (self.acc_norm, self.acc_norm_stderr) if norm else (self.acc, self.acc_stderr)
        return max(m - 1.96 * s, 0.0), min(m + 1.96 * s, 1.0)

    def to_dict(self) -> dict:
        return {"n": self.n, "acc": self.acc, "acc_stderr": self.acc_stderr, "acc_ci95": self.ci95(),
                "acc_norm": self.acc_norm, "acc_norm_stderr": self.acc_norm_stderr,
                "acc_norm_ci95": self.ci95(True), "random_baseline": self.random_baseline,
                "per_subject": self.per_subject}


def _stderr(values: list[float]) -> float:
    """Standard error of the mean with the sample standard deviation (lm-eval's mean_stderr)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def score_items(model, tokenizer, items: list[MCItem], batch_size: int = 16, autocast=None,
                target_delimiter: str = " ") -> tuple[MCResult, list[dict]]:
    requests, owners = [], []
    for k, item in enumerate(items):
        for c in item.choices:
            requests.append(encode_pair(tokenizer, item.context, target_delimiter + c))
            owners.append(k)
    lls = loglikelihoods(model, requests, batch_size=batch_size, autocast=autocast)
    per_item: list[list[float]] = [[] for _ in items]
    for (ll, _), k in zip(lls, owners):
        per_item[k].append(ll)
    accs, norms, details = [], [], []
    by_subject: dict[str, list[float]] = defaultdict(list)
    for item, scores in zip(items, per_item):
        pred = max(range(len(scores)), key=lambda j: scores[j])
        normed = [s / max(len(c), 1) for s, c in zip(scores, item.choices)]
        pred_norm = max(range(len(normed)), key=lambda j: normed[j])
        accs.append(float(pred == item.gold))
        norms.append(float(pred_norm == item.gold))
        by_subject[item.subject].append(float(pred == item.gold))
        details.append({"source": item.source, "gold": item.gold, "pred": pred, "pred_norm": pred_norm,
                        "loglikelihoods": scores})
    n = len(items)
    result = MCResult(
        n=n, acc=sum(accs) / n, acc_norm=sum(norms) / n, acc_stderr=_stderr(accs), acc_norm_stderr=_stderr(norms),
        random_baseline=sum(1 / len(it.choices) for it in items) / n,
        per_subject={s: {"n": len(v), "acc": sum(v) / len(v)} for s, v in sorted(by_subject.items())})
    return result, details
