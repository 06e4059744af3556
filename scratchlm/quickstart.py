"""`scratchlm quickstart`: the whole pipeline on one corpus, ending with a report.

corpus -> clean + dedup -> BPE (or char-level) tokenizer (and how much it compresses) -> train/val shards
       -> pretrain a small GPT (progress, evals, samples) -> val loss / perplexity / bits-per-byte,
          a multiple-choice check, samples -> runs/quickstart/report.md

Every stage is a library call a user can make alone; this file only strings them together.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from scratchlm.atomic import save_json
from scratchlm.config import load_config, to_toml, validate
from scratchlm.data.prepare import prepare
from scratchlm.data.shards import INDEX, load_split, read_index
from scratchlm.errors import UserError
from scratchlm.eval.cloze import build_cloze_items
from scratchlm.eval.multiple_choice import fits, score_items
from scratchlm.eval.perplexity import evaluate_tokens, token_byte_lengths
from scratchlm.generate import SamplingConfig, generate
from scratchlm.report import plot_loss, quickstart_sections, write_report
from scratchlm.tokenizer import Tokenizer, compression_stats
from scratchlm.train import checkpoint as ckpt
from scratchlm.train import recipe
from scratchlm.train.precision import autocast, pick_device
from scratchlm.train.trainer import pretrain


def val_documents(dataset_dir: Path, tok: Tokenizer, lines: int = 0, min_docs: int = 4,
                  max_tokens: int = 2_000_000, chunk: int = 1 << 16) -> list[str]:
    """The first documents of the val split, read a chunk at a time until there are `min_docs`
    of them holding `lines` lines of 8+ words (what the cloze items need), or `max_tokens` have
    been read: never the whole split, which can be far larger than what the report uses."""
    val = load_split(dataset_dir, "val", tokenizer=tok)  # checks the shards' tokenizer fingerprint
    docs: list[str] = []
    have_lines, pending = 0, np.zeros(0, dtype=np.int64)

    def add(ids: np.ndarray) -> None:
        nonlocal have_lines
        text = tok.decode(ids.tolist())
        if text.strip():
            docs.append(text)
            have_lines += sum(len(ln.split()) >= 8 for ln in text.split("\n"))

    end = min(len(val), max_tokens)
    for start in range(0, end, chunk):
        part = np.concatenate([pending, np.asarray(val[start:min(start + chunk, end)], dtype=np.int64)])
        cuts = np.flatnonzero(part == tok.eot_id)
        lo = 0
        for c in cuts:
            add(part[lo:c])
            lo = c + 1
        pending = part[lo:]
        if len(docs) >= min_docs and have_lines >= lines:
            return docs
    if len(pending):
        add(pending)  # the last document, or one cut at max_tokens
    return docs


def run_quickstart(corpus: str = "builtin", minutes: float | None = None, out: str = "runs/quickstart",
                   overrides: list[str] = (), max_steps: int | None = None, fixed: bool = False,
                   log=print) -> Path:
    out = Path(out)
    if (out / "report.md").exists():
        raise UserError(f"{out} already holds a finished quickstart (see {out / 'report.md'}); "
                        f"choose another --out or delete that directory")
    cfg = load_config("quickstart", list(overrides))
    cfg.run.out_dir, cfg.run.name = str(out.parent), out.name
    cfg.data.corpus = corpus
    if minutes is not None:
        cfg.train.max_minutes = minutes
    if max_steps is not None:
        cfg.train.max_steps = max_steps
    chosen = {}
    saved = out / "config.toml"
    resumed = saved.exists() and not fixed
    user_keys = {o.split("=", 1)[0].strip() for o in overrides} | ({"train.max_steps"} if max_steps is not None else set())
    if resumed:  # an interrupted run resumes with the settings it started with
        before = load_config(saved)
        chosen = {k: getattr(getattr(before, k.split(".")[0]), k.split(".")[1])
                  for k in recipe.KEYS if k not in user_keys}
        recipe.apply(cfg, chosen, user_keys)
        validate(cfg)
        log(f"[0/5] resuming with the settings this run started with ({saved})")
    elif not fixed:  # settings for this budget, corpus and machine (train/recipe.py); an explicit --set wins
        speed = recipe.matmul_speed(pick_device(cfg.run.device))
        prepared = Path(cfg.data.dataset_dir or out / "data") / INDEX
        if prepared.exists() or cfg.tokenizer.path:  # the tokenizer exists already: its size is not ours to pick
            user_keys.add("tokenizer.vocab_size")
        size = recipe.corpus_bytes(corpus, cfg.data.max_chars)
        chosen = recipe.apply(cfg, recipe.choose(cfg.train.max_minutes, size, speed), user_keys)
        validate(cfg)
        log(f"[0/5] settings for {cfg.train.max_minutes:g} min on this machine ({speed / 1e9:.0f} GFLOP/s bf16 "
            f"matmul) and {f'{size / 1e6:.1f} MB of text' if size else 'a corpus of unknown size'}: "
            + ", ".join(f"{k}={v}" for k, v in chosen.items()) + " (--fixed trains the preset as it is)")
    timings: dict[str, float] = {}
    t_all = time.time()

    # 1-4: data, tokenizer, shards
    dataset_dir = Path(cfg.data.dataset_dir) if cfg.data.dataset_dir else out / "data"
    t = time.time()
    if (dataset_dir / INDEX).exists():
        log(f"[1/5] using the prepared dataset in {dataset_dir}")
    else:
        log(f"[1/5] preparing {corpus!r}: clean, deduplicate, train the tokenizer, write shards")
        prepare(cfg.data, cfg.tokenizer, dataset_dir, seed=cfg.run.seed, log=lambda m: log("      " + m))
    timings["prepare"] = time.time() - t
    index = read_index(dataset_dir)
    tok = Tokenizer.load(dataset_dir / "tokenizer")
    docs = val_documents(dataset_dir, tok, lines=4 * 4 * cfg.eval.mc_limit)  # 4x the lines the cloze items use
    passage = (docs[0] if docs else tok.decode(load_split(dataset_dir, "train")[:400].tolist()))[:1000]
    comp = compression_stats(tok, passage)
    if comp["kind"] == "char":
        log(f"[2/5] tokenizer: character-level ({tok.vocab_size} tokens, one per byte): a held-out passage of "
            f"{comp['characters']} characters ({comp['bytes']} bytes) is {comp['tokens']} tokens")
    else:
        log(f"[2/5] tokenizer: a held-out passage of {comp['characters']} characters is {comp['char_level_tokens']} "
            f"character-level tokens but {comp['tokens']} BPE tokens ({comp['ratio']}x shorter)")
    if corpus not in ("builtin", "builtin:kjv") and docs:
        cfg.eval.prompts = [" ".join(d.split()[:4]) for d in docs[:4] if d.split()]
    if not fixed and not resumed:  # how often the budget reads these tokens: dropout, and where to stop
        train_tokens = index["splits"]["train"]["tokens"]
        if user_keys & recipe.SHAPE:  # the recipe's speed table knows its own shapes only
            user_keys.add("model.dropout")
        rep = recipe.repetition(cfg.train.max_minutes, speed, train_tokens,
                                cfg.train.batch_size * cfg.model.context_length)
        if rep["train.max_steps"] >= cfg.train.max_steps:
            del rep["train.max_steps"]  # the preset's cap is lower already
        more = recipe.apply(cfg, rep, user_keys)
        chosen.update(more)
        passes = recipe.epochs(cfg.train.max_minutes * speed / recipe.REFERENCE_FLOPS, train_tokens)
        log(f"      the budget would read the {train_tokens:,} training tokens ~{passes:.1f} times"
            + (f"; so: {', '.join(f'{k}={v}' for k, v in more.items())}" if more else "")
            + f" (dropout beyond {recipe.DROPOUT_AFTER_EPOCHS:g} passes, stop at {recipe.MAX_EPOCHS:g})")

    # 5: pretrain
    resume = bool(ckpt.list_checkpoints(out / "checkpoints"))
    log(f"[3/5] pretraining ({'resuming' if resume else 'budget: '}"
        f"{'' if resume else f'{cfg.train.max_minutes:g} min / {cfg.train.max_steps} steps'})")
    t = time.time()
    result = pretrain(cfg, dataset_dir, resume=resume, log=lambda m: log("      " + m))
    timings["pretrain"] = time.time() - t

    # 6: evaluate the final model on the whole validation split, sample, multiple choice
    log("[4/5] evaluating")
    t = time.time()
    from scratchlm.train.checkpoint import load_for_inference
    last = ckpt.latest_valid(out / "checkpoints", log=log)
    model, tok, _ = load_for_inference(last)
    device = next(model.parameters()).device
    amp = autocast(device, result.precision)
    val_tokens = load_split(dataset_dir, "val", tokenizer=tok)  # the checkpoint's tokenizer made them
    ppl = evaluate_tokens(model, val_tokens, token_byte_lengths(tok), stride=cfg.model.context_length // 2,
                          autocast=amp)
    items = build_cloze_items(docs, n=cfg.eval.mc_limit, seed=cfg.run.seed)
    fitting = [it for it in items if fits(tok, it, cfg.model.context_length)]
    if len(fitting) < len(items):  # long lines, or a char-level tokenizer with a short context
        log(f"      multiple choice: {len(items) - len(fitting)} of {len(items)} items have an answer longer than "
            f"the {cfg.model.context_length}-token context and are left out")
    items = fitting
    mc = score_items(model, tok, items, autocast=amp)[0] if len(items) >= 10 else None
    greedy = generate(model, tok, cfg.eval.prompts, SamplingConfig(max_new_tokens=48, temperature=0))
    sampled = generate(model, tok, cfg.eval.prompts, SamplingConfig(max_new_tokens=48, temperature=0.8,
                                                                    top_k=50, seed=cfg.run.seed))
    timings["evaluate"] = time.time() - t
    timings["total"] = time.time() - t_all

    # 7: report
    log("[5/5] writing the report")
    results = {"settings_chosen": chosen, "val": ppl.to_dict(), "compression": comp, "multiple_choice": mc.to_dict() if mc else None,
               "train": {"steps": result.step, "tokens": result.tokens, "tokens_per_s": result.tokens_per_s,
                         "stopped_by": result.stopped_by, "precision": result.precision, "device": result.device},
               "timings_s": timings, "samples": {"greedy": dict(zip(cfg.eval.prompts, greedy)),
                                                 "sampled": dict(zip(cfg.eval.prompts, sampled))}}
    save_json(out / "results.json", results)
    png = plot_loss(out / "metrics.jsonl", out / "loss.png")
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("type") == "eval"]
    sections = quickstart_sections(results, index, evals, corpus=corpus, vocab_size=tok.vocab_size,
                                   plot=png is not None, config_toml=to_toml(cfg))
    path = write_report(out, "scratchlm quickstart report", sections)
    log(f"val loss {ppl.loss:.4f} | perplexity {ppl.perplexity:.2f} | {ppl.bits_per_byte:.4f} bits/byte"
        + (f" | multiple choice acc {mc.acc:.3f} (random {mc.random_baseline:.2f})" if mc else ""))
    log(f"report: {path.resolve()}")
    return path
