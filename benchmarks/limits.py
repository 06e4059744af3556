"""What this machine can do at best: the denominators every other table divides by.

- Memory read bandwidth: batch-1 decoding reads every weight once per token, so
  tokens/s x weight bytes per token can never beat it. Measured as a plain reduction (`torch.sum`)
  over a tensor far larger than the caches, with all threads.
- Matmul peaks (bf16 and fp32): training is matmuls, so tokens/s x FLOPs per token over the peak
  of the arithmetic used is the MFU. Measured on large square matmuls (best of several sizes).

Measured once per process (`measure()` caches), best of a few rounds: on a shared machine the
best round is the one least disturbed by neighbours.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from benchmarks.common import md_table
from scratchlm.model.packed import PackedLinear, can_pack


@dataclass
class Limits:
    read_bytes_per_s: float      # torch.sum over 256 MB of fp32
    gemv_bf16_bytes_per_s: float  # weights read per second by a bf16 (4096 x 16384) matrix-vector product
    gemv_packed_bytes_per_s: float  # the same product with the matrix in oneDNN's packed layout
    bf16_flops: float
    fp32_flops: float


_cached: Limits | None = None


def _best_seconds(fn, rounds: int, min_s: float = 0.2) -> float:
    """Best per-call seconds over `rounds` rounds of at least `min_s` each."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_s:
                break
        best = min(best, dt / n)
    return best


def read_bandwidth(mb: int = 256, rounds: int = 5) -> float:
    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    return x.numel() * 4 / _best_seconds(lambda: x.sum(), rounds)


def gemv_bandwidth(rounds: int = 5, packed: bool = False) -> float:
    w = torch.randn(16384, 4096, dtype=torch.bfloat16)  # 128 MB: far past the 32 MB L3
    v = torch.randn(1, 4096, dtype=torch.bfloat16)
    if packed:
        if not can_pack(w):
            return float("nan")
        layer = PackedLinear(torch.nn.Linear(4096, 16384, bias=False, dtype=torch.bfloat16))
        return w.numel() * 2 / _best_seconds(lambda: layer(v), rounds)
    return w.numel() * 2 / _best_seconds(lambda: torch.nn.functional.linear(v, w), rounds)


def matmul_peak(dtype: torch.dtype, rounds: int = 3) -> float:
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best = max(best, 2 * n ** 3 / _best_seconds(lambda: a @ b, rounds, min_s=0.3))
    return best


def measure() -> Limits:
    global _cached
    if _cached is None:
        _cached = Limits(read_bandwidth(), gemv_bandwidth(), gemv_bandwidth(packed=True), matmul_peak(torch.bfloat16), matmul_peak(torch.float32))
    return _cached


def run() -> str:
    lim = measure()
    rows = [["memory read bandwidth (torch.sum, 256 MB fp32)", f"{lim.read_bytes_per_s / 1e9:.1f} GB/s",
             "decode at batch 1 (weight bytes x tokens/s)"],
            ["bf16 GEMV weight read (16384 x 4096)", f"{lim.gemv_bf16_bytes_per_s / 1e9:.1f} GB/s",
             "what one torch bf16 matrix-vector product reaches"],
            ["bf16 GEMV, matrix in oneDNN's packed layout", f"{lim.gemv_packed_bytes_per_s / 1e9:.1f} GB/s",
             "the same product as our `--quantize bf16` decoding runs it"],
            ["bf16 matmul peak (best of 1024^3, 2048^3)", f"{lim.bf16_flops / 1e9:,.0f} GFLOP/s", "bf16 training (MFU)"],
            ["fp32 matmul peak (best of 1024^3, 2048^3)", f"{lim.fp32_flops / 1e9:,.0f} GFLOP/s", "fp32 training (MFU)"]]
    return (f"### This machine's limits ({torch.get_num_threads()} threads)\n\n"
            "Every fraction-of-limit column below divides by these numbers, measured in the same run.\n\n"
            + md_table(["limit", "measured", "bounds"], rows))


if __name__ == "__main__":
    print(run())
