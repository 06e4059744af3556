"""Markdown tables from experiments/sweep.py's JSON lines: every run, and mean/spread of repeats.

    python experiments/tables.py experiments/results/sweep.jsonl [--tag TAG ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--tag", action="append", default=[])
    a = p.parse_args()
    rows = [json.loads(line) for line in open(a.results) if line.strip()]
    rows = [r for r in rows if not a.tag or r["tag"] in a.tag]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["tag"], r["corpus"], r["minutes"], tuple(r["settings"]))].append(r)
    print("| tag | corpus | min | settings | params (M) | steps | tok/s | bits/byte (held-out) | runs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (tag, corpus, minutes, settings), runs in groups.items():
        bpb = [r.get("heldout_bpb", r["val_bpb"]) for r in runs]
        spread = f" ± {(max(bpb) - min(bpb)) / 2:.3f}" if len(bpb) > 1 else ""
        print(f"| {tag} | {corpus} | {minutes:g} | {' '.join(settings) or '(preset)'} | {runs[0]['params_m']:.2f} | "
              f"{statistics.mean(r['steps'] for r in runs):.0f} | {statistics.mean(r['tokens_per_s'] for r in runs):,.0f} | "
              f"{statistics.mean(bpb):.3f}{spread} | {len(runs)} |")


if __name__ == "__main__":
    main()
