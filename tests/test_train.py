import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scratchlm.config import load_config
from scratchlm.errors import UserError
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.schedule import lr_at
from scratchlm.train.trainer import pretrain

SMALL = ["model.context_length=32", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
         "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=3", "train.eval_every=0",
         "train.log_every=1000", "train.precision=fp32", "train.sample_tokens=4", "train.eval_batches=1"]


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scratchlm", *args], capture_output=True, text=True, **kw)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def final_weights(run: Path) -> dict:
    return load_file(str(ckpt.list_checkpoints(run / "checkpoints")[-1] / "model.safetensors"))


def test_schedule_warmup_cosine_never_negative_or_backwards():
    lrs = [lr_at(s, 100, 1.0, warmup_steps=10, min_lr_ratio=0.1) for s in range(150)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))           # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))       # decay falls
    assert min(lrs) == pytest.approx(0.1) and lrs[149] == pytest.approx(0.1)  # stays put after the end
    wsd = [lr_at(s, 100, 1.0, 0, "wsd", 0.0, 0.2) for s in range(100)]
    assert wsd[50] == 1.0 and wsd[99] < 0.1 and min(wsd) >= 0


def test_exact_resume_after_sigkill_is_bit_identical(tmp_path, tiny_dataset):
    common = ["pretrain", "--config", "tiny", "--data", str(tiny_dataset), "--set", "train.max_steps=24",
              "--set", "train.checkpoint_every=4", "--set", "train.keep_last=3"] + \
             [x for s in SMALL for x in ("--set", s)]
    straight = cli(*common, "--set", f"run.out_dir={tmp_path}", "--set", "run.name=straight")
    assert straight.returncode == 0, straight.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "scratchlm", *common, "--set", f"run.out_dir={tmp_path}",
                             "--set", "run.name=killed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once it is past a checkpoint, mid-way
        if (run / "metrics.jsonl").exists() and len(losses(run)) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(losses(run))
    assert 10 <= killed_at < 24, "the run was not killed mid-way"
    resumed = cli(*common, "--set", f"run.out_dir={tmp_path}", "--set", "run.name=killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout

    a, b = final_weights(tmp_path / "straight"), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(run)


def test_corrupt_checkpoint_is_skipped_for_the_previous_one(tmp_path, tiny_dataset):
    cfg = load_config("tiny", SMALL + ["train.max_steps=6", "train.checkpoint_every=3", "train.keep_last=5",
                                       f"run.out_dir={tmp_path}", "run.name=r"])
    pretrain(cfg, tiny_dataset, log=lambda *_: None, quiet=True)
    ckpts = ckpt.list_checkpoints(tmp_path / "r" / "checkpoints")
    assert [c.name for c in ckpts] == ["step_000003", "step_000006"]
    weights = ckpts[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated by a crash / full disk
    messages = []
    assert ckpt.latest_valid(tmp_path / "r" / "checkpoints", log=messages.append) == ckpts[0]
    assert "checksum" in messages[0]
    cfg2 = load_config("tiny", SMALL + ["train.max_steps=6", f"run.out_dir={tmp_path}", "run.name=r"])
    res = pretrain(cfg2, tiny_dataset, resume=True, log=lambda *_: None, quiet=True)
    assert res.step == 6


def test_checkpoint_every_n_not_every_step(tmp_path, tiny_dataset):
    cfg = load_config("tiny", SMALL + ["train.max_steps=7", "train.checkpoint_every=3", "train.keep_last=10",
                                       f"run.out_dir={tmp_path}", "run.name=r"])
    pretrain(cfg, tiny_dataset, log=lambda *_: None, quiet=True)
    names = [c.name for c in ckpt.list_checkpoints(tmp_path / "r" / "checkpoints")]
    assert names == ["step_000003", "step_000006", "step_000007"]
    assert all(ckpt.validate(c) is None for c in ckpt.list_checkpoints(tmp_path / "r" / "checkpoints"))


def test_resume_with_other_shape_refused_and_rerun_refused(tmp_path, tiny_dataset):
    cfg = load_config("tiny", SMALL + ["train.max_steps=2", f"run.out_dir={tmp_path}", "run.name=r"])
    pretrain(cfg, tiny_dataset, log=lambda *_: None, quiet=True)
    with pytest.raises(UserError, match="already has checkpoints"):
        pretrain(load_config("tiny", SMALL + [f"run.out_dir={tmp_path}", "run.name=r"]), tiny_dataset)
    bigger = load_config("tiny", SMALL + ["model.d_model=64", f"run.out_dir={tmp_path}", "run.name=r"])
    with pytest.raises(UserError, match="model config changed.*d_model"):
        pretrain(bigger, tiny_dataset, resume=True, log=lambda *_: None)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, tiny_dataset):
    args = ["pretrain", "--config", "tiny", "--data", str(tiny_dataset), "--set", "train.max_steps=100000",
            "--set", "train.checkpoint_every=0", "--set", f"run.out_dir={tmp_path}", "--set", "run.name=t"] + \
           [x for s in SMALL for x in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "-m", "scratchlm", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run = tmp_path / "t"
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by signal" in err
    (last,) = ckpt.list_checkpoints(run / "checkpoints")
    assert ckpt.validate(last) is None and int(last.name.split("_")[1]) == len(losses(run))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process(tmp_path, tiny_dataset):
    """gloo, 2 ranks x 4 sequences == 1 rank x 8 sequences, with grad accumulation on both."""
    sets = SMALL + ["train.max_steps=6", "train.grad_accum=2", "train.checkpoint_every=0", f"run.out_dir={tmp_path}"]
    args = ["pretrain", "--config", "tiny", "--data", str(tiny_dataset)] + [x for s in sets for x in ("--set", s)]
    single = cli(*args, "--set", "run.name=single")
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "scratchlm", *args, "--set", "run.name=ddp"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    assert losses(tmp_path / "single") == pytest.approx(losses(tmp_path / "ddp"), abs=1e-4)


def test_bad_configs(tmp_path, tiny_dataset):
    with pytest.raises(UserError, match="unknown config key train.lrr"):
        load_config("tiny", ["train.lrr=1"])
    with pytest.raises(UserError, match="must be true or false"):
        load_config("tiny", ["train.compile=maybe"])
    assert load_config("tiny", ["train.compile=False"]).train.compile is False  # not bool("False")
    with pytest.raises(UserError, match="unknown preset"):
        load_config("nope")
    with pytest.raises(UserError, match="divisible"):
        pretrain(load_config("tiny", SMALL + ["train.batch_size=7", "train.grad_accum=2",
                                              f"run.out_dir={tmp_path}"]), tiny_dataset)
    with pytest.raises(UserError, match="smaller than the tokenizer"):
        pretrain(load_config("tiny", SMALL + ["model.vocab_size=100", f"run.out_dir={tmp_path}"]), tiny_dataset)
    with pytest.raises(UserError, match="less than one context window"):
        pretrain(load_config("tiny", SMALL + ["model.context_length=10000000", f"run.out_dir={tmp_path}"]),
                 tiny_dataset)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() != 0:  # root ignores permissions; then only check the message path exists
        with pytest.raises(UserError, match="cannot write"):
            pretrain(load_config("tiny", SMALL + [f"run.out_dir={ro}"]), tiny_dataset)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    r = cli("quickstart", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "q"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not found" in r.stderr
    r = cli("pretrain", "--config", "tiny", "--set", "train.lr")
    assert r.returncode == 2 and "section.key=value" in r.stderr
    r = cli("pretrain", "--config", "nope")
    assert r.returncode == 2 and "unknown preset" in r.stderr
    assert not (tmp_path / "q" / "report.md").exists()
