"""Loaders for the standard multiple-choice files, turned into prompts the way
lm-evaluation-harness writes them, so our numbers and theirs are comparable.

Every item becomes: context (the prompt), choices (continuations, each scored after
`target_delimiter`), gold (index of the right one).

- MMLU: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
        + k dev exemplars + "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"; choices " A".." D".
- HellaSwag: "{activity_label}: {ctx_a} {Ctx_b}" -> the four endings (lm-eval's preprocessing).
- ARC: "Question: {question}\\nAnswer:" -> the answer texts.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from scratchlm.errors import UserError


@dataclass
class MCItem:
    context: str
    choices: list[str]
    gold: int
    subject: str = ""
    source: str = ""   # file:line, for error messages


@dataclass
class LoadOptions:
    on_bad_record: str = "stop"   # stop | skip


def _bad(opts: LoadOptions, where: str, problem: str) -> None:
    if opts.on_bad_record != "skip":
        raise UserError(f"{where}: {problem}; fix the row or pass --on-bad-record skip")


# --- MMLU ----------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJ"


def _mmlu_rows(path: Path, opts: LoadOptions) -> list[tuple[str, list[str], int, str]]:
    """Both layouts: header-less `question,A,B,C,D,letter` and `question,choice0..3,answer(0-3)`
    with a header (and possibly an index column)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = list(csv.reader(f))
    if not reader:
        raise UserError(f"{path} is empty")
    header = [h.strip().lower() for h in reader[0]]
    has_header = "question" in header
    body = reader[1:] if has_header else reader
    for lineno, row in enumerate(body, start=2 if has_header else 1):
        where = f"{path}:{lineno}"
        if has_header:
            rec = dict(zip(header, row))
            q = rec.get("question", "")
            choices = [rec.get(f"choice{i}", rec.get(LETTERS[i].lower(), "")) for i in range(4)]
            ans = rec.get("answer", "").strip()
        else:
            if len(row) != 6:
                _bad(opts, where, f"expected 6 columns (question, 4 choices, answer), found {len(row)}")
                continue
            q, choices, ans = row[0], row[1:5], row[5].strip()
        if ans.isdigit():
            gold = int(ans)
        elif len(ans) == 1 and ans.upper() in LETTERS:
            gold = LETTERS.index(ans.upper())
        else:
            _bad(opts, where, f"answer {ans!r} is not a letter A-D or an index 0-3")
            continue
        if not 0 <= gold < len(choices):
            _bad(opts, where, f"answer {ans!r} is outside the {len(choices)} choices")
            continue
        rows.append((q, choices, gold, where))
    return rows


def _mmlu_subject(path: Path) -> str:
    return re.sub(r"_(dev|test|val)$", "", path.stem)


def _mmlu_prompt(q: str, choices: list[str]) -> str:
    return q.strip() + "\n" + "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(choices)) + "Answer:"


def load_mmlu(test_path: str | Path, dev_dir: str | Path | None = None, shots: int = 0,
              opts: LoadOptions | None = None) -> list[MCItem]:
    """One subject's test CSV (or a directory of them); few-shot exemplars from the dev split."""
    opts = opts or LoadOptions()
    test_path = Path(test_path)
    files = sorted(test_path.glob("*.csv")) if test_path.is_dir() else [test_path]
    if not files:
        raise UserError(f"no MMLU CSV files in {test_path}")
    items = []
    for f in files:
        subject = _mmlu_subject(f)
        pretty = subject.replace("_", " ")
        prefix = f"The following are multiple choice questions (with answers) about {pretty}.\n\n"
        if shots:
            dd = Path(dev_dir) if dev_dir else f.parent.parent / "dev"
            dev_file = dd / f"{subject}_dev.csv"
            if not dev_file.exists():
                raise UserError(f"{shots}-shot MMLU needs the dev split: {dev_file} not found (give --dev-dir)")
            for q, ch, g, _ in _mmlu_rows(dev_file, opts)[:shots]:
                prefix += _mmlu_prompt(q, ch) + " " + LETTERS[g] + "\n\n"
        for q, ch, g, where in _mmlu_rows(f, opts):
            items.append(MCItem(prefix + _mmlu_prompt(q, ch), [LETTERS[i] for i in range(len(ch))], g, subject, where))
    return items


