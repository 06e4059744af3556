"""The fast encoder: our own merges run by tiktoken's Rust BPE.

tiktoken merges, within each regex chunk, the adjacent pair whose concatenated bytes have the
lowest rank — exactly the rule of our reference encoder, with rank = token id (for an imported
vocabulary too: its ids are its ranks). So handing it our
vocabulary as `mergeable_ranks` gives identical ids (the tests check this on varied text), and
nothing is downloaded: tiktoken only fetches files when asked for a named encoding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import tiktoken

if TYPE_CHECKING:
    from scratchlm.tokenizer.bpe import Tokenizer


def tiktoken_encoding(tok: "Tokenizer") -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name=f"scratchlm-{tok.fingerprint}",
        pat_str=tok.pattern,
        mergeable_ranks={b: i for i, b in enumerate(tok.vocab)},
        special_tokens=dict(tok.special_tokens),
        explicit_n_vocab=tok.vocab_size,
    )
