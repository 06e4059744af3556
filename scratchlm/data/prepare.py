"""`scratchlm prepare`: raw corpus -> cleaned, deduplicated, tokenized train/val shards.

    read -> clean/filter -> deduplicate -> decontaminate -> split into train/val
         -> train (or load, or take the char-level one) the tokenizer -> encode -> shards + index.json

It streams: the corpus is read once to decide what to keep, once to place each document in
train or val, once to train the tokenizer and once to encode. Between passes we keep a few bytes
per document (a hash, a MinHash signature row), never the text, so a corpus larger than memory
prepares. Settings come from the `[data]` and `[tokenizer]` config sections.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from scratchlm.atomic import staged_dir
from scratchlm.config import DataConfig, TokenizerConfig
from scratchlm.data.clean import CleanStats, QualityFilter, clean_document, normalize, strip_gutenberg
from scratchlm.data.dedup import Deduplicator
from scratchlm.data.shards import FORMAT, INDEX, VERSION, ShardWriter, dtype_for_vocab
from scratchlm.data.sources import ReadOptions, iter_documents
from scratchlm.errors import UserError
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.bpe import batched

MIN_DOCS_FOR_DOCUMENT_SPLIT = 20  # fewer documents (one big file, say): split contiguous spans instead
SPANS_PER_CORPUS = 40             # ...about this many, so val gets whole spans and train the rest
BATCH_CHARS = 1 << 19             # characters per batch in every pass: bounds memory, not only documents


def split_key(text: str, seed: int) -> int:
    """Where a document goes is decided by its content hash alone: independent of input order."""
    return int.from_bytes(hashlib.sha1(f"{seed}:".encode() + text.encode("utf-8")).digest()[:8], "big")


def cut_spans(text: str, target_chars: int) -> list[str]:
    """Cut a text into contiguous spans of about `target_chars`, at a paragraph break if there is
    one near the cut, else a line break, else a space. The spans concatenate back to the text."""
    spans, start = [], 0
    while len(text) - start > 1.5 * target_chars:
        lo, mid, hi = start + target_chars // 2, start + target_chars, start + 3 * target_chars // 2
        cut = -1
        for sep in ("\n\n", "\n", " "):  # the separator nearest before the target, else after it
            cut = text.rfind(sep, lo, mid)
            cut = cut if cut != -1 else text.find(sep, mid, hi)
            if cut != -1:
                cut += len(sep)
                break
        if cut == -1:
            cut = mid
        spans.append(text[start:cut])
        start = cut
    spans.append(text[start:])
    return [s for s in spans if s.strip()]


def val_mask(keys: list[int], val_fraction: float) -> np.ndarray:
    """The units with the smallest keys go to val: round(n * val_fraction) of them, at least one."""
    n = len(keys)
    mask = np.zeros(n, dtype=bool)
    if n >= 2 and val_fraction > 0:
        n_val = min(max(1, round(n * val_fraction)), n - 1)
        mask[np.argsort(np.asarray(keys, dtype=np.uint64), kind="stable")[:n_val]] = True
    return mask


def val_mask_by_chars(keys: list[int], sizes: list[int], val_fraction: float) -> np.ndarray:
    """The units with the smallest keys go to val until they hold `val_fraction` of the characters
    (at least one unit, never all). For corpora whose units differ wildly in size."""
    mask = np.zeros(len(keys), dtype=bool)
    if len(keys) >= 2 and val_fraction > 0:
        order = np.argsort(np.asarray(keys, dtype=np.uint64), kind="stable")
        held = np.cumsum(np.asarray(sizes, dtype=np.int64)[order])
        n_val = min(int(np.searchsorted(held, val_fraction * held[-1])) + 1, len(keys) - 1)
        mask[order[:n_val]] = True
    return mask


def val_share_too_small(mask: np.ndarray, sizes: list[int], val_fraction: float) -> bool:
    """Did a split by unit count give val well under its share of the text (under half of it)?"""
    total = sum(sizes)
    val = sum(n for n, v in zip(sizes, mask) if v)
    return val_fraction > 0 and total > 0 and val < 0.5 * val_fraction * total


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """The split `prepare` makes, for a list in memory: by document when there are enough of them
    and val gets its share of the text, else by contiguous spans (see `cut_spans`)."""
    total = sum(map(len, docs))
    mask = None
    if len(docs) >= MIN_DOCS_FOR_DOCUMENT_SPLIT:
        mask = val_mask([split_key(d, seed) for d in docs], val_fraction)
        if val_share_too_small(mask, list(map(len, docs)), val_fraction):
            mask = None
    if mask is None:
        target = max(total // SPANS_PER_CORPUS, 200)
        docs = [s for d in docs for s in cut_spans(d, target)]
        keys, sizes = [split_key(d, seed) for d in docs], list(map(len, docs))
        mask = val_mask(keys, val_fraction)
        if val_share_too_small(mask, sizes, val_fraction):
            mask = val_mask_by_chars(keys, sizes, val_fraction)
    return [d for d, v in zip(docs, mask) if not v], [d for d, v in zip(docs, mask) if v]


def make_tokenizer(cfg: TokenizerConfig, texts: Iterator[str], log: Callable[[str], None] = print) -> Tokenizer:
    """The tokenizer `prepare` encodes with: loaded (tokenizer.path), char-level, or BPE trained on `texts`."""
    if cfg.path:
        tok = Tokenizer.load(cfg.path)
        if cfg.kind == "char" and tok.kind != "char":
            raise UserError(f"tokenizer.kind is char but tokenizer.path {cfg.path} holds a BPE tokenizer "
                            f"({tok.vocab_size} tokens); drop one of the two settings")
        return tok
    if cfg.kind == "char":
        tok = Tokenizer.char_level()
        log(f"character-level tokenizer: {tok.vocab_size} tokens (the 256 bytes + {len(tok.special_tokens)} "
            f"special), no merges, so tokenizer.vocab_size={cfg.vocab_size} and pattern are not used")
        return tok
    t = time.time()
    # num_workers=None: one process per core counts the pre-token chunks (the merges do not depend on it)
    tok = Tokenizer.train(texts, cfg.vocab_size, pattern=cfg.pattern, num_workers=None)
    log(f"trained a {tok.vocab_size}-token BPE tokenizer in {time.time() - t:.1f}s")
    return tok


def prepare(data: DataConfig, tokenizer: TokenizerConfig, out: str | Path, *, seed: int = 0,
            overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Prepare `data.corpus` into `out` (written whole, or not at all). Memory does not grow with the
    corpus: documents are streamed in pieces of at most `sources.PIECE_CHARS` characters."""
    try:
        return _prepare(data, tokenizer, Path(out), seed=seed, overwrite=overwrite, log=log)
    except MemoryError:  # one line, not a traceback; staged_dir has removed the partial output
        raise UserError(f"ran out of memory while preparing {data.corpus}; free memory, or cap the corpus "
                        "with data.max_chars") from None


