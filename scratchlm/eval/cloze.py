"""A small multiple-choice task made from held-out text, for corpora that ship without one.

Each item: the first half of a held-out line is the context; the choices are its true second
half and the second halves of three other held-out lines. A model that learned the language of
the corpus picks the true ending more often than the 25% of chance. Built only from the
validation split, so the model never trained on the answers.
"""

from __future__ import annotations

import random

from scratchlm.eval.tasks import MCItem


def build_cloze_items(texts: list[str], n: int = 100, n_choices: int = 4, seed: int = 0) -> list[MCItem]:
    lines = [ln.strip() for t in texts for ln in t.split("\n") if len(ln.split()) >= 8]
    rng = random.Random(seed)
    rng.shuffle(lines)
    pool = lines[: n * n_choices]
    halves = []
    for ln in pool:
        words = ln.split()
        cut = len(words) // 2
        halves.append((" ".join(words[:cut]), " ".join(words[cut:])))
    items = []
    for k in range(0, len(halves) - n_choices + 1, n_choices):
        group = halves[k:k + n_choices]
        gold = rng.randrange(n_choices)
        context = group[gold][0]
        choices = [g[1] for g in group]
        items.append(MCItem(context, choices, gold, "cloze", f"val line {k + gold}"))
        if len(items) >= n:
            break
    return items
