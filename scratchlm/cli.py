"""`scratchlm <command>`: parse arguments, call the library, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scratchlm.errors import UserError


class _Help(argparse.HelpFormatter):
    """Show every option's default after its help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")


def cmd_quickstart(a) -> None:
    from scratchlm.quickstart import run_quickstart
    run_quickstart(corpus=a.corpus, minutes=a.minutes, out=a.out, overrides=a.overrides, max_steps=a.max_steps,
                   fixed=a.fixed)


def _read_input(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    p = Path(path)
    if not p.exists():
        raise UserError(f"input {path} not found")
    return p.read_text(encoding="utf-8", errors="replace")


def cmd_tokenizer(a) -> None:
    from scratchlm.tokenizer import Tokenizer
    if a.action == "train":
        from scratchlm.data.sources import ReadOptions, iter_documents
        if a.kind == "char":  # nothing to learn: the bytes are the tokens
            tok = Tokenizer.char_level()
        elif a.input is None:
            raise UserError("tokenizer train needs --input CORPUS (only --kind char needs none)")
        else:
            texts = (d.text for d in iter_documents(a.input, ReadOptions(text_field=a.text_field)))
            tok = Tokenizer.train(texts, a.vocab_size, pattern=a.pattern, min_frequency=a.min_frequency,
                                  num_workers=None)  # one counting process per core
        tok.save(a.out)
        if a.hf:
            from scratchlm.tokenizer.hf_export import export_hf
            export_hf(tok, a.out)
        made = (f"a char-level tokenizer, {tok.vocab_size} tokens (the 256 bytes + specials, no merges)"
                if tok.kind == "char" else f"trained {tok.vocab_size} tokens ({len(tok.merges)} merges)")
        print(f"{made} -> {a.out} (fingerprint {tok.fingerprint})")
    elif a.action == "encode":
        tok = Tokenizer.load(a.tokenizer)
        print(json.dumps(tok.encode(_read_input(a.input), allowed_special="all" if a.allow_special else ())))
    elif a.action == "decode":
        tok = Tokenizer.load(a.tokenizer)
        try:
            ids = json.loads(_read_input(a.input))
        except json.JSONDecodeError:
            raise UserError("decode expects a JSON list of token ids") from None
        sys.stdout.write(tok.decode(ids))
    elif a.action == "stats":
        from scratchlm.tokenizer import compression_stats
        tok = Tokenizer.load(a.tokenizer)
        text = _read_input(a.input)
        if not text:
            raise UserError(f"{a.input} is empty")
        c = compression_stats(tok, text)
        label = "BPE" if c["kind"] == "bpe" else "byte (char)"  # kind char: one token per byte
        print(f"characters           {c['characters']:,}\nbytes                {c['bytes']:,}\n"
              f"{label + ' tokens':<21}{c['tokens']:,}\nbytes/token          {c['bytes_per_token']:.3f}\n"
              f"chars/token          {c['chars_per_token']:.3f}\n"
              f"char-level tokens    {c['char_level_tokens']:,} (vocab {c['char_vocab']})\n"
              f"sequence length ratio char-level / {label}: {c['ratio']:.2f}x")


# `scratchlm prepare` shortcuts: flag -> (config section, key). Given flags override --config/--set.
PREPARE_FLAGS = {"input": ("data", "corpus"), "out": ("data", "dataset_dir"), "text_field": ("data", "text_field"),
                 "on_bad_record": ("data", "on_bad_record"), "val_fraction": ("data", "val_fraction"),
                 "threshold": ("data", "near_dedup_threshold"), "min_chars": ("data", "min_chars"),
                 "max_docs": ("data", "max_docs"), "decontaminate": ("data", "decontaminate"),
                 "tokenizer": ("tokenizer", "path"), "vocab_size": ("tokenizer", "vocab_size"),
                 "pattern": ("tokenizer", "pattern"), "tokenizer_kind": ("tokenizer", "kind")}


def cmd_prepare(a) -> None:
    from scratchlm.config import apply_dict, load_config
    from scratchlm.data.prepare import prepare
    cfg = load_config(a.config, a.overrides)
    for flag, (section, key) in PREPARE_FLAGS.items():
        if getattr(a, flag) is not None:
            apply_dict(cfg, {section: {key: getattr(a, flag)}})
    if a.no_dedup:
        cfg.data.dedup = False
    if a.drop_contaminated:
        cfg.data.drop_contaminated = True
    if not cfg.data.dataset_dir:
        raise UserError("no output directory: give --out DIR (or set data.dataset_dir)")
    print(json.dumps(prepare(cfg.data, cfg.tokenizer, cfg.data.dataset_dir, seed=cfg.run.seed,
                             overwrite=a.overwrite), indent=1))


def cmd_dedup(a) -> None:
    from scratchlm.atomic import write_text
    from scratchlm.data.dedup import deduplicate
    from scratchlm.data.sources import ReadOptions, iter_documents
    docs = list(iter_documents(a.input, ReadOptions(text_field=a.text_field)))
    if not docs:
        raise UserError(f"no documents in {a.input}")
    if Path(a.out).exists() and not a.overwrite:
        raise UserError(f"{a.out} exists; pass --overwrite or choose another --out")
    res = deduplicate([d.text for d in docs], threshold=a.threshold, num_perm=a.num_perm, ngram=a.ngram)
    kept = [{"text": d.text, "source": d.source} for d, k in zip(docs, res.keep) if k]
    write_text(a.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    report = {**res.report(), "clusters": [[docs[i].source for i in c] for c in res.clusters]}
    write_text(Path(a.out).with_suffix(".report.json"), json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "clusters"}, indent=1))
    for c in report["clusters"][:20]:
        print("cluster:", " ~ ".join(c))


