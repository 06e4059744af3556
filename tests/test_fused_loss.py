"""The chunked head + cross-entropy (training never builds the tokens x vocab logits) gives the
loss and gradients of the plain path: logits -> fp32 cross-entropy."""

import pytest
import torch

from scratchlm.model import GPT, ModelConfig, lm_loss
from scratchlm.model.gpt import head_cross_entropy


@pytest.mark.parametrize("masked,compiled", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("bf16", [False, True])
def test_head_cross_entropy_matches_plain_loss_and_grads(masked, compiled, bf16):
    """compiled: under torch.compile, which takes the head's other way of subtracting the one-hot."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 16, generator=g, requires_grad=True)
    w = (torch.randn(300, 16, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, 300, (2, 37), generator=g)
    t[0, 3] = -100  # ignore_index, as F.cross_entropy
    mask = (torch.rand(2, 37, generator=g) > 0.3).float() if masked else None
    results = []
    fused_loss = torch.compile(head_cross_entropy, fullgraph=True) if compiled else head_cross_entropy
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fused_loss(x, w, t, mask, chunk=16) if fused else lm_loss(x @ w.t(), t, mask)
        gx, gw = torch.autograd.grad(loss * 3.0, (x, w))  # a non-unit incoming gradient too
        results.append((loss.float(), gx, gw))
    (l0, gx0, gw0), (l1, gx1, gw1) = results
    tol = dict(rtol=2e-2, atol=2e-3) if bf16 else dict(rtol=1e-5, atol=1e-6)
    assert torch.allclose(l0, l1, **tol) and torch.allclose(gx0, gx1, **tol) and torch.allclose(gw0, gw1, **tol)


def test_model_training_loss_is_the_plain_loss_of_its_logits():
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=200, context_length=16, d_model=32, n_layers=2, n_heads=2, d_ff=64))
    x = torch.randint(0, 200, (3, 16))
    logits, loss = m(x, x)
    assert logits is None
    full, _ = m(x)
    assert torch.allclose(loss, lm_loss(full, x), rtol=1e-5)
    loss.backward()  # the tied embedding/head matrix gets its gradient from both uses
    assert m.embed_tokens.weight.grad is not None and m.embed_tokens.weight.grad.abs().sum() > 0


def test_logsumexp_with_a_scratch_buffer_is_torchs_bit_for_bit():
    from scratchlm.model.gpt import _logsumexp
    x = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)) * 30
    x[1] = float("-inf")                              # a row that is all -inf: -inf, not nan
    x[2, 7] = float("inf")
    x[3, :500] = float("-inf")
    x[4] = x[4].bfloat16().float()                    # bf16 logits upcast, as training feeds it
    got = _logsumexp(x.clone(), torch.empty_like(x))
    torch.testing.assert_close(got, torch.logsumexp(x, -1), rtol=0, atol=0, equal_nan=True)
