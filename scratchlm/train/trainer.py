"""The one training loop, and the step it repeats.

    train(cfg, model, objective)   any stage: pretraining, fine-tuning, DPO (each an Objective)
    pretrain(cfg, dataset_dir)     a GPT learning next-token prediction on prepared shards

The loop, once per optimizer step (read `train` below, paragraph by paragraph):
    save a checkpoint, evaluate, sample: once in a while and at the end (the save first, so a
        crash in evaluation never loses training)
    stop, if that was the last step
    one training step (`train_step`): set the LR (and, in a sequence-length warm-up, the length),
        accumulate the gradients of the micro-batches, clip, AdamW (or Muon + AdamW)
    the budget: steps, tokens, a time budget re-planned from the measured speed; rank 0 decides
        and every rank follows, so all compute the same learning rate and stop together
    log

Everything that decides the numbers (weights, AdamW moments, data position, RNG) is in the
checkpoint, and dropout masks depend only on (seed, rank, step), so a resumed run continues bit
for bit (on CPU) where the killed one stopped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from scratchlm.config import Config, to_toml
from scratchlm.errors import UserError
from scratchlm.model import GPT, ModelConfig
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.distributed import Parallel, agree_on_stop, all_ranks_agree, barrier, parallelize, setup, teardown
from scratchlm.train.hardware import keep_freed_memory, peak_flops
from scratchlm.train.logger import MetricsLog, Progress, Speed
from scratchlm.train.muon import Muon, MuonAdamW
from scratchlm.train.objective import Objective, PretrainObjective
from scratchlm.train.precision import autocast, pick_device, pick_precision
from scratchlm.train.schedule import TimeBudget, lr_continued, plateau, seq_length_at


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    seconds: float
    tokens_per_s: float      # over training steps only (not evaluation, not the first, compiling step)
    final_eval: dict
    stopped_by: str          # "steps" | "tokens" | "minutes" | "signal"
    precision: str
    device: str
    is_main: bool = True     # rank 0 (or the only process): the one that reports


def pretrain(cfg: Config, dataset_dir: str | Path, resume: bool = False, log: Callable[[str], None] = print,
             quiet: bool = False) -> TrainResult:
    """A GPT (cfg.model) learning next-token prediction on the shards `scratchlm prepare` wrote."""
    objective = PretrainObjective(dataset_dir, cfg.model.context_length, cfg.eval.prompts,
                                  eval_windows=cfg.train.eval_batches * 8, sample_tokens=cfg.train.sample_tokens)
    vocab = objective.tokenizer.vocab_size
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = vocab
    if cfg.model.vocab_size < vocab:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                        f"({vocab}); set model.vocab_size >= {vocab} (or 0 to match)")
    if cfg.model.vocab_size > -(-vocab // 128) * 128 and os.environ.get("RANK", "0") == "0":
        # more than the usual round-up for fast matmuls: a char tokenizer under a BPE-sized preset, say
        log(f"warning: model.vocab_size={cfg.model.vocab_size} but the tokenizer has {vocab} tokens, so "
            f"{cfg.model.vocab_size - vocab} output rows are never a target; model.vocab_size=0 matches it")
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    return train(cfg, GPT(cfg.model), objective, resume=resume, log=log, quiet=quiet)


def train(cfg: Config, model: nn.Module, objective: Objective, *, resume: bool = False,
          log: Callable[[str], None] = print, quiet: bool = False) -> TrainResult:
    """Train `model` (built by the caller, on CPU; only parameters with requires_grad train) on
    `objective` under cfg.train, in the run directory cfg.run_dir."""
    tc = cfg.train
    device = pick_device(cfg.run.device)
    info = setup(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    precision = pick_precision(tc.precision, device)
    if device.type == "cpu":
        keep_freed_memory()  # every step reuses the last one's memory instead of faulting fresh pages in
    micro_batch = micro_batch_size(tc, info.world_size)
    say = log if info.is_main else (lambda *_: None)
    run_dir, ckpt_root = cfg.run_dir, cfg.run_dir / "checkpoints"
    if info.is_main:
        _check_run_dir(run_dir)

    # A sequence-length warm-up trains on a few shapes: a static graph for each, not one with symbolic sizes
    par = parallelize(model.to(device), info, tc.parallel, device, compile=tc.compile,
                      dynamic=False if tc.seq_warmup_steps else None)
    optimizer = make_optimizer(model, tc, device, par.sharded)  # after parallelize: FSDP swaps in sharded parameters
    objective.setup(info.rank, info.world_size, micro_batch, cfg.run.seed)
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=info.is_main)
    state = {"step": 0, "tokens": 0, "planned_steps": tc.max_steps, "best_val_loss": math.inf, "elapsed": 0.0,
             "lr_anchor": None}
    resumed = _resume(cfg, model, optimizer, objective, par, state, metrics, say) if resume else False
    if not resume and ckpt.list_checkpoints(ckpt_root):
        raise UserError(f"{run_dir} already has checkpoints; pass --resume to continue it, or choose "
                        f"another run name (--set run.name=...)")
    if not all_ranks_agree(state["step"] if resumed else -1, info):
        raise UserError(f"the ranks found different checkpoints in {ckpt_root}; run.out_dir must be on a "
                        f"filesystem that every node sees")
    if tc.tensorboard:
        metrics.add_tensorboard(run_dir / "tensorboard", purge_step=state["step"] + 1)
    if info.is_main:
        (run_dir / "config.toml").write_text(to_toml(cfg))
        objective.tokenizer.save(run_dir / "tokenizer")  # the run is self-contained: generate/eval need only it

    amp = autocast(device, precision)
    peak, peak_source = peak_flops(device, precision)
    flops_per_token = model.flops_per_token() if hasattr(model, "flops_per_token") else 0.0
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"model: {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained); device {device}, precision "
        f"{precision}, {info.world_size} process(es) x {micro_batch} per micro-step x {tc.grad_accum} micro-steps; "
        f"MFU against {peak / 1e12:.1f} TFLOP/s per device ({peak_source})")

    talks = info.is_main or par.sharded  # who saves, evaluates and samples: rank 0, or every rank under FSDP

    def save(step: int, root: Path, optimizer) -> None:
        """A checkpoint, or one clear line if the disk is full."""
        if not talks:
            return
        extra = {"data": objective.state_dict(), "model": model_fingerprint(cfg), "task": objective.checkpoint_meta(),
                 "tokenizer_fingerprint": objective.tokenizer.fingerprint, "config": dataclasses.asdict(cfg)}
        try:
            saved = ckpt.save_checkpoint(root, step, model, optimizer, {**state, **extra}, info=info,
                                         sharded=par.sharded, weights=objective.checkpoint_weights(model))
        except OSError as e:
            raise UserError(f"could not save the step-{step} checkpoint in {root} ({e.strerror or e}); earlier "
                            f"checkpoints are intact: free some space, then continue with --resume") from None
        if info.is_main:
            ckpt.prune(root, tc.keep_last if optimizer is not None else 1, protect=saved)

    def evaluate(step: int) -> dict:
        """Held-out metrics and samples, logged; the best model kept, named by its step."""
        if not talks:
            return {}
        model.eval()
        with amp:
            scores = objective.evaluate(model)
        samples = objective.samples(model)
        model.train()
        metrics.write({"type": "eval", "step": step, **scores, "samples": samples})
        progress.message(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        show(samples)
        if tc.keep_best and scores["val_loss"] < state["best_val_loss"]:
            state["best_val_loss"] = scores["val_loss"]
            save(step, run_dir / "best", None)
        return {"step": step, **scores, "samples": samples}

    def sample(step: int) -> None:
        if not talks:
            return
        model.eval()
        texts = objective.samples(model)
        model.train()
        metrics.write({"type": "samples", "step": step, "samples": texts})
        progress.message(f"step {step} samples:")
        show(texts)

    def show(samples: dict) -> None:
        for prompt, text in samples.items():
            progress.message(f"  {prompt!r} -> {(prompt + text)[:160]!r}")

    def log_step(step: int, lr: float, out: dict) -> None:
        speed.add(out["tokens"], out["seconds"])
        tok_s = speed.tokens_per_s()
        mfu = tok_s * flops_per_token / (peak * info.world_size)  # per device, as the peak is
        metrics.write({"step": step, **{k: v for k, v in out.items() if k not in ("tokens", "seconds")}, "lr": lr,
                       "tokens": state["tokens"], "tok_per_s": round(tok_s, 1), "mfu": round(mfu, 4),
                       "elapsed": round(state["elapsed"], 2)})
        progress.total = state["planned_steps"]
        if every(step, tc.log_every) or step == state["planned_steps"]:
            progress.update(step, out["loss"], tok_s, mfu, lr, speed.eta(state["planned_steps"] - step))

    # --- the loop ----------------------------------------------------------------------------
    step = first_step = state["step"]
    budget = TimeBudget(tc.max_minutes, elapsed=state["elapsed"])
    progress = Progress(state["planned_steps"], enabled=info.is_main and not quiet)
    speed, started, stopped_by, final_eval = Speed(), time.time(), "steps", {}
    model.train()
    with _StopFlag() as stop:
        while True:
            last_step = step >= state["planned_steps"] or stopped_by == "signal"
            evaluated, busy_since = False, time.time()

            # once in a while and at the end: save, then evaluate or sample (a crash there loses no training)
            if step > first_step:
                if last_step or every(step, tc.checkpoint_every):
                    save(step, ckpt_root, optimizer)
                if stopped_by == "signal":
                    progress.message(f"stopped by signal at step {step}; checkpoint saved, continue with --resume")
                    break
                evaluated = last_step or every(step, tc.eval_every)
                if evaluated:
                    final_eval = evaluate(step)
                elif every(step, tc.sample_every):
                    sample(step)
            budget.add_busy(time.time() - busy_since)
            if last_step:
                break

            # one training step
            lr = lr_continued(step, state["planned_steps"], tc, state["lr_anchor"])
            if tc.seq_warmup_steps:
                seq_len = seq_length_at(step, tc.seq_warmup_steps, cfg.model.context_length, tc.seq_warmup_start)
                objective.set_train_length(seq_len)
            out = train_step(par, objective, optimizer, lr, tc.grad_accum, tc.grad_clip, amp,
                             seed=step_seed(cfg.run.seed, info.rank, step), log=say)
            if tc.seq_warmup_steps:
                out["seq_len"] = seq_len
            step = state["step"] = step + 1
            state["tokens"] += out["tokens"]

            # the budget: rank 0's plan and clock decide, every rank follows (same LR, same last step)
            state["planned_steps"], stopped_by = next_plan(step, state, tc, budget, evaluated, stop.stop, info)
            state["elapsed"] = budget.elapsed()

            log_step(step, lr, out)

    metrics.close()
    teardown(info)
    return TrainResult(run_dir=run_dir, step=state["step"], tokens=state["tokens"], seconds=time.time() - started,
                       tokens_per_s=speed.tokens_per_s(), final_eval=final_eval, stopped_by=stopped_by,
                       precision=precision, device=str(device), is_main=info.is_main)


def train_step(par: Parallel, objective: Objective, optimizer: torch.optim.Optimizer, lr: float, grad_accum: int,
               grad_clip: float, amp, seed: int, log: Callable[[str], None] = print) -> dict[str, float]:
    """One optimizer step over `grad_accum` micro-batches on every rank. Returns the step's loss
    (the mean over every loss term of the step, all ranks), its metrics, the tokens it saw (all
    ranks) and the seconds it took."""
    started = time.time()
    torch.manual_seed(seed)  # dropout: different on every rank and step, the same again on resume
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's matrices: their own peak, the same schedule
    batches = [objective.next_batch() for _ in range(grad_accum)]
    (total,) = par.sum([float(sum(objective.count(b) for b in batches))])
    # Each term weighs 1/total. DDP and FSDP *average* gradients over ranks, so each rank scales its
    # sum by world_size / total: after the average, the gradient is that of (all sums) / total.
    scale = par.info.world_size / max(total, 1.0)
    loss_sum, sums, tokens = 0.0, {}, 0
    for i, batch in enumerate(batches):
        tokens += objective.tokens(batch)
        batch = {k: v.to(par.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with par.grad_sync(last_micro_step=i == grad_accum - 1):  # communicate on the last micro-step only
            loss, terms = _objective_loss(par, objective, batch, amp, log)
            (loss * scale).backward()
        loss_sum += loss.item()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    if grad_clip > 0:  # after backward, so on the gradients already averaged over the ranks
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    par.compiled_ok = True
    names = sorted(sums)
    reduced = par.sum([loss_sum, float(tokens)] + [sums[k] for k in names])
    loss = reduced[0] / max(total, 1.0)
    if not math.isfinite(loss):
        raise UserError(f"the loss became {loss}; lower train.lr or check the data")
    return {"loss": loss, "tokens": int(reduced[1]), "seconds": time.time() - started,
            **{k: v / max(total, 1.0) for k, v in zip(names, reduced[2:])}}


def _objective_loss(par: Parallel, objective: Objective, batch: dict, amp, log) -> tuple[torch.Tensor, dict]:
    """objective.loss through the training model. torch.compile needs a C++ toolchain and fails on
    the first call without one: never let that kill a run, continue without it."""
    try:
        with amp:
            return objective.loss(par.model, batch)
    except Exception as e:
        if par.model is par.eager or par.compiled_ok:
            raise
        log(f"torch.compile failed ({type(e).__name__}); continuing without it")
        par.model = par.eager
        with amp:
            return objective.loss(par.model, batch)


# --- the pieces the loop calls ----------------------------------------------------------------

def next_plan(step: int, state: dict, tc, budget: TimeBudget, evaluated: bool, signalled: bool,
              info) -> tuple[int, str]:
    """(planned steps, why the run stops there) after `step`: the time budget re-planned from the
    measured speed, the token budget, the clock, a signal. Rank 0's plan and clock decide for all
    ranks; a signal to any rank stops them all."""
    plan, reason = state["planned_steps"], "steps"
    if tc.max_minutes:
        grow = state["lr_anchor"] is None and plateau(step, plan, tc)
        plan = budget.after_step(step, plan, evaluated=evaluated, eval_every=tc.eval_every,
                                 may_grow=grow, cap=tc.max_steps)
    if tc.max_tokens and state["tokens"] >= tc.max_tokens:
        plan, reason = step, "tokens"
    if tc.max_minutes and (budget.expired() or step >= plan < tc.max_steps):  # out of time, or of the steps that fit
        plan, reason = step, "minutes"
    return agree_on_stop(plan, "signal" if signalled else reason, info)


def every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def step_seed(seed: int, rank: int, step: int) -> int:
    """A seed per (run seed, rank, step): ranks drop different units, a resumed run the same ones."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def micro_batch_size(tc, world_size: int) -> int:
    """Sequences per rank per micro-step: batch_size is global, split over grad_accum and ranks."""
    if tc.batch_size % (tc.grad_accum * world_size):
        raise UserError(f"train.batch_size={tc.batch_size} must be divisible by train.grad_accum "
                        f"({tc.grad_accum}) x processes ({world_size}); e.g. batch_size="
                        f"{max(tc.batch_size // (tc.grad_accum * world_size), 1) * tc.grad_accum * world_size}")
    return tc.batch_size // (tc.grad_accum * world_size)


