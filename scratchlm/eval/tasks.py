"""Loaders for the standard multiple-choice files, turned into prompts the way
lm-evaluation-harness writes them, so our numbers and theirs are comparable.

Every item becomes: context (the prompt), choices (continuations, each scored after
`target_delimiter`), gold (index of the right one).

- MMLU: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
        + k dev exemplars + "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"; choices " A".." D".
- HellaSwag: "{activity_label}: {ctx_a} {Ctx_b}" -> the four endings (lm-eval's preprocessing; from
        the 6-line text form, ctx_b is recovered first: see `split_hellaswag_context`).
- ARC: "Question: {question}\\nAnswer:" -> the answer texts.
"""

from __future__ import annotations

import ast
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
MMLU_LAYOUTS = ("question,A,B,C,D,answer without a header (Hendrycks' files); a header with question, "
                "choice0..choice3 (or A..D) and answer; or a header with question, choices (a list) and answer")


def _parse_choices(cell: str) -> list[str] | None:
    """A `choices` cell as a CSV export of the HF dataset writes it: a JSON or Python list."""
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(cell)
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, (list, tuple)) and all(isinstance(c, (str, int, float)) for c in value):
            return [str(c) for c in value]
    return None


def _mmlu_rows(path: Path, opts: LoadOptions) -> list[tuple[str, list[str], int, str, str]]:
    """(question, choices, gold, where, subject) per row, from any of the layouts in MMLU_LAYOUTS.
    `subject` comes from a `subject` column when there is one, else from the file name."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = list(csv.reader(f))
    if not reader:
        raise UserError(f"{path} is empty")
    header = [h.strip().lower() for h in reader[0]]
    has_header = "question" in header
    file_subject = _mmlu_subject(path)
    if has_header:
        if "choices" in header:
            layout = "list"
        elif all(f"choice{i}" in header for i in range(4)):
            layout, names = "columns", [f"choice{i}" for i in range(4)]
        elif all(x in header for x in "abcd"):
            layout, names = "columns", list("abcd")
        else:
            layout = ""
        if not layout or "answer" not in header:
            raise UserError(f"{path}: unrecognised MMLU layout (columns: {', '.join(header)}); expected {MMLU_LAYOUTS}")
    elif len(reader[0]) != 6:
        raise UserError(f"{path}: unrecognised MMLU layout ({len(reader[0])} columns, no header); expected {MMLU_LAYOUTS}")
    body = reader[1:] if has_header else reader
    rows = []
    for lineno, row in enumerate(body, start=2 if has_header else 1):
        where = f"{path}:{lineno}"
        subject = file_subject
        if has_header:
            if len(row) != len(header):
                _bad(opts, where, f"expected {len(header)} columns, found {len(row)}")
                continue
            rec = dict(zip(header, row))
            q, ans = rec["question"], rec["answer"].strip()
            subject = rec.get("subject", "").strip() or file_subject
            choices = _parse_choices(rec["choices"]) if layout == "list" else [rec[n] for n in names]
            if choices is None:
                _bad(opts, where, f"the choices cell {rec['choices'][:40]!r} is not a list")
                continue
        else:
            if len(row) != 6:
                _bad(opts, where, f"expected 6 columns (question, 4 choices, answer), found {len(row)}")
                continue
            q, choices, ans = row[0], row[1:5], row[5].strip()
        if len(choices) < 2 or not all(c.strip() for c in choices):
            _bad(opts, where, f"a question needs at least 2 non-empty choices, got {choices!r}")
            continue
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
        rows.append((q, choices, gold, where, subject))
    return rows


def _mmlu_subject(path: Path) -> str:
    return re.sub(r"_(dev|test|val)$", "", path.stem)


def _mmlu_prompt(q: str, choices: list[str]) -> str:
    return q.strip() + "\n" + "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(choices)) + "Answer:"


def load_mmlu(test_path: str | Path, dev_dir: str | Path | None = None, shots: int = 0,
              opts: LoadOptions | None = None) -> list[MCItem]:
    """One subject's test CSV (or a directory of them); few-shot exemplars are the first `shots`
    questions of the subject's dev file (lm-eval's `first_n` sampler)."""
    opts = opts or LoadOptions()
    test_path = Path(test_path)
    files = sorted(test_path.glob("*.csv")) if test_path.is_dir() else [test_path]
    if not files:
        raise UserError(f"no MMLU CSV files in {test_path}")
    prefixes: dict[str, str] = {}

    def prefix(subject: str, folder: Path) -> str:
        if subject not in prefixes:
            text = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
            if shots:
                dev_file = (Path(dev_dir) if dev_dir else folder.parent / "dev") / f"{subject}_dev.csv"
                if not dev_file.exists():
                    raise UserError(f"{shots}-shot MMLU needs the dev split: {dev_file} not found (give --dev-dir)")
                for q, ch, g, _, _ in _mmlu_rows(dev_file, opts)[:shots]:
                    text += _mmlu_prompt(q, ch) + " " + LETTERS[g] + "\n\n"
            prefixes[subject] = text
        return prefixes[subject]

    items = []
    for f in files:
        for q, ch, g, where, subject in _mmlu_rows(f, opts):
            items.append(MCItem(prefix(subject, f.parent) + _mmlu_prompt(q, ch), [LETTERS[i] for i in range(len(ch))],
                                g, subject, where))
    return items


# --- HellaSwag -----------------------------------------------------------------------------------

def _hs_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_query(activity_label: str, ctx_a: str, ctx_b: str) -> str:
    """lm-eval's HellaSwag prompt: the activity label, then ctx_a and ctx_b with ctx_b's first
    letter capitalised (str.capitalize, which also lower-cases the rest), then its clean-up."""
    return _hs_preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())


# The 6-line text form keeps only `activity_label: ctx_a ctx_b`. ctx_b, where there is one, is the
# lower-case start of the last sentence ("... on a roof. he"): everything after the last sentence
# end, when it starts with a lower-case letter. (Checked on real records in tests/test_eval.py.)
_CTX_B = re.compile(r"(?<=[.!?]) ([a-z][^.!?]*)$")


def split_hellaswag_context(line: str) -> tuple[str, str, str]:
    """`activity_label: ctx` -> (activity_label, ctx_a, ctx_b), undoing the text form's join."""
    label, _, ctx = line.strip().partition(": ")
    m = _CTX_B.search(ctx)
    return (label, ctx[:m.start()], m.group(1)) if m else (label, ctx, "")


