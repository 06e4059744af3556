"""From a checkpoint and a file of preference pairs to a DPO run; and scoring any pair file.

    align_dpo(cfg, "runs/sft", "prefs.json")           # -> runs/<name>: checkpoints, metrics, pairs.json
    eval_preference("runs/dpo", "prefs.json")           # accuracy (95% interval), margin, n

The run keeps what it trained on: `pairs.json` (token ids of the training and held-out pairs with
the reference's log-probs, computed once) and `val_pairs.jsonl` (the held-out pairs as text, for
`scratchlm eval preference`). A resumed run reads pairs.json back instead of recomputing it, so
it continues with exactly the same numbers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from pathlib import Path
from typing import Callable

import torch.nn as nn

from scratchlm.align.data import EncodedPair, encode_pairs, load_pairs, split_pairs
from scratchlm.align.dpo import DPOObjective, evaluate_pairs, precompute_reference
from scratchlm.atomic import write_text
from scratchlm.config import Config
from scratchlm.errors import UserError
from scratchlm.finetune.templates import check_tokenizer, get_template
from scratchlm.train.checkpoint import load_for_inference
from scratchlm.train.precision import autocast, pick_device, pick_precision

PAIRS_FILE, VAL_FILE = "pairs.json", "val_pairs.jsonl"


def _check(cfg: Config) -> None:
    d = cfg.dpo
    if d.beta <= 0:
        raise UserError(f"dpo.beta must be > 0, got {d.beta}")
    if not 0 <= d.label_smoothing < 0.5:
        raise UserError(f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
    if d.on_bad_record not in ("stop", "skip"):
        raise UserError(f"dpo.on_bad_record must be stop or skip, got {d.on_bad_record!r}")
    if not 0 <= d.val_fraction < 1:
        raise UserError(f"dpo.val_fraction must be in [0, 1), got {d.val_fraction}")


def _template_of(meta: dict, name: str, where: str):
    task = meta["state"].get("task", {})
    name = name or task.get("template", "")
    if not name:
        raise UserError(f"{where} is a {task.get('kind', 'pretrain')} checkpoint with no prompt template; "
                        f"name one with --set dpo.template=chat (or alpaca), or start from an SFT run")
    return get_template(name)


def _load_reference(path: str, tok, device: str):
    ref, ref_tok, _ = load_for_inference(path, device=device)
    if ref_tok.fingerprint != tok.fingerprint:
        raise UserError(f"the reference checkpoint {path} uses another tokenizer than the policy (fingerprint "
                        f"{ref_tok.fingerprint} vs {tok.fingerprint}); log-probs of different token ids cannot be "
                        f"compared: use a reference trained with the same tokenizer")
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _no_dropout(model: nn.Module) -> None:
    """DPO compares log-probs of the policy with the reference's: dropout would make them noisy
    (and the step-0 loss no longer ln 2). TRL switches it off too."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = 0.0


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _pairs_json(train: list[EncodedPair], val: list[EncodedPair], header: dict) -> str:
    row = lambda p: [p.prompt_ids, p.chosen_ids, p.rejected_ids, p.ref_chosen, p.ref_rejected]
    return json.dumps({**header, "train": [row(p) for p in train], "val": [row(p) for p in val]})


def _read_pairs_json(path: Path) -> tuple[dict, list[EncodedPair], list[EncodedPair]]:
    data = json.loads(path.read_text())
    rows = lambda key: [EncodedPair(*r) for r in data.pop(key)]
    return data, rows("train"), rows("val")


