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
    "qk-norm": dict(pos_encoding="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=2, qk_norm=True),
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


@pytest.mark.parametrize("variant", ["llama", "qk-norm"])
def test_cached_logits_match_full_forward(variant):
    m = tiny(**VARIANTS[variant]).eval()
    x = torch.randint(0, 97, (2, 12))
    full, _ = m(x)
    cache = m.new_cache(2)
    m(x[:, :8], cache=cache)
    steps = [m(x[:, t:t + 1], cache=cache)[0] for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 8:12], atol=1e-5, rtol=1e-5)


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    """With QK-norm, scaling the q and k projections changes nothing (the logits are bounded by
    the learned gains); without it, the same scaling sharpens every attention pattern."""
    x = torch.randint(0, 97, (2, 16))
    for qk_norm in (True, False):
        m = tiny(**{**VARIANTS["qk-norm"], "qk_norm": qk_norm}).eval()
        if qk_norm:  # gains away from 1, so the test also covers them (and that sdpa == explicit with them)
            for layer in m.layers:
                torch.nn.init.uniform_(layer.attn.q_norm.weight, 0.5, 2.0)
                torch.nn.init.uniform_(layer.attn.k_norm.weight, 0.5, 2.0)
        before, _ = m(x)
        with torch.no_grad():
            for layer in m.layers:
                qk_rows = (m.cfg.n_heads + m.cfg.kv_heads) * m.cfg.head_dim
                layer.attn.qkv.weight[:qk_rows] *= 10.0
        after, _ = m(x)
        assert torch.allclose(before, after, atol=1e-4) == qk_norm
        if qk_norm:
            for layer in m.layers:
                layer.attn.explicit = True
            torch.testing.assert_close(m(x)[0], after, atol=1e-5, rtol=1e-5)


def test_sampling_top_k_top_p_and_seed():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    picks = sample_next(logits, SamplingConfig(top_k=2), g)
    assert set(picks.tolist()) <= {2, 3}
    # top-p keeps the smallest set whose probability reaches p, *including* the token that crosses
    # it: with p = 0.5 and probabilities 0.4, 0.35, 0.25 that is {0, 1} (dropping the crossing token
    # would leave {0}; keeping one too many, {0, 1, 2}).
    probs = torch.tensor([[0.4, 0.35, 0.25]]).repeat(400, 1)
    picks = sample_next(probs.log(), SamplingConfig(top_p=0.5), g)
    assert set(picks.tolist()) == {0, 1}
    picks = sample_next(probs.log(), SamplingConfig(top_p=0.3), g)  # the first token crosses 0.3 alone
    assert set(picks.tolist()) == {0}
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
    """Counted by hand from the architecture, so a wrong count (a tied matrix counted twice, a
    missing bias) fails: vocab 97, context 24, width 32, 2 layers, ff 64, no biases, tied head."""
    V, T, d, L, ff = 97, 24, 32, 2, 64
    per_layer = d + d * 3 * d + d * d + d + d * ff + ff * d  # attn_norm, qkv, out, ffn_norm, up, down
    embed, pos = V * d, T * d
    m = tiny()
    assert m.num_params() == embed + pos + L * per_layer + d  # + final norm; lm_head is embed
    assert m.num_params(non_embedding=True) == embed + L * per_layer + d
    untied = tiny(tie_embeddings=False, bias=True)
    biases = L * (3 * d + d + ff + d + d + d)  # qkv, out, up, down; the two LayerNorm biases
    assert untied.num_params() == embed + pos + L * per_layer + d + d + biases + V * d
    assert m.flops_per_token() == 6 * (embed + L * per_layer + d) + 12 * L * d * T
    mem = m.memory_estimate(4)
    assert mem["params_bytes"] == 16 * m.num_params()
    # activations are checked against what autograd really saves in tests/test_plan.py; here: they
    # grow with the batch, and in bf16 they take less than in fp32
    assert m.memory_estimate(8)["activations_bytes"] > mem["activations_bytes"] > m.memory_estimate(4, "bf16")["activations_bytes"]


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


