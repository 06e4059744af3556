"""Decontamination: find training documents that contain evaluation text.

A model that saw the test questions while pretraining scores well for the wrong reason. We
hash every word 13-gram of each evaluation set (the n-gram size GPT-3's paper used) and flag any
training document that shares at least one with it. A "word" is one definition everywhere: a run
of `\\w` characters, lower-cased (`dedup.word_hashes`), so punctuation and hyphens separate words
both when we count an item's words and when we hash its n-grams.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from scratchlm.data.dedup import ngram_hashes, word_hashes
from scratchlm.errors import UserError


@dataclass
class ContaminationReport:
    ngram: int
    per_eval_set: dict = field(default_factory=dict)  # name -> {"items", "items_too_short", "docs_flagged", "ngrams_matched"}
    flagged: list[int] = field(default_factory=list)  # indices of training documents

    def to_dict(self) -> dict:
        return {"ngram": self.ngram, "per_eval_set": self.per_eval_set, "docs_flagged": len(self.flagged)}


class Decontaminator:
    def __init__(self, eval_sets: dict[str, list[str]], ngram: int = 13):
        """eval_sets: name -> list of texts (questions with their answers, passages...)."""
        self.ngram = ngram
        self.index: dict[str, np.ndarray] = {}
        self.sizes: dict[str, dict] = {}
        for name, texts in eval_sets.items():
            words = [word_hashes(t) for t in texts]
            grams = [ngram_hashes(w, ngram) for w in words if len(w) >= ngram]
            if not grams:
                raise UserError(f"eval set {name}: none of its {len(texts)} items has {ngram} words, so there is "
                                f"nothing to look for")
            self.index[name] = np.unique(np.concatenate(grams))
            self.sizes[name] = {"items": len(texts), "items_too_short": len(texts) - len(grams)}

    def new_report(self) -> ContaminationReport:
        return ContaminationReport(ngram=self.ngram, per_eval_set={
            name: {**self.sizes[name], "docs_flagged": 0, "ngrams_matched": 0} for name in self.index})

    def check(self, docs: list[str], report: ContaminationReport | None = None, offset: int = 0) -> ContaminationReport:
        """Flag the documents that share an n-gram with an eval set. Call repeatedly with the same
        `report` and a running `offset` to check a corpus batch by batch."""
        report = report or self.new_report()
        for i, doc in enumerate(docs):
            words = word_hashes(doc)
            if len(words) < self.ngram:
                continue
            grams = np.unique(ngram_hashes(words, self.ngram))
            hit = False
            for name, ref in self.index.items():
                matched = int(np.isin(grams, ref, assume_unique=True).sum())
                if matched:
                    report.per_eval_set[name]["docs_flagged"] += 1
                    report.per_eval_set[name]["ngrams_matched"] += matched
                    hit = True
            if hit:
                report.flagged.append(offset + i)
        return report


def load_eval_texts(paths: list[str]) -> dict[str, list[str]]:
    """Eval sets by file: MMLU CSVs, HellaSwag/ARC JSONL or text, or any text file. Each item's
    question and choices become one text, so a leaked question-with-answer is caught. A file we
    cannot read as an eval set is an error (checking nothing must not look like "0 flagged")."""
    from scratchlm.eval.tasks import load_task_items
    sets: dict[str, list[str]] = {}
    for p in paths:
        items = load_task_items(p)
        sets[p] = [it.context + " " + " ".join(it.choices) for it in items] if items is not None else \
            [open(p, encoding="utf-8", errors="replace").read()]
    return sets
