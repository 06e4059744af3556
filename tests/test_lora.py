"""Our LoRA: merge == unmerged, only adapters learn, the same numbers as peft, adapters saved alone."""

import copy

import pytest
import torch

from scratchlm.config import LoraConfig
from scratchlm.errors import UserError
from scratchlm.finetune.lora import (add_lora, base_fingerprint, lora_layers, load_adapter, merge_and_unload,
                                     merge_lora, save_adapter, unmerge_lora)
from scratchlm.model import GPT, ModelConfig


def tiny(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{"vocab_size": 64, "context_length": 16, "d_model": 32, "n_layers": 2, "n_heads": 2,
                              "d_ff": 64, **kw})).eval()


def randomize_adapters(model: GPT, seed=1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            for p in [*layer.lora_A.values(), *layer.lora_B.values()]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


ALL = ["q", "k", "v", "o", "mlp", "head"]


@pytest.mark.parametrize("kw", [{}, {"ffn": "swiglu", "norm": "rmsnorm", "pos_encoding": "rope", "n_kv_heads": 1}])
def test_merged_logits_equal_unmerged_and_unmerge_restores(kw):
    model = add_lora(tiny(**kw), LoraConfig(rank=4, alpha=8, targets=ALL))
    randomize_adapters(model)
    x = torch.randint(0, 64, (2, 12))
    emb = model.embed_tokens.weight.detach().clone()
    before = model(x)[0]
    merge_lora(model)
    assert torch.allclose(model(x)[0], before, atol=1e-5)
    assert torch.equal(model.embed_tokens.weight, emb), "merging a tied head must not touch the embeddings"
    unmerge_lora(model)
    assert torch.allclose(model(x)[0], before, atol=1e-5)
    plain = merge_and_unload(model)
    assert not lora_layers(plain) and torch.allclose(plain(x)[0], before, atol=1e-5)


def test_starts_at_the_base_and_only_adapters_get_gradients():
    base = tiny()
    x = torch.randint(0, 64, (2, 12))
    ref = base(x)[0].detach()
    model = add_lora(copy.deepcopy(base), LoraConfig(rank=2, alpha=4, targets=["q", "v", "mlp"]))
    assert torch.allclose(model(x)[0], ref), "B starts at zero: the adapted model equals its base"
    model.train()
    model(x, x)[1].backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # q and v slices (rank 2: A 2x32, B 32x2 each) + up (A 2x32, B 64x2) + down (A 2x64, B 32x2), 2 layers
    assert trainable == 2 * (2 * (2 * 32 + 32 * 2) + (2 * 32 + 64 * 2) + (2 * 64 + 32 * 2))


def test_scaling_is_alpha_over_rank():
    model = add_lora(tiny(), LoraConfig(rank=4, alpha=2, targets=["o"]))
    layer = lora_layers(model)[0]
    randomize_adapters(model)
    x = torch.randn(3, 32)
    expected = x @ layer.weight.T + (2 / 4) * (x @ layer.lora_A["o"].T @ layer.lora_B["o"].T)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_same_outputs_as_peft_with_the_same_weights():
    peft = pytest.importorskip("peft")  # in the test extra; a missing peft fails CI's install, not this
    r, alpha = 4, 8
    ours = add_lora(tiny(), LoraConfig(rank=r, alpha=alpha, targets=ALL))
    randomize_adapters(ours)
    # peft adapts whole Linears. Our q/k/v adapters on slices of the fused qkv are one peft adapter
    # of rank 3r: A stacked, B block-diagonal, alpha 3*alpha (so alpha/rank is the same).
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["qkv", "out", "up_proj", "down_proj", "lm_head"],
                        rank_pattern={"qkv": 3 * r}, alpha_pattern={"qkv": 3 * alpha}, lora_dropout=0.0),
        tiny())
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if not hasattr(layer, "lora_A"):
                continue
            target = theirs.get_submodule(name)
            A, B = target.lora_A["default"].weight, target.lora_B["default"].weight
            A.zero_()
            B.zero_()
            for k, (part, (s, e)) in enumerate(layer.parts.items()):
                A[k * r:(k + 1) * r] = layer.lora_A[part]
                B[s:e, k * r:(k + 1) * r] = layer.lora_B[part]
    theirs.eval()
    x = torch.randint(0, 64, (2, 12))
    assert torch.allclose(ours(x)[0], theirs(x)[0], atol=1e-5)


def test_adapter_saved_alone_and_refused_on_another_base(tmp_path):
    base = tiny(seed=0, d_model=64, d_ff=256, n_layers=4, vocab_size=512)
    fp = base_fingerprint(base)
    model = add_lora(copy.deepcopy(base), LoraConfig(rank=2, alpha=4, targets=["q", "v"]))
    randomize_adapters(model)
    path = save_adapter(model, tmp_path, fp)
    full = sum(p.numel() * 4 for p in base.parameters())
    assert path.stat().st_size < full / 50, "the adapter file holds the adapters, not the model"
    x = torch.randint(0, 512, (1, 10))
    loaded = load_adapter(copy.deepcopy(base), path)
    assert torch.allclose(loaded(x)[0], model(x)[0])
    with pytest.raises(UserError, match="another base"):
        load_adapter(tiny(seed=1, d_model=64, d_ff=256, n_layers=4, vocab_size=512), path)


def test_bad_lora_settings_are_one_line_errors():
    with pytest.raises(UserError, match="lora.targets"):
        add_lora(tiny(), LoraConfig(targets=["attn"]))
    with pytest.raises(UserError, match="lora.rank"):
        add_lora(tiny(), LoraConfig(rank=0))
