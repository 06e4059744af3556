"""`scratchlm prepare`: raw corpus -> cleaned, deduplicated, tokenized train/val shards.

    read -> clean/filter -> deduplicate -> decontaminate -> split by document
         -> train (or load) the tokenizer -> encode in parallel -> shards + index.json
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from scratchlm.atomic import staged_dir
from scratchlm.data.clean import CleanStats, QualityFilter, clean_document
from scratchlm.data.dedup import deduplicate
from scratchlm.data.shards import FORMAT, INDEX, VERSION, ShardWriter, dtype_for_vocab
from scratchlm.data.sources import ReadOptions, iter_documents
from scratchlm.errors import UserError
from scratchlm.tokenizer import Tokenizer


@dataclass
class PrepareOptions:
    corpus: str = "builtin"
    out: str = "data/builtin"
    text_field: str = "text"
    on_bad_record: str = "stop"
    tokenizer: str = ""              # existing tokenizer dir; empty = train one
    vocab_size: int = 4096
    pattern: str = "gpt4"
    val_fraction: float = 0.05
    dedup: bool = True
    near_threshold: float = 0.8
    min_chars: int = 32
    max_docs: int = 0
    max_chars: int = 0
    decontaminate: list[str] = field(default_factory=list)  # eval files to check against
    drop_contaminated: bool = False
    overwrite: bool = False
    seed: int = 0


def _split_key(text: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}:".encode() + text.encode("utf-8")).hexdigest()


def _blocks(text: str, target_chars: int = 8000) -> list[str]:
    """Cut a long document into paragraph-aligned blocks (used only to split tiny corpora)."""
    out, cur = [], []
    size = 0
    for para in text.split("\n\n"):
        cur.append(para)
        size += len(para)
        if size >= target_chars:
            out.append("\n\n".join(cur) + "\n")
            cur, size = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/val split by document: the documents with the smallest content hashes
    go to val. Independent of input order; at least one val document when there are two or more.
    A corpus of fewer than 20 documents (one big text file, say) is split by paragraph blocks."""
    if len(docs) < 20:
        docs = [b for d in docs for b in _blocks(d)]
    if len(docs) < 2 or val_fraction <= 0:
        return docs, []
    n_val = max(1, round(len(docs) * val_fraction))
    ranked = sorted(range(len(docs)), key=lambda i: _split_key(docs[i], seed))
    val_ids = set(ranked[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


def prepare(opts: PrepareOptions, log: Callable[[str], None] = print) -> dict:
    out = Path(opts.out)
    if (out / INDEX).exists() and not opts.overwrite:
        raise UserError(f"{out} already holds a prepared dataset; pass --overwrite or choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / INDEX).exists() and not opts.overwrite:
        raise UserError(f"{out} exists and is not empty; choose another --out")
    t0 = time.time()
    stats: dict = {"corpus": opts.corpus}

    # 1. read + clean
    qf = QualityFilter(min_chars=opts.min_chars)
    cstats = CleanStats()
    docs: list[str] = []
    total_chars = 0
    for doc in iter_documents(opts.corpus, ReadOptions(opts.text_field, opts.on_bad_record)):
        text = clean_document(doc.text, qf, cstats)
        if text is None:
            continue
        docs.append(text)
        total_chars += len(text)
        if (opts.max_docs and len(docs) >= opts.max_docs) or (opts.max_chars and total_chars >= opts.max_chars):
            break
    stats["clean"] = asdict(cstats)
    removed = ", ".join(f"{k}: {v['docs']}" for k, v in cstats.removed.items())
    log(f"read {cstats.docs_in} documents ({cstats.bytes_in / 1e6:.2f} MB), kept {cstats.docs_out} after "
        f"cleaning ({removed or 'none removed'})")
    if not docs:
        raise UserError(f"no documents left after cleaning {opts.corpus} (all empty or filtered out); "
                        "check the corpus or lower --min-chars")

    # 2. deduplicate
    if opts.dedup:
        res = deduplicate(docs, threshold=opts.near_threshold, seed=opts.seed)
        docs = [d for d, k in zip(docs, res.keep) if k]
        stats["dedup"] = res.report()
        log(f"dedup: {res.exact_dups} exact and {res.near_dups} near duplicates removed "
            f"({len(res.clusters)} near-dup clusters), {len(docs)} documents left")

    # 3. decontaminate
    if opts.decontaminate:
        from scratchlm.data.decontam import Decontaminator, load_eval_texts
        rep = Decontaminator(load_eval_texts(opts.decontaminate)).check(docs)
        stats["decontamination"] = rep.to_dict()
        log(f"decontamination: {len(rep.flagged)} documents share 13-grams with eval sets "
            + ("(dropped)" if opts.drop_contaminated else "(kept; --drop-contaminated removes them)"))
        if opts.drop_contaminated:
            flagged = set(rep.flagged)
            docs = [d for i, d in enumerate(docs) if i not in flagged]

    # 4. split
    train_docs, val_docs = split_documents(docs, opts.val_fraction, opts.seed)
    if not train_docs:
        raise UserError("no training documents left; give a bigger corpus")

    # 5. tokenizer
    if opts.tokenizer:
        tok = Tokenizer.load(opts.tokenizer)
    else:
        t = time.time()
        tok = Tokenizer.train(train_docs, opts.vocab_size, pattern=opts.pattern, num_workers=2)
        log(f"trained a {tok.vocab_size}-token BPE tokenizer in {time.time() - t:.1f}s")
    dtype = dtype_for_vocab(tok.vocab_size)

    # 6. encode + write, all inside a staged directory renamed into place at the end
    t = time.time()
    with staged_dir(out, replace=opts.overwrite) as tmp:
        splits = {}
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            w = ShardWriter(tmp, split, dtype, tok.eot_id)
            for s in range(0, len(split_docs), 256):
                for ids in tok.encode_batch(split_docs[s:s + 256]):
                    w.add(ids)
            splits[split] = w.close()
            splits[split]["bytes"] = sum(len(d.encode("utf-8")) for d in split_docs)
        tok.save(tmp / "tokenizer")
        index = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": tok.vocab_size,
                 "eot_id": tok.eot_id, "tokenizer_fingerprint": tok.fingerprint, "sources": [opts.corpus],
                 "splits": splits, "stats": stats, "options": asdict(opts)}
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
    secs = time.time() - t0
    mb = sum(s["bytes"] for s in splits.values()) / 1e6
    summary = {"out": str(out), "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"],
               "train_docs": len(train_docs), "val_docs": len(val_docs), "seconds": round(secs, 2),
               "MB_per_s": round(mb / max(time.time() - t, 1e-9), 2),
               "bytes_per_token": round(mb * 1e6 / max(splits["train"]["tokens"] + splits["val"]["tokens"], 1), 3)}
    log(f"wrote {out}: {summary['train_tokens']:,} train / {summary['val_tokens']:,} val tokens "
        f"({summary['train_docs']} / {summary['val_docs']} documents), {summary['bytes_per_token']} bytes/token, "
        f"{secs:.1f}s")
    return summary
