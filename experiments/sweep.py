"""Run quickstarts over a grid of settings and time budgets; score each on a held-out text.

This is how the quickstart's budget rule (scratchlm/train/recipe.py) and the README's sweep and
ablation tables were made. Each run is the user's command,

    scratchlm quickstart --corpus TRAIN --minutes M --out DIR [--set k=v ...]

followed, when a held-out text is given, by

    scratchlm eval perplexity --ckpt DIR --data HELDOUT

and one JSON line per run is appended to --results (settings, steps, tokens, bits/byte, wall time).
Runs are sequential: on a small machine two timed runs at once would measure nothing.

    python experiments/sweep.py --corpus ts_train.txt --heldout ts_val.txt --minutes 1 3 \\
        --grid "model.d_model=128,192 model.n_layers=4" --set tokenizer.vocab_size=1024 \\
        --results experiments/results/sweep.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path


def grid(spec: str) -> list[list[str]]:
    """ "a.b=1,2 c.d=x" -> [["a.b=1", "c.d=x"], ["a.b=2", "c.d=x"]]"""
    axes = []
    for item in spec.split():
        key, values = item.split("=", 1)
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def slug(settings: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9=.+-]+", "_", "+".join(s.split(".", 1)[-1] for s in settings)) or "default"


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--heldout", default="", help="text scored with eval perplexity (else the run's val split)")
    p.add_argument("--minutes", type=float, nargs="+", required=True)
    p.add_argument("--grid", default="", help='space-separated "section.key=v1,v2" axes')
    p.add_argument("--set", action="append", default=[], help="fixed override for every run")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--recipe", action="store_true",
                   help="let the quickstart choose its settings for the budget (default: --fixed, the preset + --set)")
    p.add_argument("--tag", default="", help="label stored with each result")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--results", default="experiments/results/sweep.jsonl")
    a = p.parse_args()
    out, results = Path(a.out), Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "scratchlm"]
    for minutes, settings, rep in itertools.product(a.minutes, grid(a.grid), range(a.repeats)):
        overrides = a.set + settings
        # one prepared dataset per tokenizer setting, shared by every run that uses it
        tok = [s for s in overrides if s.startswith("tokenizer.")] + (["recipe"] if a.recipe else [])
        data_dir = out / ("data_" + Path(a.corpus).stem + "_" + slug(tok))
        name = f"{Path(a.corpus).stem}_{minutes:g}m_{slug(overrides)}_r{rep}"
        run_dir = out / name
        if (run_dir / "results.json").exists():
            print(f"skip {name} (done)")
            continue
        t0 = time.time()
        cmd = exe + ["quickstart", "--corpus", a.corpus, "--minutes", f"{minutes:g}", "--out", str(run_dir),
                     "--set", f"data.dataset_dir={data_dir}"] + ([] if a.recipe else ["--fixed"])
        for s in overrides:
            cmd += ["--set", s]
        run(cmd, out / f"{name}.log")
        res = json.loads((run_dir / "results.json").read_text())
        row = {"tag": a.tag, "recipe": res.get("settings_chosen") if a.recipe else None, "corpus": Path(a.corpus).name, "minutes": minutes, "settings": overrides, "repeat": rep,
               "steps": res["train"]["steps"], "tokens": res["train"]["tokens"],
               "tokens_per_s": round(res["train"]["tokens_per_s"]), "val_bpb": round(res["val"]["bits_per_byte"], 4),
               "wall_s": round(time.time() - t0, 1)}
        log = (out / f"{name}.log").read_text()
        row["params_m"] = float(re.findall(r"model: ([0-9.]+)M parameters", log)[-1])
        if a.heldout:
            score = subprocess.run(exe + ["eval", "perplexity", "--ckpt", str(run_dir), "--data", a.heldout],
                                   capture_output=True, text=True, check=True)
            row["heldout_bpb"] = round(json.loads(score.stdout)["bits_per_byte"], 4)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
