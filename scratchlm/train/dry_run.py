"""Check a training config for a world size without launching it.

    scratchlm pretrain --config gpt2-124m --dry-run --world-size 8

says whether the batch splits over the processes, how many sequences each rank runs per
micro-step, the tokens per optimizer step, the parameter count and a rough memory estimate per
rank: the questions to answer before asking for eight GPUs, not after.
"""

from __future__ import annotations

import torch

from scratchlm.config import Config
from scratchlm.model import GPT
from scratchlm.train.trainer import micro_batch_size


def dry_run(cfg: Config, world_size: int, vocab_size: int = 0) -> dict:
    """The shape of one optimizer step of `cfg` on `world_size` processes (raises UserError if the
    batch does not split). vocab_size: the tokenizer's, for configs that take it from there."""
    tc = cfg.train
    micro = micro_batch_size(tc, world_size)
    model_cfg = cfg.model
    if model_cfg.vocab_size == 0:
        model_cfg = type(model_cfg)(**{**vars(model_cfg), "vocab_size": vocab_size or cfg.tokenizer.effective_vocab_size})
    with torch.device("meta"):  # shapes only: no memory, no time, even for a large model
        model = GPT(model_cfg)
    sharded = tc.parallel == "fsdp" and world_size > 1
    memory = model.memory_estimate(micro, precision="fp32" if tc.precision == "fp32" else "bf16")
    weights = memory["params_bytes"] / (world_size if sharded else 1)
    return {
        "world_size": world_size,
        "parallel": tc.parallel if world_size > 1 else "single process",
        "batch_size": tc.batch_size,
        "grad_accum": tc.grad_accum,
        "micro_batch_per_rank": micro,
        "tokens_per_step": tc.batch_size * model_cfg.context_length,
        "parameters": model.num_params(),
        "vocab_size": model_cfg.vocab_size,
        "memory_per_rank_gb": round((weights + memory["activations_bytes"]) / 1e9, 2),
    }


def format_dry_run(plan: dict) -> str:
    return (f"{plan['world_size']} process(es), {plan['parallel']}: batch {plan['batch_size']} = "
            f"{plan['micro_batch_per_rank']} per rank per micro-step x {plan['grad_accum']} micro-steps x "
            f"{plan['world_size']} ranks\n"
            f"tokens per optimizer step: {plan['tokens_per_step']:,}\n"
            f"parameters: {plan['parameters'] / 1e6:.1f}M (vocabulary {plan['vocab_size']:,})\n"
            f"memory per rank (rough: weights, grads, AdamW, activations): {plan['memory_per_rank_gb']:.2f} GB")