def make_optimizer(model: nn.Module, tc, device: torch.device, sharded: bool = False):
    """AdamW over the parameters that train; weight decay only on matrices (>= 2-D) that are not
    embeddings: not norms, biases, embeddings or the output matrix tied to them.

    train.optimizer=muon: the blocks' matrices (layers.N..., 2-D) go to Muon instead (train/muon.py),
    at train.muon_lr; each group's `lr_scale` is its peak LR over train.lr, so one schedule drives both."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, matrices, qkv = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if tc.optimizer == "muon" and p.dim() == 2 and name.startswith("layers."):
            (qkv if name.endswith("attn.qkv.weight") else matrices).append(p)
        else:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel reads and writes each parameter, gradient and moment once (on CPU too: the
    # default there is a Python loop of ~10 ops per tensor). Same update up to float rounding.
    adamw = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=device.type in ("cuda", "cpu"))
    if tc.optimizer == "adamw":
        return adamw
    if sharded:
        raise UserError("train.optimizer=muon cannot run under train.parallel=fsdp (Newton-Schulz needs whole "
                        "matrices, FSDP holds shards of them); use train.parallel=ddp or train.optimizer=adamw")
    c = getattr(model, "cfg", None)
    splits = [c.n_heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim] if c else None
    scale = tc.muon_lr / tc.lr
    muon = Muon([{"params": matrices, "lr_scale": scale}, {"params": qkv, "lr_scale": scale, "row_splits": splits}],
                lr=tc.muon_lr)
    return MuonAdamW(muon, adamw)


def model_fingerprint(cfg: Config) -> dict:
    return dataclasses.asdict(cfg.model)


def _resume(cfg: Config, model: nn.Module, optimizer, objective: Objective, par: Parallel, state: dict,
            metrics: MetricsLog, say) -> bool:
    """Load the latest valid checkpoint into everything (False if there is none). A changed budget
    (max_steps, max_tokens, max_minutes) is taken from the config given now, and the learning rate
    continues from where it was to the new end."""
    tc, root = cfg.train, cfg.run_dir / "checkpoints"
    if par.info.is_main:
        for d in (root, cfg.run_dir / "best"):
            for name in ckpt.remove_staging(d):
                say(f"removed {d / name}, left by an interrupted save")
    barrier(par.info)
    start = ckpt.latest_valid(root, log=say)
    if start is None:
        say(f"no valid checkpoint in {root}; starting from scratch")
        return False
    saved = ckpt.read_state(start)
    # A field the checkpoint does not name is newer than it: the run had that field's default.
    saved_model = {**dataclasses.asdict(ModelConfig()), **saved.get("model", {})}
    if saved_model != model_fingerprint(cfg):
        diff = [k for k, v in model_fingerprint(cfg).items() if saved_model.get(k) != v]
        raise UserError(f"cannot resume {cfg.run_dir}: the model config changed ({', '.join(diff)}); "
                        f"resume with the original config or start a new run")
    if saved.get("tokenizer_fingerprint") != objective.tokenizer.fingerprint:
        raise UserError(f"cannot resume {cfg.run_dir}: the dataset's tokenizer differs from the checkpoint's")
    old = saved.get("config", {}).get("train", {})
    if old.get("optimizer", "adamw") != tc.optimizer:  # a key the checkpoint predates: its default
        raise UserError(f"cannot resume {cfg.run_dir}: it was trained with train.optimizer="
                        f"{old.get('optimizer', 'adamw')}, not {tc.optimizer}; resume with that optimizer or start "
                        f"a new run")
    partial = objective.checkpoint_weights(model) is not None
    ckpt.load_training_state(model, optimizer, start, sharded_model=par.sharded, strict=not partial)
    objective.load_state_dict(saved.get("data", saved.get("loader", {})))
    ckpt.load_rng(start, saved)
    for k in state:
        state[k] = saved.get(k, state[k])
    step = state["step"]
    changed = [f"train.{k} {old.get(k)} -> {getattr(tc, k)}" for k in ("max_steps", "max_tokens", "max_minutes")
               if k in old and old[k] != getattr(tc, k)]
    if changed:
        lr_next = lr_continued(step, state["planned_steps"], tc, state["lr_anchor"])
        state["planned_steps"] = tc.max_steps
        if step >= tc.warmup_steps:
            state["lr_anchor"] = [step, lr_next]
        say(f"resuming with the budget of the config given now ({', '.join(changed)}); the learning rate "
            f"goes on from {lr_next:.3g}" + (" (the time budget counts the minutes already spent)"
                                            if tc.max_minutes else ""))
    metrics.truncate_after(step)
    say(f"resumed from {start} at step {step}")
    if step >= state["planned_steps"]:
        say(f"the run already trained {step} steps, its whole budget; raise train.max_steps to train further")
    return True


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