def cmd_pretrain(a) -> None:
    from scratchlm.config import load_config
    from scratchlm.train.trainer import pretrain
    cfg = load_config(a.config, a.overrides)
    if a.dry_run:
        from scratchlm.train.dry_run import dry_run, format_dry_run
        vocab = 0
        if a.data or cfg.data.dataset_dir:
            from scratchlm.tokenizer import Tokenizer
            vocab = Tokenizer.load(Path(a.data or cfg.data.dataset_dir) / "tokenizer").vocab_size
        print(format_dry_run(dry_run(cfg, a.world_size, vocab_size=vocab)))
        return
    data = a.data or cfg.data.dataset_dir
    if not data:
        raise UserError("no dataset: give --data DIR (from `scratchlm prepare`) or set data.dataset_dir")
    r = pretrain(cfg, data, resume=a.resume)
    if not r.is_main:
        return
    from scratchlm.report import plot_loss
    plot_loss(r.run_dir / "metrics.jsonl", r.run_dir / "loss.png")
    print(f"done: {r.step} steps, {r.tokens:,} tokens, {r.tokens_per_s:,.0f} tokens/s, stopped by {r.stopped_by}; "
          f"run in {r.run_dir}")


def cmd_eval_preference(a) -> None:
    from scratchlm.align.pipeline import eval_preference
    from scratchlm.atomic import save_json
    out = eval_preference(a.ckpt, a.data, ref=a.ref, beta=a.beta, template=a.template or "",
                          on_bad_record=a.on_bad_record, device=a.device)
    lo, hi = out["accuracy_ci95"]
    against = f"reference {out['reference']}" if out["reference"] else "no reference"
    print(f"preference: accuracy {out['accuracy']:.4f} (95% CI {lo:.3f}-{hi:.3f}), mean margin {out['margin']:.4f}, "
          f"loss {out['loss']:.4f}, ties {out['ties']}, n={out['n']} (beta {out['beta']}, {against}"
          + (f", {out['skipped']} skipped" if out["skipped"] else "") + ")")
    save_json(Path(out["ckpt"]).parent.parent / "eval_preference.json", out)


def cmd_finetune(a) -> None:
    from scratchlm.config import load_config
    from scratchlm.finetune.run import finetune_classify, finetune_sft
    shape = [o for o in a.overrides if o.strip().startswith("model.")]
    if shape:
        raise UserError(f"--set {shape[0]}: a fine-tune keeps the base checkpoint's model shape; drop the model.* "
                        f"setting (finetune.max_length limits the example length)")
    cfg = load_config(a.config, a.overrides + (["finetune.train_on_prompt=true"] if a.train_on_prompt else []))
    out = Path(a.out)
    cfg.run.out_dir, cfg.run.name = str(out.parent), out.name
    run = finetune_classify if a.task == "classify" else finetune_sft
    r, report = run(cfg, a.ckpt, a.data, resume=a.resume)
    if not r.is_main:
        return
    from scratchlm.report import plot_loss
    plot_loss(r.run_dir / "metrics.jsonl", r.run_dir / "loss.png")
    if a.task == "classify":
        result = f"test accuracy {report['test']['accuracy']:.4f} (n={report['test']['n']})"
    else:
        result = f"test response loss {report['test_response_loss']:.4f}"
    print(f"done: {r.step} steps, {r.tokens:,} tokens, {r.tokens_per_s:,.0f} tokens/s, stopped by {r.stopped_by}; "
          f"{result}; run in {r.run_dir}")


