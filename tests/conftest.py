"""Shared fixtures. Tests that need the shared data sets fail loudly if they are missing —
CI always has ../shared/data beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("SCRATCHLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared() -> Path:
    assert SHARED.exists(), f"shared data sets not found at {SHARED} (set SCRATCHLM_SHARED_DATA)"
    return SHARED


@pytest.fixture(scope="session")
def small_tokenizer(shared):
    from scratchlm.tokenizer import Tokenizer
    texts = [(shared / "tinyshakespeare.txt").read_text()[:300_000], (shared / "the-verdict.txt").read_text()]
    return Tokenizer.train(texts, 1024)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, shared):
    """A prepared dataset from Tiny Shakespeare (one document, so split by contiguous spans), vocab 512."""
    from scratchlm.config import DataConfig, TokenizerConfig
    from scratchlm.data.prepare import prepare
    out = tmp_path_factory.mktemp("ds") / "shakespeare"
    prepare(DataConfig(corpus=str(shared / "tinyshakespeare.txt"), val_fraction=0.1, max_chars=400_000),
            TokenizerConfig(vocab_size=512), out, log=lambda *_: None)
    return out
