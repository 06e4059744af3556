"""Read documents from wherever the text lives. Everything is a stream of `Document`s.

Supported: the built-in corpus, .txt/.md (one document per file), .jsonl/.json (a text field),
.parquet (pyarrow), .gz/.zst compressed versions of those, directories and globs (recursively),
http(s) URLs (downloaded to a cache, then read as a file), and Hugging Face `datasets` saved with
`save_to_disk` (`hf:PATH`). Files are read a record (or a megabyte) at a time, and a document
longer than PIECE_CHARS (a whole book in one .txt, a huge JSON record) comes out as consecutive
pieces cut at blank lines, so memory stays bounded however large a file is.
"""

from __future__ import annotations

import codecs
import glob as globlib
import gzip
import hashlib
import io
import itertools
import json
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from scratchlm.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".text"}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
ALL_SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | {".parquet"}


@dataclass
class Document:
    text: str
    source: str  # where it came from: "path", "path:line", "kjv:Genesis 1", ...
    bad_bytes: int = 0  # undecodable byte sequences replaced by U+FFFD while reading


@dataclass
class ReadOptions:
    text_field: str = "text"
    on_bad_record: str = "stop"   # stop | skip
    cache_dir: str = ""           # for URL downloads; default ~/.cache/scratchlm


# Formats we recognise but cannot read as a corpus: refusing beats reading a table as prose.
REFUSED_SUFFIXES = {".csv": "a table", ".tsv": "a table", ".xlsx": "a spreadsheet", ".zip": "an archive",
                    ".tar": "an archive", ".bz2": "bzip2-compressed", ".xz": "xz-compressed", ".pdf": "a PDF"}


def _inner_suffix(path: Path) -> str:
    s = path.suffixes
    if s and s[-1] in (".gz", ".zst") and len(s) >= 2:
        return s[-2]
    return path.suffix


