"""The lean decoding step (model/decode.py) computes GPT.forward's numbers exactly: the same logits, bit
for bit, step after step, and so the same greedy tokens, for every model variant, in fp32, bf16 and
bf16 packed (what `scratchlm generate --quantize bf16` runs); and the serving engine's decode steps, whose
rows sit in slots at lengths of their own, go through it with the numbers of its GPT.forward path."""

import pytest
import torch

from scratchlm.generate import SamplingConfig, generate_ids
from scratchlm.model import GPT, ModelConfig
from scratchlm.model.decode import Decoder
from scratchlm.model.packed import can_pack, pack_linears
from scratchlm.quantize import quantize_int8
from scratchlm.serve.batching import Engine, Request
from scratchlm.tokenizer.bpe import Tokenizer

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
    if kind == "int8":  # `scratchlm serve --quantize int8`
        quantize_int8(m)
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


# --- the serving engine ------------------------------------------------------------------------------
# (tick submitted, prompt length, max tokens) for a 3-slot engine. Its decode steps meet every case of
# Decoder.step_rows: a lone row in slot 0 and in slot 2, rows at one length in adjacent slots and in slots
# 0 and 2, rows at different lengths in adjacent slots and in slots 0 and 2, and a row that fills the context.
SCHEDULE = [(0, 5, 12), (1, 6, 4), (2, 7, 25), (6, 2, 3), (13, 4, 6)]
PROMPTS = [torch.randint(0, 262, (n,), generator=torch.Generator().manual_seed(n)).tolist() for _, n, _ in SCHEDULE]


def run_engine(m: GPT, lean: bool) -> tuple[list[list[int]], list[tuple[list[int], torch.Tensor]]]:
    """Drive an engine tick by tick on this thread (what its own thread does). Returns each request's
    tokens and, for every prefill and decode step, the rows' slots and their logits."""
    engine = Engine(m, Tokenizer([]), max_batch=3, max_queue=8, lean=lean)
    reqs = [Request(p, k, temperature=0) for p, (_, _, k) in zip(PROMPTS, SCHEDULE)]
    tokens = {id(r): [] for r in reqs}
    steps = []
    take = engine._take

    def record(rows, logits):
        steps.append(([r.slot for r in rows], logits.clone()))
        take(rows, logits)
        for r in rows:
            tokens[id(r.req)].append(r.last)
    engine._take = record
    for tick in range(40):
        for (t, _, _), req in zip(SCHEDULE, reqs):
            if t == tick:
                engine.submit(req)
        engine.step()
    assert engine.stats()["running"] == 0 and engine.stats()["completed"] == len(reqs)
    return [tokens[id(r)] for r in reqs], steps


@pytest.mark.parametrize("kind", KINDS + ["int8"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_decodes_through_the_lean_step_with_the_same_numbers(variant, kind, monkeypatch):
    m = tiny(variant, kind)
    rows, forwards = [], []
    real_step_rows, real_forward = Decoder.step_rows, GPT.forward
    monkeypatch.setattr(Decoder, "step_rows", lambda self, ids, slots, lengths:
                        rows.append((list(slots), list(lengths))) or real_step_rows(self, ids, slots, lengths))
    monkeypatch.setattr(GPT, "forward", lambda self, idx, *a, **kw:
                        forwards.append(idx.size(1)) or real_forward(self, idx, *a, **kw))
    lean_tokens, lean_steps = run_engine(m, lean=True)
    # GPT.forward ran the prefills only (one per request, the whole prompt); every decode step was lean.
    assert forwards == [n for _, n, _ in SCHEDULE]
    assert len(rows) == len(lean_steps) - len(SCHEDULE) > 20
    cases = {(len(s) == 1, s == list(range(s[0], s[-1] + 1)), len(set(n)) == 1) for s, n in rows}
    assert cases == {(True, True, True), (False, True, True), (False, False, True), (False, True, False),
                     (False, False, False)}
    assert {s[0] for s, _ in rows if len(s) == 1} == {0, 2}

    # The engine's GPT.forward path (every step a forward pass with a key mask): the same logits, bit for
    # bit, at every step; masked ones included (the same SDPA call on the same numbers).
    forwards.clear()
    old_tokens, old_steps = run_engine(m, lean=False)
    assert len(forwards) == len(old_steps)
    assert lean_tokens == old_tokens
    assert [s for s, _ in lean_steps] == [s for s, _ in old_steps]
    for (slots, lean), (_, old) in zip(lean_steps, old_steps):
        assert lean.dtype == old.dtype and torch.equal(lean, old), slots
    # Each request gets the tokens generate_ids gives it alone. Only asserted in fp32: a batched row's
    # numbers can differ from its numbers alone in the last bit (its attention also runs over masked
    # padding keys, its matrix products over more rows), and bf16 logits tie often enough (llama-gqa:
    # 0.40625 for two tokens) for that to pick the other token, with either engine path.
    if kind == "fp32":
        V = Tokenizer([]).vocab_size
        for p, (_, _, k), got in zip(PROMPTS, SCHEDULE, lean_tokens):
            assert got == generate_ids(m, [p], SamplingConfig(max_new_tokens=k, temperature=0), vocab_size=V)[0]
