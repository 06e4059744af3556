"""The run report: report.md (+ report.html) with metrics, the loss curve, samples, config, timings."""

from __future__ import annotations

import html
import re
from pathlib import Path

from scratchlm.atomic import write_text
from scratchlm.train.logger import read_metrics


def plot_loss(metrics_path: Path, out_png: Path) -> Path | None:
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and r.get("type") != "eval"]
    evals = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "eval"]
    if not train:
        return None
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png


def table(rows: list[list], header: list[str]) -> str:
    def cell(c) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")  # a '|' or newline would break the row
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def code_block(text: str, lang: str = "") -> str:
    """A fenced code block that holds any text: the fence is longer than every run of backticks in
    it (CommonMark closes a fence only with one at least as long), so a sample that contains ```
    cannot end the block early and turn the rest of the report into its own Markdown."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}{'' if text.endswith(chr(10)) else chr(10)}{fence}"


def inline_text(text: str) -> str:
    """Text shown as itself inside Markdown: every ASCII punctuation character that Markdown (or
    raw HTML, e.g. <script>) could read as syntax is backslash-escaped; newlines become spaces."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>&~])", r"\\\1", text.replace("\n", " "))


def samples_section(samples: dict) -> str:
    """Each prompt's greedy and sampled continuation, verbatim: model text is data, never Markdown."""
    return "\n\n".join(f"**{inline_text(repr(p))}** (greedy)\n{code_block(p + g)}\n\n"
                       f"**{inline_text(repr(p))}** (temperature 0.8, top-k 50)\n{code_block(p + samples['sampled'][p])}"
                       for p, g in samples["greedy"].items())


def write_report(run_dir: Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """sections: (heading, markdown body). Writes report.md and report.html beside it."""
    md = f"# {title}\n\n" + "\n\n".join(f"## {h}\n\n{body}" for h, body in sections) + "\n"
    path = run_dir / "report.md"
    write_text(path, md)
    write_text(run_dir / "report.html", markdown_to_html(md, title))
    return path


def markdown_to_html(md: str, title: str) -> str:
    """CommonMark + tables, by markdown-it-py. Raw HTML in the text (a model's sample, say) is
    escaped, never passed through."""
    from markdown_it import MarkdownIt
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    style = ("body{font-family:sans-serif;max-width:900px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px}pre{background:#f6f6f6;padding:6px;overflow-x:auto}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n{body}</body></html>\n")


def _kind_label(kind: str) -> str:
    return "BPE" if kind == "bpe" else "byte"


def quickstart_sections(results: dict, index: dict, evals: list[dict], *, corpus: str, vocab_size: int,
                        plot: bool, config_toml: str) -> list[tuple[str, str]]:
    """The quickstart report's sections, from its results.json, the dataset index and the evaluations."""
    val, train, comp, mc = results["val"], results["train"], results["compression"], results["multiple_choice"]
    stats, splits = index["stats"], index["splits"]
    dedup = stats.get("dedup", {})
    unit = "spans" if index.get("split_by") == "span" else "documents"
    samples = results["samples"]
    return [
        ("Result", table([
            ["validation loss (nats/token)", f"{val['loss']:.4f}"],
            ["validation perplexity", f"{val['perplexity']:.2f}"],
            ["validation bits per byte", f"{val['bits_per_byte']:.4f}"],
            ["multiple choice (held-out line endings, 4 choices)",
             f"acc {mc['acc']:.3f} (95% CI {mc['acc_ci95'][0]:.3f}-{mc['acc_ci95'][1]:.3f}), "
             f"random {mc['random_baseline']:.2f}, n={mc['n']}" if mc else "not enough held-out text"],
            ["optimizer steps / tokens seen", f"{train['steps']} / {train['tokens']:,}"],
            ["training speed", f"{train['tokens_per_s']:,.0f} tokens/s ({train['precision']}, {train['device']})"],
        ], ["metric", "value"])),
        ("Data", table([
            ["corpus", corpus],
            ["documents read / kept after cleaning", f"{stats['clean']['docs_in']} / {stats['clean']['docs_out']}"],
            ["duplicates removed (exact / near)",
             f"{dedup.get('exact_duplicates', 0)} / {dedup.get('near_duplicates', 0)}"],
            ["train / val tokens", f"{splits['train']['tokens']:,} / {splits['val']['tokens']:,}"],
            [f"train / val {unit}", f"{splits['train']['documents']} / {splits['val']['documents']}"],
        ], ["", ""])),
        ("Tokenizer", (f"Character-level: {vocab_size} tokens, the 256 bytes + special tokens, no merges (one "
                       "token per ASCII character; a non-ASCII character is 2-4 byte tokens).\n\n"
                       if comp["kind"] == "char" else
                       f"Byte-level BPE, {vocab_size} tokens, trained on the training split.\n\n") + table([
            ["characters", comp["characters"]], ["character-level tokens", comp["char_level_tokens"]],
            [f"{_kind_label(comp['kind'])} tokens", comp["tokens"]],
            [f"characters per {_kind_label(comp['kind'])} token", comp["ratio"]],
        ], ["held-out passage", "length"])),
        ("Training", ("![loss curve](loss.png)\n\n" if plot else "") + table(
            [[e["step"], f"{e['val_loss']:.4f}", f"{e['val_ppl']:.2f}", f"{e['val_bpb']:.4f}"] for e in evals],
            ["step", "val loss", "val ppl", "val bits/byte"])),
        ("Samples", samples_section(samples)),
        ("Timings", table([[k, f"{v:.1f} s"] for k, v in results["timings_s"].items()], ["stage", "wall time"])),
        ("Config", code_block(config_toml, "toml")),
    ]
