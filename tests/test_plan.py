"""The planner: counts checked by hand and against the real model, memory against what autograd
saves, warnings, and predictions against three published training runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from scratchlm.config import load_config
from scratchlm.errors import UserError
from scratchlm.model.accounting import activation_bytes, flops_per_token, param_counts
from scratchlm.model.config import ModelConfig
from scratchlm.model.gpt import GPT
from scratchlm.plan import GiB, make_plan, render

CPU_PEAK = 1e11  # pass a fixed CPU peak: tests must not depend on a benchmark of a busy machine

# vocab 100, context 16, width 8, 2 layers, 2 heads, d_ff 32, learned positions, LayerNorm
# without bias, tied embeddings. By hand:
#   token table 100*8 = 800, position table 16*8 = 128
#   block: 2 norms 2*8 = 16, qkv 8*24 = 192, out 8*8 = 64, up 8*32 = 256, down 32*8 = 256 -> 784
#   total 800 + 128 + 2*784 + final norm 8 = 2504; in matmuls 2504 - 128 = 2376
#   FLOPs/token 6*2376 + 12*2*8*16 = 14256 + 3072 = 17328
HAND = ModelConfig(vocab_size=100, context_length=16, d_model=8, n_layers=2, n_heads=2, d_ff=32)


def test_hand_counted_params_and_flops():
    c = param_counts(HAND)
    assert (c.total, c.token_embedding, c.position_embedding, c.per_block) == (2504, 800, 128, 784)
    assert c.matmul == 2376 and c.non_embedding == 1576
    assert flops_per_token(HAND) == 17328
    # Untied: the output head is a second 800-parameter matrix; the lookup table leaves N.
    untied = param_counts(ModelConfig(**{**HAND.__dict__, "tie_embeddings": False}))
    assert untied.total == 3304 and untied.matmul == 2376 and untied.output_head == 800


VARIANTS = [{}, dict(ffn="swiglu"), dict(attention="explicit"), dict(bias=True, tie_embeddings=False),
            dict(pos_encoding="rope", norm="rmsnorm", n_kv_heads=2), dict(pos_encoding="rope"),
            dict(pos_encoding="sinusoidal", n_layers=3, d_model=48, n_heads=6),
            dict(pos_encoding="rope", norm="rmsnorm", n_kv_heads=2, qk_norm=True), dict(qk_norm=True)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_count_matches_the_model(variant):
    cfg = ModelConfig(**{**dict(vocab_size=300, context_length=32, d_model=32, n_layers=2, n_heads=4, d_ff=96),
                         **variant})
    model = GPT(cfg)
    assert param_counts(cfg).total == sum(p.numel() for p in model.parameters())
    assert param_counts(cfg).block_matrices * cfg.n_layers == sum(  # what Muon trains
        p.numel() for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2)
    assert model.flops_per_token() == flops_per_token(cfg)


def saved_for_backward(model: GPT, idx: torch.Tensor, precision: str) -> int:
    """Bytes of every distinct tensor autograd keeps for backward, other than the parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(idx, torch.roll(idx, -1, dims=1))
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_activation_estimate_matches_what_autograd_saves(variant, precision):
    cfg = ModelConfig(**{**dict(vocab_size=512, context_length=64, d_model=64, n_layers=2, n_heads=4, d_ff=256),
                         **variant})
    torch.manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.context_length))
    measured = saved_for_backward(GPT(cfg), idx, precision)
    est = activation_bytes(cfg, 3 * cfg.context_length, precision)
    assert est.saved + est.weight_copies == pytest.approx(measured, rel=0.02)


def _cfg(*overrides):
    return load_config("tiny", [f"model.{k}" for k in (
        "vocab_size=100", "context_length=16", "d_model=8", "n_layers=2", "n_heads=2", "d_ff=32")]
        + ["train.batch_size=8", "train.max_steps=10"] + list(overrides))


