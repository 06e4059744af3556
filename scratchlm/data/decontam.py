"""Decontamination: find training documents that contain evaluation text.

A model that saw the test questions while pretraining scores well for the wrong reason. We
hash every word 13-gram of each evaluation set (the n-gram size GPT-3's paper used) and flag any
training document that shares at least one with it. Words are lower-cased, punctuation dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from scratchlm.data.dedup import ngram_hashes, word_hashes


@dataclass
class ContaminationReport:
    ngram: int
    per_eval_set: dict = field(default_factory=dict)  # name -> {"docs_flagged": n, "ngrams_matched": n}
    flagged: list[int] = field(default_factory=list)  # indices of training documents

    def to_dict(self) -> dict:
        return {"ngram": self.ngram, "per_eval_set": self.per_eval_set, "docs_flagged": len(self.flagged)}


class Decontaminator:
    def __init__(self, eval_sets: dict[str, list[str]], ngram: int = 13):
        """eval_sets: name -> list of texts (questions with their answers, passages...)."""
        self.ngram = ngram
        self.index: dict[str, np.ndarray] = {}
        for name, texts in eval_sets.items():
            grams = [ngram_hashes(word_hashes(t), ngram) for t in texts
                     if len(t.split()) >= ngram]
            self.index[name] = np.unique(np.concatenate(grams)) if grams else np.zeros(0, np.uint64)

    def check(self, docs: list[str]) -> ContaminationReport:
        report = ContaminationReport(ngram=self.ngram)
        stats = {name: {"docs_flagged": 0, "ngrams_matched": 0} for name in self.index}
        for i, doc in enumerate(docs):
            words = word_hashes(doc)
            if len(words) < self.ngram:
                continue
            grams = np.unique(ngram_hashes(words, self.ngram))
            hit = False
            for name, ref in self.index.items():
                matched = int(np.isin(grams, ref, assume_unique=True).sum()) if len(ref) else 0
                if matched:
                    stats[name]["docs_flagged"] += 1
                    stats[name]["ngrams_matched"] += matched
                    hit = True
            if hit:
                report.flagged.append(i)
        report.per_eval_set = stats
        return report


def load_eval_texts(paths: list[str]) -> dict[str, list[str]]:
    """Eval sets by file: MMLU CSVs, HellaSwag/ARC JSONL or text, or any text file. Each item's
    question and choices become one text, so a leaked question-with-answer is caught."""
    from scratchlm.eval.tasks import load_task_items
    sets: dict[str, list[str]] = {}
    for p in paths:
        items = load_task_items(p)
        sets[p] = [it.context + " " + " ".join(it.choices) for it in items] if items is not None else \
            [open(p, encoding="utf-8", errors="replace").read()]
    return sets
