"""Our tokenizer <-> a Hugging Face `tokenizer.json` (+ `tokenizer_config.json` with the chat template).

Export reuses `scratchlm.tokenizer.hf_export` (the BPE itself) and adds what `AutoTokenizer` and
`apply_chat_template` need: special tokens by role and the template as Jinja.

Import reads a byte-level BPE `tokenizer.json` (GPT-2's, Llama 3's, ...) into a `Tokenizer` with
the *same ids*. Its byte tokens are not ids 0..255 in byte order (GPT-2 starts with "!"), so the
tokenizer is built from an explicit vocabulary, and the id of each token is its merge rank, which
is how these vocabularies were built. That assumption is checked, not trusted: the merges must make
tokens in id order, and (when `tokenizers` is installed) a probe text must encode to the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from scratchlm.atomic import write_text
from scratchlm.errors import UserError
from scratchlm.finetune.templates import ALPACA_PREAMBLE, Template
from scratchlm.tokenizer import ENDOFTEXT, GPT2_PATTERN, Tokenizer
from scratchlm.tokenizer.hf_export import bytes_to_unicode, to_hf_dict

PAD = "<|pad|>"

# Text that exercises the pre-tokenizer and the merges: contractions, digits, code, whitespace runs,
# emoji and CJK (multi-byte UTF-8).
PROBE = ("Hello, world! It's 2024; we'll test 12345 numbers.\n\n  def f(x):\n\treturn x**2  # ok\n"
         "naïve café — 日本語のテキスト 🤖🎉 «quotes» I'M HERE   \n")


# --- export -----------------------------------------------------------------------------------

def _jinja_str(s: str) -> str:
    """A Python string as a Jinja string literal (Jinja reads the same escapes)."""
    return json.dumps(s, ensure_ascii=False).replace("{", "\\u007b").replace("}", "\\u007d")


def chat_template_jinja(template: Template) -> str:
    """Jinja that renders exactly `template.render(messages, add_generation_prompt)`, refusing
    (raise_exception) what `render` refuses."""
    end = _jinja_str(template.end_token)
    if template.name == "chat":
        return (
            "{%- for m in messages -%}"
            "{%- if m['role'] not in ['system', 'user', 'assistant'] -%}"
            "{{ raise_exception('unknown role ' + m['role'] + '; roles are system, user, assistant') }}"
            "{%- elif m['role'] == 'assistant' -%}"
            "{{- '<|assistant|>\\n' + m['content'] + " + end + " -}}"
            "{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}"
            "{%- else -%}"
            "{{- '<|' + m['role'] + '|>\\n' + m['content'] + " + end + " + '\\n' -}}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}"
            "{%- if messages[-1]['role'] == 'assistant' -%}"
            "{{ raise_exception('add_generation_prompt needs a conversation that ends with a user turn') }}"
            "{%- endif -%}"
            "{{- '<|assistant|>\\n' -}}"
            "{%- elif messages[-1]['role'] != 'assistant' -%}"
            "{{ raise_exception('the conversation ends with a user turn: there is no response to train on') }}"
            "{%- endif -%}"
        )
    if template.name == "alpaca":
        return (
            "{%- if messages[0]['role'] != 'user' or messages | length > 2"
            " or (messages | length == 2 and messages[1]['role'] != 'assistant') -%}"
            "{{ raise_exception('the alpaca template takes one user turn and at most one assistant turn') }}"
            "{%- endif -%}"
            "{{- " + _jinja_str(ALPACA_PREAMBLE + "\n\n### Instruction:\n") + " + messages[0]['content'] -}}"
            "{%- if messages[0]['input'] is defined and messages[0]['input'] -%}"
            "{{- '\\n\\n### Input:\\n' + messages[0]['input'] -}}"
            "{%- endif -%}"
            "{{- '\\n\\n### Response:\\n' -}}"
            "{%- if messages | length == 2 -%}"
            "{%- if add_generation_prompt -%}"
            "{{ raise_exception('add_generation_prompt needs a conversation that ends with a user turn') }}"
            "{%- endif -%}"
            "{{- messages[1]['content'] + " + end + " -}}"
            "{%- elif not add_generation_prompt -%}"
            "{{ raise_exception('the conversation has no assistant turn to train on') }}"
            "{%- endif -%}"
        )
    raise UserError(f"template {template.name!r} has no Jinja version; export without a template")


def stop_token_ids(tok: Tokenizer, template: Template | None) -> list[int]:
    """<|endoftext|>, and the template's end-of-turn token: generation stops at either."""
    ids = [tok.eot_id]
    if template is not None and template.end_token in tok.special_tokens:
        ids.append(tok.special_tokens[template.end_token])
    return sorted(set(ids))


def pad_token(tok: Tokenizer) -> str:
    return PAD if PAD in tok.special_tokens else tok.eot_token


