"""Preference pairs: read them from any of three formats, check them, and turn them into token ids.

A pair is one prompt and two responses to it, `chosen` (preferred by a person) and `rejected`.
Three file formats are read (the format is recognised from the records themselves):

    JSONL / JSON list of {"prompt", "chosen", "rejected"}
        prompt as text, or as chat messages [{"role", "content"}, ...] ending with a user turn
    the book's preference JSON (LLMs-from-scratch ch. 7): [{"instruction", "input", "output",
        "chosen", "rejected"}, ...]  (the prompt is instruction + input; `output` is ignored)
    Anthropic HH-RLHF: {"chosen", "rejected"}, each a whole transcript
        "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: <response>"
        The two share every turn but the last; the prompt is their shared prefix up to the last
        "\\n\\nAssistant:", parsed into messages, and the responses are what follows it.

Prompts are rendered with the checkpoint's template and encoded with the same builder SFT uses,
``encode(prompt) + encode(response) + [end]``, so chosen and rejected share the prompt ids exactly.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from scratchlm.errors import UserError
from scratchlm.finetune.templates import Template, check_messages, encode_prompt_response

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


@dataclass
class PreferencePair:
    prompt: list[dict]        # chat messages, ending with the user turn the responses answer
    chosen: str
    rejected: str
    where: str = ""           # "file line N" / "file record N", for error messages


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]     # response tokens + the template's end token
    rejected_ids: list[int]
    ref_chosen: float | None = None    # the reference's summed log-prob of chosen_ids (precomputed)
    ref_rejected: float | None = None


class BadRecord(UserError):
    """One pair is unusable; with on_bad_record="skip" it is counted and dropped."""


# --- reading ---------------------------------------------------------------------------------------

def _records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of a .json list or a .jsonl(.gz) file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from None
        for i, rec in enumerate(data):
            yield f"{path.name} record {i + 1}", rec
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path.name} line {n}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path.name} line {n}", BadRecord(f"{path.name} line {n}: not valid JSON ({e.msg})")


def split_transcript(chosen: str, rejected: str, where: str = "") -> PreferencePair:
    """An HH-RLHF pair of full transcripts -> prompt messages + the two final responses.

    The prompt is the shared prefix up to the *last* "\\n\\nAssistant:" inside it: the two
    transcripts may agree on the first words of their responses too, so the shared prefix alone
    can end mid-response."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        raise BadRecord(f"{where}: the transcripts share no '\\n\\nAssistant:' turn, so there is no response to "
                        f"compare; each must end with an assistant turn")
    prompt_text = chosen[:cut]
    a, b = chosen[cut + len(ASSISTANT):], rejected[cut + len(ASSISTANT):]
    if HUMAN in a or HUMAN in b or ASSISTANT in a or ASSISTANT in b:
        raise BadRecord(f"{where}: the transcripts differ before their last assistant turn; a pair must share "
                        f"every turn but the last")
    return PreferencePair(_transcript_messages(prompt_text, where), a.strip(), b.strip(), where)


def _transcript_messages(text: str, where: str) -> list[dict]:
    """"\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman: bye" -> user/assistant/user messages."""
    messages, pos = [], 0
    markers = {HUMAN: "user", ASSISTANT: "assistant"}
    while pos < len(text):
        starts = [(text.find(m, pos), m) for m in markers if text.find(m, pos) >= 0]
        if not starts:
            break
        start, marker = min(starts)
        if start > pos and messages:  # text between turns belongs to the previous turn
            messages[-1]["content"] += text[pos:start]
        nxt = [text.find(m, start + len(marker)) for m in markers]
        end = min([x for x in nxt if x >= 0], default=len(text))
        messages.append({"role": markers[marker], "content": text[start + len(marker):end].strip()})
        pos = end
    if not messages or messages[-1]["role"] != "user":
        raise BadRecord(f"{where}: the transcript has no human turn before its last assistant turn")
    return messages


