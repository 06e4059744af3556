"""Training throughput (forward + backward + AdamW) vs Hugging Face GPT2LMHeadModel of the same shape."""

from __future__ import annotations

import time

import torch

from benchmarks.common import md_table
from scratchlm.model import GPT, ModelConfig
from scratchlm.train.precision import measured_peak_flops

SHAPES = {
    "tiny": dict(vocab=10000, layers=4, heads=4, width=256, ff=1024, ctx=256, batch=32),
    "small": dict(vocab=50304, layers=6, heads=6, width=384, ff=1536, ctx=256, batch=16),
}
STEPS = 4


def ours(s: dict) -> GPT:
    return GPT(ModelConfig(vocab_size=s["vocab"], context_length=s["ctx"], d_model=s["width"], n_layers=s["layers"],
                           n_heads=s["heads"], d_ff=s["ff"], bias=True))


def hf(s: dict):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=s["vocab"], n_positions=s["ctx"], n_embd=s["width"], n_layer=s["layers"],
                     n_head=s["heads"], n_inner=s["ff"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg, attn_implementation="sdpa") if _accepts_attn() else GPT2LMHeadModel(cfg)


def _accepts_attn() -> bool:
    import inspect

    from transformers import GPT2LMHeadModel
    return "attn_implementation" in inspect.signature(GPT2LMHeadModel.__init__).parameters


def tokens_per_s(model, s: dict, bf16: bool, compile_: bool, is_hf: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_model = torch.compile(model) if compile_ else model
    x = torch.randint(0, s["vocab"], (s["batch"], s["ctx"]))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = step_model(input_ids=x, labels=x).loss if is_hf else step_model(x, x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t = time.perf_counter()
    step()
    step()  # warm-up (and compilation)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(STEPS):
        step()
    return STEPS * s["batch"] * s["ctx"] / (time.perf_counter() - t), warm


def run() -> str:
    torch.set_num_threads(torch.get_num_threads())
    peak = measured_peak_flops(torch.device("cpu"), "bf16")
    peak32 = measured_peak_flops(torch.device("cpu"), "fp32")
    rows = []
    for name, s in SHAPES.items():
        flops = ours(s).flops_per_token()
        res = {}
        for label, builder, bf16, comp, is_hf in [
            ("HF fp32", hf, False, False, True), ("HF bf16", hf, True, False, True),
            ("ours fp32", ours, False, False, False), ("ours bf16", ours, True, False, False),
            ("ours bf16 + compile", ours, True, True, False)]:
            res[label] = tokens_per_s(builder(s), s, bf16, comp, is_hf)
        hf_best = max(res["HF fp32"][0], res["HF bf16"][0])
        for label, (tps, warm) in res.items():
            p = peak if "bf16" in label else peak32
            rows.append([name, label, f"{tps:,.0f}", f"{tps * flops / p * 100:.1f}%", f"{warm:.1f}",
                         f"{tps / hf_best:.2f}x"])
    return ("### Training step: tokens/s (forward + backward + AdamW), same shape as HF GPT2LMHeadModel (sdpa)\n\n"
            f"Measured matmul peak here: bf16 {peak / 1e9:,.0f} GFLOP/s, fp32 {peak32 / 1e9:,.0f} GFLOP/s "
            "(MFU is against the peak of the precision used). Goal: >= 2x HF's best.\n\n"
            + md_table(["shape", "implementation", "tokens/s", "MFU", "warm-up s", "vs HF best"], rows))


if __name__ == "__main__":
    print(run())
