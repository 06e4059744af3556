"""bf16 Linears in oneDNN's packed layout: bit-identical outputs, the same greedy tokens, the same
byte count, and models it cannot pack exactly (fp32) are left alone."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchlm.generate import SamplingConfig, generate_ids
from scratchlm.model import GPT, ModelConfig
from scratchlm.model.packed import PackedLinear, can_pack, pack_linears
from scratchlm.quantize import decode_bytes_per_token

pytestmark = pytest.mark.skipif(not can_pack(torch.zeros(1, dtype=torch.bfloat16)),
                                reason="this CPU/PyTorch has no bf16 oneDNN kernels, so nothing is packed")


def tiny(dtype=torch.bfloat16, **kw) -> GPT:
    torch.manual_seed(3)
    cfg = dict(vocab_size=300, context_length=40, d_model=64, n_layers=2, n_heads=4, d_ff=128, bias=True)
    return GPT(ModelConfig(**(cfg | kw))).to(dtype).eval()


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_is_bit_identical(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(linear)
    for shape in [(1, 1, 96), (3, 7, 96), (5, 96)]:  # one decoding row, a prefill, a flat batch
        x = torch.randn(shape, dtype=torch.bfloat16)
        with torch.inference_mode():
            assert torch.equal(packed(x), F.linear(x, linear.weight, linear.bias))
        assert packed(x).shape == (*shape[:-1], 200)


@pytest.mark.parametrize("kw", [{}, {"pos_encoding": "rope", "norm": "rmsnorm", "ffn": "swiglu", "n_kv_heads": 2}])
def test_packed_model_decodes_the_same_greedy_tokens(kw):
    plain, packed = tiny(**kw), tiny(**kw)
    nbytes = decode_bytes_per_token(plain)
    assert pack_linears(packed) == 2 * (5 if kw else 4) + 1  # every Linear and the tied head
    assert decode_bytes_per_token(packed) == nbytes
    assert packed.embed_tokens.weight.dtype == torch.bfloat16  # the embedding keeps the shared matrix
    prompts = [[5, 9, 200, 17, 3], [7, 8]]
    for batch in ([prompts[0]], prompts):  # unpadded and left-padded; 50 tokens slide the 40-token window
        want = generate_ids(plain, batch, SamplingConfig(max_new_tokens=50, temperature=0))
        assert generate_ids(packed, batch, SamplingConfig(max_new_tokens=50, temperature=0)) == want
        assert generate_ids(packed, batch, SamplingConfig(max_new_tokens=50, temperature=0, use_cache=False)) == want


def test_fp32_model_is_left_alone():
    model = tiny(torch.float32)
    assert pack_linears(model) == 0
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.requires_grad