def load_hellaswag(path: str | Path, opts: LoadOptions | None = None) -> list[MCItem]:
    """Official JSONL ({ctx_a, ctx_b, activity_label, endings, label}) or the 6-lines-per-item
    text variant (`label: ctx` / gold index / four endings). Both give lm-eval's prompts."""
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
                query = hellaswag_query(d["activity_label"], d["ctx_a"], d["ctx_b"])
                endings = list(d["endings"])
                gold = int(d["label"])
                label = d["activity_label"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                _bad(opts, where, f"not a HellaSwag record ({type(e).__name__}: {e})")
                continue
            if len(endings) != 4 or not 0 <= gold < 4:
                _bad(opts, where, f"expected 4 endings and a label 0-3, got {len(endings)} and {gold}")
                continue
            items.append(MCItem(query, [_hs_preprocess(e) for e in endings], gold, label, where))
        return items
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    if len(lines) % 6:
        _bad(opts, str(path), f"{len(lines)} lines is not a multiple of 6 (context, label, 4 endings)")
    for k in range(0, len(lines) - len(lines) % 6, 6):
        where = f"{path}:{k + 1}"
        block = lines[k:k + 6]
        if not block[1].strip().isdigit() or not 0 <= int(block[1]) < 4 or ": " not in block[0]:
            _bad(opts, where, f"not a HellaSwag block (`label: context`, gold 0-3, 4 endings): {block[0][:40]!r}")
            continue
        label, ctx_a, ctx_b = split_hellaswag_context(block[0])
        items.append(MCItem(hellaswag_query(label, ctx_a, ctx_b), [_hs_preprocess(e) for e in block[2:6]],
                            int(block[1]), label, where))
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
    """Recognise an eval file by its content (for decontamination): MMLU CSV (or a directory of
    them), ARC or HellaSwag JSONL, HellaSwag text. None for any other .txt/.md file (plain text).
    A file that looks like an eval set but cannot be read is an error, never zero items."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"eval file {p} not found")
    if p.is_dir() or p.suffix == ".csv":
        items = load_mmlu(p)
    elif p.suffix in (".jsonl", ".json"):
        with open(p, encoding="utf-8", errors="replace") as f:
            head = f.read(4000)  # enough to recognise the format; the file itself may be large
        if '"answerKey"' in head:
            items = load_arc(p)
        elif '"ctx_a"' in head and '"endings"' in head:
            items = load_hellaswag(p)
        else:
            raise UserError(f"{p}: not a recognised eval file (ARC JSONL with answerKey, HellaSwag JSONL with "
                            "ctx_a/endings); give MMLU CSV, ARC, HellaSwag, or plain .txt")
    elif "hellaswag" in p.name.lower():
        items = load_hellaswag(p)
    elif p.suffix in (".txt", ".md", ".text"):
        return None
    else:
        raise UserError(f"{p}: not a recognised eval file; give MMLU CSV, ARC or HellaSwag JSONL, or plain .txt")
    if not items:
        raise UserError(f"{p}: no eval items could be read")
    return items
