"""Deduplication, exact and near: MinHash signatures + LSH banding, verified, clustered.

Exact duplicates: the same text after lower-casing and collapsing whitespace has the same hash.

Near duplicates (two editions of a book, a scraped page with a different footer):
1. Shingles: each document becomes the set of its word 5-grams, each hashed to 32 bits.
2. MinHash: apply `num_perm` random hash functions h_k(x) = (a_k * x + b_k) mod 2^64 >> 32
   and keep the minimum of each over the shingles. For two documents, P[min equal] equals
   their Jaccard similarity, so the share of equal signature rows estimates it. All of this is
   one NumPy matrix per batch of documents.
3. LSH: cut the signature into `bands` bands of `rows` rows; documents sharing any whole band
   land in the same bucket and become candidate pairs. More bands, fewer rows = higher recall.
4. Verify each candidate pair by its estimated Jaccard >= threshold (kills LSH false positives),
   join verified pairs with union-find, keep the first document of each cluster.
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)
_MASK32 = np.uint64(0xFFFFFFFF)


def exact_key(text: str) -> bytes:
    return hashlib.sha1(" ".join(text.lower().split()).encode("utf-8")).digest()


def word_hashes(text: str) -> np.ndarray:
    """Deterministic hash per word: crc32 of its UTF-8 bytes (the same in every process and run,
    unlike Python's salted hash()). Mapped in C, with no Python code per word."""
    words = _WORD.findall(text.lower())
    return np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))


def ngram_hashes(words: np.ndarray, n: int) -> np.ndarray:
    """Hash every window of n consecutive words into one 64-bit value (polynomial rolling hash)."""
    if len(words) < n:
        n = max(len(words), 1)
        if len(words) == 0:
            return np.zeros(0, dtype=np.uint64)
    m = len(words) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    mult = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * mult + words[k:k + m]
    return h


