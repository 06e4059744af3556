"""The numbers behind the README's "Fine-tune" section (not part of `make bench`: needs runs).

    python -m benchmarks.finetune_evidence baseline --data ../shared/data/sms_spam_part1.tsv
        bag-of-words logistic regression on the same seeded split as `scratchlm finetune classify`
    python -m benchmarks.finetune_evidence sft --base runs/base --run runs/sft --data instruction-data.json
        held-out response loss before/after, share of answers that end with the end token, 5 examples
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter

import torch
import torch.nn.functional as F

from scratchlm.config import FinetuneConfig
from scratchlm.finetune.classify import classification_metrics, format_metrics
from scratchlm.finetune.data import load_conversations, load_labeled, pad_id, split_indices


def bag_of_words_baseline(data: str, seed: int, val_fraction: float, test_fraction: float) -> dict:
    """Logistic regression on word counts (log1p), vocabulary from the training split only."""
    records = load_labeled(data)
    split = split_indices(len(records), val_fraction, test_fraction, seed)
    words = lambda t: re.findall(r"[a-z0-9£$]+|[!?]", t.lower())  # noqa: E731
    vocab = {w: i for i, (w, _) in enumerate(Counter(w for i in split["train"] for w in words(records[i].text))
                                             .most_common(20000))}
    labels = sorted({records[i].label for i in split["train"]})

    def features(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.zeros(len(idx), len(vocab))
        for row, i in enumerate(idx):
            for w in words(records[i].text):
                if w in vocab:
                    x[row, vocab[w]] += 1
        return x.log1p(), torch.tensor([labels.index(records[i].label) for i in idx])

    (xtr, ytr), (xva, yva), (xte, yte) = (features(split[k]) for k in ("train", "val", "test"))
    best = None
    for l2 in (1e-4, 1e-3, 1e-2):  # the one regularisation knob, chosen on the validation split
        torch.manual_seed(seed)
        w = torch.zeros(len(vocab), len(labels), requires_grad=True)
        b = torch.zeros(len(labels), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(xtr @ w + b, ytr) + l2 * (w ** 2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        with torch.no_grad():
            val_acc = ((xva @ w + b).argmax(-1) == yva).float().mean().item()
            test_pred = (xte @ w + b).argmax(-1).tolist()
        if best is None or val_acc > best[0]:
            best = (val_acc, l2, test_pred)
    metrics = classification_metrics(yte.tolist(), best[2], labels)
    return {"model": "bag-of-words logistic regression", "l2": best[1], "val_acc": round(best[0], 4),
            "split": {k: len(v) for k, v in split.items()}, "test": metrics}


def sft_report(base: str, run: str, data: str, n_answers: int, n_table: int) -> dict:
    from scratchlm.config import from_dict
    from scratchlm.finetune.base import load_base
    from scratchlm.finetune.sft import answer, encode_examples, prompt_messages, response_loss
    from scratchlm.finetune.templates import get_template
    from scratchlm.train.checkpoint import load_for_inference
    model, tok, meta = load_for_inference(run, device="cpu")
    task = meta["state"]["task"]
    cfg = from_dict(meta["state"]["config"])
    fc = cfg.finetune
    template = get_template(task["template"])
    convs = load_conversations(data)
    test = [convs[i] for i in split_indices(len(convs), fc.val_fraction, fc.test_fraction, cfg.run.seed)["test"]]
    max_len = model.cfg.context_length + 1
    enc, _ = encode_examples(tok, template, test, max_len)
    base_model, _, _ = load_base(base)
    base_model.eval()
    before = response_loss(base_model, enc, pad_id(tok))
    after = response_loss(model, enc, pad_id(tok))
    prompts = [prompt_messages(c) for c in test[:n_answers]]
    answers = answer(model, tok, template, prompts)
    base_answers = answer(base_model, tok, template, prompts[:n_table], max_new_tokens=48)
    rows = [{"instruction": p[-1]["content"] + (f" [{p[-1]['input']}]" if p[-1].get("input") else ""),
             "reference": c.messages[-1]["content"], "base": b[0], "finetuned": a[0], "ended": a[1]}
            for p, c, a, b in zip(prompts[:n_table], test, answers, base_answers)]
    return {"run": run, "template": template.name, "test_examples": len(enc), "response_loss_before": round(before, 4),
            "response_loss_after": round(after, 4), "answers": len(answers),
            "end_token_rate": round(sum(e for _, e in answers) / max(len(answers), 1), 4), "table": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("baseline")
    p.add_argument("--data", required=True)
    p.add_argument("--seed", type=int, default=1337)
    p = sub.add_parser("sft")
    p.add_argument("--base", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--answers", type=int, default=110, help="held-out prompts to answer (greedy)")
    p.add_argument("--table", type=int, default=5)
    a = ap.parse_args()
    if a.what == "baseline":
        d = FinetuneConfig()
        res = bag_of_words_baseline(a.data, a.seed, d.val_fraction, d.test_fraction)
        print(format_metrics(res["test"]))
    else:
        res = sft_report(a.base, a.run, a.data, a.answers, a.table)
    print(json.dumps(res, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