def align_dpo(cfg: Config, start: str, data: str, ref: str | None = None, resume: bool = False,
              log: Callable[[str], None] = print, quiet: bool = False):
    """DPO from checkpoint `start` on the pairs in `data`; the reference is `start` unless `ref` is given."""
    from scratchlm.train.trainer import train
    _check(cfg)
    d = cfg.dpo
    if not resume and (cfg.run_dir / PAIRS_FILE).exists():  # refuse before writing anything into another run
        raise UserError(f"{cfg.run_dir} already holds a DPO run; pass --resume to continue it, or choose another --out")
    model, tok, meta = load_for_inference(start, device="cpu")
    if meta["state"]["task"].get("kind") == "classify":
        raise UserError(f"{start} is a classifier; DPO starts from a language model (an SFT run)")
    if getattr(model, "lora", None):
        from scratchlm.finetune.lora import merge_and_unload
        model = merge_and_unload(model)  # a LoRA SFT run: fold its adapters in, then train every weight
    template = _template_of(meta, d.template, start)
    check_tokenizer(tok, template)
    cfg.model = copy.deepcopy(meta["config"].model)  # the policy keeps the starting model's shape
    cfg.model.dropout = cfg.model.attn_dropout = 0.0
    _no_dropout(model)
    ref_path = ref or str(Path(meta["path"]))
    reference = _load_reference(ref_path, tok, "cpu") if ref else copy.deepcopy(model)
    _no_dropout(reference)
    T = cfg.model.context_length
    run_dir = cfg.run_dir
    pairs_file = run_dir / PAIRS_FILE

    if resume and pairs_file.exists():
        header, train_pairs, val_pairs = _read_pairs_json(pairs_file)
        if header["tokenizer_fingerprint"] != tok.fingerprint or header["reference_digest"] != _weights_digest(
                reference):
            raise UserError(f"{pairs_file} was computed with another reference or tokenizer; resume with the "
                            f"original --ckpt/--ref, or start a new run")
        log(f"resuming with the {len(train_pairs)} training and {len(val_pairs)} held-out pairs of {pairs_file}")
    else:
        pairs, skipped = load_pairs(data, d.on_bad_record)
        if d.max_pairs and len(pairs) > d.max_pairs:
            keep = sorted(random.Random(cfg.run.seed).sample(range(len(pairs)), d.max_pairs))
            pairs = [pairs[i] for i in keep]
        train_raw, val_raw = split_pairs(pairs, d.val_fraction, cfg.run.seed)
        train_pairs = encode_pairs(train_raw, tok, template, T, d.on_bad_record, skipped, log)
        val_kept: list = []
        val_pairs = encode_pairs(val_raw, tok, template, T, d.on_bad_record, skipped, log, val_kept) if val_raw else []
        if skipped:
            log(f"skipped {len(skipped)} bad pair(s), e.g. {skipped[0]}")
        log(f"{len(train_pairs)} training and {len(val_pairs)} held-out pairs from {data} (template {template.name})")
        if d.precompute_reference:
            # Under the precision training will use: the policy's log-probs are computed under it, and
            # at step 0 (policy = reference) the two must agree, or the margin starts off zero.
            device = pick_device(cfg.run.device)
            with autocast(device, pick_precision(cfg.train.precision, device)):
                precompute_reference(reference.to(device), train_pairs + val_pairs,
                                     tok.special_tokens.get("<|pad|>", tok.eot_id), length_normalize=d.length_normalize)
            reference.to("cpu")
        run_dir.mkdir(parents=True, exist_ok=True)
        header = {"data": str(data), "reference": ref_path, "reference_digest": _weights_digest(reference),
                  "tokenizer_fingerprint": tok.fingerprint, "template": template.name, "skipped": len(skipped),
                  "length_normalize": d.length_normalize}
        write_text(pairs_file, _pairs_json(train_pairs, val_pairs, header))
        write_text(run_dir / VAL_FILE, "".join(
            json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}, ensure_ascii=False) + "\n"
            for p in val_kept))
    if d.precompute_reference and all(p.ref_chosen is not None for p in train_pairs + val_pairs):
        reference = None  # the log-probs are in the pairs: no reference model in memory
    objective = DPOObjective(tok, template, train_pairs, val_pairs, beta=d.beta, label_smoothing=d.label_smoothing,
                             length_normalize=d.length_normalize, reference=reference, reference_path=ref_path,
                             sample_prompts=d.sample_prompts, sample_tokens=cfg.train.sample_tokens)
    if not resume:
        before = {"samples": objective.samples(model.to(pick_device(cfg.run.device)))}
        write_text(run_dir / "samples_before.json", json.dumps(before, indent=1, ensure_ascii=False))
        model.to("cpu")
    model.train()
    return train(cfg, model, objective, resume=resume, log=log, quiet=quiet)


def eval_preference(ckpt: str, data: str, ref: str | None = None, beta: float | None = None, template: str = "",
                    on_bad_record: str = "stop", device: str = "auto", log: Callable[[str], None] = print) -> dict:
    """Preference accuracy of a checkpoint on a pair file: the share of pairs whose implicit reward
    beta·log(pi/pi_ref) is higher for chosen, against `ref`, else the run's recorded reference.
    ref="none" (or a checkpoint with no recorded reference) scores log pi(chosen) vs log pi(rejected)."""
    model, tok, meta = load_for_inference(ckpt, device=device)
    task = meta["state"].get("task", {})
    tmpl = _template_of(meta, template, ckpt)
    check_tokenizer(tok, tmpl)
    ref = ref if ref is not None else task.get("reference")
    reference = None
    if ref and ref != "none":
        reference = _load_reference(ref, tok, device)
    else:
        ref = None
        log("no reference: scoring log p(chosen) against log p(rejected) under the checkpoint alone")
    beta = beta if beta is not None else task.get("beta", 0.1)
    pairs, skipped = load_pairs(data, on_bad_record)
    enc = encode_pairs(pairs, tok, tmpl, model.cfg.context_length, on_bad_record, skipped, log)
    res = evaluate_pairs(model, enc, tok.special_tokens.get("<|pad|>", tok.eot_id), beta,
                         length_normalize=task.get("length_normalize", False), reference=reference)
    return {"ckpt": meta["path"], "data": str(data), "reference": ref, "beta": beta, "template": tmpl.name,
            "skipped": len(skipped), **res.to_dict()}
