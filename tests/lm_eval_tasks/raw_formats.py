"""Adapters from the local files' layouts to the Hugging Face layouts that lm-eval's own task
configs expect. They only move fields around (and, for HellaSwag's text form, undo its join of
ctx_a and ctx_b); every prompt is then built by lm-eval's own YAML and preprocessing code.
Written independently of scratchlm's loaders on purpose: nothing here imports scratchlm."""

import importlib.util
from pathlib import Path

import datasets
import lm_eval


def mmlu_csv(dataset: datasets.Dataset) -> datasets.Dataset:
    """`question,choice0..choice3,answer` rows -> cais/mmlu rows {question, choices, answer}."""
    return dataset.map(lambda d: {"question": d["question"],
                                  "choices": [d[f"choice{i}"] for i in range(4)],
                                  "answer": int(d["answer"])})


def _lm_eval_hellaswag_process_docs():
    path = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "utils.py"
    spec = importlib.util.spec_from_file_location("lm_eval_hellaswag_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.process_docs


def unjoin_context(ctx: str) -> tuple[str, str]:
    """The text form wrote ctx_a + " " + ctx_b. Which part was ctx_b follows from where the item
    comes from (rowanz/hellaswag data/README.md), not from letter case: an ActivityNet context ends
    in an incomplete sentence, kept apart as ctx_b; a WikiHow context (its text starts with the
    article's title, "How to ...") ends in a whole step and has no ctx_b. So WikiHow -> (ctx, "");
    ActivityNet -> cut after the last sentence end, whatever follows it."""
    if ctx.startswith("How to "):
        return ctx, ""
    cut = max(ctx.rfind(end) for end in (". ", "! ", "? "))  # the last sentence end
    return (ctx[:cut + 1], ctx[cut + 2:]) if cut >= 0 else ("", ctx)


def hellaswag_text(dataset: datasets.Dataset) -> datasets.Dataset:
    """6 lines per item (`label: ctx` / gold / 4 endings) -> Rowan/hellaswag rows, then lm-eval's
    own hellaswag `process_docs` (capitalisation of ctx_b, [tag] clean-up)."""
    lines = dataset["text"]
    rows = []
    for k in range(0, len(lines) - len(lines) % 6, 6):
        label, ctx = lines[k].split(": ", 1)
        ctx_a, ctx_b = unjoin_context(ctx)
        rows.append({"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                     "label": lines[k + 1].strip(), "endings": lines[k + 2:k + 6]})
    return _lm_eval_hellaswag_process_docs()(datasets.Dataset.from_list(rows))
