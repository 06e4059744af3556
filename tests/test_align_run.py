"""DPO through the one trainer: a run, its metrics and checkpoint meta, exact resume, the CLI and
`eval preference`, and one-line refusals (reference with another tokenizer, no template)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from scratchlm.align.pipeline import align_dpo, eval_preference
from scratchlm.cli import main
from scratchlm.config import load_config
from scratchlm.errors import UserError
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.logger import read_metrics
from scratchlm.train.trainer import pretrain

SMALL = ["model.context_length=128", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
         "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=1", "train.eval_every=0",
         "train.log_every=1000", "train.precision=fp32", "train.sample_tokens=4", "train.eval_batches=1"]
DPO = ["train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=1", "train.log_every=1000", "train.precision=fp32",
       "train.sample_tokens=4", "dpo.template=alpaca", "dpo.val_fraction=0.25", "dpo.beta=0.5"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_dataset):
    out = tmp_path_factory.mktemp("base")
    pretrain(load_config("tiny", SMALL + ["train.max_steps=2", f"run.out_dir={out}", "run.name=base"]),
             tiny_dataset, log=lambda *_: None, quiet=True)
    return out / "base"


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"Say {w}.", "chosen": f"Thou art {w}.", "rejected": f"No, {w} is vile!"}
            for w in ("kind", "good", "wise", "fair", "true", "brave", "meek", "calm", "just", "bold", "glad", "warm")]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _dpo_cfg(tmp_path, name, extra=()):
    return load_config("dpo", DPO + [f"run.out_dir={tmp_path}", f"run.name={name}", *extra])


def test_dpo_run_logs_rewards_and_records_its_reference(tmp_path, base, pairs_file):
    r = align_dpo(_dpo_cfg(tmp_path, "d", ["train.max_steps=12", "train.eval_every=6"]), str(base), str(pairs_file),
                  log=lambda *_: None, quiet=True)
    run = tmp_path / "d"
    steps = [m for m in read_metrics(run / "metrics.jsonl") if m.get("type") is None]
    evals = [m for m in read_metrics(run / "metrics.jsonl") if m.get("type") == "eval"]
    # Step 1 starts at policy == reference: loss ln 2, margin 0 (precomputed reference: to float rounding).
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and abs(steps[0]["reward_margin"]) < 1e-4
    assert {"reward_chosen", "reward_rejected", "accuracy"} <= steps[0].keys()
    assert {"val_accuracy", "val_margin", "train_accuracy", "val_loss"} <= evals[-1].keys()
    assert evals[-1]["train_margin"] > 0 and steps[-1]["loss"] < math.log(2)
    meta = ckpt.read_state(ckpt.list_checkpoints(run / "checkpoints")[-1])["task"]
    assert meta["kind"] == "dpo" and meta["template"] == "alpaca" and meta["beta"] == 0.5
    assert meta["reference"].startswith(str(base))
    assert (run / "pairs.json").exists() and len((run / "val_pairs.jsonl").read_text().splitlines()) == 3
    assert json.loads((run / "samples_before.json").read_text())["samples"]
    # eval preference against the recorded reference, on the held-out pairs the run wrote
    res = eval_preference(str(run), str(run / "val_pairs.jsonl"), log=lambda *_: None)
    assert res["n"] == 3 and res["reference"] == meta["reference"] and res["beta"] == 0.5
    assert res["accuracy_ci95"][0] <= res["accuracy"] <= res["accuracy_ci95"][1]
    before = eval_preference(str(base), str(run / "val_pairs.jsonl"), ref=str(base), template="alpaca",
                             log=lambda *_: None)
    assert before["margin"] == 0.0 and before["ties"] == 3 and before["accuracy"] == 0.0


def test_dpo_resume_is_exact(tmp_path, base, pairs_file):
    extra = ["train.max_steps=6", "train.checkpoint_every=3", "train.keep_last=5"]
    align_dpo(_dpo_cfg(tmp_path, "straight", extra), str(base), str(pairs_file), log=lambda *_: None, quiet=True)
    shutil.copytree(tmp_path / "straight", tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "step_000006")
    align_dpo(_dpo_cfg(tmp_path, "killed", extra), str(base), str(pairs_file), resume=True,
              log=lambda *_: None, quiet=True)
    a, b = (load_file(str(tmp_path / n / "checkpoints" / "step_000006" / "model.safetensors"))
            for n in ("straight", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_live_reference_gives_the_same_first_step(tmp_path, base, pairs_file):
    losses = []
    for name, pre in (("pre", "true"), ("live", "false")):
        align_dpo(_dpo_cfg(tmp_path, name, ["train.max_steps=2", f"dpo.precompute_reference={pre}"]), str(base),
                  str(pairs_file), log=lambda *_: None, quiet=True)
        losses.append([m["loss"] for m in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in m])
    assert losses[1][0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


def test_refusals_are_one_line(tmp_path, base, pairs_file, small_tokenizer, capsys):
    with pytest.raises(UserError, match="pretrain checkpoint with no prompt template.*dpo.template"):
        align_dpo(load_config("dpo", [f"run.out_dir={tmp_path}", "run.name=x"]), str(base), str(pairs_file))
    # a reference trained with another tokenizer
    other = tmp_path / "other"
    shutil.copytree(base, other)
    small_tokenizer.save(other / "tokenizer")
    for c in ckpt.list_checkpoints(other / "checkpoints") + ckpt.list_checkpoints(other / "best"):
        state = json.loads((c / "state.json").read_text())
        state["tokenizer_fingerprint"] = small_tokenizer.fingerprint
        (c / "state.json").write_text(json.dumps(state))
        man = json.loads((c / "manifest.json").read_text())
        man["files"]["state.json"] = ckpt._sha256(c / "state.json")
        (c / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(UserError, match="uses another tokenizer than the policy"):
        align_dpo(_dpo_cfg(tmp_path, "y"), str(base), str(pairs_file), ref=str(other))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    assert main(["align", "dpo", "--ckpt", str(base), "--data", str(bad), "--out", str(tmp_path / "z"),
                 "--set", "dpo.template=alpaca"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chosen and rejected are identical" in err
    assert main(["align", "dpo", "--ckpt", str(base), "--data", str(pairs_file), "--out", str(tmp_path / "z"),
                 "--set", "model.n_layers=3"]) == 2
    assert "keeps the starting checkpoint's model shape" in capsys.readouterr().err
    assert not (tmp_path / "z" / "pairs.json").exists()


def test_cli_align_and_eval_preference(tmp_path, base, pairs_file, capsys):
    out = tmp_path / "cli"
    assert main(["align", "dpo", "--ckpt", str(base), "--data", str(pairs_file), "--out", str(out), "--beta", "0.5",
                 "--set", "dpo.template=alpaca", "--set", "train.max_steps=2", "--set", "train.batch_size=4"]) == 0
    assert "held-out preference accuracy" in capsys.readouterr().out
    assert main(["eval", "preference", "--ckpt", str(out), "--data", str(pairs_file)]) == 0
    line = capsys.readouterr().out
    assert "95% CI" in line and "n=12" in line and "beta 0.5" in line
    assert json.loads((out / "eval_preference.json").read_text())["n"] == 12
    # generate wraps a DPO run's prompt in its template, as for an SFT run
    from scratchlm.finetune.templates import task_prompts
    state = ckpt.read_state(ckpt.list_checkpoints(out / "checkpoints")[-1])
    from scratchlm.tokenizer import Tokenizer
    prompts, _ = task_prompts(state["task"], Tokenizer.load(out / "tokenizer"), ["Say kind."])
    assert prompts[0].endswith("### Response:\n") and "Say kind." in prompts[0]
    assert main(["generate", "--ckpt", str(out), "--prompt", "Say kind.", "--max-new-tokens", "3", "--greedy"]) == 0
    # running into the finished run without --resume is refused before any of its files is touched
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    other = tmp_path / "other_pairs.jsonl"
    other.write_text(json.dumps({"prompt": "Other?", "chosen": "Yes, gladly.", "rejected": "No."}) + "\n")
    capsys.readouterr()
    assert main(["align", "dpo", "--ckpt", str(base), "--data", str(other), "--out", str(out),
                 "--set", "dpo.template=alpaca"]) == 2
    assert "already holds a DPO run" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before