def cmd_classify(a) -> None:
    from scratchlm.finetune.classify import classifier_task, classify_texts
    from scratchlm.train.checkpoint import load_for_inference
    texts = list(a.text)
    if a.file:
        texts += [line for line in _read_input(a.file).splitlines() if line.strip()]
    if not texts:
        raise UserError("nothing to classify: give texts as arguments or --file FILE (one text per line)")
    model, tok, meta = load_for_inference(a.ckpt, device=a.device)
    task = classifier_task(meta, a.ckpt)
    for text, res in zip(texts, classify_texts(model, tok, task, texts)):
        print(json.dumps({"text": text, **res}, ensure_ascii=False) if a.json else
              f"{res['label']}\t{res['probability']:.3f}\t{text}")


def cmd_eval(a) -> None:
    if a.task == "preference":
        return cmd_eval_preference(a)
    from scratchlm.train.precision import autocast
    from scratchlm.atomic import save_json
    from scratchlm.train.checkpoint import load_for_inference
    model, tok, meta = load_for_inference(a.ckpt, device=a.device)
    amp = autocast(next(model.parameters()).device, "fp32")
    if a.task == "classify":
        from scratchlm.finetune.classify import classifier_task, evaluate_file
        out = evaluate_file(model, tok, classifier_task(meta, a.ckpt), a.data)
        f1 = ", ".join(f"{k} F1 {v['f1']:.4f}" for k, v in out["per_class"].items())
        print(f"classify: accuracy {out['accuracy']:.4f}, {f1}, n={out['n']}")
    elif a.task == "perplexity":
        from scratchlm.data.shards import INDEX, load_split
        from scratchlm.eval.perplexity import evaluate_tokens, token_byte_lengths
        import numpy as np
        p = Path(a.data)
        if (p / INDEX).exists():
            tokens = load_split(p, a.split, tokenizer=tok)
        elif p.exists():
            tokens = np.asarray(tok.encode_ordinary(p.read_text(encoding="utf-8", errors="replace")), dtype=np.int64)
        else:
            raise UserError(f"{a.data} not found")
        res = evaluate_tokens(model, tokens, token_byte_lengths(tok), stride=a.stride, autocast=amp)
        out = res.to_dict()
    else:
        from scratchlm.eval.multiple_choice import score_items
        from scratchlm.eval.tasks import LoadOptions, load_task
        items = load_task(a.task, a.data, shots=a.shots, dev_dir=a.dev_dir, opts=LoadOptions(a.on_bad_record))
        if a.limit:
            items = items[:a.limit]
        res, _ = score_items(model, tok, items, autocast=amp)
        out = res.to_dict()
        lo, hi = res.ci95()
        print(f"{a.task}: acc {res.acc:.4f} (95% CI {lo:.3f}-{hi:.3f}), acc_norm {res.acc_norm:.4f}, "
              f"random baseline {res.random_baseline:.3f}, n={res.n}")
    run_dir = Path(meta["path"]).parent.parent
    save_json(run_dir / f"eval_{a.task}.json", {"task": a.task, "data": a.data, **out})
    print(json.dumps({k: v for k, v in out.items() if k != "per_subject"}, indent=1))


def cmd_align(a) -> None:
    from scratchlm.align.pipeline import align_dpo
    from scratchlm.config import load_config
    shape = [o for o in a.overrides if o.strip().startswith("model.")]
    if shape:
        raise UserError(f"--set {shape[0]}: DPO keeps the starting checkpoint's model shape; drop the model.* "
                        f"setting")
    extra = [f"run.out_dir={Path(a.out).parent}", f"run.name={Path(a.out).name}"]
    if a.beta is not None:
        extra.append(f"dpo.beta={a.beta}")
    if a.on_bad_record:
        extra.append(f"dpo.on_bad_record={a.on_bad_record}")
    cfg = load_config(a.config, list(a.overrides) + extra)
    r = align_dpo(cfg, a.ckpt, a.data, ref=a.ref, resume=a.resume)
    if r.is_main:
        ev = r.final_eval
        print(f"done: {r.step} steps, stopped by {r.stopped_by}; held-out preference accuracy "
              f"{ev.get('val_accuracy', float('nan')):.3f}, margin {ev.get('val_margin', float('nan')):.3f}; "
              f"run in {r.run_dir}")


