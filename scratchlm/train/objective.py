"""What the one training loop learns from: a data source and a loss.

Pretraining, fine-tuning (classification, instructions, LoRA) and preference tuning (DPO) all train
through `train()` in trainer.py. The loop owns everything that is the same for all of them: device,
precision, DDP/FSDP, compile, learning-rate schedule, budgets, gradient accumulation, clipping,
checkpoints and exact resume, signals, logging. A stage owns only what differs, as an `Objective`:

    objective.setup(rank, world_size, micro_batch, seed)   once, before the first step
    batch = objective.next_batch()                          a dict of CPU tensors, one micro-batch
    loss_sum, metric_sums = objective.loss(model, batch)    a SUM over the batch's loss terms
    objective.count(batch)                                  how many terms that sum holds

Why a sum and a count, not a mean: with gradient accumulation and several processes, one optimizer
step sees many micro-batches, and in fine-tuning they hold different numbers of loss tokens. The
loop divides the sum by the count of the *whole step* (every micro-batch, every rank), so each
term weighs the same wherever the micro-batch boundaries fall. (A mean per micro-batch would give
a token in a short batch more weight than one in a long batch.)
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

from scratchlm.data.dataset import RandomWindowLoader
from scratchlm.data.shards import load_split
from scratchlm.errors import UserError
from scratchlm.eval.perplexity import evaluate_tokens, token_byte_lengths
from scratchlm.generate import SamplingConfig, generate
from scratchlm.tokenizer import Tokenizer


class Objective:
    """What the one training loop learns from: a data source and a loss. One subclass per stage."""

    tokenizer: Tokenizer  # saved into <run>/tokenizer; its fingerprint is checked on resume

    def setup(self, rank: int, world_size: int, micro_batch: int, seed: int) -> None:
        """Called once by train() before the first step: build this rank's data loader
        (micro_batch = train.batch_size // (train.grad_accum * world_size) sequences/examples/pairs)."""
        raise NotImplementedError

    def next_batch(self) -> dict[str, torch.Tensor]:
        """One micro-batch for this rank (CPU tensors; the trainer moves every tensor to the device)."""
        raise NotImplementedError

    def count(self, batch: dict) -> int:
        """How many loss terms the micro-batch holds: tokens that carry loss (pretrain, SFT), examples
        (classifier), pairs (DPO)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The SUM of per-term losses over the micro-batch (scalar tensor with grad) and metric SUMS
        (floats, e.g. {"correct": 3.0}). The trainer divides the loss by the total count of the whole
        optimizer step (all micro-batches and all ranks); it logs metric sums / total count.

        `model` is what training calls: possibly a DDP wrapper or a compiled module, so call it
        (its forward) and nothing else on it; keep your own reference for anything more."""
        raise NotImplementedError

    def tokens(self, batch: dict) -> int:
        """Tokens processed by this micro-batch (for tokens/s and the token budget)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics; must contain "val_loss" (what keep_best tracks). Called with the model in
        eval mode on rank 0 (all ranks under FSDP); the trainer puts it back in train mode."""
        raise NotImplementedError

    def samples(self, model: nn.Module) -> dict[str, str]:
        """Sample generations for the log ({prompt: text}); may return {}."""
        return {}

    def state_dict(self) -> dict:
        """The data position, JSON-serialisable, for exact resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def checkpoint_meta(self) -> dict:
        """JSON saved in the checkpoint's state.json under "task"; load_for_inference reads it back."""
        return {"kind": "pretrain"}

    def set_train_length(self, length: int) -> None:
        """Sequence-length warm-up (train.seq_warmup_steps): train on sequences of `length` tokens."""
        raise UserError("train.seq_warmup_steps is for pretraining; set it to 0 for this stage")

    def checkpoint_weights(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """None = save the whole model (default). A LoRA run returns only the adapter tensors; on
        resume the trainer then loads the checkpoint into the model the caller built with strict=False."""
        return None


class PretrainObjective(Objective):
    """Next-token prediction on prepared shards: random non-overlapping windows, epoch by epoch."""

    def __init__(self, dataset_dir: str | Path, context_length: int, prompts: list[str] = (),
                 eval_windows: int = 160, sample_tokens: int = 48, tokenizer: Tokenizer | None = None):
        dataset_dir = Path(dataset_dir)
        # The shards must have been made by this tokenizer (index.json's fingerprint): a given one, or the
        # copy saved beside the shards, which an edited or swapped tokenizer/ directory would betray.
        self.tokenizer = tokenizer or Tokenizer.load(dataset_dir / "tokenizer")
        self.train_tokens = load_split(dataset_dir, "train", tokenizer=self.tokenizer)
        self.val_tokens = load_split(dataset_dir, "val", tokenizer=self.tokenizer)
        self.T = context_length
        self.prompts, self.eval_windows, self.sample_tokens = list(prompts), eval_windows, sample_tokens
        if len(self.train_tokens) < self.T + 1:
            raise UserError(f"the training split has {len(self.train_tokens)} tokens, less than one context window "
                            f"({self.T + 1}); use more data or a smaller model.context_length")
        if len(self.val_tokens) < self.T + 1:  # never score the training tail and call it val_loss
            raise UserError(f"the validation split of {dataset_dir} has {len(self.val_tokens)} tokens, less than one "
                            f"context window ({self.T + 1}); prepare it with a larger data.val_fraction (or more "
                            f"text), or use a smaller model.context_length")
        self.token_bytes = token_byte_lengths(self.tokenizer)
        self.loader: RandomWindowLoader | None = None
        self.resume_state: dict | None = None  # a data position loaded before setup()
        self.seed = 0
        self.train_length = context_length  # shorter during a sequence-length warm-up

    def setup(self, rank: int, world_size: int, micro_batch: int, seed: int) -> None:
        # The loader cuts each global micro-batch (micro_batch x world_size windows) into one slice per rank.
        self.seed = seed
        self.loader = RandomWindowLoader(self.train_tokens, micro_batch * world_size, self.T, seed=seed,
                                         rank=rank, world_size=world_size)
        if self.resume_state is not None:
            self.loader.load_state_dict(self.resume_state)

    def set_train_length(self, length: int) -> None:
        self.train_length = length

    def next_batch(self) -> dict[str, torch.Tensor]:
        x, y = self.loader.next_batch()
        # Sequence-length warm-up: the same windows, cut into shorter sequences (the same tokens per step)
        n = self.train_length
        return {"input": x.reshape(-1, n), "target": y.reshape(-1, n)}

    def count(self, batch: dict) -> int:
        return batch["target"].numel()

    def tokens(self, batch: dict) -> int:
        return batch["input"].numel()

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        # Given targets, the model computes the mean loss itself, through the chunked output head where it
        # can (model/gpt.py `head_cross_entropy`: the tokens x vocab logits are never materialised).
        _, mean = model(batch["input"], batch["target"])
        return mean * batch["target"].numel(), {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        # The trainer runs this under its autocast; evaluate_tokens must not override it.
        res = evaluate_tokens(model, self.val_tokens, self.token_bytes, max_windows=self.eval_windows,
                              autocast=contextlib.nullcontext())
        return {"val_loss": res.loss, "val_ppl": res.perplexity, "val_bpb": res.bits_per_byte}

    def samples(self, model: nn.Module) -> dict[str, str]:
        if not self.prompts:
            return {}
        texts = generate(model, self.tokenizer, self.prompts, SamplingConfig(
            max_new_tokens=self.sample_tokens, temperature=0.8, top_k=50, seed=self.seed))
        return dict(zip(self.prompts, texts))

    def state_dict(self) -> dict:
        return self.loader.state_dict() if self.loader else dict(self.resume_state or {})

    def load_state_dict(self, state: dict) -> None:
        self.resume_state = dict(state)
        if self.loader is not None:
            self.loader.load_state_dict(state)