def parse_record(rec: object, where: str) -> PreferencePair:
    """One record in any of the three formats -> a PreferencePair (or BadRecord)."""
    if isinstance(rec, BadRecord):
        raise rec
    if not isinstance(rec, dict):
        raise BadRecord(f"{where}: expected a JSON object with 'chosen' and 'rejected'")
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if missing:
        raise BadRecord(f"{where}: missing {', '.join(repr(k) for k in missing)}; a pair needs 'chosen' and "
                        f"'rejected' (and a 'prompt' or 'instruction', unless both are full HH-RLHF transcripts)")
    chosen, rejected = rec["chosen"], rec["rejected"]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise BadRecord(f"{where}: 'chosen' and 'rejected' must be strings")
    if "instruction" in rec:  # the book's format
        prompt = [{"role": "user", "content": str(rec["instruction"]), "input": str(rec.get("input") or "")}]
    elif "prompt" in rec:
        p = rec["prompt"]
        if isinstance(p, str):
            prompt = [{"role": "user", "content": p}]
        else:
            try:
                prompt = check_messages(p, f"{where}: prompt")
            except UserError as e:
                raise BadRecord(str(e)) from None
            if prompt[-1]["role"] != "user":
                raise BadRecord(f"{where}: the prompt messages must end with a user turn (the one the responses "
                                f"answer)")
    else:  # HH-RLHF full transcripts
        return split_transcript(chosen, rejected, where)
    return PreferencePair(prompt, chosen.strip(), rejected.strip(), where)


def check_pair(pair: PreferencePair) -> None:
    if not pair.chosen or not pair.rejected:
        which = "chosen" if not pair.chosen else "rejected"
        raise BadRecord(f"{pair.where}: the {which} response is empty; drop the pair")
    if pair.chosen == pair.rejected:
        raise BadRecord(f"{pair.where}: chosen and rejected are identical, so there is no preference to learn; "
                        f"drop the pair")


def _handle(e: BadRecord, on_bad_record: str, skipped: list) -> None:
    if on_bad_record != "skip":
        raise UserError(f"{e} (or pass --on-bad-record skip to count and drop such pairs)")
    skipped.append(str(e))


def load_pairs(path: str | Path, on_bad_record: str = "stop") -> tuple[list[PreferencePair], list[str]]:
    """All usable pairs in a file and the reasons for the skipped ones (on_bad_record="skip")."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"preference data {path} not found")
    pairs, skipped = [], []
    for where, rec in _records(path):
        try:
            pair = parse_record(rec, where)
            check_pair(pair)
            pairs.append(pair)
        except BadRecord as e:
            _handle(e, on_bad_record, skipped)
    if not pairs:
        raise UserError(f"{path} holds no usable preference pairs" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return pairs, skipped


# --- tokens ----------------------------------------------------------------------------------------

def encode_pairs(pairs: list[PreferencePair], tok, template: Template, context_length: int,
                 on_bad_record: str = "stop", skipped: list | None = None,
                 log: Callable[[str], None] = print) -> list[EncodedPair]:
    """Token ids for each pair. A prompt that leaves no room for a response in the context is a bad
    record; a response that overflows it is cut at the context (its end token then falls off)."""
    skipped = [] if skipped is None else skipped
    out, cut = [], 0
    for pair in pairs:
        try:
            try:
                prompt_ids, chosen_ids = encode_prompt_response(tok, template, pair.prompt, pair.chosen)
                _, rejected_ids = encode_prompt_response(tok, template, pair.prompt, pair.rejected)
            except BadRecord:
                raise
            except UserError as e:
                if "tokenizer has no special token" in str(e):
                    raise  # the template does not fit the tokenizer: every pair would fail
                raise BadRecord(f"{pair.where}: {e}") from None
            room = context_length - len(prompt_ids)
            if room < 2:
                raise BadRecord(f"{pair.where}: the prompt is {len(prompt_ids)} tokens, which leaves no room for a "
                                f"response in the context of {context_length}; shorten it or drop the pair")
            if len(chosen_ids) > room or len(rejected_ids) > room:
                cut += 1
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
            if chosen_ids == rejected_ids:
                raise BadRecord(f"{pair.where}: chosen and rejected are identical within the context of "
                                f"{context_length} tokens; drop the pair or raise the context length")
            out.append(EncodedPair(prompt_ids, chosen_ids, rejected_ids))
        except BadRecord as e:
            _handle(e, on_bad_record, skipped)
    if cut:
        log(f"{cut} of {len(out)} pairs have a response longer than the context ({context_length} tokens): "
            f"cut at the context")
    if not out:
        raise UserError(f"no usable preference pairs ({len(skipped)} skipped)")
    return out


def split_pairs(pairs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the first share held out: the same split for the same seed."""
    import random
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(pairs) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(pairs) > 1:
        n_val = 1
    if n_val >= len(pairs):
        raise UserError(f"dpo.val_fraction={val_fraction} leaves no training pairs out of {len(pairs)}")
    val = [pairs[i] for i in sorted(order[:n_val])]
    train = [pairs[i] for i in sorted(order[n_val:])]
    return train, val