def cmd_generate(a) -> None:
    from scratchlm.finetune.templates import task_prompts
    from scratchlm.generate import SamplingConfig, generate
    from scratchlm.train.checkpoint import load_for_inference
    model, tok, meta = load_for_inference(a.ckpt, device=a.device)
    if a.quantize == "int8":
        from scratchlm.quantize import quantize_int8
        model = quantize_int8(model)
    elif a.quantize == "bf16":
        import torch

        from scratchlm.model.packed import pack_linears
        model = model.to(torch.bfloat16)
        pack_linears(model)  # on a CPU: the layout its bf16 matmul kernel reads fastest (same numbers)
    cfg = SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=0 if a.greedy else a.temperature,
                         top_k=a.top_k, top_p=a.top_p, seed=a.seed, stop_strings=a.stop)
    prompts = a.prompt or [""]
    # An instruction-tuned run answers in its template and stops on its end token, unless --raw.
    prompts, cfg.stop_tokens = task_prompts(meta["state"].get("task") or {}, tok, prompts, raw=a.raw)
    if len(prompts) == 1:
        sys.stdout.write(prompts[0])
        generate(model, tok, prompts[0], cfg, stream=True)
    else:
        for p, text in zip(prompts, generate(model, tok, prompts, cfg)):
            print(f"--- {p!r}\n{p}{text}")


def cmd_export(a) -> None:
    if a.format == "hf":
        if a.peft_adapter:
            from scratchlm.interop.peft_adapter import export_peft_adapter
            out = export_peft_adapter(a.ckpt, a.out, template=a.template)
            print(f"exported the LoRA adapters of {a.ckpt} -> {out} (load with peft's PeftModel.from_pretrained("
                  f"AutoModelForCausalLM.from_pretrained(BASE), {str(out)!r}), BASE = `scratchlm export hf` of the "
                  f"run's base)")
            return
        from scratchlm.interop.hf import export_hf
        out = export_hf(a.ckpt, a.out, template=a.template)
        print(f"exported {a.ckpt} -> {out} (load with transformers' AutoModelForCausalLM.from_pretrained)")
    else:
        if a.peft_adapter:
            raise UserError("--peft-adapter is for `export hf`; `export gguf` merges a LoRA run's adapters")
        from scratchlm.interop.gguf import export_gguf
        out = export_gguf(a.ckpt, a.out, template=a.template)
        print(f"exported {a.ckpt} -> {out} (GGUF for llama.cpp)")


def cmd_import(a) -> None:
    from scratchlm.interop.hf import import_hf
    out = import_hf(a.src, a.out)
    print(f"imported {a.src} -> run {out} (use it with generate/eval --ckpt {out})")


def cmd_serve(a) -> None:
    from scratchlm.serve.api import serve
    serve(a.ckpt, host=a.host, port=a.port, api_key=a.api_key, device=a.device, max_batch=a.max_batch,
          max_queue=a.max_queue, model_name=a.model_name)


def cmd_chat(a) -> None:
    from scratchlm.serve.terminal import chat
    chat(a.ckpt, device=a.device, max_tokens=a.max_tokens, temperature=0 if a.greedy else a.temperature,
         top_p=a.top_p, seed=a.seed, system=a.system)


def _prices(items: list[str]) -> dict[str, float]:
    prices = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            prices[key.strip()] = float(value)
        except ValueError:
            raise UserError(f"bad --price {item!r}: write ACCELERATOR=USD_PER_HOUR, e.g. --price h100=2.49") from None
    return prices


def cmd_plan(a) -> None:
    from scratchlm.config import load_config
    from scratchlm.plan import make_plan, render
    cfg = load_config(a.config, a.overrides)
    plan = make_plan(cfg, tokens=a.tokens, compute_optimal=a.compute_optimal, devices=a.devices,
                     parallel=a.parallel, mfu=a.mfu, activation_checkpointing=a.activation_checkpointing,
                     prices=_prices(a.price), name=a.config)
    print(render(plan))


