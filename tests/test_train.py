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
    mask = os.umask(0o022)
    os.umask(mask)
    pretrain(cfg, tiny_dataset, log=lambda *_: None, quiet=True)
    names = [c.name for c in ckpt.list_checkpoints(tmp_path / "r" / "checkpoints")]
    assert names == ["step_000003", "step_000006", "step_000007"]
    assert all(ckpt.validate(c) is None for c in ckpt.list_checkpoints(tmp_path / "r" / "checkpoints"))
    # staged in private temp dirs, published with ordinary permissions (here umask 022)
    last = ckpt.list_checkpoints(tmp_path / "r" / "checkpoints")[-1]
    assert last.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (last / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "r" / "tokenizer" / "tokenizer.scratchlm.json").stat().st_mode & 0o777 == 0o666 & ~mask


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


PARALLEL = SMALL + ["train.max_steps=12", "train.grad_accum=2", "train.checkpoint_every=6", "train.keep_last=3"]


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                        f"--master_port={_free_port()}", "-m", "scratchlm", *args],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def pretrain_args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    sets = PARALLEL + [f"run.out_dir={out}", f"run.name={name}", *extra]
    return ["pretrain", "--config", "tiny", "--data", str(data)] + [x for s in sets for x in ("--set", s)]


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory, tiny_dataset) -> Path:
    """The same 12 steps three ways: 1 process x 8 sequences; DDP and FSDP with 2 ranks x 4 (gloo),
    all with gradient accumulation 2, checkpoints at steps 6 and 12."""
    out = tmp_path_factory.mktemp("parallel")
    r = cli(*pretrain_args(tiny_dataset, out, "single"))
    assert r.returncode == 0, r.stderr
    torchrun(*pretrain_args(tiny_dataset, out, "ddp"))
    torchrun(*pretrain_args(tiny_dataset, out, "fsdp", "train.parallel=fsdp"))
    return out


def assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)


