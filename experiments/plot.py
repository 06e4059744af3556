"""Held-out bits/byte against model size, one line per corpus and time budget (the README's figure).

    python experiments/plot.py experiments/results/sweep.jsonl --out experiments/results/size_vs_budget.svg \\
        --tag size1 --tag final6 --tag kjv --tag recipe10 --tag drop --tag kjv10 --tag size3 --tag drop30 \\
        --tag recipe30 --tag kjv1 --tag default6 --tag kjv30 --tag drop10b

Each point is the mean of the runs with the same corpus, budget and settings (the run count is
printed beside points with more than one). Dropout runs get their own dashed line: at a budget that
reads the corpus many times, regularisation and size trade off (README, "The best model per CPU-minute").
Needs matplotlib (`pip install matplotlib`); the package does not.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def series_key(row: dict) -> tuple[str, float, float, bool]:
    dropout = next((float(s.split("=")[1]) for s in row["settings"] if s.startswith("model.dropout=")),
                   (row.get("recipe") or {}).get("model.dropout", 0.0))  # set by hand, or chosen by the recipe
    if dropout and "model.attn_dropout=0.0" in row["settings"]:
        dropout = -dropout  # on the residual branches only: a line of its own
    corpus = "KJV (built-in)" if row["corpus"] == "builtin" else "Tiny Shakespeare"
    cap = (row.get("recipe") or {}).get("train.max_steps")
    capped = cap is not None and row["steps"] >= cap  # the repetition rule's cap stopped it before the clock did
    return corpus, row["minutes"], dropout, capped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results")
    p.add_argument("--out", required=True, help=".svg or .png")
    p.add_argument("--tag", action="append", default=[], help="runs to plot (default: all)")
    p.add_argument("--skip", action="append", default=[], help="leave out runs with this setting")
    a = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        rows = [json.loads(line) for line in open(a.results) if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"cannot read {a.results}: {e} (give the JSONL file experiments/sweep.py --results wrote)")
    rows = [r for r in rows if (not a.tag or r["tag"] in a.tag) and not set(a.skip) & set(r["settings"])]
    # mean over repeats of one setting, then one line per (corpus, minutes, dropout)
    points: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        points[series_key(r)][r["params_m"]].append(r.get("heldout_bpb") or r["val_bpb"])
    corpora = sorted({k[0] for k in points})
    fig, axes = plt.subplots(1, len(corpora), figsize=(5.2 * len(corpora), 4.2), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        for (c, minutes, dropout, capped), by_size in sorted(points.items()):
            if c != corpus:
                continue
            sizes = sorted(by_size)
            means = [statistics.mean(by_size[s]) for s in sizes]
            label = (f"{minutes:g} min" + (f", dropout {abs(dropout):g}" if dropout else "")
                     + (" (residual only)" if dropout < 0 else "")
                     + (", stopped at 12 passes" if capped else ""))
            line, = ax.plot(sizes, means, marker="o", linestyle="--" if dropout else "-", label=label)
            for s, m in zip(sizes, means):
                if len(by_size[s]) > 1:
                    ax.annotate(f"{len(by_size[s])} runs", (s, m), textcoords="offset points", xytext=(4, 4),
                                fontsize=7, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 3, 5], labels=["1M", "2M", "3M", "5M"])
        ax.minorticks_off()
        ax.set_xlabel("parameters (log scale)")
        ax.set_ylabel("validation bits/byte (lower is better)")
        ax.set_title(corpus)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("The quickstart's recipe on 2 CPU cores: bits/byte on text held out from training, by model size "
                 "and time budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(a.out, metadata={"Date": None} if a.out.endswith(".svg") else None)
    print(f"wrote {a.out}: {sum(len(v) for v in points.values())} points, {len(points)} lines")


if __name__ == "__main__":
    main()
