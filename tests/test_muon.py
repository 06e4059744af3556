"""Muon (train/muon.py): orthogonalised updates, the parameter split with AdamW, exact resume."""

import pytest
import torch

from scratchlm.config import load_config
from scratchlm.errors import UserError
from scratchlm.model import GPT, ModelConfig
from scratchlm.train.muon import MuonAdamW, orthogonalize
from scratchlm.train.trainer import make_optimizer, pretrain

from test_train import SMALL, final_weights, losses


def test_newton_schulz_makes_every_singular_value_about_one():
    torch.manual_seed(0)
    for shape in ((64, 32), (32, 96)):  # tall and wide
        # a gradient-like matrix: a few strong directions, many weak ones
        u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
        v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
        k = min(shape)
        s = torch.logspace(0, -2, k)
        g = u[:, :k] @ torch.diag(s) @ v[:, :k].T
        assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 50
        o = orthogonalize(g)
        sv = torch.linalg.svdvals(o)
        assert o.shape == g.shape and o.dtype == torch.float32
        assert sv.min() > 0.5 and sv.max() < 1.3, sv  # the quintic's loose band around 1, not a spread of 100x
        # and the directions are g's: o ≈ U Vᵀ of g
        torch.testing.assert_close(o, u[:, :k] @ v[:, :k].T, atol=0.35, rtol=0)


def _tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           d_ff=64, pos_encoding="rope", norm="rmsnorm", ffn="swiglu", tie_embeddings=False))


def test_muon_takes_the_blocks_matrices_adamw_the_rest_and_fsdp_is_refused():
    model = _tiny_model()
    tc = load_config("tiny", ["train.optimizer=muon"]).train
    opt = make_optimizer(model, tc, torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert muon == {f"layers.{i}.{w}.weight" for i in (0, 1)
                    for w in ("attn.qkv", "attn.out", "ffn.up_proj", "ffn.gate_proj", "ffn.down_proj")}
    assert adamw == set(names.values()) - muon and "lm_head.weight" in adamw and "embed_tokens.weight" in adamw
    qkv_group = next(g for g in opt.muon.param_groups if g["row_splits"])
    assert qkv_group["row_splits"] == [32, 16, 16]  # q, k, v orthogonalised separately (GQA: k, v narrower)
    assert all(g["lr_scale"] == pytest.approx(tc.muon_lr / tc.lr) for g in opt.muon.param_groups)
    with pytest.raises(UserError, match="fsdp"):
        make_optimizer(model, tc, torch.device("cpu"), sharded=True)


def test_muon_step_moves_each_block_of_qkv_by_an_orthogonal_matrix():
    model = _tiny_model()
    tc = load_config("tiny", ["train.optimizer=muon", "train.muon_lr=0.01"]).train
    opt = make_optimizer(model, tc, torch.device("cpu"))
    x = torch.randint(0, 64, (4, 16))
    model(x[:, :-1], x[:, 1:])[1].backward()
    w = model.layers[0].attn.qkv.weight
    before = w.detach().clone()
    for g in opt.param_groups:
        g["lr"] = tc.lr * g.get("lr_scale", 1.0)
    opt.step()
    for block in (w.detach() - before).split([32, 16, 16]):  # each a (rows x 32) step of norm ~ lr per direction
        sv = torch.linalg.svdvals(block / -0.01)
        assert sv.min() > 0.5 and sv.max() < 1.3, sv


def test_loss_falls_with_muon_on_a_tiny_model():
    """A fixed batch, 30 steps each: Muon (matrices at 0.02, the rest AdamW 3e-3) against AdamW at 3e-3."""
    torch.manual_seed(1)
    x = torch.randint(0, 64, (8, 17))
    final = {}
    for name in ("adamw", "muon"):
        model = _tiny_model()
        tc = load_config("tiny", [f"train.optimizer={name}", "train.lr=3e-3"]).train
        opt = make_optimizer(model, tc, torch.device("cpu"))
        for g in opt.param_groups:
            g["lr"] = tc.lr * g.get("lr_scale", 1.0)
        first = None
        for _ in range(30):
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            first = first if first is not None else loss.item()
        final[name] = loss.item()
        assert final[name] < first - 1.0, (name, first, final[name])
    print(f"loss after 30 steps on one batch: adamw {final['adamw']:.3f}, muon {final['muon']:.3f}")
    assert final["muon"] < final["adamw"]


def test_exact_resume_with_muon_and_a_changed_optimizer_is_refused(tmp_path, tiny_dataset):
    import shutil
    sets = SMALL + ["train.optimizer=muon", "train.max_steps=8", "train.checkpoint_every=4", "train.keep_last=5",
                    f"run.out_dir={tmp_path}"]
    pretrain(load_config("tiny", sets + ["run.name=straight"]), tiny_dataset, quiet=True, log=lambda *_: None)
    shutil.copytree(tmp_path / "straight", tmp_path / "again")
    shutil.rmtree(tmp_path / "again" / "checkpoints" / "step_000008")  # as if killed after step 4's checkpoint
    shutil.rmtree(tmp_path / "again" / "best")
    pretrain(load_config("tiny", sets + ["run.name=again"]), tiny_dataset, resume=True, quiet=True,
             log=lambda *_: None)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(tmp_path / "again")
    state = torch.load(tmp_path / "straight" / "checkpoints" / "step_000008" / "optimizer.pt", weights_only=True)
    assert set(state) == {"muon", "adamw"} and state["muon"]["state"]  # the momentum buffers are saved
    with pytest.raises(UserError, match="train.optimizer=muon, not adamw"):
        pretrain(load_config("tiny", [s for s in sets if "optimizer" not in s] + ["run.name=again"]),
                 tiny_dataset, resume=True, quiet=True, log=lambda *_: None)


def test_muon_under_ddp_matches_one_process(tmp_path, tiny_dataset):
    """DDP averages the gradients before the step, so every rank orthogonalises the same matrix:
    2 ranks x 4 sequences train the same weights as 1 process x 8."""
    from test_train import assert_close_weights, cli, pretrain_args, torchrun
    r = cli(*pretrain_args(tiny_dataset, tmp_path, "single", "train.optimizer=muon"))
    assert r.returncode == 0, r.stderr
    torchrun(*pretrain_args(tiny_dataset, tmp_path, "ddp", "train.optimizer=muon"))
    assert_close_weights(final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp"))
    assert losses(tmp_path / "single") == pytest.approx(losses(tmp_path / "ddp"), abs=1e-4)