# --- HellaSwag -----------------------------------------------------------------------------------

def _hs_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path: str | Path, opts: LoadOptions | None = None) -> list[MCItem]:
    """Official JSONL ({ctx_a, ctx_b, activity_label, endings, label}) or the 6-lines-per-item
    text variant (`label: ctx` / gold index / four endings)."""
    opts = opts or LoadOptions()
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UserError(f"{path} is empty")
    items = []
    if text.lstrip().startswith("{"):
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                d = json.loads(line)
                ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
                endings = list(d["endings"])
                gold = int(d["label"])
                label = d["activity_label"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                _bad(opts, where, f"not a HellaSwag record ({type(e).__name__}: {e})")
                continue
            if len(endings) != 4 or not 0 <= gold < 4:
                _bad(opts, where, f"expected 4 endings and a label 0-3, got {len(endings)} and {gold}")
                continue
            items.append(MCItem(_hs_preprocess(label + ": " + ctx), [_hs_preprocess(e) for e in endings],
                                gold, label, where))
        return items
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    if len(lines) % 6:
        _bad(opts, str(path), f"{len(lines)} lines is not a multiple of 6 (context, label, 4 endings)")
    for k in range(0, len(lines) - len(lines) % 6, 6):
        where = f"{path}:{k + 1}"
        block = lines[k:k + 6]
        if not block[1].strip().isdigit() or not 0 <= int(block[1]) < 4:
            _bad(opts, where, f"gold label {block[1]!r} is not 0-3")
            continue
        label = block[0].split(":", 1)[0]
        items.append(MCItem(block[0].strip(), [e.strip() for e in block[2:6]], int(block[1]), label, where))
    return items


# --- ARC -----------------------------------------------------------------------------------------

def load_arc(path: str | Path, opts: LoadOptions | None = None) -> list[MCItem]:
    opts = opts or LoadOptions()
    path = Path(path)
    items = []
    lines = path.read_text(encoding="utf-8").splitlines()
    if not any(ln.strip() for ln in lines):
        raise UserError(f"{path} is empty")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            d = json.loads(line)
            texts, labels = d["choices"]["text"], d["choices"]["label"]
            gold = labels.index(d["answerKey"])
            q = d["question"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            _bad(opts, where, f"not an ARC record ({type(e).__name__}: {e})")
            continue
        except ValueError:
            _bad(opts, where, f"answerKey {d.get('answerKey')!r} is not among the labels {d['choices']['label']}")
            continue
        if len(texts) < 2 or len(texts) != len(labels):
            _bad(opts, where, f"a question needs at least 2 choices with one label each, got {len(texts)}")
            continue
        items.append(MCItem(f"Question: {q}\nAnswer:", list(texts), gold, "arc", where))
    return items


def load_task(task: str, path: str | Path, shots: int = 0, dev_dir: str | None = None,
              opts: LoadOptions | None = None) -> list[MCItem]:
    if not Path(path).exists():
        raise UserError(f"{task} data {path} not found")
    if task == "mmlu":
        items = load_mmlu(path, dev_dir, shots, opts)
    elif task == "hellaswag":
        items = load_hellaswag(path, opts)
    elif task == "arc":
        items = load_arc(path, opts)
    else:
        raise UserError(f"unknown task {task!r}; tasks are mmlu, hellaswag, arc")
    if not items:
        raise UserError(f"no usable items in {path}")
    return items


def load_task_items(path: str | Path) -> list[MCItem] | None:
    """Guess the task from the file (for decontamination); None if it is plain text."""
    p = Path(path)
    try:
        if p.suffix == ".csv" or p.is_dir():
            return load_mmlu(p, opts=LoadOptions("skip"))
        if p.suffix == ".jsonl":
            head = p.read_text(encoding="utf-8")[:2000]
            return load_arc(p, LoadOptions("skip")) if '"answerKey"' in head else load_hellaswag(p, LoadOptions("skip"))
        if "hellaswag" in p.name:
            return load_hellaswag(p, LoadOptions("skip"))
    except UserError:
        return None
    return None
