import pytest
import torch

from scratchlm.errors import UserError
from scratchlm.generate import SamplingConfig, generate_ids, sample_next
from scratchlm.model import GPT, ModelConfig
from scratchlm.model.attention import explicit_attention

VARIANTS = {
    "gpt2": dict(),
    "llama": dict(pos_encoding="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=2, tie_embeddings=False),
    "sinusoidal": dict(pos_encoding="sinusoidal", bias=True),
}


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=97, context_length=24, d_model=32, n_layers=2, n_heads=4, d_ff=64, **kw))


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_and_explicit_attention_agree(variant):
    m = tiny(**VARIANTS[variant])
    x = torch.randint(0, 97, (3, 20))
    fused, _ = m(x)
    for layer in m.layers:
        layer.attn.explicit = True
    explicit, _ = m(x)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_explicit_attention_is_causal():
    q = k = v = torch.randn(1, 1, 5, 8)
    out1 = explicit_attention(q, k, v, None)
    v2 = v.clone()
    v2[..., 4, :] += 100  # changing the last value must not change earlier outputs
    out2 = explicit_attention(q, k, v2, None)
    assert torch.allclose(out1[..., :4, :], out2[..., :4, :]) and not torch.allclose(out1[..., 4, :], out2[..., 4, :])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_equals_uncached_including_window_slide(variant):
    m = tiny(**VARIANTS[variant])
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10]]  # different lengths: left padding
    cfg = dict(max_new_tokens=40, temperature=0)     # 7 + 40 > context 24: the window slides
    cached = generate_ids(m, prompts, SamplingConfig(**cfg))
    uncached = generate_ids(m, prompts, SamplingConfig(**cfg, use_cache=False))
    alone = [generate_ids(m, [p], SamplingConfig(**cfg))[0] for p in prompts]
    assert cached == uncached == alone
    assert all(len(c) == 40 for c in cached)


def test_cached_logits_match_full_forward():
    m = tiny(**VARIANTS["llama"]).eval()
    x = torch.randint(0, 97, (2, 12))
    full, _ = m(x)
    cache = m.new_cache(2)
    m(x[:, :8], cache=cache)
    steps = [m(x[:, t:t + 1], cache=cache)[0] for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 8:12], atol=1e-5, rtol=1e-5)


def test_sampling_top_k_top_p_and_seed():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    picks = sample_next(logits, SamplingConfig(top_k=2), g)
    assert set(picks.tolist()) <= {2, 3}
    picks = sample_next(logits, SamplingConfig(top_p=0.5), g)
    assert set(picks.tolist()) == {3}  # p(3) = 0.64 > 0.5 alone
    assert sample_next(logits[:1], SamplingConfig(temperature=0), None).item() == 3
    m = tiny()
    a = generate_ids(m, [[1, 2]], SamplingConfig(max_new_tokens=10, seed=5))
    b = generate_ids(m, [[1, 2]], SamplingConfig(max_new_tokens=10, seed=5))
    assert a == b


def test_stop_tokens_per_row_in_a_batch():
    m = tiny()
    free = generate_ids(m, [[1, 2], [3]], SamplingConfig(max_new_tokens=10, temperature=0))
    stop = free[0][2]
    out = generate_ids(m, [[1, 2], [3]], SamplingConfig(max_new_tokens=10, temperature=0, stop_tokens=[stop]))
    assert out[0] == free[0][:free[0].index(stop)]
    assert out[1] == (free[1][:free[1].index(stop)] if stop in free[1] else free[1])


@pytest.mark.parametrize("kw,match", [
    (dict(d_model=30, n_heads=4), "does not divide"),
    (dict(n_heads=4, n_kv_heads=3), "must divide"),
    (dict(d_model=12, n_heads=4, pos_encoding="rope"), "even head size"),
    (dict(norm="batchnorm"), "layernorm or rmsnorm"),
])
def test_bad_shapes_are_refused(kw, match):
    base = dict(vocab_size=10, context_length=8, d_model=32, n_layers=1, n_heads=4, d_ff=8)
    with pytest.raises(UserError, match=match):
        GPT(ModelConfig(**{**base, **kw}))


def test_bad_generation_inputs():
    m = tiny()
    with pytest.raises(UserError, match="longer than the model's context"):
        generate_ids(m, [list(range(30))], SamplingConfig(max_new_tokens=1))
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        generate_ids(m, [[500]], SamplingConfig(max_new_tokens=1))
    with pytest.raises(UserError, match="longer than the context length"):
        m(torch.zeros(1, 30, dtype=torch.long))


def test_param_count_flops_memory():
    m = tiny()
    n = m.num_params()
    assert n == sum(p.numel() for p in m.parameters())
    assert m.flops_per_token() > 6 * m.num_params(non_embedding=True)
    assert m.memory_estimate(4)["total_bytes"] > n * 16


def test_bf16_training_tracks_fp32():
    """Mixed precision (bf16 matmuls, fp32 master weights) must follow the fp32 loss curve."""
    def run(bf16: bool) -> list[float]:
        m = tiny()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        data = torch.randint(0, 20, (64, 25), generator=g)  # a small vocabulary subset: learnable
        losses = []
        for step in range(30):
            batch = data[(step * 8) % 64:(step * 8) % 64 + 8]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                _, loss = m(batch[:, :-1], batch[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses
    fp32, bf16 = run(False), run(True)
    assert fp32[-1] < fp32[0] - 1.0
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05 * fp32[0]
    assert next(tiny().parameters()).dtype == torch.float32