def write_tokenizer_files(tok: Tokenizer, directory: Path, template: Template | None, max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens, chat template) into `directory`."""
    if template is not None:
        missing = [s for s in template.special_tokens if s not in tok.special_tokens]
        if missing:
            raise UserError(f"the {template.name} template needs special token(s) {', '.join(missing)} that this "
                            f"tokenizer lacks; export with another template or none")
    write_text(directory / "tokenizer.json", json.dumps(to_hf_dict(tok), ensure_ascii=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.eot_token, "eos_token": tok.eot_token, "pad_token": pad_token(tok), "unk_token": None,
        "additional_special_tokens": [s for s in tok.special_tokens if s not in (tok.eot_token, PAD)],
        "add_bos_token": False, "add_eos_token": False,
        "model_max_length": max_length, "clean_up_tokenization_spaces": False,
    }
    if template is not None:
        config["chat_template"] = chat_template_jinja(template)
    write_text(directory / "tokenizer_config.json", json.dumps(config, indent=1, ensure_ascii=False))


# --- import -----------------------------------------------------------------------------------

def _pattern_of(pre: dict | None, where: Path) -> str:
    """The pre-tokenizer regex of a byte-level tokenizer.json, or a one-line refusal."""
    if pre and pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise UserError(f"{where}: ByteLevel add_prefix_space=true is not supported (scratchlm never adds a space)")
        if pre.get("use_regex", True):
            return GPT2_PATTERN
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
                and "Regex" in parts[0].get("pattern", {}) and parts[0].get("behavior") == "Isolated"
                and not parts[0].get("invert") and not parts[1].get("use_regex", True)
                and not parts[1].get("add_prefix_space")):
            return parts[0]["pattern"]["Regex"]
    kind = pre.get("type") if pre else None
    raise UserError(f"{where}: pre-tokenizer {kind!r} is not byte-level BPE's (ByteLevel, or one regex Split then "
                    f"ByteLevel); scratchlm imports only byte-level BPE tokenizers")


def tokenizer_from_hf(directory: str | Path) -> Tokenizer:
    """A scratchlm Tokenizer with the same ids as `directory/tokenizer.json`."""
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        raise UserError(f"no tokenizer.json in {directory}; scratchlm imports tokenizers in the Hugging Face "
                        f"tokenizer.json format only")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        model = d["model"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a readable tokenizer.json ({type(e).__name__})") from None
    if model.get("type") != "BPE" or model.get("byte_fallback") or not isinstance(model.get("vocab"), dict):
        raise UserError(f"{path}: the model is {model.get('type')!r}"
                        f"{' with byte_fallback' if model.get('byte_fallback') else ''}, not byte-level BPE "
                        f"(SentencePiece-style tokenizers cannot be imported)")
    if d.get("normalizer"):
        raise UserError(f"{path}: normalizer {d['normalizer'].get('type')!r} is not supported "
                        f"(byte-level BPE has none)")
    pattern = _pattern_of(d.get("pre_tokenizer"), path)

    u2b = {u: b for b, u in bytes_to_unicode().items()}
    specials = {t["content"]: t["id"] for t in d.get("added_tokens", []) if t.get("special", True)}
    plain_added = [t["content"] for t in d.get("added_tokens", [])
                   if not t.get("special", True) and t["content"] not in model["vocab"]]
    if plain_added:
        raise UserError(f"{path}: non-special added tokens ({plain_added[0]!r}, ...) are not supported")
    special_ids = set(specials.values())
    ordinary = {i: t for t, i in model["vocab"].items() if i not in special_ids}
    n = len(ordinary)
    if set(ordinary) != set(range(n)):
        raise UserError(f"{path}: ordinary token ids are not 0..{n - 1} with the special tokens after them; "
                        f"scratchlm cannot hold this id layout")
    try:
        vocab = [bytes(u2b[c] for c in ordinary[i]) for i in range(n)]
    except KeyError as e:
        raise UserError(f"{path}: token characters like {e.args[0]!r} are not byte-level BPE's byte alphabet") from None

    # The id of each token must be its merge rank: merges must create tokens in increasing id order.
    rank = {b: i for i, b in enumerate(vocab)}
    last = -1
    for m in model.get("merges", []):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        made = rank.get(bytes(u2b[c] for c in left + right))
        if made is None:
            raise UserError(f"{path}: merge {left!r} + {right!r} makes a token that is not in the vocabulary")
        if made < last:
            raise UserError(f"{path}: token ids are not in merge order (merge {left!r} + {right!r} makes id {made} "
                            f"after id {last}); scratchlm's encoder needs id = merge rank")
        last = max(last, made)
    tok = Tokenizer([], pattern=pattern, special_tokens=specials, vocab=vocab,
                    eot_token=_eos_token(directory, specials))
    _check_probe(tok, path)
    return tok


def _eos_token(directory: str | Path, specials: dict[str, int]) -> str:
    """The end-of-text token: tokenizer_config.json's eos_token (GPT-2: <|endoftext|>, Llama 3:
    <|end_of_text|>), which scratchlm uses as its document separator."""
    eos = None
    path = Path(directory) / "tokenizer_config.json"
    if path.exists():
        try:
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            raise UserError(f"{path} is not readable JSON") from None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    eos = eos or ENDOFTEXT
    if eos not in specials:
        raise UserError(f"{directory}: the end-of-text token {eos!r} is not a special token of tokenizer.json; "
                        f"scratchlm needs one to separate documents")
    return eos


def _check_probe(tok: Tokenizer, path: Path) -> None:
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:  # the check needs the `hf` extra; the structural checks above still ran
        return
    theirs = HFTokenizer.from_file(str(path)).encode(PROBE, add_special_tokens=False).ids
    ours = tok.encode_ordinary(PROBE)
    if theirs != ours:
        at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        raise UserError(f"{path}: scratchlm would tokenize differently from this tokenizer.json (first difference at "
                        f"token {at}); it cannot be imported with identical ids")