def _prepare(data: DataConfig, tokenizer: TokenizerConfig, out: Path, *, seed: int, overwrite: bool,
             log: Callable[[str], None]) -> dict:
    if (out / INDEX).exists() and not overwrite:
        raise UserError(f"{out} already holds a prepared dataset; pass --overwrite or choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / INDEX).exists() and not overwrite:
        raise UserError(f"{out} exists and is not empty; choose another --out")
    if not 0 <= data.val_fraction < 1:
        raise UserError(f"data.val_fraction must be in [0, 1), got {data.val_fraction}")
    t0 = time.time()
    stats: dict = {"corpus": data.corpus}
    qf = QualityFilter(min_chars=data.min_chars)
    read = ReadOptions(data.text_field, data.on_bad_record)

    passed: list[bool] = []  # per document read: did it pass the quality filters (pass 1 decides)

    def cleaned(cstats: CleanStats | None = None) -> Iterator[str]:
        """The corpus after cleaning and the size caps: the same sequence on every pass. The first
        pass (with `cstats`) runs the quality filters and remembers their verdicts; later passes
        only normalise the documents that passed."""
        n = chars = 0
        for k, doc in enumerate(iter_documents(data.corpus, read)):
            if cstats is not None:
                cstats.bad_bytes += doc.bad_bytes
                text = clean_document(doc.text, qf, cstats)
                passed.append(text is not None)
            else:
                text = normalize(strip_gutenberg(doc.text)) if passed[k] else None
            if text is None:
                continue
            yield text
            n, chars = n + 1, chars + len(text)
            if (data.max_docs and n >= data.max_docs) or (data.max_chars and chars >= data.max_chars):
                return

    contam = None
    if data.decontaminate:  # an unusable eval file fails now, not after a pass over the corpus
        from scratchlm.data.decontam import Decontaminator, load_eval_texts
        contam = Decontaminator(load_eval_texts(data.decontaminate))
        report = contam.new_report()

    with staged_dir(out, replace=overwrite) as tmp:
        # 1. read + clean + deduplicate: per document, an exact-match hash and a MinHash signature
        cstats = CleanStats()
        dedup = Deduplicator(threshold=data.near_dedup_threshold, near=data.dedup, exact=data.dedup,
                             seed=seed, spill_dir=tmp / ".dedup")
        lengths: list[int] = []
        for batch in batched(cleaned(cstats), BATCH_CHARS):
            dedup.add(batch)
            lengths.extend(map(len, batch))
        stats["clean"] = asdict(cstats)
        removed = ", ".join(f"{k}: {v['docs']}" for k, v in cstats.removed.items())
        log(f"read {cstats.docs_in} documents ({cstats.bytes_in / 1e6:.2f} MB), kept {cstats.docs_out} after "
            f"cleaning ({removed or 'none removed'})")
        if cstats.bad_bytes:
            log(f"warning: {cstats.bad_bytes:,} undecodable byte sequences (not UTF-8) were replaced by U+FFFD")
        if not cstats.docs_out:
            raise UserError(f"no documents left after cleaning {data.corpus} (all empty or filtered out); "
                            "check the corpus or lower data.min_chars (--min-chars)")
        res = dedup.finish()
        keep = res.keep
        (tmp / ".dedup" / "signatures.u32").unlink(missing_ok=True)
        (tmp / ".dedup").rmdir()
        if data.dedup:
            stats["dedup"] = res.report()
            log(f"dedup: {res.exact_dups} exact and {res.near_dups} near duplicates removed "
                f"({len(res.clusters)} near-dup clusters), {sum(keep)} documents left")

        # 2. decontaminate (the eval sets were loaded first) and place each unit (a document, or a span of a few-document corpus)
        n_kept = sum(keep)
        by_span = n_kept < MIN_DOCS_FOR_DOCUMENT_SPLIT
        span_chars = max(sum(n for n, k in zip(lengths, keep) if k) // SPANS_PER_CORPUS, 200) if by_span else 0
        dropped: set[int] = set()

        def kept_docs() -> Iterator[tuple[int, str]]:
            for i, text in enumerate(cleaned()):
                if keep[i] and i not in dropped:
                    yield i, text

        def units() -> Iterator[str]:
            for _, text in kept_docs():
                yield from (cut_spans(text, span_chars) if by_span else [text])

        if contam is not None:
            for batch in batched(kept_docs(), BATCH_CHARS, lambda d: len(d[1])):
                before = len(report.flagged)
                contam.check([t for _, t in batch], report)
                hits = report.flagged[before:]
                report.flagged[before:] = [batch[j][0] for j in hits]  # batch positions -> document ids
            stats["decontamination"] = report.to_dict()
            log(f"decontamination: {len(report.flagged)} documents share {contam.ngram}-grams with eval sets "
                + ("(dropped)" if data.drop_contaminated else "(kept; --drop-contaminated removes them)"))
            if data.drop_contaminated:
                dropped = set(report.flagged)

        def keys_and_sizes() -> tuple[list[int], list[int]]:
            pairs = [(split_key(u, seed), len(u)) for u in units()]
            return [k for k, _ in pairs], [n for _, n in pairs]

        keys, sizes = keys_and_sizes()
        is_val = val_mask(keys, data.val_fraction)
        if len(keys) >= 2 and val_share_too_small(is_val, sizes, data.val_fraction):
            # A count-based split of units of very different sizes (one book and a few notes, say)
            # can give val almost none of the text: cut spans, and hold out by characters instead.
            share = sum(n for n, v in zip(sizes, is_val) if v) / max(sum(sizes), 1)
            units_were = "spans" if by_span else "documents"
            if not by_span:
                by_span = True
                span_chars = max(sum(sizes) // SPANS_PER_CORPUS, 200)
                keys, sizes = keys_and_sizes()
            is_val = val_mask_by_chars(keys, sizes, data.val_fraction)
            new = sum(n for n, v in zip(sizes, is_val) if v) / max(sum(sizes), 1)
            log(f"split: holding out {data.val_fraction:.0%} of the {units_were} by count gave val only "
                f"{share:.2%} of the text, so val is now {new:.2%} of the characters, held out as whole spans")
        if data.val_fraction > 0 and not is_val.any():
            raise UserError(f"{data.corpus} is too small to hold out a validation split ({len(keys)} "
                            f"{'span' if by_span else 'document'} after cleaning); give more text, or set "
                            "data.val_fraction=0 to train without validation")
        if is_val.all() or not keys:
            raise UserError("no training documents left; give a bigger corpus")
        del keys, sizes

        def split_units(want_val: bool) -> Iterator[str]:
            for u, v in zip(units(), is_val):
                if v == want_val:
                    yield u

        # 3. tokenizer
        tok = make_tokenizer(tokenizer, split_units(False), log)
        dtype = dtype_for_vocab(tok.vocab_size)

        # 4. encode + write; the directory is renamed into place only when complete
        t = time.time()
        writers = {"train": ShardWriter(tmp, "train", dtype, tok.eot_id, data.shard_tokens),
                   "val": ShardWriter(tmp, "val", dtype, tok.eot_id, data.shard_tokens)}
        nbytes = {"train": 0, "val": 0}
        # ids as arrays where the tokenizer can (BPE): no Python int per token, so its threads overlap
        encode = getattr(tok, "encode_batch_arrays", tok.encode_batch)
        for batch in batched(zip(units(), is_val), BATCH_CHARS, lambda u: len(u[0])):
            for (text, v), ids in zip(batch, encode([text for text, _ in batch])):
                split = "val" if v else "train"
                writers[split].add(ids)
                nbytes[split] += len(text.encode("utf-8"))
        splits = {name: {**w.close(), "bytes": nbytes[name]} for name, w in writers.items()}
        tok.save(tmp / "tokenizer")
        options = {"data": asdict(data), "tokenizer": asdict(tokenizer), "seed": seed}
        index = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": tok.vocab_size,
                 "eot_id": tok.eot_id, "tokenizer_fingerprint": tok.fingerprint, "sources": [data.corpus],
                 "split_by": "span" if by_span else "document", "splits": splits, "stats": stats, "options": options}
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
    secs = time.time() - t0
    mb = sum(s["bytes"] for s in splits.values()) / 1e6
    summary = {"out": str(out), "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"],
               "train_docs": splits["train"]["documents"], "val_docs": splits["val"]["documents"],
               "split_by": index["split_by"], "seconds": round(secs, 2),
               "MB_per_s": round(mb / max(time.time() - t, 1e-9), 2),
               "bytes_per_token": round(mb * 1e6 / max(splits["train"]["tokens"] + splits["val"]["tokens"], 1), 3)}
    unit = "spans" if by_span else "documents"
    log(f"wrote {out}: {summary['train_tokens']:,} train / {summary['val_tokens']:,} val tokens "
        f"({summary['train_docs']} / {summary['val_docs']} {unit}), {summary['bytes_per_token']} bytes/token, "
        f"{secs:.1f}s")
    return summary
