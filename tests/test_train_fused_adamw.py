"""The trainer's AdamW runs fused (one kernel per step, on CPU too): the same updates as PyTorch's
reference loop up to float rounding, and resuming keeps this run's kernel whatever the checkpoint used."""

import copy

import pytest
import torch

from scratchlm.config import load_config
from scratchlm.model import GPT, ModelConfig
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.trainer import make_optimizer


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=97, context_length=16, d_model=32, n_layers=2, n_heads=2, d_ff=64, bias=True))


def _steps(model: GPT, opt, n: int, seed: int = 1, bf16: bool = False) -> list[float]:
    x, losses = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(seed)), []
    for _ in range(n):  # one batch, again and again: the loss must fall
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, x.roll(-1, 1))[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _assert_same_params(a: GPT, b: GPT) -> None:
    """Equal up to fp32 rounding. Except the key bias: its true gradient is zero (softmax ignores a shift
    that is the same for every key), so Adam scales rounding noise up to steps of ~lr; those only within 1% of lr."""
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        if name.endswith("attn.qkv.bias"):
            d = a.cfg.d_model
            torch.testing.assert_close(x[d:2 * d], y[d:2 * d], atol=1e-4, rtol=0, msg=f"{name} (keys)")
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)


def _reference(opt) -> None:
    """Turn an optimizer into PyTorch's plain per-tensor loop (the CPU default before fused)."""
    for group in opt.param_groups:
        group["fused"], group["foreach"] = False, False


def test_fused_adamw_updates_match_the_reference_loop():
    tc = load_config("tiny", ["train.weight_decay=0.1", "train.lr=1e-2"]).train
    start = _model()
    fused_model, ref_model = copy.deepcopy(start), copy.deepcopy(start)
    fused = make_optimizer(fused_model, tc, torch.device("cpu"))
    ref = make_optimizer(ref_model, tc, torch.device("cpu"))
    _reference(ref)
    assert all(g["fused"] for g in fused.param_groups)
    _steps(fused_model, fused, 5)
    _steps(ref_model, ref, 5)
    _assert_same_params(fused_model, ref_model)
    assert all(not torch.equal(a, b) for a, b in zip(fused_model.parameters(), start.parameters()))  # all trained
    # Under bf16 autocast the float rounding of the two is amplified by bf16's; the losses still agree
    fused_model, ref_model = copy.deepcopy(start), copy.deepcopy(start)
    fused, ref = make_optimizer(fused_model, tc, torch.device("cpu")), make_optimizer(ref_model, tc, torch.device("cpu"))
    _reference(ref)
    a, b = _steps(fused_model, fused, 5, bf16=True), _steps(ref_model, ref, 5, bf16=True)
    assert a[-1] < a[0] - 0.05 and a == pytest.approx(b, rel=2e-3)


def test_resume_keeps_the_fused_kernel_and_continues_like_the_reference(tmp_path):
    """A checkpoint written by the reference loop (an older version's) resumes into a fused run, and one
    written by a fused run into the loop; both continue with the same numbers as never stopping."""
    tc = load_config("tiny", ["train.lr=1e-2"]).train
    for saved_fused in (False, True):
        model = _model()
        opt = make_optimizer(model, tc, torch.device("cpu"))
        if not saved_fused:
            _reference(opt)
        _steps(model, opt, 3)
        root = tmp_path / f"saved_fused_{saved_fused}"
        saved = ckpt.save_checkpoint(root, 3, model, opt, {})
        _steps(model, opt, 2, seed=2)  # the run that never stopped

        resumed = GPT(model.cfg)
        new_opt = make_optimizer(resumed, tc, torch.device("cpu"))
        if saved_fused:
            _reference(new_opt)
        ckpt.load_training_state(resumed, new_opt, saved)
        assert all(bool(g["fused"]) is not saved_fused for g in new_opt.param_groups)  # this run's kernel, kept
        assert all(new_opt.state[p]["step"].item() == 3 for p in resumed.parameters())
        _steps(resumed, new_opt, 2, seed=2)
        _assert_same_params(resumed, model)
