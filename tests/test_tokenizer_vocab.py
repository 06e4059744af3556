"""A tokenizer with an explicit vocabulary (the id layout of an imported tokenizer)."""

import pytest

from scratchlm.errors import UserError
from scratchlm.tokenizer import Tokenizer


def shuffled_bytes_tokenizer() -> Tokenizer:
    # Bytes in reverse order, then merges: ids are not the byte values, as in GPT-2.
    vocab = [bytes([255 - i]) for i in range(256)] + [b"th", b"the", b" the", b"e "]
    return Tokenizer([], special_tokens={"<|eot|>": 261, "<|x|>": 260}, vocab=vocab, eot_token="<|eot|>")


def test_explicit_vocab_encodes_saves_and_loads(tmp_path):
    tok = shuffled_bytes_tokenizer()
    text = "the theme of the day<|eot|>"
    ids = tok.encode(text, allowed_special="all")
    assert ids[:2] == [257, 258]  # "the", " the|me": merges by id, bytes at their shuffled ids
    assert ids == tok.encode_python(text, allowed_special="all") and ids[-1] == 261 == tok.eot_id
    assert tok.decode(ids) == text
    assert tok.encode("a") == [255 - ord("a")]
    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert back.fingerprint == tok.fingerprint and back.encode(text, allowed_special="all") == ids
    assert back.eot_token == "<|eot|>"


def test_merge_based_tokenizers_keep_format_1(tmp_path):
    tok = Tokenizer([(116, 104)], special_tokens=["<|endoftext|>"])
    assert "vocab" not in tok.to_dict() and tok.to_dict()["version"] == 1
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).fingerprint == tok.fingerprint


def test_explicit_vocab_refusals():
    with pytest.raises(UserError, match="lacks 1 of the 256 byte tokens"):
        Tokenizer([], special_tokens=[], vocab=[bytes([i]) for i in range(255)] + [b"ab"])
    with pytest.raises(UserError, match="special token ids must be 256..256"):
        Tokenizer([], special_tokens={"<|endoftext|>": 300}, vocab=[bytes([i]) for i in range(256)])
    with pytest.raises(UserError, match="two tokens with the same bytes"):
        Tokenizer([], special_tokens=[], vocab=[bytes([i]) for i in range(256)] + [b"a"])
