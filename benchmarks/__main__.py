"""Run every benchmark (or those named) and write benchmarks/RESULTS.md.

    python -m benchmarks                 # all
    python -m benchmarks tokenizer dedup # some
"""

from __future__ import annotations

import importlib
import platform
import sys
import time
from pathlib import Path

import torch

ALL = ["limits", "tokenizer", "dedup", "train_step", "generate", "serve"]


def main(names: list[str]) -> None:
    names = names or ALL
    results_path = Path(__file__).parent / "RESULTS.md"
    sections = {}
    if results_path.exists():  # keep the other benchmarks' latest tables
        current = None
        for block in results_path.read_text().split("\n<!-- bench: ")[1:]:
            current, body = block.split(" -->\n", 1)
            sections[current] = body.strip()
    t_all = time.time()
    for name in names:
        t = time.time()
        print(f"== {name}", flush=True)
        table = importlib.import_module(f"benchmarks.{name}").run()
        print(table, flush=True)
        sections[name] = table + f"\n\n(run on {time.strftime('%Y-%m-%d')}, {time.time() - t:.0f} s)"
    head = (f"# Benchmark results\n\nMachine: {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}. Regenerate with `make bench`.\n")
    if set(names) >= set(ALL):
        head += (f"\nEvery table below comes from one run of `make bench` ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
                 f"{(time.time() - t_all) / 60:.0f} minutes), so each fraction of a limit divides by the limits "
                 "measured in that same run.")
    else:
        head += f"\nSections from separate runs: {', '.join(names)} re-run on {time.strftime('%Y-%m-%d')}; the rest kept."
    head += (" Every comparison alternates the sides within a run and keeps each side's best round, so a "
             "neighbour's load slows both sides alike and ratios are steadier than absolutes.\n")
    # "notes" is written by hand (what moved each number, what did not work) and kept as it is.
    body = "".join(f"\n<!-- bench: {n} -->\n{sections[n]}\n" for n in ALL + ["notes"] if n in sections)
    results_path.write_text(head + body)
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