def optimal_bands(num_perm: int, threshold: float, target_recall: float = 0.995) -> tuple[int, int]:
    """Most rows per band (fewest false candidates) that still catch pairs at `threshold` with
    probability >= target_recall: P(candidate) = 1 - (1 - J^rows)^bands."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= target_recall:
            best = (bands, rows)
    return best


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the earliest document is the root: it is kept


@dataclass
class MinHasher:
    num_perm: int = 128
    ngram: int = 5
    seed: int = 0

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.a = rng.integers(1, 2**63, size=self.num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64)

    def shingle_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All documents' shingle hashes, concatenated, and how many belong to each document.

        The rolling hash runs once over the whole batch's words; windows that straddle two
        documents are dropped. A document shorter than `ngram` words is one shingle of all its words.
        """
        words = [word_hashes(t) for t in texts]
        lens = np.array([len(w) for w in words], dtype=np.int64)
        n = self.ngram
        if lens.sum() == 0:
            return np.zeros(0, np.uint64), np.zeros(len(texts), np.int64)
        allw = np.concatenate(words)
        doc_end = np.repeat(np.cumsum(lens), lens)            # end offset of each word's document
        grams = ngram_hashes(allw, n) if len(allw) >= n else np.zeros(0, np.uint64)
        valid = np.arange(len(grams)) + n <= doc_end[:len(grams)]
        grams = grams[valid]
        sizes = np.maximum(lens - n + 1, 0)
        short = (lens > 0) & (lens < n)
        if short.any():  # rare: a document shorter than n words is one shingle of all its words
            rebuilt, cursor = [], 0
            for i in range(len(texts)):
                if short[i]:
                    rebuilt.append(ngram_hashes(words[i], len(words[i])))
                else:
                    rebuilt.append(grams[cursor:cursor + sizes[i]])
                    cursor += sizes[i]
            grams = np.concatenate(rebuilt)
            sizes = np.where(short, 1, sizes)
        return grams & _MASK32, sizes

    def signatures(self, texts: list[str], chunk_rows: int = 1024, threads: int = 0) -> np.ndarray:
        """(len(texts), num_perm) uint32 signatures.

        h_k(x) = (a_k x + b_k) mod 2^64, keeping the top 32 bits. The shift is monotone, so we take
        minima on the 64-bit values and shift once at the end. Shingles are processed in chunks of
        `chunk_rows`: a chunk's (rows x num_perm) hash block (1 MB at the defaults) stays in the L2
        cache between the multiply, the add and the minimum, where a large block would go to memory
        and back three times (2-3x slower). The documents are split into one contiguous range per
        thread (NumPy releases the GIL in these loops); minima are exact, so the result does not
        depend on the chunking or the threads.
        """
        return self.minhash(*self.shingle_hashes(texts), chunk_rows=chunk_rows, threads=threads)

    def minhash(self, grams: np.ndarray, sizes: np.ndarray, chunk_rows: int = 1024, threads: int = 0) -> np.ndarray:
        """The signatures of documents given as shingle_hashes returns them (see `signatures`)."""
        sig = np.full((len(sizes), self.num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
        doc_of = np.repeat(np.arange(len(sizes)), sizes)
        threads = threads or min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 8)
        # Cut the shingles at document boundaries into one range per thread: no two threads touch one row.
        ends = np.cumsum(sizes)
        cuts = [0] + [int(ends[np.searchsorted(ends, len(grams) * k // threads)]) if len(grams) else 0
                      for k in range(1, threads)] + [len(grams)]
        cuts = sorted(set(cuts))

        def work(lo: int, hi: int) -> None:
            buf = np.empty((chunk_rows, self.num_perm), dtype=np.uint64)
            with np.errstate(over="ignore"):
                for s in range(lo, hi, chunk_rows):
                    e = min(s + chunk_rows, hi)
                    hv = buf[:e - s]
                    np.multiply(grams[s:e, None], self.a[None, :], out=hv)
                    hv += self.b
                    d = doc_of[s:e]
                    starts = np.flatnonzero(np.concatenate([[True], d[1:] != d[:-1]]))
                    docs = d[starts]  # distinct within a chunk, so the fancy assignment below is safe
                    sig[docs] = np.minimum(sig[docs], np.minimum.reduceat(hv, starts, axis=0))

        ranges = list(zip(cuts[:-1], cuts[1:]))
        if len(ranges) > 1:
            with ThreadPoolExecutor(len(ranges)) as pool:
                list(pool.map(lambda r: work(*r), ranges))
        elif ranges:
            work(*ranges[0])
        out = (sig >> np.uint64(32)).astype(np.uint32)
        out[sizes == 0] = np.iinfo(np.uint32).max
        return out


@dataclass
class DedupResult:
    keep: list[bool]
    exact_dups: int = 0
    near_dups: int = 0
    clusters: list[list[int]] = field(default_factory=list)  # near-dup clusters of size > 1
    candidate_pairs: int = 0
    verified_pairs: int = 0

    def report(self) -> dict:
        return {"documents": len(self.keep), "kept": sum(self.keep), "exact_duplicates": self.exact_dups,
                "near_duplicates": self.near_dups, "near_dup_clusters": len(self.clusters),
                "lsh_candidate_pairs": self.candidate_pairs, "verified_pairs": self.verified_pairs,
                "largest_cluster": max((len(c) for c in self.clusters), default=0)}


def lsh_pairs(sig: np.ndarray, bands: int, rows: int, max_bucket: int = 64) -> set[tuple[int, int]]:
    """Candidate pairs: documents whose signatures agree on every row of some band."""
    pairs: set[tuple[int, int]] = set()
    for band in range(bands):
        block = np.ascontiguousarray(sig[:, band * rows:(band + 1) * rows])
        keys = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel()
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        if counts.max() < 2:
            continue
        order = np.argsort(inverse, kind="stable")
        ends = np.cumsum(counts)
        for g in np.flatnonzero(counts > 1):
            members = order[ends[g] - counts[g]:ends[g]].tolist()
            if len(members) <= max_bucket:
                pairs.update((members[i], members[j]) for i in range(len(members)) for j in range(i + 1, len(members)))
            else:  # a huge bucket: link all to its first member rather than O(n^2) pairs
                pairs.update((members[0], m) for m in members[1:])
    return pairs


class Deduplicator:
    """Streaming deduplication: feed documents in batches with `add`, then `finish` decides.

    Only 20 bytes (exact key) and one signature row (`num_perm` x 4 bytes) per document are kept,
    never the texts, so a corpus larger than memory can be deduplicated. `spill_dir` keeps the
    signatures in a file instead of memory.

    A batch's signatures are computed in a background thread while the caller's thread reads and
    shingles the next batch: shingling is Python (regex, crc32) and holds the GIL, the MinHash
    arithmetic is NumPy and releases it, so the two overlap on two cores. Results are collected in
    batch order, so nothing depends on the timing.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, bands: int = 0,
                 rows: int = 0, exact: bool = True, near: bool = True, seed: int = 0,
                 spill_dir: str | Path | None = None):
        self.threshold, self.num_perm, self.exact, self.near = threshold, num_perm, exact, near
        self.bands, self.rows = (bands, rows) if bands else optimal_bands(num_perm, threshold)
        self.hasher = MinHasher(num_perm=num_perm, ngram=ngram, seed=seed)
        self.keep: list[bool] = []
        self.exact_dups = 0
        self._seen: set[bytes] = set()
        self._live: list[int] = []      # documents that take part in near-dedup (not exact dups, have words)
        self._sigs: list[np.ndarray] = []
        self._spill = None
        self._pool = ThreadPoolExecutor(1) if near else None
        self._pending = None  # (first document id, the batch's fresh positions, signature future)
        if spill_dir:
            Path(spill_dir).mkdir(parents=True, exist_ok=True)
            self._spill_path = Path(spill_dir) / "signatures.u32"
            self._spill = open(self._spill_path, "wb")

    def add(self, texts: list[str]) -> None:
        base = len(self.keep)
        fresh = []
        for i, t in enumerate(texts):
            keep = True
            if self.exact:
                k = exact_key(t)
                if k in self._seen:
                    keep = False
                    self.exact_dups += 1
                else:
                    self._seen.add(k)
            self.keep.append(keep)
            if keep:
                fresh.append(i)
        if not self.near or not fresh:
            return
        grams, sizes = self.hasher.shingle_hashes([texts[i] for i in fresh])
        previous, self._pending = self._pending, (base, fresh, self._pool.submit(self.hasher.minhash, grams, sizes))
        if previous is not None:
            self._collect(*previous)

    def _collect(self, base: int, fresh: list[int], future) -> None:
        sig = future.result()
        # A document with no words has no shingles, hence no signature: it cannot be a *near*
        # duplicate of anything (equal empty signatures would put all such documents in one cluster).
        has_words = (sig != np.iinfo(np.uint32).max).any(axis=1)
        self._live.extend(base + i for i, w in zip(fresh, has_words) if w)
        sig = np.ascontiguousarray(sig[has_words])
        if self._spill is not None:
            self._spill.write(sig.tobytes())
        else:
            self._sigs.append(sig)

    def finish(self) -> "DedupResult":
        result = DedupResult(keep=self.keep, exact_dups=self.exact_dups)
        if self._pending is not None:
            self._collect(*self._pending)
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown()
        if self._spill is not None:
            self._spill.close()
            sig = (np.memmap(self._spill_path, dtype=np.uint32, mode="r").reshape(-1, self.num_perm)
                   if self._live else np.zeros((0, self.num_perm), np.uint32))
        else:
            sig = np.concatenate(self._sigs) if self._sigs else np.zeros((0, self.num_perm), np.uint32)
        live = self._live
        if len(live) < 2:
            return result
        pairs = lsh_pairs(sig, self.bands, self.rows)
        result.candidate_pairs = len(pairs)
        uf = UnionFind(len(live))
        if pairs:
            arr = np.array(sorted(pairs), dtype=np.int64)
            est = np.empty(len(arr))
            for s in range(0, len(arr), 65536):  # verify in chunks: estimated Jaccard per pair
                a, b = arr[s:s + 65536, 0], arr[s:s + 65536, 1]
                est[s:s + 65536] = (sig[a] == sig[b]).mean(axis=1)
            verified = arr[est >= self.threshold]
            result.verified_pairs = len(verified)
            for a, b in verified.tolist():
                uf.union(a, b)
        groups: dict[int, list[int]] = {}
        for j in range(len(live)):
            groups.setdefault(uf.find(j), []).append(live[j])
        for members in groups.values():
            if len(members) > 1:
                result.clusters.append(members)
                for i in members[1:]:
                    self.keep[i] = False
                    result.near_dups += 1
        return result


def deduplicate(texts: list[str], threshold: float = 0.8, num_perm: int = 128, ngram: int = 5,
                bands: int = 0, rows: int = 0, exact: bool = True, near: bool = True, seed: int = 0,
                batch: int = 2048, spill_dir: str | Path | None = None) -> DedupResult:
    """Decide which documents to keep (the in-memory form of `Deduplicator`)."""
    d = Deduplicator(threshold, num_perm, ngram, bands, rows, exact, near, seed, spill_dir)
    for s in range(0, len(texts), batch):
        d.add(texts[s:s + batch])
    return d.finish()


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    """Exact Jaccard similarity of word n-gram sets (for tests and benchmarks)."""
    def grams(t: str) -> set:
        w = _WORD.findall(t.lower())
        return {tuple(w[i:i + ngram]) for i in range(max(len(w) - ngram + 1, 1))}
    A, B = grams(a), grams(b)
    return len(A & B) / max(len(A | B), 1)
