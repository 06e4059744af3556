"""What to train for a time budget: the quickstart's settings, chosen from minutes, corpus and machine.

A fixed preset is wrong at both ends: in one minute a large model barely leaves its initial loss, in
thirty a small one stops improving long before the time is up. The rule below comes from measured
runs (experiments/sweep.py; the tables are in the README, "The best model per CPU-minute"):

1. Compute. The budget is turned into *reference minutes*: minutes x (this machine's matmul speed /
   the speed of the machine the sweep ran on). A machine twice as fast gets the model the sweep
   found best for twice the time.
2. Model size. The sweep's winner at the budgets it measured (1-3 minutes: the smallest shape);
   larger shapes only far beyond them, as an extrapolation of compute-optimal scaling (N grows
   with compute) that no run here has checked.
3. Vocabulary. A BPE vocabulary too large for the corpus spends its merges on rare words and
   names, whose embeddings see few updates and which held-out text rarely contains: on 1 MB of
   Shakespeare 1,024 tokens beat 4,096 by ~0.15 bits/byte on the held-out plays. The size grows with
   the square root of the corpus, between 512 and 8,192.
4. Compile. torch.compile cost ~20 s before the first step here (cold cache) and bought ~1.3x
   speed; below two minutes that is a loss, so short runs train eager (a rule from those two
   numbers, not a sweep).

Everything chosen here is printed, saved with the run (config.toml, results.json), and yields to an
explicit `--set`: a user who sets model.d_model gets exactly that.
"""

from __future__ import annotations

import math
import time

import torch

# The sweep's machine: its bf16 1024x1024 matmul speed, measured by `matmul_speed` (2 cores, AVX-512).
REFERENCE_FLOPS = 3.4e11

# Model shapes, smallest first, each used from `minutes` reference minutes up. Measured: at 1 and 3
# minutes on Tiny Shakespeare and 3 minutes on the KJV, the d=128 shape won or tied every time (d=192:
# +0.012, +0.007, +0.098 bits/byte; 256x6: +0.39). The larger entries are extrapolations (bigger
# models win with more compute, as in compute-optimal scaling), placed far above the measured
# budgets so that a speed measurement off by 3x on a busy machine cannot change a measured choice.
SIZES: list[tuple[float, dict]] = [
    (0.0, {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 384}),     # 1.0M params with 1,024 tokens
    (20.0, {"d_model": 192, "n_layers": 4, "n_heads": 6, "d_ff": 512}),    # 2.0M (extrapolated)
    (60.0, {"d_model": 256, "n_layers": 6, "n_heads": 8, "d_ff": 704}),    # 5.1M (extrapolated)
]


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
    chosen = SIZES[0][1]
    for start, shape in SIZES:
        if reference_minutes >= start:
            chosen = shape
    return dict(chosen)


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


def choose(minutes: float, corpus_bytes: int | None, flops: float) -> dict[str, object]:
    """Settings ("section.key" -> value) for a budget of `minutes` on a machine doing `flops` bf16
    FLOP/s, for a corpus of `corpus_bytes` (None: unknown).

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
