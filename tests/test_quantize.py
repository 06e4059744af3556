"""Int8 weight-only quantization and the lean decode loop: same module names, the int8 kernel
agrees with plain dequantized math, held-out perplexity within 1% of bf16, and greedy decoding
through the fast path gives the tokens of a full forward pass at every step."""

import pytest
import torch

from scratchlm.cli import main
from scratchlm.eval.perplexity import evaluate_tokens, token_byte_lengths
from scratchlm.generate import SamplingConfig, generate_ids
from scratchlm.model import GPT, ModelConfig
from scratchlm.quantize import Int8Linear, decode_bytes_per_token, quantize_int8
from scratchlm.train.checkpoint import load_for_inference

SMALL = ["model.context_length=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.d_ff=256",
         "train.batch_size=16", "train.lr=3e-3", "train.warmup_steps=10", "train.eval_every=0",
         "train.log_every=1000", "train.precision=fp32", "train.sample_tokens=4", "train.eval_batches=1",
         "train.max_steps=150", "train.checkpoint_every=150"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_dataset):
    from scratchlm.config import load_config
    from scratchlm.train.trainer import pretrain
    out = tmp_path_factory.mktemp("q")
    pretrain(load_config("tiny", SMALL + [f"run.out_dir={out}", "run.name=r"]), tiny_dataset,
             log=lambda *_: None, quiet=True)
    return out / "r"


def test_int8_linear_matches_dequantized_math_and_keeps_names():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, context_length=32, d_model=48, n_layers=2, n_heads=2, d_ff=96, bias=True))
    names = {n for n, _ in model.named_modules()}
    before = decode_bytes_per_token(model.to(torch.bfloat16))
    quantize_int8(model)
    assert {n for n, _ in model.named_modules()} == names  # layers.0.attn.qkv etc. are still there
    q = model.layers[0].attn.qkv
    assert isinstance(q, Int8Linear) and q.weight.dtype == torch.int8 and q.scale.shape == (q.out_features,)
    assert model.lm_head.weight.dtype == torch.int8 and model.embed_tokens.weight.dtype == torch.bfloat16
    x = torch.randn(5, 48, dtype=torch.bfloat16)
    ref = x.float() @ q.dequantized().float().t() + q.bias.float()
    assert torch.allclose(q(x).float(), ref, rtol=2e-2, atol=2e-2)
    assert decode_bytes_per_token(model) < 0.6 * before  # about half the bytes per token


def test_int8_perplexity_within_one_percent_of_bf16_and_cli(trained_run, shared, capsys):
    model, tok, _ = load_for_inference(trained_run, device="cpu")
    model = model.to(torch.bfloat16)
    held_out = (shared / "tinyshakespeare.txt").read_text()[1_000_000:1_040_000]  # past the 400k trained on
    tokens = torch.tensor(tok.encode_ordinary(held_out)).numpy()
    nbytes = token_byte_lengths(tok)
    ppl_bf16 = evaluate_tokens(model, tokens, nbytes).perplexity
    ppl_int8 = evaluate_tokens(quantize_int8(model), tokens, nbytes).perplexity
    assert ppl_bf16 < 0.4 * tok.vocab_size  # it learned something (uniform = vocab size): the comparison means something
    assert abs(ppl_int8 / ppl_bf16 - 1) < 0.01, (ppl_bf16, ppl_int8)
    assert main(["generate", "--ckpt", str(trained_run), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                 "--greedy", "--quantize", "int8", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantized", [False, True])
def test_fast_decode_is_greedy_full_forward(dtype, quantized):
    """Every token the cached loop (no per-token mask, no per-token tensors) picks is the argmax of
    a full, uncached forward pass over the sequence so far, for unpadded and padded batches."""
    torch.manual_seed(1)
    model = GPT(ModelConfig(vocab_size=256, context_length=48, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                            pos_encoding="rope", n_kv_heads=2)).to(dtype).eval()
    if quantized:
        quantize_int8(model)
    prompts = [[5, 9, 200, 17, 3], [7, 8]]
    for batch in ([prompts[0]], prompts):
        out = generate_ids(model, batch, SamplingConfig(max_new_tokens=60, temperature=0))  # slides the window
        ref = generate_ids(model, batch, SamplingConfig(max_new_tokens=60, temperature=0, use_cache=False))
        assert out == ref


def test_cli_bf16_generates_what_the_bf16_model_does(trained_run, capsys):
    from scratchlm.generate import generate
    model, tok, _ = load_for_inference(trained_run, device="cpu")
    want = generate(model.to(torch.bfloat16), tok, "ROMEO:", SamplingConfig(max_new_tokens=24, temperature=0))
    assert main(["generate", "--ckpt", str(trained_run), "--prompt", "ROMEO:", "--max-new-tokens", "24",
                 "--greedy", "--quantize", "bf16", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "ROMEO:" + want[0] + "\n"
