"""Export to a Hugging Face `tokenizer.json` that `tokenizers` and `transformers` load.

Two details make HF's BPE give our ids:
- HF merges by *pair* rank, we merge by the rank of the concatenated token. So every split
  (left, right) of a token whose halves are both tokens is listed as a merge, in the order of
  the token it makes; that way any pair HF could merge, we could merge too, at the same priority.
- `ignore_merges: true`: a chunk that is itself a token maps straight to it (tiktoken does this).
Bytes are written with GPT-2's byte→unicode table, the convention of HF's ByteLevel pieces.
Merges are written as "left right" strings, the form every `tokenizers` release reads (the list
form `["left", "right"]` is only read from 0.20 on); the byte→unicode table never yields a space,
so the separator is unambiguous. `ignore_merges` needs `tokenizers` >= 0.19.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from scratchlm.atomic import write_text

if TYPE_CHECKING:
    from scratchlm.tokenizer.bpe import Tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def to_hf_dict(tok: "Tokenizer") -> dict:
    b2u = bytes_to_unicode()

    def show(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {show(b): i for i, b in enumerate(tok.vocab)}
    merges = []
    for token_id, b in enumerate(tok.vocab):  # every multi-byte token (the bytes need no merge)
        for k in range(1, len(b)):
            left, right = tok.rank.get(b[:k]), tok.rank.get(b[k:])
            if left is not None and right is not None and left < token_id and right < token_id:
                merges.append(f"{show(b[:k])} {show(b[k:])}")
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s, i in tok.special_tokens.items()]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True, "vocab": vocab, "merges": merges},
    }


def export_hf(tok: "Tokenizer", directory: str | Path) -> Path:
    """Write tokenizer.json (+ a minimal tokenizer_config.json for transformers)."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    write_text(path, json.dumps(to_hf_dict(tok), ensure_ascii=False))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
              "pad_token": "<|pad|>" if "<|pad|>" in tok.special_tokens else None,
              "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False}
    write_text(directory / "tokenizer_config.json", json.dumps(config, indent=1))
    return path
