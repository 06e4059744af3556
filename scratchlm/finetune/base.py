"""Start a fine-tune from a base checkpoint, choose what trains, and rebuild fine-tuned runs.

    gpt, tok, base = load_base("runs/base")             # any of our checkpoints (LoRA ones merged)
    set_trainable(gpt, "last-block")                    # head | last-block | all | lora
    model = rebuild(cfg, task_meta, ckpt_dir)           # what load_for_inference calls for a fine-tuned run

A LoRA checkpoint holds only the adapters (and a classifier's head); `rebuild` loads the base it
names, checks the base's fingerprint, and attaches them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from scratchlm.config import LoraConfig
from scratchlm.errors import UserError
from scratchlm.finetune.data import EpochSampler
from scratchlm.finetune.lora import adapter_state, add_lora, base_fingerprint, load_adapter_tensors, merge_and_unload
from scratchlm.model import GPT
from scratchlm.train.objective import Objective

TRAINABLE = ("head", "last-block", "all", "lora")


class FinetuneObjective(Objective):
    """What the classifier and SFT objectives share: examples drawn epoch by epoch by an
    `EpochSampler` whose position resumes exactly, the run's `meta` (recorded in every
    checkpoint), and adapter-only checkpoints for a LoRA run."""

    sampler: EpochSampler | None = None
    _pending_state: dict | None = None   # a position loaded before setup() built the sampler
    meta: dict = {}

    def _start_sampler(self, rank: int, world_size: int, micro_batch: int, seed: int,
                       groups: list[list[int]] | None = None) -> None:
        self.sampler = EpochSampler(len(self.train_set), seed, groups, rank, world_size)
        self.micro_batch = micro_batch
        if self._pending_state is not None:
            self.sampler.load_state_dict(self._pending_state)

    def state_dict(self) -> dict:
        return self.sampler.state_dict() if self.sampler else (self._pending_state or {"epoch": 0, "pos": 0})

    def load_state_dict(self, state: dict) -> None:
        self._pending_state = dict(state)
        if self.sampler is not None:
            self.sampler.load_state_dict(state)

    def checkpoint_meta(self) -> dict:
        return self.meta

    def checkpoint_weights(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        return adapter_state(model) if self.meta.get("lora") else None


def load_base(ckpt: str | Path, init: str = "pretrained", seed: int = 1337):
    """(GPT, tokenizer, checkpoint path) from any scratchlm checkpoint or run directory, on CPU.
    `init="random"` keeps only the shape and the tokenizer (the "from scratch" ablation)."""
    from scratchlm.train.checkpoint import load_for_inference
    model, tok, meta = load_for_inference(ckpt, device="cpu")
    task = meta["state"].get("task") or {"kind": "pretrain"}
    if task.get("kind") == "classify":
        raise UserError(f"{ckpt} is a classifier; fine-tune from a language model checkpoint")
    if getattr(model, "lora", None):
        model = merge_and_unload(model)  # a LoRA run as a base: fold its adapters in
    if init == "random":
        torch.manual_seed(seed)
        model = GPT(model.cfg)
    elif init != "pretrained":
        raise UserError(f"finetune.init must be pretrained or random, got {init!r}")
    model.train()
    return model, tok, Path(meta["path"]).resolve()


def attach_classifier_head(gpt: GPT, n_classes: int) -> GPT:
    """Replace the vocabulary head by a classes head (the book's chapter 6): the logits at the last
    real token of a sequence become class scores. The new head is not tied to the embeddings."""
    gpt.lm_head = nn.Linear(gpt.cfg.d_model, n_classes, bias=True)
    nn.init.normal_(gpt.lm_head.weight, std=0.02)
    nn.init.zeros_(gpt.lm_head.bias)
    gpt.cfg = dataclasses.replace(gpt.cfg, tie_embeddings=False)
    return gpt


def set_trainable(gpt: GPT, mode: str, lora: LoraConfig | None = None, head_trains: bool = False) -> GPT:
    """Choose what learns. `head_trains`: the (new) head always learns, whatever the mode (classifier)."""
    if mode not in TRAINABLE:
        raise UserError(f"finetune.trainable must be one of {', '.join(TRAINABLE)}, got {mode!r}")
    if mode == "lora":
        if head_trains and "head" in lora.targets:  # the new head trains whole; no adapter on it
            lora = dataclasses.replace(lora, targets=[t for t in lora.targets if t != "head"])
        add_lora(gpt, lora)
    else:
        for p in gpt.parameters():
            p.requires_grad_(mode == "all")
        if mode == "last-block":
            for p in [*gpt.layers[-1].parameters(), *gpt.norm.parameters()]:
                p.requires_grad_(True)
        if mode in ("head", "last-block"):
            gpt.lm_head.weight.requires_grad_(True)  # (tied: then the embedding learns too)
    if head_trains:
        for p in gpt.lm_head.parameters():
            p.requires_grad_(True)
    return gpt


def rebuild(cfg, task: dict, ckpt: Path) -> GPT:
    """The model of a fine-tuned checkpoint, with its weights (load_for_inference calls this)."""
    from scratchlm.train import checkpoint as ckptlib
    if task.get("lora"):
        base, _, _ = load_base(task["base"])
        fp = base_fingerprint(base)
        if task.get("base_fingerprint") and fp != task["base_fingerprint"]:
            raise UserError(f"the base {task['base']} has changed since {ckpt} was trained on it (fingerprint "
                            f"{fp}, expected {task['base_fingerprint']}); LoRA adapters only fit their own base")
        model = base
    else:
        model = GPT(cfg.model)
    if task.get("kind") == "classify":
        attach_classifier_head(model, len(task["labels"]))
    if task.get("lora"):
        add_lora(model, LoraConfig(**task["lora"]))
        from safetensors.torch import load_file
        load_adapter_tensors(model, load_file(str(Path(ckpt) / "model.safetensors")), str(ckpt))
    else:
        ckptlib.load_model_weights(model, ckpt)
    return model
