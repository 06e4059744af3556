"""Pretraining: the loop, and everything it calls.

The story of one optimizer step:
    set the learning rate for this step
    for each micro-batch: forward, loss / grad_accum, backward (DDP/FSDP sync only on the last one)
    clip the (already averaged) gradients, AdamW step, zero the gradients
    log; maybe checkpoint; then maybe evaluate and sample (after the checkpoint, so a crash in
    evaluation never loses training)

Everything that decides the numbers — weights, AdamW moments, data position, every RNG — is in
the checkpoint, so a resumed run continues bit for bit (on CPU) where the killed one stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from scratchlm.config import Config, to_toml
from scratchlm.data.dataset import RandomWindowLoader
from scratchlm.data.shards import load_split, read_index
from scratchlm.errors import UserError
from scratchlm.eval.perplexity import evaluate_tokens, token_byte_lengths
from scratchlm.generate import SamplingConfig, generate
from scratchlm.model import GPT
from scratchlm.tokenizer import Tokenizer
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.distributed import (agree_on_stop, all_ranks_agree, all_reduce_mean, barrier, setup,
                                         shard_model, skip_grad_sync, teardown)
from scratchlm.train.logger import MetricsLog, Progress
from scratchlm.train.precision import autocast, measured_peak_flops, pick_device, pick_precision
from scratchlm.train.schedule import lr_at


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    seconds: float
    tokens_per_s: float
    final_eval: dict
    stopped_by: str          # "steps" | "tokens" | "minutes" | "signal"
    precision: str
    device: str
    is_main: bool = True     # rank 0 (or the only process): the one that reports


def make_optimizer(model: GPT, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices of Linear layers — not norms, biases or embeddings."""
    decay, no_decay = [], []
    embeddings = {id(model.embed_tokens.weight)}
    if hasattr(model, "pos_embed"):
        embeddings.add(id(model.pos_embed.weight))
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def model_fingerprint(cfg: Config) -> dict:
    return dataclasses.asdict(cfg.model)


class _StopFlag:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit cleanly."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to the run directory {run_dir} ({e.strerror}); choose another run.out_dir") from None


