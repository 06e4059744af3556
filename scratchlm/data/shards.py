"""Token shards on disk: flat arrays of token ids, memory-mapped for reading.

Layout of a prepared dataset directory:
    index.json        what is inside: splits, shard files, token counts, document boundaries,
                      dtype, tokenizer fingerprint, sources, cleaning/dedup statistics
    train_000.bin     uint16 (vocab <= 65536) or uint32 token ids, documents separated by <|endoftext|>
    val_000.bin
    tokenizer/        the tokenizer that produced the ids
The directory is written under a temporary name and renamed when complete, so a crash never
leaves something that looks like a finished dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scratchlm.errors import UserError

INDEX = "index.json"
FORMAT = "scratchlm-shards"
VERSION = 1


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise UserError(f"vocab_size {vocab_size} does not fit in uint32 token shards")


class ShardWriter:
    """Append documents' token ids to one split's shards, rolling over every `shard_tokens`."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, eot_id: int, shard_tokens: int = 50_000_000):
        self.dir, self.split, self.dtype, self.eot = directory, split, dtype, eot_id
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self.doc_offsets: list[int] = []   # token offset where each document starts (global in split)
        self.tokens = 0
        self._buf: list[np.ndarray] = []
        self._buf_len = 0
        self._max = np.iinfo(dtype).max

    def add(self, ids: list[int] | np.ndarray) -> None:
        arr = np.empty(len(ids) + 1, dtype=np.int64)  # the document's ids, then its end-of-text token
        arr[:-1], arr[-1] = ids, self.eot
        if len(arr) and (arr.max() > self._max or arr.min() < 0):
            raise UserError(f"token id {int(arr.max())} does not fit the shard dtype {self.dtype.name}")
        self.doc_offsets.append(self.tokens)
        self._buf.append(arr.astype(self.dtype))
        self._buf_len += len(arr)
        self.tokens += len(arr)
        if self._buf_len >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        name = f"{self.split}_{len(self.shards):03d}.bin"
        data = np.concatenate(self._buf)
        data.tofile(self.dir / name)
        self.shards.append({"file": name, "tokens": int(len(data))})
        self._buf, self._buf_len = [], 0

    def close(self) -> dict:
        self._flush()
        return {"tokens": self.tokens, "documents": len(self.doc_offsets), "shards": self.shards,
                "doc_offsets": self.doc_offsets}


def read_index(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / INDEX
    if not path.exists():
        raise UserError(f"{directory} is not a prepared dataset (no {INDEX}); run `scratchlm prepare` first")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is corrupt ({e}); re-run `scratchlm prepare`") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise UserError(f"{path} is not a scratchlm dataset of version {VERSION}; re-run `scratchlm prepare`")
    return index


def check_tokenizer(directory: str | Path, index: dict, tokenizer) -> None:
    """Token ids only mean something under the tokenizer that made them: refuse any other."""
    made_by = index.get("tokenizer_fingerprint")
    if made_by != tokenizer.fingerprint:
        raise UserError(f"dataset {directory} was tokenized by another tokenizer (fingerprint {made_by}) than this "
                        f"model's ({tokenizer.fingerprint}); prepare the data with the model's tokenizer: "
                        "scratchlm prepare --tokenizer RUN/tokenizer ...")


class ShardedTokens:
    """A split's shards as one read-only token sequence, without joining them into one array.

    Indexing and slicing read only the shards they touch (each one memory-mapped), so a split
    larger than memory costs nothing until read, and every DDP rank shares the page cache instead
    of holding a copy. `np.asarray(x)` does join them: use it only for small splits.
    """

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.dtype = parts[0].dtype
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise IndexError("ShardedTokens supports contiguous slices only")
            pieces = []
            k = int(np.searchsorted(self.offsets, start, side="right")) - 1
            while start < stop:
                lo = start - self.offsets[k]
                hi = min(stop, self.offsets[k + 1]) - self.offsets[k]
                pieces.append(self.parts[k][lo:hi])
                start += hi - lo
                k += 1
            if not pieces:
                return np.zeros(0, dtype=self.dtype)
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        i = int(key) + (n if int(key) < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(key)
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[k][i - self.offsets[k]]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate(self.parts)
        return out.astype(dtype) if dtype is not None else out


def load_split(directory: str | Path, split: str, tokenizer=None) -> np.ndarray | ShardedTokens:
    """All tokens of a split, memory-mapped (O(1) memory until touched): one array for one shard,
    a `ShardedTokens` view for several. With `tokenizer`, first check that it made the shards."""
    directory = Path(directory)
    index = read_index(directory)
    if tokenizer is not None:
        check_tokenizer(directory, index, tokenizer)
    if split not in index["splits"]:
        raise UserError(f"dataset {directory} has no {split!r} split")
    dtype = np.dtype(index["dtype"])
    parts = []
    for shard in index["splits"][split]["shards"]:
        path = directory / shard["file"]
        expected = shard["tokens"] * dtype.itemsize
        if not path.exists() or path.stat().st_size != expected:
            raise UserError(f"shard {path} is missing or truncated; re-run `scratchlm prepare`")
        parts.append(np.memmap(path, dtype=dtype, mode="r"))
    if not parts:
        return np.zeros(0, dtype=dtype)
    return parts[0] if len(parts) == 1 else ShardedTokens(parts)
