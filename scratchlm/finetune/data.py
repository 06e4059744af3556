"""Fine-tuning data: labelled texts (classification) and conversations (instruction SFT).

    load_labeled("sms_spam.tsv")        # label<TAB>text lines, CSV with label,text, or JSONL {text, label}
    load_conversations("instr.json")    # Alpaca {instruction, input, output} (JSON array or JSONL),
                                        # or chat JSONL {"messages": [{role, content}, ...]}

Every record remembers where it came from (`file:line`), so a bad one is reported as
"instr.json:17: the record has no 'output'" and nothing is trained on half-read data.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scratchlm.errors import UserError
from scratchlm.finetune.templates import alpaca_messages, check_messages


@dataclass
class LabeledText:
    text: str
    label: str
    where: str        # file:line, for error messages


@dataclass
class Conversation:
    messages: list[dict]
    where: str


def _open(path: str | Path) -> tuple[Path, str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file {p} not found")
    try:
        return p, p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{p} is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None


def _json_lines(p: Path, text: str) -> list[tuple[str, object]]:
    """(where, record) for each non-blank line of a JSONL file."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{p}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{n}: not valid JSON ({e.msg})") from None
    return out


def _records(p: Path, text: str) -> list[tuple[str, object]]:
    """A JSON array (the book's instruction-data.json) or JSON lines."""
    if p.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise UserError(f"{p}: expected a JSON array of records (or one JSON object per line)")
        return [(f"{p}[record {i}]", r) for i, r in enumerate(data)]
    return _json_lines(p, text)


# --- classification ---------------------------------------------------------------------------

def load_labeled(path: str | Path, text_field: str = "text", label_field: str = "label") -> list[LabeledText]:
    """Labelled texts from TSV (`label<TAB>text`, the UCI SMS spam layout), CSV (`label,text`, an
    optional header row naming the columns) or JSONL (`{"text": ..., "label": ...}`)."""
    p, text = _open(path)
    out: list[LabeledText] = []
    if p.suffix in (".jsonl", ".json"):
        for where, r in _records(p, text):
            if not isinstance(r, dict) or text_field not in r or label_field not in r:
                raise UserError(f"{where}: expected an object with {text_field!r} and {label_field!r}")
            out.append(LabeledText(str(r[text_field]), str(r[label_field]), where))
    elif p.suffix == ".csv":
        reader = csv.reader(io.StringIO(text))
        rows = [(reader.line_num, row) for row in reader]  # line_num: where a (multi-line) row ends
        header = [c.strip().lower() for c in rows[0][1]] if rows else []
        has_header = label_field in header and text_field in header
        li, ti = (header.index(label_field), header.index(text_field)) if has_header else (0, 1)
        for i, (n, row) in enumerate(rows):
            if (i == 0 and has_header) or not row:
                continue
            if len(row) <= max(li, ti):
                raise UserError(f"{p}:{n}: expected two columns, label and text")
            out.append(LabeledText(row[ti], row[li].strip(), f"{p}:{n}"))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if "\t" not in line:
                raise UserError(f"{p}:{n}: expected label<TAB>text")
            label, body = line.split("\t", 1)
            out.append(LabeledText(body, label.strip(), f"{p}:{n}"))
    for r in out:
        if not r.label:
            raise UserError(f"{r.where}: empty label")
        if not r.text.strip():
            raise UserError(f"{r.where}: empty text")
    if not out:
        raise UserError(f"{p} holds no records")
    return out


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """A seeded shuffle cut into train/val/test: the same seed gives the same split everywhere."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"finetune.val_fraction={val_fraction} + test_fraction={test_fraction} must be below 1")
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    return {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}


# --- instructions / chat ----------------------------------------------------------------------

def load_conversations(path: str | Path) -> list[Conversation]:
    """Alpaca records become one user turn (+ input) and one assistant turn; chat records are
    checked (known roles, string contents) and kept as they are."""
    p, text = _open(path)
    out: list[Conversation] = []
    for where, r in _records(p, text):
        if not isinstance(r, dict):
            raise UserError(f"{where}: expected a JSON object")
        if "messages" in r:
            msgs = check_messages(r["messages"], where=f"{where}: messages")
            if not any(m["role"] == "assistant" for m in msgs):
                raise UserError(f"{where}: the conversation has no assistant turn to learn from")
            if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
                raise UserError(f"{where}: an assistant message is empty; remove the record or write the response")
        elif "instruction" in r:
            if "output" not in r:
                raise UserError(f"{where}: the record has no 'output' (the response to learn)")
            if not isinstance(r["output"], str) or not r["output"].strip():
                raise UserError(f"{where}: empty response in 'output'; remove the record or write the response")
            if not isinstance(r["instruction"], str) or not isinstance(r.get("input", "") or "", str):
                raise UserError(f"{where}: 'instruction' and 'input' must be strings")
            msgs = alpaca_messages(r)
        else:
            raise UserError(f"{where}: expected an Alpaca record {{instruction, input, output}} "
                            f"or a chat record {{messages: [...]}}")
        out.append(Conversation(msgs, where))
    if not out:
        raise UserError(f"{p} holds no records")
    return out


# --- batching ---------------------------------------------------------------------------------

class EpochSampler:
    """Example indices in a seeded shuffle, epoch after epoch; (epoch, pos) is the whole resume state.

    With `groups` (one list of indices per class), each epoch draws every class equally often:
    smaller classes are repeated (in a fresh shuffle) up to the size of the largest.
    Every rank walks the same order and takes its own slice of each global batch."""

    def __init__(self, n: int, seed: int, groups: list[list[int]] | None = None, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise UserError("no training examples")
        self.n, self.seed, self.groups, self.rank, self.world = n, seed, groups, rank, world_size
        self.epoch, self.pos = 0, 0
        self._order = self._make_order(0)

    def _make_order(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, epoch])
        if not self.groups:
            return rng.permutation(self.n).tolist()
        m = max(len(g) for g in self.groups)
        drawn = [np.resize(rng.permutation(g), m) for g in self.groups if len(g)]
        return rng.permutation(np.concatenate(drawn)).tolist()

    def take(self, k: int) -> list[int]:
        """This rank's k indices of the next global batch of k * world_size."""
        out: list[int] = []
        while len(out) < k * self.world:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order(self.epoch)
            need = k * self.world - len(out)
            out += self._order[self.pos:self.pos + need]
            self.pos += min(need, len(self._order) - self.pos)
        return out[self.rank * k:(self.rank + 1) * k]

    @property
    def epoch_size(self) -> int:
        return len(self._order)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._make_order(self.epoch)


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids padded on the right with pad_id, and (B, T) bool: True where a real token is."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    real = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        real[i, :len(s)] = True
    return ids, real


def pad_id(tok) -> int:
    """Padding is masked by position, so any id works; <|pad|> keeps the batches readable."""
    return tok.special_tokens.get("<|pad|>", tok.eot_id)
