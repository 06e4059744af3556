"""Byte-level BPE tokenizer, trained from scratch. Start reading at `bpe.py`."""

from scratchlm.tokenizer.bpe import (DEFAULT_SPECIAL_TOKENS, ENDOFTEXT, GPT2_PATTERN, GPT4_PATTERN,
                                     PATTERNS, Tokenizer, compression_stats)

__all__ = ["Tokenizer", "GPT2_PATTERN", "GPT4_PATTERN", "PATTERNS", "DEFAULT_SPECIAL_TOKENS", "ENDOFTEXT", "compression_stats"]