def pretrain(cfg: Config, dataset_dir: str | Path, resume: bool = False, log: Callable[[str], None] = print,
             quiet: bool = False) -> TrainResult:
    tc = cfg.train
    device = pick_device(cfg.run.device)
    info = setup(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    precision = pick_precision(tc.precision, device)
    say = log if info.is_main else (lambda *_: None)
    run_dir = cfg.run_dir
    if info.is_main:
        _check_run_dir(run_dir)

    # --- data and tokenizer -------------------------------------------------------------------
    dataset_dir = Path(dataset_dir)
    index = read_index(dataset_dir)
    tok = Tokenizer.load(dataset_dir / "tokenizer")
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    if cfg.model.vocab_size < tok.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                        f"({tok.vocab_size}); set model.vocab_size >= {tok.vocab_size} (or 0 to match)")
    train_tokens = load_split(dataset_dir, "train")
    val_tokens = load_split(dataset_dir, "val")
    T = cfg.model.context_length
    if len(train_tokens) < T + 1:
        raise UserError(f"the training split has {len(train_tokens)} tokens, less than one context window "
                        f"({T + 1}); use more data or a smaller model.context_length")
    if tc.parallel not in ("ddp", "fsdp"):
        raise UserError(f"train.parallel={tc.parallel!r} is not one of ddp, fsdp")
    sharded = info.enabled and tc.parallel == "fsdp"  # FSDP only means something with several ranks
    if tc.batch_size % (tc.grad_accum * info.world_size):
        raise UserError(f"train.batch_size={tc.batch_size} must be divisible by train.grad_accum "
                        f"({tc.grad_accum}) x processes ({info.world_size})")

    # --- model, optimizer, loader -------------------------------------------------------------
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    model = GPT(cfg.model).to(device)
    if sharded:
        shard_model(model)  # before the optimizer, which must see the sharded parameters
    optimizer = make_optimizer(model, tc, device)
    loader = RandomWindowLoader(train_tokens, tc.batch_size // tc.grad_accum, T, seed=cfg.run.seed,
                                rank=info.rank, world_size=info.world_size)
    state = {"step": 0, "tokens": 0, "planned_steps": tc.max_steps, "best_val_loss": math.inf,
             "elapsed": 0.0}
    ckpt_root = run_dir / "checkpoints"
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=info.is_main)

    start_ckpt = ckpt.latest_valid(ckpt_root, log=say) if resume else None
    if resume and start_ckpt is None:
        say(f"no valid checkpoint in {ckpt_root}; starting from scratch")
    if not resume and ckpt.list_checkpoints(ckpt_root):
        raise UserError(f"{run_dir} already has checkpoints; pass --resume to continue it, or choose "
                        f"another run name (--set run.name=...)")
    if start_ckpt is not None:
        saved = ckpt.read_state(start_ckpt)
        if saved.get("model") != model_fingerprint(cfg):
            diff = [k for k, v in model_fingerprint(cfg).items() if saved.get("model", {}).get(k) != v]
            raise UserError(f"cannot resume {run_dir}: the model config changed ({', '.join(diff)}); "
                            f"resume with the original config or start a new run")
        if saved.get("tokenizer_fingerprint") != tok.fingerprint:
            raise UserError(f"cannot resume {run_dir}: the dataset's tokenizer differs from the checkpoint's")
        ckpt.load_training_state(model, optimizer, start_ckpt, sharded_model=sharded)
        loader.load_state_dict(saved["loader"])
        ckpt.load_rng(start_ckpt, saved)
        for k in ("step", "tokens", "planned_steps", "best_val_loss", "elapsed"):
            state[k] = saved[k]
        if saved["step"] == 0:  # nothing trained yet (an imported model): this config plans the run
            state["planned_steps"] = tc.max_steps
        metrics.truncate_after(state["step"])
        say(f"resumed from {start_ckpt} at step {state['step']}")
    if not all_ranks_agree(state["step"] if start_ckpt else -1, info):
        raise UserError(f"the ranks found different checkpoints in {ckpt_root}; run.out_dir must be on a "
                        f"filesystem that every node sees")
    if tc.tensorboard:
        metrics.add_tensorboard(run_dir / "tensorboard", purge_step=state["step"] + 1)
    if info.is_main:
        (run_dir / "config.toml").write_text(to_toml(cfg))
        tok.save(run_dir / "tokenizer")  # the run is self-contained: generate/eval need only it

    train_model = model
    if info.enabled and not sharded:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    dist_model = train_model  # what `skip_grad_sync` talks to (compile wraps it below)
    done_compiling = False
    if tc.compile:
        train_model = torch.compile(train_model)

    peak = measured_peak_flops(device, precision)
    flops_per_token = model.flops_per_token()
    token_bytes = token_byte_lengths(tok)
    amp = autocast(device, precision)
    tokens_per_step = tc.batch_size * T
    say(f"model: {model.num_params() / 1e6:.2f}M parameters, {cfg.model.n_layers} layers, width "
        f"{cfg.model.d_model}, context {T}; device {device}, precision {precision}, "
        f"{info.world_size} process(es); {len(train_tokens):,} train tokens")

    # Under FSDP every rank must take part in each forward pass (the weights are gathered from
    # all of them), so evaluation and sampling run on every rank; only rank 0 reports.
    evaluates = info.is_main or sharded

    def samples() -> dict:
        texts = generate(model, tok, cfg.eval.prompts, SamplingConfig(
            max_new_tokens=tc.sample_tokens, temperature=0.8, top_k=50, seed=cfg.run.seed))
        model.train()
        return dict(zip(cfg.eval.prompts, texts))

    def run_eval(step: int) -> dict:
        res = evaluate_tokens(model, val_tokens if len(val_tokens) > T else train_tokens[-(T * 4 + 1):],
                              token_bytes, max_windows=tc.eval_batches * 8, autocast=autocast(device, precision))
        record = {"step": step, "val_loss": res.loss, "val_ppl": res.perplexity, "val_bpb": res.bits_per_byte}
        record["samples"] = samples()
        return record

    def show_samples(texts: dict) -> None:
        for prompt, text in texts.items():
            progress.message(f"  {prompt!r} -> {(prompt + text)[:160]!r}")

    progress = Progress(state["planned_steps"], enabled=info.is_main and not quiet)
    stopped_by = "steps"
    last_eval: dict = {}
    t0 = time.time() - state["elapsed"]
    run_start_step = state["step"]
    t_run = t_step10 = time.time()
    interval = None  # (time, step) since the last evaluation: to re-plan a time budget
    model.train()
    with _StopFlag() as stop:
        while state["step"] < state["planned_steps"]:
            step = state["step"]
            lr = lr_at(step, state["planned_steps"], tc.lr, tc.warmup_steps, tc.schedule, tc.min_lr_ratio,
                       tc.decay_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(tc.grad_accum):
                x, y = loader.next_batch()
                x, y = x.to(device), y.to(device)
                # accumulate locally; all-reduce (DDP) / reduce-scatter (FSDP) on the last micro-step
                sync = skip_grad_sync(dist_model, tc.parallel, skip=info.enabled and micro < tc.grad_accum - 1)
                with sync:
                    try:
                        with amp:
                            _, loss = train_model(x, y)
                    except Exception as e:  # torch.compile needs a C++ toolchain; never let it kill a run
                        if train_model is dist_model or done_compiling:
                            raise
                        say(f"torch.compile failed ({type(e).__name__}); continuing without it")
                        train_model = dist_model
                        with amp:
                            _, loss = train_model(x, y)
                    (loss / tc.grad_accum).backward()
                loss_sum += loss.item()
            if not math.isfinite(loss_sum):
                raise UserError(f"loss became {loss_sum} at step {step}; lower train.lr or check the data")
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done_compiling = True
            state["step"] = step = step + 1
            state["tokens"] += tokens_per_step
            loss_val = all_reduce_mean(loss_sum / tc.grad_accum, info, device)

            elapsed = time.time() - t0
            state["elapsed"] = elapsed
            done_here = step - run_start_step
            tok_s = done_here * tokens_per_step / max(time.time() - t_run, 1e-9)
            mfu = tok_s * flops_per_token / peak
            # With a time budget, fix the planned length once we know the speed, so the LR
            # schedule still ends where the run ends. The speed is measured over steps 10-20,
            # after warm-up (torch.compile, allocator), which would otherwise skew it.
            if done_here == 10:
                t_step10 = time.time()
            if tc.max_minutes and done_here == 20 and step < state["planned_steps"]:
                remaining = tc.max_minutes * 60 - elapsed
                est = step + int(remaining / ((time.time() - t_step10) / 10) * 0.9)
                state["planned_steps"] = max(min(state["planned_steps"], est), step + 1)
                interval = (time.time(), step)
            if tc.max_tokens and state["tokens"] >= tc.max_tokens:
                state["planned_steps"], stopped_by = step, "tokens"
            if tc.max_minutes and elapsed >= tc.max_minutes * 60:
                state["planned_steps"], stopped_by = step, "minutes"
            if stop.stop:
                stopped_by = "signal"
            state["planned_steps"], stopped_by = agree_on_stop(state["planned_steps"], stopped_by, info)
            progress.total = state["planned_steps"]
            metrics.write({"step": step, "loss": loss_val, "lr": lr, "tokens": state["tokens"],
                           "tok_per_s": round(tok_s, 1), "mfu": round(mfu, 4), "elapsed": round(elapsed, 2)})
            eta = (state["planned_steps"] - step) * (time.time() - t_run) / max(done_here, 1)
            if step % tc.log_every == 0 or step == state["planned_steps"]:
                progress.update(step, loss_val, tok_s, mfu, lr, eta)

            final = step >= state["planned_steps"] or stopped_by == "signal"
            t_step_end = time.time()
            if (info.is_main or sharded) and (final or (tc.checkpoint_every and step % tc.checkpoint_every == 0)):
                saved_at = _save(ckpt_root, step, model, optimizer, {
                    **state, "loader": loader.state_dict(), "model": model_fingerprint(cfg),
                    "tokenizer_fingerprint": tok.fingerprint, "config": dataclasses.asdict(cfg)}, info, sharded)
                if info.is_main:
                    ckpt.prune(ckpt_root, tc.keep_last, protect=saved_at)
            barrier(info)
            if stopped_by == "signal":
                progress.message(f"stopped by signal at step {step}; checkpoint saved, continue with --resume")
                break
            evaluating = evaluates and (final or (tc.eval_every and step % tc.eval_every == 0))
            if evaluating:
                last_eval = run_eval(step)
                metrics.write({"type": "eval", **last_eval})
                progress.message(f"step {step}: val loss {last_eval['val_loss']:.4f}, ppl "
                                 f"{last_eval['val_ppl']:.1f}, {last_eval['val_bpb']:.3f} bits/byte")
                show_samples(last_eval["samples"])
                if tc.keep_best and last_eval["val_loss"] < state["best_val_loss"]:
                    state["best_val_loss"] = last_eval["val_loss"]
                    _save(run_dir / "best", 0, model, None, {
                        **state, "model": model_fingerprint(cfg), "tokenizer_fingerprint": tok.fingerprint,
                        "config": dataclasses.asdict(cfg), "val_loss": last_eval["val_loss"], "from_step": step},
                        info, sharded)
            elif evaluates and tc.sample_every and step % tc.sample_every == 0:
                texts = samples()
                metrics.write({"type": "samples", "step": step, "samples": texts})
                progress.message(f"step {step} samples:")
                show_samples(texts)
            if tc.max_minutes and evaluating and interval and not final:
                # Re-plan with what the run has learned: the speed since the last evaluation and
                # the cost of checkpointing + evaluating, spread over the steps between evaluations.
                # (Rank 0's plan is the one every rank follows, from the next step.)
                per_step = (t_step_end - interval[0]) / max(step - interval[1], 1)
                per_step += (time.time() - t_step_end) / tc.eval_every
                remaining = tc.max_minutes * 60 - (time.time() - t0)
                est = step + int(remaining / per_step * 0.97)
                state["planned_steps"] = max(min(tc.max_steps, est), step + 1)
                interval = (time.time(), step)
            barrier(info)

    seconds = time.time() - t_run
    trained = state["step"] - run_start_step
    metrics.close()
    teardown(info)
    return TrainResult(run_dir=run_dir, step=state["step"], tokens=state["tokens"], seconds=seconds,
                       tokens_per_s=trained * tokens_per_step / max(seconds, 1e-9), final_eval=last_eval,
                       stopped_by=stopped_by, precision=precision, device=str(device),
                       is_main=info.is_main)


def _save(root: Path, step: int, model: GPT, optimizer, state: dict, info, sharded: bool) -> Path:
    """A checkpoint, or one clear line if the disk is full or the directory unwritable. The
    checkpoint is staged and renamed, so a failed save leaves the earlier ones as they were."""
    try:
        return ckpt.save_checkpoint(root, step, model, optimizer, state, info=info, sharded=sharded)
    except OSError as e:
        raise UserError(f"could not save the step-{step} checkpoint in {root} ({e.strerror or e}); earlier "
                        f"checkpoints are intact: free some space, then continue with --resume") from None


def load_for_inference(ckpt_dir: str | Path, device: str = "auto") -> tuple[GPT, Tokenizer, dict]:
    """A model and its tokenizer from a checkpoint or run directory, ready to generate or evaluate."""
    path = Path(ckpt_dir)
    if not path.exists():
        raise UserError(f"checkpoint {path} not found")
    if (path / "checkpoints").exists() or (path / "best").exists():  # a run directory
        best = list(ckpt.list_checkpoints(path / "best"))
        latest = ckpt.latest_valid(path / "checkpoints", log=lambda *_: None)
        path = best[-1] if best and ckpt.validate(best[-1]) is None else latest
        if path is None:
            raise UserError(f"no valid checkpoint in run directory {ckpt_dir}")
    problem = ckpt.validate(path)
    if problem:
        raise UserError(f"checkpoint {path} is not usable: {problem}")
    state = ckpt.read_state(path)
    from scratchlm.config import from_dict
    cfg = from_dict(state["config"])
    dataset_tok = Path(cfg.data.dataset_dir or cfg.run_dir / "data") / "tokenizer"
    tok_dir = path.parent.parent / "tokenizer"
    for candidate in (path / "tokenizer", tok_dir, dataset_tok):
        if (candidate / "tokenizer.scratchlm.json").exists():
            tok = Tokenizer.load(candidate)
            break
    else:
        raise UserError(f"no tokenizer found for checkpoint {path} (looked in {tok_dir} and {dataset_tok})")
    if tok.fingerprint != state.get("tokenizer_fingerprint"):
        raise UserError(f"the tokenizer at {tok_dir} is not the one checkpoint {path} was trained with")
    dev = pick_device(device)
    model = GPT(cfg.model)
    ckpt.load_model_weights(model, path)
    model.to(dev).eval()
    return model, tok, {"config": cfg, "state": state, "path": str(path)}


def save_json(path: Path, data: dict) -> None:
    from scratchlm.atomic import write_text
    write_text(path, json.dumps(data, indent=1, default=str))