def test_initial_loss_is_about_ln_vocab():
    """A freshly initialised model must be unsure: loss ~ ln(V). Far above means a bad init (large
    logits), far below a leak of the target."""
    import math
    m = tiny()
    x = torch.randint(0, 97, (8, 25), generator=torch.Generator().manual_seed(0))
    _, loss = m(x[:, :-1], x[:, 1:])
    assert abs(loss.item() - math.log(97)) < 0.05


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_with_a_padding_mask(variant):
    """Left-padded batch: a row's logits depend neither on later tokens nor on the padding."""
    from scratchlm.generate import _batch_inputs, _prefill_mask
    m = tiny(**VARIANTS[variant]).eval()
    row = [5, 6, 7, 8, 9, 10]
    ids, pos, valid = _batch_inputs([row, [1, 2]], "cpu")
    logits, _ = m(ids, positions=pos, mask=_prefill_mask(valid))
    alone, _ = m(torch.tensor([row]))
    torch.testing.assert_close(logits[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, -2:], m(torch.tensor([[1, 2]]))[0][0], atol=1e-5, rtol=1e-5)
    ids2 = ids.clone()
    ids2[0, -1] = 50                 # change the last token: earlier positions must not move
    ids2[1, :4] = 3                  # change the padding of row 1: its real positions must not move
    logits2, _ = m(ids2, positions=pos, mask=_prefill_mask(valid))
    torch.testing.assert_close(logits2[0, :-1], logits[0, :-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits2[0, -1], logits[0, -1])
    torch.testing.assert_close(logits2[1, -2:], logits[1, -2:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["explicit", "sdpa-causal", "sdpa-masked"])
def test_attention_dropout_on_every_path(path):
    """Attention dropout applies on the explicit and the masked paths too: outputs vary in training,
    not in eval, and average out to the eval output."""
    from scratchlm.model.attention import CausalSelfAttention
    cfg = ModelConfig(vocab_size=10, context_length=8, d_model=16, n_heads=2, d_ff=16, dropout=0.5,
                      attention="explicit" if path == "explicit" else "sdpa")
    torch.manual_seed(0)
    attn = CausalSelfAttention(cfg)
    x = torch.randn(1, 8, 16)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()[None, None] if path == "sdpa-masked" else None
    attn.eval()
    reference = attn(x, mask=mask)
    attn.train()
    draws = torch.stack([attn(x, mask=mask) for _ in range(400)])
    assert not torch.allclose(draws[0], draws[1])
    torch.testing.assert_close(draws.mean(0), reference, atol=0.05, rtol=0.1)


def test_attn_dropout_zero_keeps_the_residual_dropout_only():
    """model.attn_dropout=0 with model.dropout>0: attention is deterministic in training (SDPA keeps its
    fused kernel), the residual branches still drop; -1 means "the same as model.dropout"; out of range refused."""
    from scratchlm.model.attention import CausalSelfAttention
    base = dict(vocab_size=10, context_length=8, d_model=16, n_heads=2, d_ff=16, dropout=0.5)
    x = torch.randn(1, 8, 16)
    for attn_dropout, varies in ((0.0, False), (-1.0, True)):
        torch.manual_seed(0)
        attn = CausalSelfAttention(ModelConfig(**base, attn_dropout=attn_dropout)).train()
        assert (not torch.equal(attn(x), attn(x))) == varies
    torch.manual_seed(0)
    m = GPT(ModelConfig(**base, n_layers=1, attn_dropout=0.0)).train()
    ids = torch.randint(0, 10, (1, 8))
    assert not torch.equal(m(ids)[0], m(ids)[0])  # the residual dropout is still on
    with pytest.raises(UserError, match="attn_dropout"):
        ModelConfig(**base, attn_dropout=1.5).validate()


def test_padded_vocabulary_is_never_sampled(small_tokenizer):
    """gpt2-124m has 50,304 outputs for 50,257 tokens: ids past the tokenizer's mean nothing."""
    V = small_tokenizer.vocab_size
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=V + 64, context_length=32, d_model=32, n_layers=1, n_heads=2, d_ff=64))
    boost = torch.zeros(V + 64)
    boost[V:] = 50.0  # make the padding the likeliest outputs
    m.lm_head.register_forward_hook(lambda mod, inp, out: out + boost)
    for cfg in (SamplingConfig(max_new_tokens=8, temperature=0), SamplingConfig(max_new_tokens=8, seed=1)):
        ids = generate_ids(m, [small_tokenizer.encode("To be")], cfg, vocab_size=V)
        assert all(t < V for t in ids[0])
        from scratchlm.generate import generate
        (text,) = generate(m, small_tokenizer, "To be", cfg)  # the old code raised here (an id past the vocabulary)
        assert isinstance(text, str)


def test_generate_from_an_empty_prompt_and_without_touching_the_callers_config(small_tokenizer, capsys):
    from scratchlm.generate import generate
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=small_tokenizer.vocab_size, context_length=32, d_model=32, n_layers=1,
                        n_heads=2, d_ff=64))
    cfg = SamplingConfig(max_new_tokens=6, temperature=0)
    (text,) = generate(m, small_tokenizer, [""], cfg)  # starts from <|endoftext|>, like a new document
    assert cfg.stop_tokens == []                        # the caller's config is not changed
    ids = generate_ids(m, [[small_tokenizer.eot_id]], SamplingConfig(max_new_tokens=6, temperature=0))[0]
    assert text == small_tokenizer.decode(ids[:ids.index(small_tokenizer.eot_id)] if small_tokenizer.eot_id in ids
                                          else ids)


def test_streamed_text_never_shows_the_stop_string(small_tokenizer, capsys):
    from scratchlm.generate import generate, printable
    assert printable("Hello wor", ["world"]) == len("Hello ")  # might become the stop string: held back
    assert printable("Hello world!", ["world"]) == len("Hello ")
    assert printable("caf\ufffd", []) == 3                   # a character still being decoded
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=small_tokenizer.vocab_size, context_length=64, d_model=32, n_layers=1,
                        n_heads=2, d_ff=64))
    free = generate(m, small_tokenizer, "The", SamplingConfig(max_new_tokens=20, temperature=0))[0]
    stop = free[len(free) // 2:len(free) // 2 + 2]
    assert stop and stop in free
    capsys.readouterr()
    (text,) = generate(m, small_tokenizer, ["The"], SamplingConfig(max_new_tokens=20, temperature=0,
                                                                  stop_strings=[stop]), stream=True)
    out = capsys.readouterr().out
    assert text == free[:free.index(stop)] and out == text + "\n" and stop not in out
