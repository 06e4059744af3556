"""The lean decoding step (model/decode.py) computes GPT.forward's numbers exactly: the same logits, bit
for bit, step after step, and so the same greedy tokens, for every model variant, in fp32, bf16 and
bf16 packed (what `scratchlm generate --quantize bf16` runs)."""

import pytest
import torch

from scratchlm.generate import SamplingConfig, generate_ids
from scratchlm.model import GPT, ModelConfig
from scratchlm.model.decode import Decoder
from scratchlm.model.packed import can_pack, pack_linears

VARIANTS = {
    "gpt2": dict(bias=True),  # learned positions, LayerNorm, GELU: the benchmark's shape
    "quickstart": dict(pos_encoding="rope", norm="rmsnorm", ffn="swiglu", qk_norm=True),
    "llama-gqa": dict(pos_encoding="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=2, tie_embeddings=False),
    "sinusoidal-explicit": dict(pos_encoding="sinusoidal", attention="explicit"),
}
PACKS = can_pack(torch.zeros(1, dtype=torch.bfloat16))
KINDS = ["fp32", "bf16"] + (["packed"] if PACKS else [])


def tiny(variant: str, kind: str) -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=300, context_length=32, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                        **VARIANTS[variant])).eval()
    with torch.no_grad():  # non-trivial norm gains and biases, so a skipped or swapped one shows
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    if kind != "fp32":
        m = m.to(torch.bfloat16)
    if kind == "packed":
        assert pack_linears(m) > 0
    return m


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_lean_step_logits_are_bit_identical(variant, kind):
    m = tiny(variant, kind)
    prompt = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain_cache, lean_cache = m.new_cache(2), m.new_cache(2)
        m(prompt, cache=plain_cache)
        m(prompt, cache=lean_cache)
        decoder = Decoder(m, lean_cache)
        ids = prompt[:, -1:]
        for _ in range(20):
            want, _ = m(ids, cache=plain_cache)
            got = decoder.step(ids)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert torch.equal(got, want)
            ids = want[:, -1].float().argmax(-1, keepdim=True)
        assert lean_cache.pos == plain_cache.pos == 27
        assert torch.equal(lean_cache.k, plain_cache.k) and torch.equal(lean_cache.v, plain_cache.v)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_uses_the_lean_step_and_picks_the_same_tokens(variant, kind, monkeypatch):
    m = tiny(variant, kind)
    steps = []
    real_step = Decoder.step
    monkeypatch.setattr(Decoder, "step", lambda self, ids: steps.append(ids.size(0)) or real_step(self, ids))
    cfg = SamplingConfig(max_new_tokens=45, temperature=0)  # 5 + 45 > context 32: the window slides
    for prompts in ([[5, 9, 200, 17, 3]], [[5, 9, 200, 17, 3], [1, 2, 3, 4, 5]], [[5, 9, 200], [7]]):
        steps.clear()
        lean = generate_ids(m, prompts, cfg)
        assert generate_ids(m, prompts, cfg, lean=False) == lean
        assert all(len(t) == 45 for t in lean)
        padded = len({len(p) for p in prompts}) > 1
        assert steps == ([] if padded else [len(prompts)] * len(steps)) and (padded or len(steps) > 30)
