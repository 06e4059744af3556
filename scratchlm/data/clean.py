"""Cleaning: normalise text, strip boilerplate, and drop low-quality documents.

Every filter counts what it removed (documents and bytes), so `prepare` can report it.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_TRAILING_WS = re.compile(r"[ \t]+\n")
_MANY_BLANKS = re.compile(r"\n{3,}")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def normalize(text: str) -> str:
    """NFC, unix newlines, no control characters, no trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_WS.sub("\n", text)
    text = _MANY_BLANKS.sub("\n\n", text)
    return text.strip() + "\n" if text.strip() else ""


def strip_gutenberg(text: str) -> str:
    """Keep only the book between Project Gutenberg's START and END markers, if present."""
    start = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text)
    if start:
        text = text[start.end():end.start() if end and end.start() > start.end() else None]
    elif end:
        text = text[:end.start()]
    return text


@dataclass
class QualityFilter:
    min_chars: int = 32
    min_alpha_ratio: float = 0.5     # letters / non-space characters
    max_dup_line_ratio: float = 0.3  # share of lines that repeat another line in the document

    def reason_to_drop(self, text: str) -> str | None:
        if len(text) < self.min_chars:
            return "too_short"
        nonspace = sum(1 for c in text if not c.isspace())
        letters = sum(1 for c in text if c.isalpha())
        if nonspace == 0 or letters / nonspace < self.min_alpha_ratio:
            return "low_alpha"
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if len(lines) >= 10:
            counts = Counter(lines)
            repeated = sum(c - 1 for c in counts.values() if c > 1)
            if repeated / len(lines) > self.max_dup_line_ratio:
                return "repeated_lines"
        return None


@dataclass
class CleanStats:
    docs_in: int = 0
    bytes_in: int = 0
    docs_out: int = 0
    bytes_out: int = 0
    removed: dict = field(default_factory=dict)  # reason -> {"docs": n, "bytes": n}
    bad_bytes: int = 0  # undecodable byte sequences the reader replaced by U+FFFD

    def drop(self, reason: str, nbytes: int) -> None:
        r = self.removed.setdefault(reason, {"docs": 0, "bytes": 0})
        r["docs"] += 1
        r["bytes"] += nbytes


def clean_document(text: str, qf: QualityFilter, stats: CleanStats) -> str | None:
    """Normalise one document and return it, or None (counted in `stats`) if a filter drops it."""
    raw_bytes = len(text.encode("utf-8", "replace"))
    stats.docs_in += 1
    stats.bytes_in += raw_bytes
    text = normalize(strip_gutenberg(text))
    if not text:
        stats.drop("empty", raw_bytes)
        return None
    reason = qf.reason_to_drop(text)
    if reason:
        stats.drop(reason, raw_bytes)
        return None
    stats.docs_out += 1
    stats.bytes_out += len(text.encode("utf-8"))
    return text
