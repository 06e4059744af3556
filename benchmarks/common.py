"""Helpers shared by the benchmarks: the corpus, timing, and markdown tables."""

from __future__ import annotations

import os
import time
from pathlib import Path

SHARED = Path(os.environ.get("SCRATCHLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def gutenberg_texts(min_mb: float = 20.0) -> list[str]:
    """Whole books from ../shared/data/gutenberg, in a fixed order, until at least min_mb."""
    from scratchlm.data.clean import strip_gutenberg
    folder = SHARED / "gutenberg"
    if not folder.exists():
        raise SystemExit(f"benchmark corpus not found: {folder}")
    texts, size = [], 0
    for path in sorted(folder.glob("*.txt")):
        t = strip_gutenberg(path.read_text(encoding="utf-8-sig")).replace("\r\n", "\n")
        texts.append(t)
        size += len(t.encode())
        if size >= min_mb * 1e6:
            break
    return texts


def best_of(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def timed_cpu(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process and its finished children, fn's result): CPU / wall
    over the number of cores is the share of the machine a step kept busy."""
    import resource

    def cpu() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
    c0, t0 = cpu(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, cpu() - c0, out


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