def test_ddp_and_fsdp_two_processes_match_one_process(parallel_runs):
    single = final_weights(parallel_runs / "single")
    for name in ("ddp", "fsdp"):
        assert_close_weights(single, final_weights(parallel_runs / name))
        assert losses(parallel_runs / "single") == pytest.approx(losses(parallel_runs / name), abs=1e-4)
    # FSDP really sharded: one DCP file per rank, plus the consolidated weights for inference
    sharded = ckpt.list_checkpoints(parallel_runs / "fsdp" / "checkpoints")[-1] / ckpt.SHARDED
    assert sorted(p.name for p in sharded.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert ckpt.validate(sharded.parent) is None


def _resume_from_step_6(runs: Path, source: str, name: str) -> Path:
    """A copy of `source` as it was at step 6 (its step-12 checkpoint and log lines gone)."""
    import shutil
    shutil.copytree(runs / source, runs / name)
    shutil.rmtree(runs / name / "checkpoints" / "step_000012")
    return runs / name


def test_fsdp_resume_is_exact_and_reshards(parallel_runs, tiny_dataset):
    fsdp = final_weights(parallel_runs / "fsdp")
    # same world size: bit for bit
    run = _resume_from_step_6(parallel_runs, "fsdp", "fsdp_again")
    r = torchrun(*pretrain_args(tiny_dataset, parallel_runs, "fsdp_again", "train.parallel=fsdp"), "--resume")
    assert "resumed from" in r.stdout
    b = final_weights(run)
    assert all(torch.equal(fsdp[k], b[k]) for k in fsdp)
    assert losses(run) == losses(parallel_runs / "fsdp")
    # 2 shards -> 1 process: DCP reshards the weights and AdamW moments
    run = _resume_from_step_6(parallel_runs, "fsdp", "fsdp_to_one")
    r = cli(*pretrain_args(tiny_dataset, parallel_runs, "fsdp_to_one", "train.parallel=fsdp"), "--resume")
    assert r.returncode == 0, r.stderr
    assert_close_weights(fsdp, final_weights(run))
    # a plain single-process checkpoint -> FSDP over 2 ranks
    run = _resume_from_step_6(parallel_runs, "single", "one_to_fsdp")
    torchrun(*pretrain_args(tiny_dataset, parallel_runs, "one_to_fsdp", "train.parallel=fsdp"), "--resume")
    assert_close_weights(final_weights(parallel_runs / "single"), final_weights(run))


def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, tiny_dataset, monkeypatch):
    import errno
    real_save = ckpt.save_file

    def save_file_disk_full(tensors, filename, *a, **kw):
        if "step_000006" in str(filename) or ".step_000006." in str(filename):
            Path(filename).write_bytes(b"\0" * 100)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, *a, **kw)

    cfg = load_config("tiny", SMALL + ["train.max_steps=9", "train.checkpoint_every=3", "train.keep_last=5",
                                       f"run.out_dir={tmp_path}", "run.name=r"])
    monkeypatch.setattr(ckpt, "save_file", save_file_disk_full)
    with pytest.raises(UserError) as e:
        pretrain(cfg, tiny_dataset, quiet=True)
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "step-6 checkpoint" in msg and "--resume" in msg
    root = tmp_path / "r" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step_000003"]  # no half-written step 6, no temp dir
    assert ckpt.validate(root / "step_000003") is None
    monkeypatch.setattr(ckpt, "save_file", real_save)  # space freed: resume goes on from step 3
    result = pretrain(load_config("tiny", SMALL + ["train.max_steps=9", "train.checkpoint_every=3",
                                                   "train.keep_last=5", f"run.out_dir={tmp_path}", "run.name=r"]),
                      tiny_dataset, resume=True, quiet=True)
    assert result.step == 9 and [r["step"] for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").open())
                                 if "loss" in r] == list(range(1, 10))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_save_io_error_is_an_oserror_and_leaves_no_temp_dir(tmp_path, monkeypatch):
    """DCP wraps a rank's I/O error in its CheckpointException (not an OSError); the trainer's
    one-line 'could not save' handling relies on seeing an OSError."""
    import errno

    import torch.distributed.checkpoint.filesystem as dcp_fs
    from scratchlm.model import GPT
    from scratchlm.train.trainer import make_optimizer

    def disk_full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_fs, "_write_item", disk_full)
    cfg = load_config("tiny", SMALL + ["model.vocab_size=64"])
    model = GPT(cfg.model)
    with pytest.raises(OSError, match="No space left on device"):
        ckpt.save_checkpoint(tmp_path, 6, model, make_optimizer(model, cfg.train, torch.device("cpu")), {},
                             sharded=True)
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_and_periodic_samples(tmp_path, tiny_dataset):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = load_config("tiny", SMALL + ["train.max_steps=6", "train.checkpoint_every=0", "train.eval_every=3",
                                       "train.sample_every=2", "train.tensorboard=true",
                                       f"run.out_dir={tmp_path}", "run.name=tb"])
    pretrain(cfg, tiny_dataset, quiet=True)
    run = tmp_path / "tb"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tb_loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in tb_loss] == list(range(1, 7))
    assert [v for _, v in tb_loss] == pytest.approx(losses(run), rel=1e-6)
    assert [e.step for e in events.Scalars("eval/val_loss")] == [3, 6]
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    sampled = [r["step"] for r in records if r.get("type") == "samples"]
    assert sampled == [2, 4]  # step 6 samples come with its evaluation
    assert all(set(r["samples"]) == set(cfg.eval.prompts) for r in records if r.get("type") == "samples")


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
    not_a_dir = tmp_path / "a_file"
    not_a_dir.write_text("x")  # unwritable even for root, unlike a chmod-ed directory
    with pytest.raises(UserError, match="cannot write to the run directory"):
        pretrain(load_config("tiny", SMALL + [f"run.out_dir={not_a_dir}"]), tiny_dataset)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    r = cli("quickstart", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "q"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not found" in r.stderr
    r = cli("pretrain", "--config", "tiny", "--set", "train.lr")
    assert r.returncode == 2 and "section.key=value" in r.stderr
    r = cli("pretrain", "--config", "nope")
    assert r.returncode == 2 and "unknown preset" in r.stderr
    assert not (tmp_path / "q" / "report.md").exists()


def test_sharded_checkpoint_metadata_cannot_run_code(parallel_runs, tmp_path):
    """DCP keeps its .metadata as a pickle; ours is read with an allow-list, so a planted object fails."""
    import pickle
    import shutil
    from scratchlm.config import load_config
    from scratchlm.model import GPT
    from scratchlm.train.trainer import make_optimizer
    src = ckpt.list_checkpoints(parallel_runs / "fsdp" / "checkpoints")[-1]
    bad = tmp_path / "step_000012"
    shutil.copytree(src, bad)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (bad / ckpt.SHARDED / ".metadata").write_bytes(pickle.dumps(Payload()))
    cfg = load_config("tiny", PARALLEL)
    cfg.model.vocab_size = json.loads((src / "state.json").read_text())["model"]["vocab_size"]
    model = GPT(cfg.model)
    with pytest.raises(UserError, match="refusing to load"):
        ckpt.load_training_state(model, make_optimizer(model, cfg.train, torch.device("cpu")), bad)
    assert not marker.exists()


def test_ddp_sigterm_to_one_rank_stops_all_at_the_same_step(tmp_path, tiny_dataset):
    """A signal reaching one worker only (a pre-empted node) must not leave the others waiting
    in an all-reduce forever: every rank stops after the same step, one checkpoint, exit 0."""
    args = pretrain_args(tiny_dataset, tmp_path, "sig", "train.max_steps=100000", "train.checkpoint_every=0")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={_free_port()}", "-m", "scratchlm", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    run = tmp_path / "sig"
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 5):
        time.sleep(0.05)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    rank1 = [int(p) for p in workers if b"\0LOCAL_RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes()]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by signal" in err
    (last,) = ckpt.list_checkpoints(run / "checkpoints")
    assert ckpt.validate(last) is None and int(last.name.split("_")[1]) == len(losses(run))