def build_parser() -> argparse.ArgumentParser:
    fmt = _Help
    parser = argparse.ArgumentParser(prog="scratchlm", description="Build a GPT from scratch: data, tokenizer, "
                                     "model, training, evaluation, generation.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    p = sub.add_parser("quickstart", help="the whole pipeline on a built-in corpus, ending with a report",
                       formatter_class=fmt)
    p.add_argument("--corpus", default="builtin", help="builtin, or a PATH/dir/glob/URL (txt, jsonl, parquet)")
    p.add_argument("--minutes", type=float, default=None, help="training time budget (default from the preset: 6)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps")
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--fixed", action="store_true",
                   help="train the quickstart preset as it is, instead of settings chosen for the budget, "
                        "corpus and machine")
    _add_set(p)
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("tokenizer", help="train, use and measure a byte-level BPE (or char-level) tokenizer",
                       formatter_class=fmt)
    tsub = p.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("train", help="train a tokenizer on a corpus", formatter_class=fmt)
    t.add_argument("--input", help="corpus: file, dir, glob, URL, or builtin (not needed for --kind char)")
    t.add_argument("--kind", choices=["bpe", "char"], default="bpe",
                   help="char: no merges, the 256 bytes + specials (one token per ASCII character)")
    t.add_argument("--vocab-size", type=int, default=4096, help="tokens in the vocabulary, 256 bytes and specials included")
    t.add_argument("--pattern", default="gpt4", help="pre-tokenizer: gpt2, gpt4 or a regex")
    t.add_argument("--min-frequency", type=int, default=1, help="ignore chunks rarer than this")
    t.add_argument("--text-field", default="text", help="the field holding the text in JSONL / parquet records")
    t.add_argument("--hf", action="store_true", help="also write a Hugging Face tokenizer.json")
    t.add_argument("--out", required=True, help="directory to write the tokenizer to")
    for name, helptext in (("encode", "text -> JSON ids"), ("decode", "JSON ids -> text"),
                           ("stats", "bytes/token, chars/token, and the ratio to a character-level tokenizer")):
        t = tsub.add_parser(name, help=helptext, formatter_class=fmt)
        t.add_argument("--tokenizer", required=True, help="tokenizer directory")
        t.add_argument("--input", default="-", help="file, or - for stdin")
        if name == "encode":
            t.add_argument("--allow-special", action="store_true", help="recognise <|special|> tokens in the text")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("prepare", help="corpus -> cleaned, deduplicated, tokenized train/val shards",
                       description="Settings come from the [data] and [tokenizer] sections of --config (default: "
                       "the built-in defaults), then --set, then the shortcut flags below.", formatter_class=fmt)
    p.add_argument("--config", default=None, help="preset name or .toml path (its [data] and [tokenizer] sections)")
    _add_set(p)
    p.add_argument("--input", help="corpus: builtin, file, dir, glob, URL or hf:PATH (data.corpus)")
    p.add_argument("--out", help="dataset directory to write (data.dataset_dir)")
    p.add_argument("--tokenizer", help="use this tokenizer directory instead of training one (tokenizer.path)")
    p.add_argument("--vocab-size", type=int, help="tokenizer.vocab_size")
    p.add_argument("--pattern", help="pre-tokenizer: gpt2, gpt4 or a regex (tokenizer.pattern)")
    p.add_argument("--tokenizer-kind", choices=["bpe", "char"],
                   help="char: one token per byte, no merges, vocab_size not used (tokenizer.kind)")
    p.add_argument("--text-field", help="JSONL/Parquet field holding the text (data.text_field)")
    p.add_argument("--on-bad-record", choices=["stop", "skip"], help="data.on_bad_record")
    p.add_argument("--val-fraction", type=float, help="share held out for validation (data.val_fraction)")
    p.add_argument("--no-dedup", action="store_true", help="keep duplicates (data.dedup=false)")
    p.add_argument("--threshold", type=float, help="near-duplicate Jaccard threshold (data.near_dedup_threshold)")
    p.add_argument("--min-chars", type=int, help="drop shorter documents (data.min_chars)")
    p.add_argument("--max-docs", type=int, help="read at most this many documents (data.max_docs)")
    p.add_argument("--decontaminate", nargs="*", help="eval files: MMLU CSV, HellaSwag, ARC, text (data.decontaminate)")
    p.add_argument("--drop-contaminated", action="store_true", help="drop flagged documents (data.drop_contaminated)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("dedup", help="remove exact and near-duplicate documents (MinHash LSH)", formatter_class=fmt)
    p.add_argument("input", help="corpus: file, dir, glob, URL or builtin")
    p.add_argument("--out", required=True, help="JSONL of the kept documents (+ .report.json)")
    p.add_argument("--threshold", type=float, default=0.8, help="near-duplicate Jaccard threshold")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (more: finer estimates)")
    p.add_argument("--ngram", type=int, default=5, help="words per shingle")
    p.add_argument("--text-field", default="text", help="the field holding the text in JSONL / parquet records")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_dedup)

    p = sub.add_parser("pretrain", help="train a GPT on prepared shards (torchrun for several processes)",
                       formatter_class=fmt)
    p.add_argument("--config", default="tiny", help="preset name or .toml path")
    p.add_argument("--data", help="prepared dataset directory")
    p.add_argument("--resume", action="store_true", help="continue from the latest valid checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config for --world-size processes and print the step's shape; train nothing")
    p.add_argument("--world-size", type=int, default=1, help="processes to check the config for (with --dry-run)")
    _add_set(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("plan", help="parameters, FLOPs, memory per device, time and cost of a run, before "
                       "you start it", formatter_class=fmt)
    p.add_argument("--config", default="quickstart", help="preset name or .toml path")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--tokens", type=float, default=None,
                        help="tokens to train on, e.g. 10e9 (default: the config's max_tokens or max_steps)")
    target.add_argument("--compute-optimal", action="store_true", help="20 tokens per parameter (Chinchilla)")
    p.add_argument("--devices", type=int, default=1, help="GPUs in total, over all nodes")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default=None, help="default: the config's train.parallel")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume, a fraction of the peak")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="plan memory and time with each block's activations recomputed in backward")
    p.add_argument("--price", action="append", default=[], metavar="ACCELERATOR=USD",
                   help="price per device-hour, e.g. --price h100=2.49 (repeatable; cpu too)")
    _add_set(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("finetune", help="fine-tune a checkpoint: a classifier, or instruction following (SFT)",
                       formatter_class=fmt)
    p.add_argument("task", choices=["classify", "sft"], help="classify: a classifier head; sft: instruction following")
    p.add_argument("--ckpt", required=True, help="base checkpoint or run directory")
    p.add_argument("--data", required=True, help="classify: label<TAB>text TSV, CSV or JSONL {text, label}; "
                   "sft: Alpaca JSON/JSONL {instruction, input, output} or chat JSONL {messages}")
    p.add_argument("--out", required=True, help="run directory, e.g. runs/spam")
    p.add_argument("--config", default="finetune", help="preset name or .toml path")
    p.add_argument("--resume", action="store_true", help="continue from the latest valid checkpoint")
    p.add_argument("--train-on-prompt", action="store_true", help="sft: the loss covers prompt tokens too "
                   "(= --set finetune.train_on_prompt=true)")
    _add_set(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("classify", help="classify texts with a fine-tuned classifier", formatter_class=fmt)
    p.add_argument("text", nargs="*", help="texts to classify")
    p.add_argument("--ckpt", required=True, help="classifier checkpoint or run directory")
    p.add_argument("--file", help="a file of texts, one per line (- for stdin)")
    p.add_argument("--json", action="store_true", help="one JSON object per text, with every class's probability")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("eval", help="perplexity / bits-per-byte, MMLU, HellaSwag, ARC, a classifier, preference pairs",
                       formatter_class=fmt)
    p.add_argument("task", choices=["perplexity", "mmlu", "hellaswag", "arc", "classify", "preference"],
                   help="what to measure")
    p.add_argument("--ckpt", required=True, help="checkpoint or run directory")
    p.add_argument("--data", required=True, help="text file or prepared dataset (perplexity); task file or dir")
    p.add_argument("--split", default="val", help="split of a prepared dataset to score (perplexity)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: context length)")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples before each question")
    p.add_argument("--dev-dir", default=None, help="MMLU dev split for few-shot exemplars")
    p.add_argument("--limit", type=int, default=0, help="score at most this many items (0 = all)")
    p.add_argument("--on-bad-record", choices=["stop", "skip"], default="stop",
                   help="what to do with an unreadable item")
    p.add_argument("--ref", default=None, help="preference: reference checkpoint (default: the run's recorded "
                   "reference; 'none' compares log p(chosen) with log p(rejected))")
    p.add_argument("--beta", type=float, default=None, help="preference: reward scale (default: the run's, or 0.1)")
    p.add_argument("--template", default=None, help="preference: alpaca | chat (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("align", help="preference alignment (DPO) of a fine-tuned checkpoint", formatter_class=fmt)
    asub = p.add_subparsers(dest="method", required=True, help="the alignment method")
    t = asub.add_parser("dpo", help="Direct Preference Optimization on chosen/rejected pairs", formatter_class=fmt)
    t.add_argument("--ckpt", required=True, help="starting checkpoint or run (usually SFT); also the reference")
    t.add_argument("--data", required=True, help="pairs: JSONL {prompt, chosen, rejected}, the book's preference "
                   "JSON, or HH-RLHF {chosen, rejected} transcripts (.jsonl[.gz])")
    t.add_argument("--out", required=True, help="run directory, e.g. runs/dpo")
    t.add_argument("--ref", default=None, help="reference checkpoint (default: --ckpt)")
    t.add_argument("--beta", type=float, default=None, help="dpo.beta (default from the config: 0.1)")
    t.add_argument("--config", default="dpo", help="preset name or .toml path")
    t.add_argument("--on-bad-record", choices=["stop", "skip"], default=None, help="dpo.on_bad_record")
    t.add_argument("--resume", action="store_true", help="continue from the latest valid checkpoint")
    _add_set(t)
    t.set_defaults(func=cmd_align)

    p = sub.add_parser("generate", help="sample text from a checkpoint", formatter_class=fmt)
    p.add_argument("--ckpt", required=True, help="checkpoint or run directory")
    p.add_argument("--prompt", action="append",
                   help="text to continue; repeat for a batch (default: start from <|endoftext|>)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="below 1: safer; above 1: more varied")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the likeliest tokens holding this much "
                   "probability (1 = all)")
    p.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="an SFT run: do not wrap the prompt in its template")
    p.add_argument("--seed", type=int, default=None, help="for reproducible sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--quantize", choices=["none", "bf16", "int8"], default="none",
                   help="bf16: bfloat16 weights (half the bytes of fp32 read per token); int8: weight-only int8 "
                   "with per-channel scales (half again)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="a checkpoint as a Hugging Face directory or a llama.cpp GGUF file",
                       formatter_class=fmt)
    p.add_argument("format", choices=["hf", "gguf"], help="hf: a transformers directory; gguf: one llama.cpp file")
    p.add_argument("--ckpt", required=True, help="checkpoint or run directory")
    p.add_argument("--out", required=True, help="new directory (hf) or FILE.gguf (gguf)")
    p.add_argument("--template", choices=["chat", "alpaca", "none"], default=None,
                   help="chat template to ship (default: the one a fine-tuned checkpoint records, else none)")
    p.add_argument("--peft-adapter", action="store_true",
                   help="hf, a LoRA run: write a peft adapter directory for the exported base instead of merging")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="a Hugging Face GPT-2/Llama directory as a scratchlm run", formatter_class=fmt)
    p.add_argument("format", choices=["hf"], help="hf: a Hugging Face GPT-2 or Llama directory")
    p.add_argument("src", help="directory with config.json, weights and tokenizer.json")
    p.add_argument("--out", required=True, help="new run directory")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("serve", help="an OpenAI-compatible API and a web chat page (needs the serve extra)",
                       formatter_class=fmt)
    p.add_argument("--ckpt", required=True, help="checkpoint or run directory")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--model-name", default=None, help="the name /v1/models reports (default: the directory's)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests decoded together (each slot holds a whole-context KV cache)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond that; more get 429")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat with a checkpoint in the terminal", formatter_class=fmt)
    p.add_argument("--ckpt", required=True, help="checkpoint or run directory")
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply")
    p.add_argument("--temperature", type=float, default=0.8, help="below 1: safer; above 1: more varied")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the likeliest tokens holding this much probability")
    p.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    p.add_argument("--seed", type=int, default=None, help="for reproducible sampling")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"scratchlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scratchlm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
