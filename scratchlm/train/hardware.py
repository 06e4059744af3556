"""What the hardware could do at best: the denominator of MFU (model FLOPs utilisation).

MFU = achieved training FLOP/s / peak FLOP/s. It is only comparable between runs (and with
published numbers: nanoGPT, PaLM, Megatron) when the peak is a stated, standard number: the
vendor's datasheet figure for *dense* math (no 2:4 sparsity) in the arithmetic the matmuls use.
On a CPU, or a GPU not in the table, there is no such number, so we measure a large matmul and
say so: that MFU is relative to this machine, not comparable with a GPU's.

Sources (NVIDIA datasheets / architecture whitepapers; FLOP/s, dense):
    A100 (SXM and PCIe, 40/80 GB)   A100 datasheet: BF16 312 T, TF32 156 T, FP32 19.5 T
    H100 SXM                        H100 datasheet: BF16 989 T, TF32 494 T, FP32 67 T
    H100 PCIe                       H100 datasheet: BF16 756 T, TF32 378 T, FP32 51 T
    H200 SXM                        H200 datasheet: BF16 989 T, TF32 494 T, FP32 67 T
    L4                              L4 datasheet:   BF16 121 T, TF32 60 T,  FP32 30.3 T
    RTX 4090                        Ada whitepaper: BF16 (FP32 accumulate) 165 T, TF32 82.6 T, FP32 82.6 T
(The datasheets print the sparse figure first, twice the dense one; the numbers here are dense.)
"""

from __future__ import annotations

import re
import time

import torch

# name pattern (searched in torch.cuda.get_device_name) -> (label, {arithmetic: FLOP/s})
DATASHEET: list[tuple[str, str, dict[str, float]]] = [
    (r"H200", "H200 SXM", {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    (r"H100.*PCIe", "H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (r"H100", "H100 SXM", {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    (r"A100", "A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"\bL4\b", "L4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"RTX 4090", "RTX 4090", {"bf16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),
]

_measured: dict[tuple[str, str], float] = {}


def matmul_arithmetic(device: torch.device, precision: str) -> str:
    """The arithmetic fp32/bf16 training actually runs its matmuls in: fp32 on a GPU that allows
    TF32 runs on the tensor cores in TF32."""
    if precision == "bf16":
        return "bf16"
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def datasheet_peak(gpu_name: str, arithmetic: str) -> tuple[float, str] | None:
    for pattern, label, peaks in DATASHEET:
        if re.search(pattern, gpu_name):
            return peaks[arithmetic], f"datasheet {label} {arithmetic} dense"
    return None


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from), e.g. (989e12, "datasheet H100 SXM bf16 dense")."""
    arithmetic = matmul_arithmetic(device, precision)
    if device.type == "cuda":
        found = datasheet_peak(torch.cuda.get_device_name(device), arithmetic)
        if found:
            return found
    key = (str(device), arithmetic)
    if key not in _measured:  # measured once per process: it costs about half a second
        _measured[key] = measure_matmul_flops(device, arithmetic)
    where = "this CPU" if device.type == "cpu" else f"this {device.type} device (not in the datasheet table)"
    return _measured[key], f"measured on {where} ({arithmetic} 1024x1024 matmul)"


def measure_matmul_flops(device: torch.device, arithmetic: str, n: int = 1024) -> float:
    """A quick matmul benchmark, for machines without a datasheet number."""
    dtype = torch.bfloat16 if arithmetic == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.25:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def keep_freed_memory() -> bool:
    """Let this process keep the memory it frees, for reuse, instead of handing it back to the OS (glibc).

    A training step allocates and frees the same large tensors every step, and PyTorch's CPU allocator
    keeps no cache of its own: glibc serves blocks over 32 MB (and, once it has trimmed its heap, smaller
    ones) straight from the OS, so every step pays the page faults of touching them for the first time
    again. Keeping freed memory trades ~5% more peak memory (1.84 -> 1.93 GB) for a faster step on the
    small shape (eager: 1,227-1,305 -> 1,451-1,452 tokens/s; compiled: 1,514-1,609 -> 1,607-1,626).
    jemalloc or tcmalloc (LD_PRELOAD) do the same. Process-wide; returns whether it applied (glibc only)."""
    import ctypes
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    # no block straight from the OS (mmap), and never give the heap's free top back (trim)
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))  # a C int