def test_hand_counted_memory_ddp_and_fsdp():
    n = 2504
    one = make_plan(_cfg("train.precision=fp32"), devices=1, cpu_peak=CPU_PEAK).memory
    assert (one.weights, one.gradients, one.optimizer, one.communication) == (4 * n, 4 * n, 8 * n, 0)
    # fp32 activations of one micro-batch of 8 x 16 tokens, by hand (bytes per token):
    #   per layer: 2 norms x (4*8 + 8) = 80, qkv and up inputs 2*4*8 = 64, qkv output 4*24 = 96,
    #   attention output 4*8 + log-sum-exp 4*2 = 40, GELU input and output 2*4*32 = 256 -> 536
    #   outside, fused head: ids 8, final norm 40, the head input's gradient 32 -> 80,
    #   and once: the head weight's gradient 4*100*8 = 3200; no logits alive
    assert one.activations.saved == 128 * (2 * 536 + 80) + 3200
    assert one.activations.logits == 0 and one.activations.weight_copies == 0
    ddp = make_plan(_cfg("train.precision=fp32"), devices=4, parallel="ddp", cpu_peak=CPU_PEAK).memory
    assert ddp.weights == 4 * n and ddp.communication == 4 * n  # a full copy, plus gradient buckets
    assert ddp.activations.saved == 32 * (2 * 536 + 80) + 3200  # micro-batch 8 / 4 devices = 2 sequences
    fsdp = make_plan(_cfg("train.precision=fp32"), devices=4, parallel="fsdp", cpu_peak=CPU_PEAK).memory
    # FSDP shards the head, so the plain head runs: ids + targets 16, final norm 40, head input 32,
    # log-probs 4*100 = 400 -> 488 saved, and the logits and their gradient alive at the loss
    assert fsdp.activations.saved == 32 * (2 * 536 + 488) and fsdp.activations.logits == 32 * 8 * 100
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (n, n, 2 * n)  # 16 B/param over 4 devices
    outside = n - 2 * 784
    assert fsdp.communication == 4 * (outside + 2 * 784) + 4 * (outside + 784)
    # Muon: one 4 B momentum for the 2 x 768 block matrices (qkv 192, out 64, up 256, down 256), AdamW 8 B the rest
    muon = make_plan(_cfg("train.optimizer=muon"), devices=1, cpu_peak=CPU_PEAK)
    assert muon.memory.optimizer == 8 * (n - 2 * 768) + 4 * 2 * 768
    assert "Muon momentum" in render(muon)
    assert any("muon" in w for w in make_plan(_cfg("train.optimizer=muon"), devices=4, parallel="fsdp",
                                               cpu_peak=CPU_PEAK).warnings)
    bf16 = make_plan(_cfg(), devices=1, cpu_peak=CPU_PEAK).memory
    assert bf16.activations.weight_copies == 2 * 2376      # autocast's bf16 copy of every matmul weight


def test_fsdp_and_checkpointing_fit_what_ddp_cannot():
    big = load_config("gpt2-124m", ["model.d_model=4096", "model.n_heads=32", "model.n_layers=32",
                                    "model.d_ff=16384", "train.batch_size=64", "train.grad_accum=8"])
    ddp = make_plan(big, devices=8, parallel="ddp", tokens=1e9, cpu_peak=CPU_PEAK)
    assert ddp.counts.total > 6e9
    h100 = next(r for r in ddp.rows if r.accelerator.key == "h100")
    assert h100.fits == "no" and ddp.memory.total > 16 * ddp.counts.total
    assert any("does not fit on" in w and "H100" in w and "--parallel fsdp" in w for w in ddp.warnings)
    fsdp = make_plan(big, devices=8, parallel="fsdp", tokens=1e9, activation_checkpointing=True, cpu_peak=CPU_PEAK)
    assert next(r for r in fsdp.rows if r.accelerator.key == "h200").fits == "yes"
    assert fsdp.memory.total < ddp.memory.total / 3
    assert any("does not implement it" in w for w in fsdp.warnings)
    # recomputing the forward costs a third more time at the same utilisation
    assert fsdp.rows[0].seconds == pytest.approx(ddp.rows[0].seconds * 4 / 3)


def test_batch_divisibility_warning():
    cfg = load_config("gpt2-124m", ["train.batch_size=480", "train.grad_accum=8"])
    bad = make_plan(cfg, devices=8, cpu_peak=CPU_PEAK)
    (w,) = [w for w in bad.warnings if "does not divide" in w]
    assert "= 64" in w and "448 or 512" in w and "train.grad_accum in {1, 2, 3, 4, 5, 6}" in w
    good = make_plan(load_config("gpt2-124m", ["train.batch_size=480", "train.grad_accum=5"]), devices=8,
                     cpu_peak=CPU_PEAK)
    assert not any("does not divide" in w for w in good.warnings) and good.micro_batch == 12


def test_time_cost_and_targets():
    cfg = _cfg()
    p = make_plan(cfg, tokens=1e9, devices=2, mfu=0.5, prices={"h100": 2.0}, cpu_peak=CPU_PEAK)
    h100 = next(r for r in p.rows if r.accelerator.key == "h100")
    assert h100.seconds == pytest.approx(1e9 * 17328 / (2 * 989e12 * 0.5))
    assert h100.cost == pytest.approx(h100.seconds / 3600 * 2 * 2.0)
    cpu = p.rows[-1]
    assert cpu.accelerator.key == "cpu" and cpu.devices == 1
    assert cpu.seconds == pytest.approx(1e9 * 17328 / (1e11 * 0.5))
    assert make_plan(cfg, compute_optimal=True, cpu_peak=CPU_PEAK).tokens == 20 * 2504
    assert make_plan(cfg, cpu_peak=CPU_PEAK).tokens == 10 * 8 * 16  # the config's own run
    capped = make_plan(_cfg("train.max_minutes=1"), tokens=1e12, cpu_peak=CPU_PEAK).warnings
    assert any("max_minutes=1 stops the run" in w and "this CPU" in w and "L4" in w for w in capped)
    assert not any("max_minutes" in w for w in make_plan(_cfg("train.max_minutes=1"), tokens=1e3,
                                                          cpu_peak=CPU_PEAK).warnings)
    for bad in (dict(mfu=0), dict(mfu=40), dict(devices=0), dict(prices={"tpu": 1.0}),
                dict(tokens=1e6, compute_optimal=True), dict(parallel="zero3")):
        with pytest.raises(UserError):
            make_plan(cfg, cpu_peak=CPU_PEAK, **bad)


