"""What to train for a time budget: the quickstart's settings, chosen from minutes, corpus and machine.

A fixed preset is wrong at both ends: in one minute a large model barely leaves its initial loss, in
thirty a small one stops improving long before the time is up. The rule below comes from measured
runs (experiments/sweep.py; the tables are in the README, "The best model per CPU-minute"):

1. Compute. The budget is turned into *reference minutes*: minutes x (this machine's matmul speed /
   the speed of the machine the sweep ran on). A machine twice as fast gets the model the sweep
   found best for twice the time.
2. Model size. The sweep's winner at the budgets it measured (1-3 minutes: the smallest shape; 10
   minutes: the next); the largest shape only far beyond them, as an extrapolation of
   compute-optimal scaling (N grows with compute) that no run here has checked.
3. Repetition. A budget that reads a small corpus many times over needs regularisation: dropout
   when the chosen model would read the training tokens more than ~10 times, and no more than 12
   passes at all (the quickstart stops there: more time only made the model worse).
4. Vocabulary. A BPE vocabulary too large for the corpus spends its merges on rare words and
   names, whose embeddings see few updates and which held-out text rarely contains: on 1 MB of
   Shakespeare 1,024 tokens beat 4,096 by ~0.15 bits/byte on the held-out plays. The size grows with
   the square root of the corpus, between 512 and 8,192.
5. Compile. torch.compile cost ~20 s before the first step here (cold cache) and bought ~1.3x
   speed; below two minutes that is a loss, so short runs train eager (a rule from those two
   numbers, not a sweep).

Everything chosen here is printed, saved with the run (config.toml, results.json), and yields to an
explicit `--set`: a user who sets model.d_model gets exactly that.
"""

from __future__ import annotations

import math
import time

import torch

# The sweep's machine: its bf16 1024x1024 matmul speed as `matmul_speed` measures it (best of 5; the
# sweep's runs read 364-424 GFLOP/s, median ~400; 2 cores, AVX-512).
REFERENCE_FLOPS = 4.0e11

# Model shapes, smallest first, each used from `minutes` reference minutes up, with the tokens one
# reference minute trains at that size (measured: 7.3M tokens in 10 minutes at d=128, 4.5M at d=192).
# Measured (held-out bits/byte, README "The best model per CPU-minute"): at 1 and 3 minutes the d=128
# shape won or tied (Tiny Shakespeare: d=192 +0.012 and +0.009; 256x6 +0.39; KJV 3 min: d=192 +0.098);
# at 10 minutes d=192 was ahead on the KJV (-0.017, one run each) and level on Tiny Shakespeare (-0.004,
# both with dropout). The switch sits between those budgets, above the default 6 minutes: untested
# between 3 and 10. d=256 x 6 was run once, on the KJV at 30 minutes: 1.107 bits/byte against 1.112 for
# the d=192 this rule picks there (with dropout), level within single-run noise; so its switch at 60
# reference minutes is not too early, and may be late. On 1 MB of text no size helps past ~10 passes.
SIZES: list[tuple[float, dict, float]] = [
    (0.0, {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 384}, 0.73e6),    # 1.0M params with 1,024 tokens
    (8.0, {"d_model": 192, "n_layers": 4, "n_heads": 6, "d_ff": 512}, 0.45e6),    # 2.0M
    (60.0, {"d_model": 256, "n_layers": 6, "n_heads": 8, "d_ff": 704}, 0.2e6),    # 5.1M (extrapolated)
]

# Data repetition. A budget that reads a small corpus many times overfits. On Tiny Shakespeare (1 MB,
# 365k training tokens at 1,024 BPE tokens), held-out bits/byte:
#   d=128, 3 min:  5.7 passes 2.088 (3 runs; 2.092 after fused AdamW, 5.1-6.7 passes);   with dropout 0.1, 4.8 passes: 2.185
#   d=128, 10 min: 20 passes 2.131;             with dropout 0.1, 13.6 passes: 2.083
#   d=192 + dropout 0.1: 10 min, 8.3 passes 2.079; 30 min, 30 passes 2.125; stopped at 12 passes: 2.068
#   d=128, 30 min, stopped at 12 passes, no dropout: 2.128 (the stop alone does not save a long run)
#   d=192, 10 min: dropout 0.1 2.079 (8.3 passes); on the residual branches only (model.attn_dropout=0,
#   1.3x faster) 2.093 (11.4 passes); none 2.121 (stopped at 12): dropout pays; the two kinds are level
# Dropout costs 1/5 to 1/3 of the speed on a CPU (attention dropout leaves SDPA's fused kernel:
# experiments/dropout_speed.py), so the passes estimated here without it overstate what a dropout run
# reads (the KJV at 30 minutes: 12 estimated, 8.4 read). It pays only where repetition hurts more
# than the lost steps: between ~5 passes (it lost) and ~20 (it won); 10 is a guess between them. And
# past some point more passes hurt even with dropout: the quickstart stops at MAX_EPOCHS (a guess
# between 13.6, still good, and 30, worse), leaving the rest of the budget unused.
DROPOUT_AFTER_EPOCHS = 10.0
DROPOUT = 0.1
MAX_EPOCHS = 12.0


