"""Generation speed, batch 1, 32-token prompt, 256 new tokens, "small" shape, vs HF `generate`."""

from __future__ import annotations

import time

import torch

from benchmarks.common import md_table
from benchmarks.train_step import SHAPES, hf, ours
from scratchlm.generate import SamplingConfig, generate_ids

NEW = 256


def run() -> str:
    s = dict(SHAPES["small"], ctx=512)
    prompt = torch.randint(0, s["vocab"], (1, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    ref = hf(s).eval()
    with torch.inference_mode():
        ref.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        t = time.perf_counter()
        out = ref.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=True,
                           pad_token_id=0)
        hf_tps = (out.shape[1] - 32) / (time.perf_counter() - t)
    rows.append(["HF generate (KV cache, fp32)", f"{hf_tps:,.0f}", "1.00x"])
    model = ours(s).eval()
    for label, dtype in [("ours (KV cache, fp32)", torch.float32), ("ours (KV cache, bf16 weights)", torch.bfloat16)]:
        m = model.to(dtype)
        generate_ids(m, [prompt[0].tolist()], SamplingConfig(max_new_tokens=8, temperature=0))
        t = time.perf_counter()
        new = generate_ids(m, [prompt[0].tolist()], SamplingConfig(max_new_tokens=NEW, temperature=0))
        tps = len(new[0]) / (time.perf_counter() - t)
        rows.append([label, f"{tps:,.0f}", f"{tps / hf_tps:.2f}x"])
    return (f"### Generation: tokens/s, batch 1, 32-token prompt, {NEW} new tokens, greedy, 'small' shape\n\n"
            "Goal: >= 4x HF.\n\n" + md_table(["implementation", "tokens/s", "vs HF"], rows))


if __name__ == "__main__":
    print(run())