# Three published runs. Each one's MFU is the one its authors reported (see README "Scaling up"):
#   nanoGPT GPT-2 124M: 8xA100 40GB, 600,000 steps x 491,520 tokens, "roughly 4 days"; the
#     nanoGPT transformer_sizing notebook assumes 30% MFU for it (37% measured on 1 GPU).
#   llm.c GPT-2 124M: 8xA100 80GB, 18,865 steps x 524,288 tokens, "~90 minutes"; its run script
#     gives ~300 ms/step, which llm.c's own MFU formula (6N + 6LCT, 312 TFLOP/s) calls 56%.
#   nanochat d20: 8xH100, 21,400 steps x 524,288 tokens, base training "about 3 hours"; its log
#     shows mfu ~47.5.
NANOCHAT_D20 = ["model.vocab_size=65536", "model.context_length=2048", "model.d_model=1280",
                "model.n_layers=20", "model.n_heads=10", "model.d_ff=5120", "model.pos_encoding=rope",
                "model.norm=rmsnorm", "model.bias=false", "model.tie_embeddings=false",
                "train.batch_size=256", "train.grad_accum=1"]
PUBLISHED = [
    ("nanoGPT 124M", ["train.batch_size=480", "train.grad_accum=5"], 600_000 * 491_520, "a100-40gb", 0.30,
     4 * 86400),
    ("llm.c 124M", ["train.batch_size=512", "train.grad_accum=1"], 18_865 * 524_288, "a100-80gb", 0.56, 90 * 60),
    ("nanochat d20", NANOCHAT_D20, 21_400 * 524_288, "h100", 0.475, 3 * 3600),
]


@pytest.mark.parametrize("name,overrides,tokens,accelerator,mfu,published_s", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_runs_within_30_percent(name, overrides, tokens, accelerator, mfu, published_s):
    p = make_plan(load_config("gpt2-124m", overrides), tokens=tokens, devices=8, mfu=mfu, cpu_peak=CPU_PEAK)
    row = next(r for r in p.rows if r.accelerator.key == accelerator)
    assert 0.7 * published_s <= row.seconds <= 1.3 * published_s, (name, row.seconds / published_s)
    assert not any("does not divide" in w for w in p.warnings)


def test_nanochat_d20_counts_match_its_log():
    # nanochat's log for d20: "Number of parameters: 560,988,160", "Estimated FLOPs per token:
    # 3.491758e+09". Its model has no norm weights; ours has 41 RMSNorms of 1280.
    d20 = load_config("gpt2-124m", NANOCHAT_D20).model
    assert param_counts(d20).total - 41 * 1280 == 560_988_160
    assert flops_per_token(d20) - 6 * 41 * 1280 == pytest.approx(3.491758e9, rel=1e-6)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "scratchlm", "plan", *args], capture_output=True, text=True)


def test_plan_cli():
    r = cli("--config", "gpt2-124m", "--devices", "8", "--tokens", "10e9", "--mfu", "0.5",
            "--price", "h100=2.5", "--parallel", "fsdp", "--set", "train.batch_size=480")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "124.48M total" in out and "FLOPs/token 855.38M" in out and "8 x H100 SXM" in out
    assert "FSDP gathered blocks" in out and "this CPU" in out and "2.50" in out
    assert "warning: train.batch_size=480 does not divide" in out
    h = r.stdout.splitlines()
    assert any(line.strip().startswith("total") for line in h)
    bad = cli("--config", "tiny", "--price", "h100=cheap")
    assert bad.returncode == 2 and "bad --price" in bad.stderr
    both = cli("--config", "tiny", "--tokens", "1e6", "--compute-optimal")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_render_mentions_every_memory_line():
    text = render(make_plan(_cfg(), devices=2, cpu_peak=CPU_PEAK))
    for piece in ("weights, fp32", "gradients, fp32", "AdamW moments", "DDP gradient buckets",
                  "activations (4 x 16 tokens)", "with activation checkpointing", "6N", "PaLM"):
        assert piece in text, piece
    assert f"{GiB}" not in text
