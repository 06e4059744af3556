"""Distributed setup, read from the environment torchrun provides. No launcher of our own.

    torchrun --nproc_per_node=2 -m scratchlm pretrain --config ...
    torchrun --nnodes=2 --node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
             --nproc_per_node=8 -m scratchlm pretrain --config ...

The model knows nothing of this: `parallelize(model, ...)` wraps it once, and the trainer talks
to the result (`Parallel`). Two ways to spread one model over the processes (`train.parallel`):
    ddp    every rank holds the whole model and optimizer; gradients are all-reduced.
    fsdp   FSDP2 (`fully_shard`): each rank holds 1/world of every block's parameters, gradients
           and AdamW moments; a block's weights are all-gathered just before it runs and freed
           after. Same maths as DDP, a fraction of the memory, more communication.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_kind: str) -> DistInfo:
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def teardown(info: DistInfo) -> None:
    # Without the barrier, a rank that finishes first destroys its group while others still talk
    # to it, and gloo workers hang at exit.
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(value: float, info: DistInfo, device) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / info.world_size


def all_reduce_sum(values: list[float], info: DistInfo, device) -> list[float]:
    """Sum a few numbers over the ranks (in float64: token counts stay exact)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@dataclass
class Parallel:
    """A model made ready for training on this rank, and how the ranks cooperate."""
    model: nn.Module        # what training calls: the model, wrapped by DDP and/or torch.compile
    eager: nn.Module        # the same without torch.compile (the fallback if compiling fails)
    info: DistInfo
    kind: str               # "single" | "ddp" | "fsdp"
    device: torch.device
    compiled_ok: bool = False  # a step has run through `model` (so torch.compile worked, if asked)

    @property
    def sharded(self) -> bool:
        """FSDP: each rank holds a piece of the weights, so every rank takes part in saving and in
        every forward pass (evaluation and sampling included)."""
        return self.kind == "fsdp"

    def grad_sync(self, last_micro_step: bool):
        """Gradient accumulation: keep gradients local until the last micro-step of the step."""
        return skip_grad_sync(self.eager, self.kind, skip=self.info.enabled and not last_micro_step)

    def sum(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, self.info, self.device)


def parallelize(model: nn.Module, info: DistInfo, kind: str, device: torch.device,
                compile: bool = False, dynamic: bool | None = None) -> Parallel:
    """Wrap a model (already on `device`) for this process: DDP or FSDP when there are several
    ranks, then torch.compile if asked (dynamic=False: one graph per input shape, none with
    symbolic sizes). Call before building the optimizer: FSDP replaces the parameters with sharded ones."""
    if not info.enabled:
        kind, wrapped = "single", model
    elif kind == "fsdp":
        shard_model(model)
        wrapped = model  # fully_shard changes the module in place
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return Parallel(model=torch.compile(wrapped, dynamic=dynamic) if compile else wrapped, eager=wrapped, info=info, kind=kind,
                    device=device)


def shard_model(model: nn.Module) -> None:
    """FSDP2: shard each transformer block on its own (so only one block is ever gathered in
    full), then the root, which takes the embeddings, final norm, output head (and any head a
    fine-tuning stage added)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 kept it under _composable
        from torch.distributed._composable.fsdp import fully_shard
    from scratchlm.model.gpt import Block
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block)
    fully_shard(model)


@contextlib.contextmanager
def skip_grad_sync(train_model: torch.nn.Module, parallel: str, skip: bool) -> Iterator[None]:
    """Inner micro-steps of gradient accumulation: keep gradients local, communicate once on the
    last micro-step (DDP `no_sync`; FSDP2 `set_requires_gradient_sync(False)`)."""
    if not skip:
        yield
    elif parallel == "fsdp":
        train_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            train_model.set_requires_gradient_sync(True)
    else:
        with train_model.no_sync():
            yield


def all_ranks_agree(value: int, info: DistInfo) -> bool:
    """True when every rank holds the same integer (e.g. the step it resumed from)."""
    if not info.enabled:
        return True
    t = _comm_tensor([value, -value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0].item() == -t[1].item()


STOP_REASONS = ("steps", "tokens", "minutes", "signal")


def agree_on_stop(planned_steps: int, stopped_by: str, info: DistInfo) -> tuple[int, str]:
    """Every rank must stop at the same step, or the others wait for it forever: rank 0's plan
    and clock decide (each rank's own clock differs a little), and a signal seen by any rank
    stops them all. One small all-reduce per step."""
    if not info.enabled:
        return planned_steps, stopped_by
    mine = [planned_steps, STOP_REASONS.index(stopped_by)] if info.is_main else [0, 0]
    t = _comm_tensor(mine + [int(stopped_by == "signal")])
    dist.all_reduce(t)
    planned, reason, signals = t.tolist()
    return planned, "signal" if signals else STOP_REASONS[reason]


def _comm_tensor(values: list[int]) -> torch.Tensor:
    """Integers to all-reduce, on the device the backend talks through (nccl: the GPU)."""
    t = torch.tensor(values, dtype=torch.int64)
    return t.cuda() if dist.get_backend() == "nccl" else t