def _open_binary(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{path} is zstd-compressed: pip install zstandard") from None
        # BufferedReader gives the stream reader line iteration, which it lacks on its own
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 with undecodable bytes replaced by U+FFFD (rather than a crash), and how many were."""
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())  # a U+FFFD already in the file is not ours
    return text, bad


def _read_error_types() -> tuple[type[BaseException], ...]:
    """What a corrupt file raises while we read it: gzip and zstd have their own exception types."""
    types: list[type[BaseException]] = [OSError, EOFError]
    try:
        import zstandard
        types.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(types)


PIECE_CHARS = 1 << 20  # a longer document is cut into consecutive pieces of about this many characters
READ_BYTES = 1 << 20   # files are read and decoded this much at a time
_BOM, _FFFD = b"\xef\xbb\xbf", "\ufffd".encode()


def cut_point(text: str, limit: int) -> int:
    """Where a piece of `text` of at most `limit` characters should end: after the last blank line
    in its second half, else the last line end, else the last space, else at `limit`."""
    for sep in ("\n\n", "\n", " "):
        i = text.rfind(sep, limit // 2, limit)
        if i != -1:
            return i + len(sep)
    return limit


def pieces(doc: Document) -> Iterator[Document]:
    """A document, cut into pieces of at most PIECE_CHARS when it is longer (a huge JSON record, say),
    so that no later stage (cleaning, dedup, encoding) ever holds more than a piece."""
    text, start, k = doc.text, 0, 0
    if len(text) <= PIECE_CHARS:
        yield doc
        return
    while start < len(text):
        cut = start + (cut_point(text[start:start + PIECE_CHARS], PIECE_CHARS) if len(text) - start > PIECE_CHARS
                       else len(text) - start)
        k += 1
        yield Document(text[start:cut], f"{doc.source}#{k}", doc.bad_bytes if k == 1 else 0)
        start = cut


class _StreamDecoder:
    """UTF-8 bytes -> text a chunk at a time (a character split between chunks is kept whole), with
    undecodable bytes replaced by U+FFFD and counted (a U+FFFD already in the file is not ours)."""

    def __init__(self):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tail, self.bad, self.started = b"", 0, False

    def decode(self, raw: bytes, final: bool = False) -> str:
        if not self.started:  # drop a byte-order mark
            raw, self.started = raw.removeprefix(_BOM), True
        text = self.decoder.decode(raw, final=final)
        self.bad += text.count("\ufffd") - (self.tail + raw).count(_FFFD)  # tail: one split across chunks
        self.tail = raw[-2:]
        return text

    def take_bad(self) -> int:
        bad, self.bad = self.bad, 0
        return bad


def read_text_file(path: Path) -> Iterator[Document]:
    """A text file is one document; a file longer than PIECE_CHARS is consecutive pieces of it, cut
    at blank lines where there are any (see `cut_point`). It is read a megabyte at a time, never
    whole, so a file larger than memory streams. Newlines become \\n."""
    dec, buf, held_cr, k = _StreamDecoder(), "", "", 0
    with _open_binary(path) as f:
        while True:
            raw = f.read(READ_BYTES)
            final = not raw
            text = held_cr + dec.decode(raw, final)
            held_cr = "\r" if text.endswith("\r") and not final else ""  # "\r" + "\n" may be split between reads
            buf += (text[:-1] if held_cr else text).replace("\r\n", "\n").replace("\r", "\n")
            while len(buf) > PIECE_CHARS:
                cut = cut_point(buf, PIECE_CHARS)
                k += 1
                yield Document(buf[:cut], f"{path}#{k}", dec.take_bad())
                buf = buf[cut:]
            if final:
                if buf or not k:  # an empty file is one (empty) document, which cleaning counts and drops
                    yield Document(buf, f"{path}#{k + 1}" if k else str(path), dec.take_bad())
                return


def _json_array(f: IO[bytes], head: bytes, path: Path) -> Iterator[tuple[object, int]]:
    """(record, undecodable bytes) for each element of a top-level JSON array, parsed one element at
    a time from text decoded a megabyte at a time: only the record being parsed is in memory."""
    dec, parser = _StreamDecoder(), json.JSONDecoder()
    buf, eof = dec.decode(head), False
    pos, n, want_value = buf.index("[") + 1, 0, True

    def more() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        raw = f.read(READ_BYTES)
        eof = not raw
        buf = buf[pos:] + dec.decode(raw, final=eof)
        pos = 0
        return True

    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n":
            pos += 1
        if pos == len(buf):
            if more():
                continue
            raise UserError(f"{path}: not valid JSON (the array is not closed: the file ends after record {n})")
        if buf[pos] == "]" and (n == 0 or not want_value):
            return
        if not want_value:
            if buf[pos] != ",":
                raise UserError(f"{path}: not valid JSON (expected ',' or ']' after record {n}, found {buf[pos]!r})")
            pos, want_value = pos + 1, True
            continue
        try:
            rec, end = parser.raw_decode(buf, pos)
        except json.JSONDecodeError as e:
            cut_short = e.pos >= len(buf) - 8 or e.msg.startswith("Unterminated")
            if cut_short and more():  # the record may continue past what has been read
                continue
            raise UserError(f"{path}: not valid JSON in record {n + 1} ({e.msg})") from None
        if end == len(buf) and not eof and more():  # a number may continue past what has been read
            continue
        pos, n, want_value = end, n + 1, False
        yield rec, dec.take_bad()


def read_jsonl(path: Path, opts: ReadOptions) -> Iterator[Document]:
    """JSON Lines (one record per line; error messages give the true line number), or a .json file
    holding one array of records (streamed a record at a time)."""
    with _open_binary(path) as f:
        # Look at the first non-blank byte without reading a line: a whole JSON array is often one line.
        head = f.read(READ_BYTES).removeprefix(_BOM)
        while head and not head.strip():
            more = f.read(READ_BYTES)
            if not more:
                break
            head += more
        if head.lstrip().startswith(b"["):
            for i, (rec, bad) in enumerate(_json_array(f, head, path)):
                doc = _record_text(rec, path, i + 1, opts, bad)
                if doc is not None:
                    yield from pieces(doc)
            return
        lines = iter(f)
        *pending, partial = head.split(b"\n")  # the head's whole lines, then the start of the next one
        pending = [p + b"\n" for p in pending] + ([partial + next(lines, b"")] if partial else [])
        for lineno, raw in enumerate(itertools.chain(pending, lines), start=1):
            if not raw.strip():
                continue
            line, bad = _decode(raw)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if opts.on_bad_record == "skip":
                    continue
                raise UserError(f"{path}:{lineno}: malformed JSON line ({e.msg}); fix it or pass --on-bad-record skip") from None
            doc = _record_text(rec, path, lineno, opts, bad)
            if doc is not None:
                yield from pieces(doc)


def _record_text(rec, path: Path, lineno: int, opts: ReadOptions, bad_bytes: int = 0) -> Document | None:
    if isinstance(rec, dict) and isinstance(rec.get(opts.text_field), str):
        return Document(rec[opts.text_field], f"{path}:{lineno}", bad_bytes)
    if opts.on_bad_record == "skip":
        return None
    keys = ", ".join(rec.keys()) if isinstance(rec, dict) else type(rec).__name__
    raise UserError(f"{path}:{lineno}: no text field {opts.text_field!r} (found: {keys}); "
                    f"choose it with --text-field or pass --on-bad-record skip")


def read_parquet(path: Path, opts: ReadOptions) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path} is Parquet: pip install 'scratchlm[parquet]' (pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    if opts.text_field not in pf.schema_arrow.names:
        raise UserError(f"{path}: no column {opts.text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                        "choose it with --text-field")
    row = 0
    for batch in pf.iter_batches(columns=[opts.text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str):
                yield from pieces(Document(text, f"{path}:{row}"))


def read_hf_dataset(spec: str, opts: ReadOptions) -> Iterator[Document]:
    """A Hugging Face dataset saved with `save_to_disk`, or loaded by `datasets` from local files."""
    try:
        import datasets
    except ImportError:
        raise UserError("hf: corpora need the datasets package: pip install datasets") from None
    path = spec[len("hf:"):]
    if not Path(path).exists():
        raise UserError(f"no saved Hugging Face dataset at {path} (scratchlm never downloads at run time; "
                        "save one with dataset.save_to_disk(PATH))")
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if opts.text_field not in ds.column_names:
        raise UserError(f"dataset {path} has no column {opts.text_field!r} (columns: {', '.join(ds.column_names)})")
    for i, rec in enumerate(ds):
        yield from pieces(Document(rec[opts.text_field], f"{path}:{i}"))


def download(url: str, cache_dir: str = "") -> Path:
    """Fetch a URL into the cache (once), atomically. Re-used on later runs."""
    cache = Path(cache_dir or os.environ.get("SCRATCHLM_CACHE", Path.home() / ".cache" / "scratchlm"))
    name = url.rstrip("/").split("/")[-1].split("?")[0] or "download"
    target = cache / hashlib.sha256(url.encode()).hexdigest()[:12] / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as out:
            shutil.copyfileobj(r, out, length=1 << 20)
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not download {url}: {e}") from None
    return target


def expand(corpus: str) -> list[Path]:
    """A path, directory or glob to the list of readable files it names (sorted, deterministic)."""
    p = Path(corpus)
    if any(ch in corpus for ch in "*?["):
        files = [Path(x) for x in sorted(globlib.glob(corpus, recursive=True))]
    elif p.is_dir():
        files = sorted(x for x in p.rglob("*") if x.is_file())
    elif p.exists():
        files = [p]
        kind = REFUSED_SUFFIXES.get(_inner_suffix(p).lower())
        if kind:
            raise UserError(f"{corpus} is {kind}, not a text corpus; convert it to .txt or to JSONL with a "
                            f"text field (see --text-field)")
        return files
    else:
        raise UserError(f"corpus {corpus} not found; give a file, directory, glob, URL or 'builtin'")
    files = [f for f in files if _inner_suffix(f) in ALL_SUFFIXES and not f.name.startswith(".")]
    if not files:
        raise UserError(f"no readable text files in {corpus} (looked for {', '.join(sorted(ALL_SUFFIXES))}, "
                        f"optionally .gz/.zst)")
    return files


def iter_documents(corpus: str, opts: ReadOptions | None = None) -> Iterator[Document]:
    """Stream every document of a corpus spec."""
    opts = opts or ReadOptions()
    if corpus in ("builtin", "builtin:kjv"):
        from scratchlm.data.builtin import iter_kjv_chapters
        for source, text in iter_kjv_chapters():
            yield Document(text, source)
        return
    if corpus.startswith("hf:"):
        yield from read_hf_dataset(corpus, opts)
        return
    if corpus.startswith(("http://", "https://")):
        files = [download(corpus, opts.cache_dir)]
    else:
        files = expand(corpus)
    for path in files:
        if not os.access(path, os.R_OK):
            raise UserError(f"cannot read {path}: permission denied")
        suffix = _inner_suffix(path)
        try:
            if suffix in JSON_SUFFIXES:
                yield from read_jsonl(path, opts)
            elif suffix == ".parquet":
                yield from read_parquet(path, opts)
            else:
                yield from read_text_file(path)
        except _read_error_types() as e:
            raise UserError(f"cannot read {path}: it is corrupt or truncated ({type(e).__name__}: {e})") from None
