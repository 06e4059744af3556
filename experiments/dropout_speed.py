"""What dropout costs per training step on this CPU, and where: the quickstart's d=192 model, compiled, bf16.

    python experiments/dropout_speed.py

On CPU any attention dropout sends scaled_dot_product_attention from its fused kernel to the plain
path that builds the (T x T) attention weights; dropout on the residual branches only is a few
random masks over (B, T, C) activations. Prints ms per step and tokens/s for each variant.
"""

from __future__ import annotations

import time

import torch

from scratchlm.config import load_config
from scratchlm.model import GPT
from scratchlm.train.trainer import make_optimizer

SHAPE = ["model.d_model=192", "model.n_layers=4", "model.n_heads=6", "model.d_ff=512", "model.vocab_size=2048"]
BATCH, ROUNDS, STEPS = 32, 4, 3


def make_step(overrides: list[str]):
    cfg = load_config("quickstart", SHAPE + overrides)  # RoPE, RMSNorm, SwiGLU, QK-norm, Muon
    torch.manual_seed(0)
    model = GPT(cfg.model).train()
    opt = make_optimizer(model, cfg.train, torch.device("cpu"))
    compiled = torch.compile(model)
    x = torch.randint(0, cfg.model.vocab_size, (BATCH, cfg.model.context_length))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compiled(x, x)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(3):  # compile and warm up
        step()
    return step, BATCH * cfg.model.context_length


def main() -> None:
    variants = {"no dropout": [], "dropout 0.1": ["model.dropout=0.1"],
                "dropout 0.1, residual branches only": ["model.dropout=0.1", "model.attn_dropout=0"]}
    for optimizer in ("muon", "adamw"):  # muon: what the quickstart trains with
        steps = {k: make_step(v + [f"train.optimizer={optimizer}"]) for k, v in variants.items()}
        best = {k: float("inf") for k in steps}
        for _ in range(ROUNDS):  # the variants alternate, so a busy moment hits them all alike
            for k, (step, _) in steps.items():
                t = time.perf_counter()
                for _ in range(STEPS):
                    step()
                best[k] = min(best[k], (time.perf_counter() - t) / STEPS)
        print(f"| {optimizer} | " + " | ".join(f"{k}: {best[k] * 1000:.0f} ms ({steps[k][1] / best[k]:,.0f} tok/s)"
                                              for k in steps) + " |", flush=True)


if __name__ == "__main__":
    main()
