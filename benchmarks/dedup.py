"""Near-duplicate detection: our MinHash LSH vs datasketch, on ~1 KB Gutenberg documents with
injected near-duplicates; plus the throughput of `prepare` on the same text."""

from __future__ import annotations

import random
import re
import tempfile
import time
from pathlib import Path

from benchmarks.common import gutenberg_texts, md_table
from scratchlm.data.dedup import deduplicate

N_DOCS = 20_000
THRESHOLD = 0.7
NUM_PERM = 128
_WORD = re.compile(r"\w+")


def make_corpus(seed: int = 0) -> tuple[list[str], list[tuple[int, int]]]:
    """18,000 originals of ~1 KB + 2,000 copies with a few random word edits (10%)."""
    rng = random.Random(seed)
    words = " ".join(gutenberg_texts(25.0)).split()
    n_orig = N_DOCS * 9 // 10
    originals = [" ".join(words[i * 170:(i + 1) * 170]) for i in range(n_orig)]
    docs, pairs = list(originals), []
    for k in range(N_DOCS - n_orig):
        src = rng.randrange(n_orig)
        w = originals[src].split()
        for _ in range(rng.randint(1, 6)):  # replace, delete or insert a word
            i = rng.randrange(len(w))
            op = rng.random()
            if op < 0.4:
                w[i] = rng.choice(words[:10000])
            elif op < 0.7:
                del w[i]
            else:
                w.insert(i, rng.choice(words[:10000]))
        docs.append(" ".join(w))
        pairs.append((src, len(docs) - 1))
    return docs, pairs


def shingles(text: str, n: int = 5) -> set:
    w = _WORD.findall(text.lower())
    return {" ".join(w[i:i + n]) for i in range(max(len(w) - n + 1, 1))}


def true_jaccard(a: set, b: set) -> float:
    return len(a & b) / max(len(a | b), 1)


def datasketch_dedup(docs: list[str]) -> list[bool]:
    from datasketch import MinHash, MinHashLSH
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    keep = []
    for i, d in enumerate(docs):
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch([s.encode() for s in shingles(d)])
        if lsh.query(m):
            keep.append(False)
        else:
            keep.append(True)
            lsh.insert(str(i), m)
    return keep


def score(keep: list[bool], pairs: list[tuple[int, int]], sh: list[set]) -> tuple[float, float]:
    """Recall: injected copies with true Jaccard >= threshold that were removed.
    Precision: removed documents that truly have a kept near-duplicate (J >= threshold - 0.1)."""
    targets = [(a, b) for a, b in pairs if true_jaccard(sh[a], sh[b]) >= THRESHOLD]
    recall = sum(not keep[b] for _, b in targets) / max(len(targets), 1)
    injected = {b: a for a, b in pairs}
    removed = [i for i, k in enumerate(keep) if not k]
    good = sum(1 for i in removed if i in injected and true_jaccard(sh[i], sh[injected[i]]) >= THRESHOLD - 0.1)
    return recall, good / max(len(removed), 1)


def run() -> str:
    docs, pairs = make_corpus()
    sh = [shingles(d) for d in docs]
    t = time.perf_counter()
    ours = deduplicate(docs, threshold=THRESHOLD, num_perm=NUM_PERM, exact=True).keep
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    theirs = datasketch_dedup(docs)
    theirs_s = time.perf_counter() - t
    r_o, p_o = score(ours, pairs, sh)
    r_t, p_t = score(theirs, pairs, sh)
    rows = [["documents/s", f"{len(docs) / ours_s:,.0f}", f"{len(docs) / theirs_s:,.0f}",
             f"{theirs_s / ours_s:.2f}x", ">= 3x"],
            ["recall (pairs with J >= 0.7)", f"{r_o:.3f}", f"{r_t:.3f}", "", ">= 0.95"],
            ["precision", f"{p_o:.3f}", f"{p_t:.3f}", "", ">= 0.95"]]
    out = (f"### Near-duplicate detection ({len(docs):,} docs of ~1 KB, {len(pairs):,} injected near-duplicates, "
           f"{NUM_PERM} permutations, threshold {THRESHOLD})\n\n"
           + md_table(["", "scratchlm", "datasketch", "ratio", "goal"], rows))

    from scratchlm.config import DataConfig, TokenizerConfig
    from scratchlm.data.prepare import prepare
    texts = gutenberg_texts(20.0)
    with tempfile.TemporaryDirectory() as d:
        corpus = Path(d) / "corpus"
        corpus.mkdir()
        for i, t in enumerate(texts):
            (corpus / f"{i:03d}.txt").write_text(t)
        mb = sum(len(t.encode()) for t in texts) / 1e6
        t = time.perf_counter()
        summary = prepare(DataConfig(corpus=str(corpus)), TokenizerConfig(vocab_size=8192), f"{d}/out",
                          log=lambda *_: None)
        secs = time.perf_counter() - t
    out += ("\n\n### `prepare` end to end (read, clean, dedup, train an 8192 tokenizer, encode, shard)\n\n"
            + md_table(["corpus", "seconds", "MB/s", "encode stage MB/s"],
                       [[f"{mb:.1f} MB, {len(texts)} books", f"{secs:.1f}", f"{mb / secs:.2f}", summary["MB_per_s"]]]))
    return out


if __name__ == "__main__":
    print(run())
