"""`scratchlm finetune classify|sft`: base checkpoint + data file -> a fine-tuned run, through the one
training loop (`scratchlm.train.trainer.train`).

    cfg = load_config("finetune", ["finetune.trainable=lora"])
    result, report = finetune_classify(cfg, "runs/base", "sms_spam.tsv")
    result, report = finetune_sft(cfg, "runs/base", "instruction-data.json")

Each builds the model (base weights, a new head or LoRA adapters, what trains), an Objective over
a seeded train/val/test split of the file, and calls train(); then it scores the test split and
writes `<run>/finetune.json` (and a classifier's `<run>/report.md`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable

from scratchlm.atomic import write_text
from scratchlm.config import Config
from scratchlm.errors import UserError
from scratchlm.finetune.base import attach_classifier_head, load_base, set_trainable
from scratchlm.finetune.classify import (ClassifyObjective, classification_metrics, encode_texts, format_metrics,
                                         label_names, predict)
from scratchlm.finetune.data import load_conversations, load_labeled, pad_id, split_indices
from scratchlm.finetune.lora import base_fingerprint, count_trainable, save_adapter
from scratchlm.finetune.sft import SFTObjective, encode_examples, prompt_messages, response_loss
from scratchlm.finetune.templates import check_tokenizer, get_template


def _prepare(cfg: Config, base: str, init: str):
    if init == "random" and cfg.finetune.trainable == "lora":
        raise UserError("finetune.init=random with LoRA trains adapters on random weights; use trainable=all")
    gpt, tok, base_path = load_base(base, init=init, seed=cfg.run.seed)
    cfg.model = dataclasses.replace(gpt.cfg)  # the run's model is the base's shape
    mode = cfg.finetune.trainable
    fingerprint = base_fingerprint(gpt) if mode == "lora" else None
    return gpt, tok, base_path, fingerprint


def _max_length(cfg: Config, context_length: int, extra: int) -> int:
    n = cfg.finetune.max_length or context_length + extra
    if n > context_length + extra:
        raise UserError(f"finetune.max_length={n} is longer than the model's context ({context_length})")
    return n


def _epochs_to_steps(cfg: Config, epoch_size: int, log) -> None:
    if cfg.finetune.epochs > 0:
        cfg.train.max_steps = max(1, math.ceil(cfg.finetune.epochs * epoch_size / cfg.train.batch_size))
        log(f"{cfg.finetune.epochs:g} epoch(s) of {epoch_size} examples at batch {cfg.train.batch_size}: "
            f"{cfg.train.max_steps} steps")


def _describe(model, mode: str, cfg: Config) -> str:
    trainable, total = count_trainable(model)
    text = f"trainable: {mode}, {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
    if mode == "lora":
        lc = cfg.lora
        text += (f"; LoRA rank {lc.rank}, alpha {lc.alpha:g} (update scaled by alpha/rank = {lc.scaling:g}), "
                 f"dropout {lc.dropout:g}, targets {','.join(model.lora['targets'])}")
    return text


def finetune_classify(cfg: Config, base: str, data: str, resume: bool = False,
                      log: Callable[[str], None] = print):
    from scratchlm.train.checkpoint import load_for_inference
    from scratchlm.train.trainer import train
    fc = cfg.finetune
    records = load_labeled(data)
    split = split_indices(len(records), fc.val_fraction, fc.test_fraction, cfg.run.seed)
    parts = {k: [records[i] for i in v] for k, v in split.items()}
    labels = label_names(parts["train"], parts["val"] + parts["test"])
    gpt, tok, base_path, fingerprint = _prepare(cfg, base, fc.init)
    max_len = _max_length(cfg, gpt.cfg.context_length, 0)
    index = {name: i for i, name in enumerate(labels)}

    def encoded(rs):
        return list(zip(encode_texts(tok, [r.text for r in rs], max_len), [index[r.label] for r in rs]))

    mode = "last-block" if fc.trainable == "auto" else fc.trainable
    cfg.finetune.trainable = mode
    attach_classifier_head(gpt, len(labels))
    set_trainable(gpt, mode, cfg.lora, head_trains=True)
    meta = {"kind": "classify", "labels": labels, "max_length": max_len, "base": str(base_path),
            "base_fingerprint": fingerprint, "init": fc.init, "trainable": mode,
            "lora": getattr(gpt, "lora", None)}
    objective = ClassifyObjective(tok, encoded(parts["train"]), encoded(parts["val"]), labels, meta,
                                  balanced=fc.balanced)
    counts = {name: sum(r.label == name for r in parts["train"]) for name in labels}
    log(f"data: {len(records)} records -> train {len(parts['train'])} / val {len(parts['val'])} / test "
        f"{len(parts['test'])} (seed {cfg.run.seed}); classes {counts}{' (balanced sampling)' if fc.balanced else ''}")
    log(_describe(gpt, mode, cfg))
    epoch = len(labels) * max(counts.values()) if fc.balanced else len(parts["train"])
    _epochs_to_steps(cfg, epoch, log)
    result = train(cfg, gpt, objective, resume=resume, log=log)
    if not result.is_main:
        return result, {}

    # Score the held-out test split with the checkpoint `scratchlm classify --ckpt RUN` uses (the best
    # on the validation split, if kept).
    model, _, saved = load_for_inference(result.run_dir, device=cfg.run.device)
    probs = predict(model, tok, [r.text for r in parts["test"]], max_len)
    metrics = classification_metrics([index[r.label] for r in parts["test"]], probs.argmax(-1).tolist(), labels)
    report = {"task": "classify", "data": str(data), "checkpoint": saved["path"], "seed": cfg.run.seed,
              "split": {k: len(v) for k, v in parts.items()}, "test": metrics, "steps": result.step,
              "seconds": round(result.seconds, 1), "tokens_per_s": round(result.tokens_per_s, 1),
              "trainable_params": count_trainable(gpt)[0], "init": fc.init, "trainable": mode}
    _finish(result.run_dir, report, gpt, fingerprint)
    write_text(result.run_dir / "report.md", f"# Classifier: {result.run_dir}\n\nTest split of {data}:\n\n```\n"
               f"{format_metrics(metrics)}\n```\n")
    log(format_metrics(metrics))
    return result, report


def finetune_sft(cfg: Config, base: str, data: str, resume: bool = False, log: Callable[[str], None] = print):
    from scratchlm.train.checkpoint import load_for_inference
    from scratchlm.train.trainer import train
    fc = cfg.finetune
    template = get_template(fc.template)
    convs = load_conversations(data)
    split = split_indices(len(convs), fc.val_fraction, fc.test_fraction, cfg.run.seed)
    parts = {k: [convs[i] for i in v] for k, v in split.items()}
    gpt, tok, base_path, fingerprint = _prepare(cfg, base, fc.init)
    check_tokenizer(tok, template)
    ctx = gpt.cfg.context_length
    max_len = _max_length(cfg, ctx, 1)  # ids per example: the context, plus the last shifted target
    enc, reps = {}, {}
    for k, v in parts.items():
        enc[k], reps[k] = encode_examples(tok, template, v, max_len, fc.train_on_prompt)
        if (w := reps[k].warning(max_len)):
            log(f"{k}: {w}")
    if not enc["train"]:
        raise UserError(f"no training example of {data} fits the context of {ctx} tokens")
    mode = "all" if fc.trainable == "auto" else fc.trainable
    cfg.finetune.trainable = mode
    set_trainable(gpt, mode, cfg.lora)
    meta = {"kind": "sft", "template": template.name, "base": str(base_path), "base_fingerprint": fingerprint,
            "init": fc.init, "trainable": mode, "train_on_prompt": fc.train_on_prompt,
            "lora": getattr(gpt, "lora", None)}
    val_prompts = [tok.encode(template.prompt(prompt_messages(c)), allowed_special="all") for c in parts["val"][:2]]
    objective = SFTObjective(tok, template, enc["train"], enc["val"], meta, val_prompts=val_prompts,
                             context_length=ctx, packing=fc.packing)
    n_loss = sum(sum(e.mask) for e in enc["train"])
    log(f"data: {len(convs)} conversations -> train {len(enc['train'])} / val {len(enc['val'])} / test "
        f"{len(enc['test'])} (seed {cfg.run.seed}); template {template.name}, loss on "
        f"{'every token' if fc.train_on_prompt else 'response + end tokens'} ({n_loss:,} train targets)")
    log(_describe(gpt, mode, cfg))
    _epochs_to_steps(cfg, len(enc["train"]), log)
    result = train(cfg, gpt, objective, resume=resume, log=log)
    if not result.is_main:
        return result, {}
    model, _, saved = load_for_inference(result.run_dir, device=cfg.run.device)
    report = {"task": "sft", "data": str(data), "checkpoint": saved["path"], "template": template.name,
              "seed": cfg.run.seed, "split": {k: len(v) for k, v in enc.items()}, "steps": result.step,
              "seconds": round(result.seconds, 1), "tokens_per_s": round(result.tokens_per_s, 1),
              "trainable_params": count_trainable(gpt)[0], "trainable": mode,
              "test_response_loss": response_loss(model, enc["test"], pad_id(tok)),
              "truncated": {k: dataclasses.asdict(r) for k, r in reps.items()}}
    _finish(result.run_dir, report, gpt, fingerprint)
    return result, report


def _finish(run_dir: Path, report: dict, model, fingerprint: str | None) -> None:
    write_text(run_dir / "finetune.json", json.dumps(report, indent=1, default=str))
    if getattr(model, "lora", None):
        save_adapter(model, run_dir, fingerprint)  # the adapters alone, for sharing (KBs)
