"""Byte-level BPE: training, a readable reference encoder, decoding, save/load.

How it works, in four steps:

1. Pre-tokenize. A regex (GPT-2's or GPT-4's) cuts text into chunks — words with their leading
   space, runs of digits, punctuation, whitespace. Merges never cross a chunk boundary, so
   " dog" and " dog." share tokens.
2. Start from bytes. Every chunk is UTF-8 bytes, so ids 0..255 are the 256 byte values and any
   string at all can be encoded: there is no "unknown" token.
3. Train. Repeatedly find the most frequent adjacent pair of tokens across the corpus and make
   it a new token. Each merge is one new id (256, 257, ...).
4. Encode. Within a chunk, repeatedly merge the adjacent pair whose concatenation is the
   *earliest learned* token, until no pair is a token. This is the rule tiktoken uses, which is
   why our fast path (`scratchlm.tokenizer.fast`) can give the same ids.

Special tokens (`<|endoftext|>`, chat roles) get ids after the merges and are never produced by
merging; `encode` only recognises them in text when allowed.

With zero merges (`Tokenizer.char_level()`, config `tokenizer.kind = "char"`) this is a
character-level tokenizer: one token per byte, so one per character on ASCII text (as in
nanoGPT's shakespeare_char), while a non-ASCII character is its 2-4 UTF-8 bytes. Every path
(fast encoding, save/load, export, serving) is the same code with an empty merge list.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import multiprocessing as mp
import os
from collections import Counter, defaultdict, deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, Literal, Mapping

import numpy as np
import regex

from scratchlm.errors import UserError

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's pre-tokenizer: exactly tiktoken's cl100k_base pat_str (tested against it), including
# `\s++$`, which keeps the whitespace at the very end of a text as one chunk.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
COMPLETE_PATTERNS = frozenset(PATTERNS.values())  # every character matches some alternative

# Every run of scratchlm reserves these, so later stages (SFT chat format, padding) can rely on them.
ENDOFTEXT = "<|endoftext|>"
DEFAULT_SPECIAL_TOKENS = (ENDOFTEXT, "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

KINDS = ("bpe", "char")  # tokenizer.kind: learned merges, or none (the bytes are the tokens)
CHAR_VOCAB_SIZE = 256 + len(DEFAULT_SPECIAL_TOKENS)

FORMAT_NAME = "scratchlm-bpe"
FORMAT_VERSION = 1
VOCAB_FORMAT_VERSION = 2  # an explicit vocabulary (imported tokenizers) instead of merges over bytes 0..255
FILE_NAME = "tokenizer.scratchlm.json"


def _clean_text(text: str) -> str:
    """Replace lone surrogates (not valid Unicode scalars, unencodable as UTF-8) with U+FFFD.

    This is the one lossy step of encoding, and it is the same policy tiktoken follows.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def _count_batch(args: tuple[list[str], str]) -> tuple[Counter, int, int, str]:
    """Chunk counts of a batch, its length in characters, how many of those the chunks cover,
    and the first piece of text the pattern skips (empty if none)."""
    texts, pattern = args
    compiled = regex.compile(pattern)
    complete = pattern in COMPLETE_PATTERNS  # covers every character: no need to add up the chunks
    counts: Counter = Counter()
    total = covered = 0
    lost = ""
    for text in texts:
        text = _clean_text(text)
        chunks = compiled.findall(text)
        counts.update(chunks)
        n = len(text) if complete else sum(map(len, chunks))
        total += len(text)
        covered += n
        if n < len(text) and not lost:
            lost = _first_gap(compiled, text)
    return counts, total, covered, lost


def _first_gap(compiled, text: str) -> str:
    pos = 0
    for m in compiled.finditer(text):
        if m.start() > pos:
            return text[pos:m.start()][:20]
        pos = m.end()
    return text[pos:pos + 20]