def vocab_for(corpus_bytes: int | None) -> int:
    """1,024 tokens for 1 MB of text, x2 for every 4x more text, a power of two in [512, 8192].

    >>> vocab_for(1_000_000), vocab_for(4_300_000), vocab_for(100_000), vocab_for(None)
    (1024, 2048, 512, 1024)
    """
    if not corpus_bytes:
        return 1024
    exact = 1024 * math.sqrt(corpus_bytes / 1e6)
    return int(min(max(2 ** round(math.log2(exact)), 512), 8192))


def size_for(reference_minutes: float) -> dict:
    """The model shape the sweep found best for this many reference minutes."""
    return dict(_size_row(reference_minutes)[1])


def _size_row(reference_minutes: float) -> tuple[float, dict, float]:
    return [row for row in SIZES if reference_minutes >= row[0]][-1] if reference_minutes >= 0 else SIZES[0]


def epochs(reference_minutes: float, train_tokens: int) -> float:
    """How many times the shape chosen for this budget reads `train_tokens` in it.

    >>> round(epochs(3, 365_176), 1), round(epochs(10, 365_176), 1)  # Tiny Shakespeare at 1,024 tokens
    (6.0, 12.3)
    """
    return reference_minutes * _size_row(reference_minutes)[2] / max(train_tokens, 1)


def repetition(minutes: float, flops: float, train_tokens: int, tokens_per_step: int) -> dict[str, object]:
    """Dropout and a step cap for the number of passes over the training tokens (the tokens exist
    only after the tokenizer has run, so this comes after `choose`).

    >>> repetition(3, REFERENCE_FLOPS, 365_176, 4096), repetition(10, REFERENCE_FLOPS, 365_176, 4096)
    ({'model.dropout': 0.0, 'train.max_steps': 1070}, {'model.dropout': 0.1, 'train.max_steps': 1070})
    """
    passes = epochs(minutes * flops / REFERENCE_FLOPS, train_tokens)
    return {"model.dropout": DROPOUT if passes > DROPOUT_AFTER_EPOCHS else 0.0,
            "train.max_steps": max(1, math.ceil(MAX_EPOCHS * train_tokens / tokens_per_step))}


def matmul_speed(device: torch.device | str = "cpu", n: int = 1024, repeats: int = 5) -> float:
    """bf16 matmul FLOP/s of the device that will train: the best of a few short timings (a busy
    moment can only make one slower)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    a @ b
    speeds = []
    for _ in range(repeats):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.1:
            a @ b
            reps += 1
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        speeds.append(2 * n ** 3 * reps / (time.perf_counter() - t0))
    return max(speeds)


# Every key the recipe sets: what a resumed run takes back from the config it started with.
KEYS = ("model.d_model", "model.n_layers", "model.n_heads", "model.d_ff", "model.dropout",
        "tokenizer.vocab_size", "train.compile", "train.max_steps")


def choose(minutes: float, corpus_bytes: int | None, flops: float) -> dict[str, object]:
    """Settings ("section.key" -> value) for a budget of `minutes` on a machine doing `flops` bf16
    FLOP/s, for a corpus of `corpus_bytes` (None: unknown). `repetition` adds the rest once the
    corpus is tokenized.

    >>> choose(3, 1_000_000, REFERENCE_FLOPS)["model.d_model"], choose(30, 1_000_000, REFERENCE_FLOPS)["model.d_model"]
    (128, 192)
    """
    reference_minutes = minutes * flops / REFERENCE_FLOPS
    settings: dict[str, object] = {f"model.{k}": v for k, v in size_for(reference_minutes).items()}
    settings["tokenizer.vocab_size"] = vocab_for(corpus_bytes)
    settings["train.compile"] = minutes >= 2.0
    return settings


KJV_TEXT_BYTES = 4_137_452  # the built-in corpus's text (measured once; reading it takes a second)


def corpus_bytes(corpus: str, max_chars: int = 0) -> int | None:
    """The corpus's size on disk, without reading it (None for a URL or a Hugging Face dataset)."""
    from scratchlm.data.sources import expand
    if corpus in ("builtin", "builtin:kjv"):
        size = KJV_TEXT_BYTES
    elif corpus.startswith(("hf:", "http://", "https://")):
        return None
    else:
        size = sum(f.stat().st_size for f in expand(corpus))
    return min(size, max_chars) if max_chars else size


SHAPE = {"model.d_model", "model.n_layers", "model.n_heads", "model.d_ff"}


def apply(cfg, settings: dict[str, object], user_keys: set[str]) -> dict[str, object]:
    """Set each chosen value on the config unless the user set that key; returns what was applied.
    The model's shape goes as a whole: a user who sets its width keeps the preset's heads and depth
    (the recipe's heads might not divide that width)."""
    applied = {}
    for key, value in settings.items():
        if key in user_keys or (key in SHAPE and user_keys & SHAPE):
            continue
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
        applied[key] = value
    return applied