def batched(items: Iterable, limit: int, size: Callable[[object], int] = len) -> Iterator[list]:
    """Group a stream into lists of about `limit` (summed `size` of the items; one long item is a
    batch alone), so a corpus is processed a piece at a time and never held whole."""
    batch, total = [], 0
    for x in items:
        batch.append(x)
        total += size(x)
        if total >= limit:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


PIECE_CHARS = 1 << 19  # counting work is handed out in pieces of about this many characters
# A place where GPT-2's and GPT-4's patterns always end a chunk: a lone newline after a visible
# character, before a letter. Nothing matched before it can reach past the newline (no alternative
# takes a newline and then a letter; the only whitespace run there is the newline itself, and it is
# one chunk whether a letter or the end of the text follows), and matching after it starts afresh.
_CUT = regex.compile(r"(?<=\S\n)(?=\p{L})")


def pieces(texts: Iterable[str], pattern: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """The texts, with long ones cut into pieces of about `size` characters whose chunk counts add up
    to the whole text's, so a few long books keep every counting worker busy to the end. Only for
    the built-in patterns (a custom one might have a chunk that spans the cut): others stay whole."""
    for text in texts:
        if pattern not in COMPLETE_PATTERNS or len(text) <= size:
            yield text
            continue
        start = 0
        while len(text) - start > size:
            m = _CUT.search(text, start + size)
            if m is None:
                break
            yield text[start:m.start()]
            start = m.start()
        yield text[start:]


def count_chunks(texts: Iterable[str], pattern: str, num_workers: int = 0) -> Counter:
    """Count each distinct pre-token chunk once. Streams: memory grows with distinct chunks only
    (at most two batches per worker are in flight). Refuses a pattern that skips characters: they
    would silently vanish from every encoded text."""
    batches = ((b, pattern) for b in batched(pieces(texts, pattern, PIECE_CHARS), PIECE_CHARS))
    total: Counter = Counter()
    chars = covered = 0
    lost = ""

    def absorb(result: tuple[Counter, int, int, str]) -> None:
        nonlocal chars, covered, lost
        counts, n, c, gap = result
        total.update(counts)
        chars, covered, lost = chars + n, covered + c, lost or gap

    if num_workers <= 1:
        for b in batches:
            absorb(_count_batch(b))
    else:
        # A process pool that notices a dead worker: multiprocessing.Pool waits forever for the task of
        # a worker that died (killed, or out of memory while it unpickled its batch).
        pool = ProcessPoolExecutor(num_workers, mp_context=mp.get_context("fork" if os.name == "posix" else "spawn"))
        try:
            pending: deque = deque()
            for b in batches:
                pending.append(pool.submit(_count_batch, b))
                if len(pending) >= 2 * num_workers:
                    absorb(pending.popleft().result())
            while pending:
                absorb(pending.popleft().result())
        except (BrokenProcessPool, MemoryError) as e:
            raise UserError(f"a tokenizer training worker ran out of memory or died ({type(e).__name__}); "
                            "free memory, or train with fewer workers") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    if covered < chars:
        raise UserError(f"the pre-tokenizer pattern skips {chars - covered:,} of {chars:,} characters "
                        f"({100 * (chars - covered) / chars:.2f}%, e.g. {lost!r}), which encoding would lose; "
                        r"add an alternative that matches the rest, e.g. end the pattern with |\s+|.")
    return total


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: what containers and taskset allow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_pattern(pattern: str) -> str:
    """A pattern name (gpt2, gpt4) or a regex, checked: it must compile, and a bare word that is
    not a known name is a typo (as a regex, "gpt3" would match almost nothing)."""
    if pattern in PATTERNS:
        return PATTERNS[pattern]
    if regex.fullmatch(r"[A-Za-z0-9_-]+", pattern):
        raise UserError(f"unknown pre-tokenizer pattern {pattern!r}; use {', '.join(PATTERNS)} or a regex")
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise UserError(f"pre-tokenizer pattern {pattern!r} is not a valid regex ({e})") from None
    return pattern


def learn_merges(chunk_counts: Counter, num_merges: int) -> list[tuple[int, int]]:
    """The BPE training loop, incremental so it scales past toy corpora.

    - Pair counts are kept for the whole corpus, and an index pair -> words that contain it.
    - The next merge comes off a max-heap. Entries go stale as counts change; a popped entry
      whose count is out of date is pushed back with the current count (lazy invalidation).
      This is exact because counts of existing pairs only ever *fall*: a merge creates new pairs
      (all containing the new token) and removes old ones.
    - Only words that contain the merged pair are touched.
    - Ties are broken deterministically: equal counts pick the smallest (left id, right id).
    - A merge whose bytes already exist as a token (the same string reached by another split)
      is skipped, so every token has unique bytes — required for tiktoken-style encoding.
    """
    words: list[list[int]] = []
    freqs: list[int] = []
    for chunk, freq in chunk_counts.items():
        b = chunk.encode("utf-8") if isinstance(chunk, str) else chunk
        if len(b) > 1:
            words.append(list(b))
            freqs.append(freq)

    # A pair (a, b) is the one int a * M + b: hashing it is cheaper than a tuple, and ints order
    # like the tuples did, so the tie-break (smallest left id, then right id) is unchanged. A heap
    # entry is one int too, -count * M² + key, ordered as (-count, key) was.
    M = 1 << max(16, (256 + num_merges).bit_length())
    MM = M * M
    pair_counts: dict[int, int] = defaultdict(int)
    where: dict[int, set[int]] = defaultdict(set)
    for wi, word in enumerate(words):
        f = freqs[wi]
        for x, y in zip(word, word[1:]):
            k = x * M + y
            pair_counts[k] += f
            where[k].add(wi)

    heap = [-c * MM + k for k, c in pair_counts.items()]
    heapq.heapify(heap)
    vocab_bytes = [bytes([i]) for i in range(256)]
    known = set(vocab_bytes)
    merges: list[tuple[int, int]] = []
    banned: set[int] = set()
    where_get = where.get

    while len(merges) < num_merges and heap:
        entry = heapq.heappop(heap)
        key = entry % MM
        count = pair_counts.get(key, 0)
        if count <= 0 or key in banned:
            continue
        if count != -(entry // MM):  # stale entry: re-queue with the true (lower) count
            heapq.heappush(heap, -count * MM + key)
            continue
        a, b = divmod(key, M)
        new_bytes = vocab_bytes[a] + vocab_bytes[b]
        if new_bytes in known:
            banned.add(key)
            continue
        new_id = len(vocab_bytes)
        vocab_bytes.append(new_bytes)
        known.add(new_bytes)
        merges.append((a, b))

        # Every pair made here contains new_id, so it is new: its first occurrence creates its
        # word set and marks it for the heap (no separate "created" set to fill per occurrence).
        created: list[int] = []
        new_left, new_right = new_id * M, new_id  # keys (x, new_id) = x*M + new_id; (new_id, y) = new_id*M + y
        for wi in where.pop(key, ()):
            # Merge in place, left to right, adjusting only the pairs around each occurrence.
            # Reading the left neighbour from the already-merged word keeps "a b a b" right.
            word = words[wi]
            f = freqs[wi]
            i = 0
            n = len(word) - 1
            while i < n:
                if word[i] == a and word[i + 1] == b:
                    if i > 0:
                        left = word[i - 1]
                        pair_counts[left * M + a] -= f
                        p = left * M + new_right
                        pair_counts[p] += f
                        s = where_get(p)
                        if s is None:
                            where[p] = {wi}
                            created.append(p)
                        else:
                            s.add(wi)
                    if i < n - 1:
                        right = word[i + 2]
                        pair_counts[b * M + right] -= f
                        p = new_left + right
                        pair_counts[p] += f
                        s = where_get(p)
                        if s is None:
                            where[p] = {wi}
                            created.append(p)
                        else:
                            s.add(wi)
                    word[i:i + 2] = [new_id]
                    n -= 1
                i += 1
        pair_counts.pop(key, None)
        for p in created:
            heapq.heappush(heap, -pair_counts[p] * MM + p)
    return merges


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------

class Tokenizer:
    """A trained byte-level BPE tokenizer: merges + pre-tokenizer pattern + special tokens.

    A tokenizer trained here has the bytes as ids 0..255 and merges from 256. One imported from
    elsewhere (GPT-2's puts the bytes in another order) is given as `vocab` instead: the bytes of
    every ordinary token, id = position, its id also its merge rank (the tiktoken convention).
    Special tokens follow the ordinary ones, in order or at the ids a mapping gives them."""

    def __init__(self, merges: list[tuple[int, int]], pattern: str = GPT4_PATTERN,
                 special_tokens: Collection[str] | Mapping[str, int] = DEFAULT_SPECIAL_TOKENS, *,
                 vocab: list[bytes] | None = None, eot_token: str = ENDOFTEXT):
        self.pattern = pattern
        self.eot_token = eot_token  # the document separator; imported tokenizers may name it otherwise
        self.custom_vocab = vocab is not None
        if vocab is None:
            self.merges = [tuple(m) for m in merges]
            self.vocab: list[bytes] = [bytes([i]) for i in range(256)]
            for a, b in self.merges:
                self.vocab.append(self.vocab[a] + self.vocab[b])
        else:
            self.merges, self.vocab = [], [bytes(b) for b in vocab]
            missing = set(range(256)) - {b[0] for b in self.vocab if len(b) == 1}
            if missing:
                raise UserError(f"the vocabulary lacks {len(missing)} of the 256 byte tokens, so it is not "
                                f"byte-level BPE (some text could not be encoded)")
        self.rank = {tok: i for i, tok in enumerate(self.vocab)}
        if len(self.rank) != len(self.vocab):
            raise UserError("tokenizer has two tokens with the same bytes; retrain it with scratchlm")
        n = len(self.vocab)
        if isinstance(special_tokens, Mapping):
            self.special_tokens: dict[str, int] = dict(special_tokens)
            if sorted(self.special_tokens.values()) != list(range(n, n + len(self.special_tokens))):
                raise UserError(f"special token ids must be {n}..{n + len(self.special_tokens) - 1}, right after "
                                f"the {n} ordinary tokens; got {sorted(self.special_tokens.values())[:4]}...")
        else:
            self.special_tokens = {s: n + i for i, s in enumerate(special_tokens)}
        self._compiled = regex.compile(pattern)
        self._special_re = (
            regex.compile("|".join(regex.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True)))
            if self.special_tokens else None
        )
        self._cache: dict[str, list[int]] = {}
        self._fast = None
        # bytes each id stands for: encoding is lossless exactly when the ids' bytes add up to the text's
        self._id_bytes = np.array([len(b) for b in self.vocab] + [0] * len(self.special_tokens), dtype=np.int64)
        for s, i in self.special_tokens.items():
            self._id_bytes[i] = len(s.encode("utf-8"))

    # --- training -----------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = GPT4_PATTERN,
              special_tokens: Collection[str] = DEFAULT_SPECIAL_TOKENS, min_frequency: int = 1,
              num_workers: int | None = 0) -> "Tokenizer":
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `texts` (any iterable).
        num_workers: processes that count the pre-token chunks (0 or 1: this one; None: one per usable
        core). The merges do not depend on it."""
        pattern = resolve_pattern(pattern)
        num_merges = vocab_size - 256 - len(special_tokens)
        if num_merges < 0:
            raise UserError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                            f"256 + {len(special_tokens)} special tokens = {256 + len(special_tokens)}")
        counts = count_chunks(texts, pattern, num_workers=usable_cores() if num_workers is None else num_workers)
        if min_frequency > 1:
            counts = Counter({k: v for k, v in counts.items() if v >= min_frequency})
        if not any(chunk.strip() for chunk in counts):
            raise UserError("the tokenizer training corpus is empty (or only whitespace); give it some text")
        merges = learn_merges(counts, num_merges)
        return cls(merges, pattern=pattern, special_tokens=special_tokens)

    @classmethod
    def char_level(cls, special_tokens: Collection[str] = DEFAULT_SPECIAL_TOKENS) -> "Tokenizer":
        """No merges: the 256 bytes are the tokens (+ specials). Nothing to learn from a corpus.
        Without merges the pre-tokenizer cannot change the ids; it is GPT-4's because that one
        covers every character and llama.cpp knows it by name (GGUF export)."""
        return cls([], pattern=GPT4_PATTERN, special_tokens=special_tokens)

    # --- sizes and lookups --------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """"char" for a tokenizer whose only ordinary tokens are the 256 bytes (no merges), else "bpe"."""
        return "char" if len(self.vocab) == 256 else "bpe"

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + len(self.special_tokens)

    @property
    def eot_id(self) -> int:
        return self.special_tokens[self.eot_token]

    def token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        b = token.encode("utf-8")
        if b not in self.rank:
            raise KeyError(token)
        return self.rank[b]

    def id_to_token(self, i: int) -> str:
        return self.decode([i])

    # --- encoding: the readable reference path ------------------------------------------------
    def _encode_chunk(self, chunk: bytes) -> list[int]:
        if chunk in self.rank:  # whole chunk is a token (tiktoken takes this shortcut too)
            return [self.rank[chunk]]
        parts = [bytes([b]) for b in chunk]
        while len(parts) > 1:
            best_rank, best_i = None, -1
            for i in range(len(parts) - 1):
                r = self.rank.get(parts[i] + parts[i + 1])
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best_i = r, i
            if best_rank is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        return [self.rank[p] for p in parts]

    def _lossless(self, text: str, ids: list[int]) -> list[int]:
        """Return `ids`, after checking that they spell every byte of `text` (already cleaned).

        Training refuses a pattern that skips characters, but a loaded or imported tokenizer brings
        its own pattern, and text it was never checked on: characters no alternative matches would
        vanish from the ids without a trace. One length comparison per text catches it. GPT-2's and
        GPT-4's patterns cover every character by construction (letters, numbers, whitespace and
        "anything else" each have an alternative), so their texts skip the check and its cost."""
        if self.pattern in COMPLETE_PATTERNS:
            return ids
        n = len(text.encode("utf-8"))
        got = int(self._id_bytes[np.asarray(ids, dtype=np.int64)].sum()) if len(ids) else 0
        if got != n:
            raise UserError(f"this tokenizer's pre-tokenizer pattern skips {n - got:,} of {n:,} bytes "
                            f"({100 * (n - got) / n:.2f}%) of the text, e.g. {_first_gap(self._compiled, text)!r}, "
                            r"which encoding would silently drop; use a tokenizer whose pattern covers every "
                            r"character (e.g. retrain with a pattern ending in |\s+|.)")
        return ids

    def encode_ordinary_python(self, text: str) -> list[int]:
        """Pure-Python reference encoder; special-token strings are treated as plain text."""
        text = _clean_text(text)
        ids: list[int] = []
        for chunk in self._compiled.findall(text):
            cached = self._cache.get(chunk)
            if cached is None:
                cached = self._encode_chunk(chunk.encode("utf-8"))
                if len(self._cache) < 200_000:
                    self._cache[chunk] = cached
            ids.extend(cached)
        return self._lossless(text, ids)

    def _split_specials(self, text: str, allowed_special, disallowed_special):
        """Yield (piece, special_id_or_None); raise on a disallowed special token."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        disallowed = (set(self.special_tokens) - allowed) if disallowed_special == "all" else set(disallowed_special)
        if disallowed and self._special_re is not None:
            m = regex.search("|".join(regex.escape(s) for s in disallowed), text)
            if m:
                raise UserError(f"the text contains the special token {m.group()!r}; pass allowed_special "
                                "to encode it as a special token, or disallowed_special=() to treat it as text")
        if not allowed:
            yield text, None
            return
        pat = regex.compile("|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True)))
        start = 0
        for m in pat.finditer(text):
            yield text[start:m.start()], None
            yield m.group(), self.special_tokens[m.group()]
            start = m.end()
        yield text[start:], None

    def encode_python(self, text: str, allowed_special: Literal["all"] | Collection[str] = (),
                      disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        ids: list[int] = []
        for piece, special in self._split_specials(text, allowed_special, disallowed_special):
            if special is not None:
                ids.append(special)
            elif piece:
                ids.extend(self.encode_ordinary_python(piece))
        return ids

    # --- encoding: the fast path (same ids, via tiktoken) -------------------------------------
    @property
    def fast(self):
        if self._fast is None:
            from scratchlm.tokenizer.fast import tiktoken_encoding
            self._fast = tiktoken_encoding(self)
        return self._fast

    def encode(self, text: str, allowed_special: Literal["all"] | Collection[str] = (),
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """Encode text to ids. A special-token string in the text raises unless allowed."""
        # Check specials ourselves so the error is our one-line message, not tiktoken's.
        next(iter(self._split_specials(text, allowed_special, disallowed_special)))
        text = _clean_text(text)
        if allowed_special == "all" or allowed_special:
            return self._lossless(text, self.fast.encode(text, allowed_special=allowed_special, disallowed_special=()))
        return self._lossless(text, self.fast.encode_ordinary(text))

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode treating special-token strings as plain text (what the data pipeline uses)."""
        text = _clean_text(text)
        return self._lossless(text, self.fast.encode_ordinary(text))

    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """Encode many documents in parallel (tiktoken's threads release the GIL)."""
        batch = self.fast.encode_ordinary_batch(texts, num_threads=num_threads or (os.cpu_count() or 1))
        if self.pattern in COMPLETE_PATTERNS:  # nothing to check: skip a per-text pass over the text
            return batch
        return [self._lossless(_clean_text(t), ids) for t, ids in zip(texts, batch)]

    def encode_batch_arrays(self, texts: list[str], num_threads: int = 0) -> list[np.ndarray]:
        """`encode_batch`, each document's ids as a uint32 array: the same ids, faster.

        Building a Python int per token (what a list of ids costs) holds the GIL and takes about a
        third of the single-thread encoding time; an array is filled by tiktoken's Rust code with
        the GIL released, so the threads overlap fully."""
        fast = self.fast

        def one(text: str) -> np.ndarray:
            try:
                return fast.encode_to_numpy(text, disallowed_special=())
            except UnicodeEncodeError:  # lone surrogates: the same repair as every other path
                return fast.encode_to_numpy(_clean_text(text), disallowed_special=())

        # Texts go to the threads 32 at a time: one task per text costs a future and a queue hand-off
        # under the GIL, which shows next to ~0.3 ms of encoding per 4 KB text.
        groups = [texts[i:i + 32] for i in range(0, len(texts), 32)]
        with ThreadPoolExecutor(num_threads or (os.cpu_count() or 1)) as pool:
            batch = [ids for group in pool.map(lambda g: [one(t) for t in g], groups) for ids in group]
        if self.pattern not in COMPLETE_PATTERNS:
            for t, ids in zip(texts, batch):
                self._lossless(_clean_text(t), ids)
        return batch

    # --- decoding -----------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        inverse_special = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        n = len(self.vocab)
        out = []
        for i in ids:
            i = int(i)
            if 0 <= i < n:
                out.append(self.vocab[i])
            elif i in inverse_special:
                out.append(inverse_special[i])
            else:
                raise UserError(f"token id {i} is outside this tokenizer's vocabulary (size {self.vocab_size})")
        return b"".join(out)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Ids to text. A token sequence that ends mid-character (possible when generation stops
        inside a multi-byte UTF-8 sequence) decodes that fragment as U+FFFD under the default
        `errors="replace"`; use `decode_bytes` to stream raw bytes instead."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # --- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab_size": self.vocab_size,
            "merges": [list(m) for m in self.merges],
        }
        if self.custom_vocab:  # version 2: the tokens themselves, as GPT-2's printable byte strings
            from scratchlm.tokenizer.hf_export import bytes_to_unicode
            b2u = bytes_to_unicode()
            d["version"] = VOCAB_FORMAT_VERSION
            d["eot_token"] = self.eot_token
            d["vocab"] = ["".join(b2u[x] for x in b) for b in self.vocab]
        return d

    @property
    def fingerprint(self) -> str:
        """A short hash of everything that determines the ids: used to match data to models."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.scratchlm.json` (human-readable: one merge per line) atomically."""
        from scratchlm.atomic import write_text
        d = self.to_dict()
        merges = d.pop("merges")
        vocab = d.pop("vocab", None)
        head = json.dumps(d, indent=1, ensure_ascii=False)[:-2]
        lines = ",\n".join(f"  [{a}, {b}]" for a, b in merges)
        text = head + (',\n "merges": [\n' + lines + "\n ]" if merges else ',\n "merges": []')
        if vocab is not None:  # one token per line
            text += ',\n "vocab": [\n' + ",\n".join("  " + json.dumps(t, ensure_ascii=False) for t in vocab) + "\n ]"
        text += "\n}\n"
        path = Path(directory) / FILE_NAME
        write_text(path, text)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        path = directory / FILE_NAME if directory.is_dir() else directory
        if not path.exists():
            raise UserError(f"no tokenizer at {path}; train one with `scratchlm tokenizer train`")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"tokenizer file {path} is corrupt ({e}); retrain it") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise UserError(f"{path} is not a scratchlm tokenizer file")
        if d.get("version") not in (FORMAT_VERSION, VOCAB_FORMAT_VERSION):
            raise UserError(f"{path} has tokenizer format version {d.get('version')}, this scratchlm "
                            f"reads versions {FORMAT_VERSION} and {VOCAB_FORMAT_VERSION}; retrain or upgrade scratchlm")
        try:
            if d["version"] == VOCAB_FORMAT_VERSION:
                from scratchlm.tokenizer.hf_export import bytes_to_unicode
                u2b = {u: b for b, u in bytes_to_unicode().items()}
                vocab = [bytes(u2b[c] for c in t) for t in d["vocab"]]
                tok = cls([], pattern=d["pattern"], special_tokens=dict(d["special_tokens"]), vocab=vocab,
                          eot_token=d["eot_token"])
            else:
                specials = sorted(d["special_tokens"], key=d["special_tokens"].get)
                tok = cls([tuple(m) for m in d["merges"]], pattern=d["pattern"], special_tokens=specials)
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise UserError(f"tokenizer file {path} is corrupt ({type(e).__name__}: {e}); retrain it") from None
        if tok.vocab_size != d.get("vocab_size") or tok.special_tokens != d["special_tokens"]:
            raise UserError(f"tokenizer file {path} is inconsistent (vocab size or special ids); retrain it")
        return tok


def compression_stats(tok: Tokenizer, text: str) -> dict:
    """How long a text is in this tokenizer's tokens, against characters (one token per
    character, the char-level view) and bytes. For kind "char", tokens = bytes."""
    n = len(tok.encode_ordinary(text))
    chars, nbytes = len(text), len(text.encode("utf-8"))
    return {"kind": tok.kind, "characters": chars, "bytes": nbytes, "char_level_tokens": chars,
            "char_vocab": len(set(text)), "tokens": n, "ratio": round(chars / max(n, 1), 2),
            "bytes_per_token": round(nbytes / max(n, 1), 3), "chars_per_token": round(chars / max(n, 1), 3)}
