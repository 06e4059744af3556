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
from scratchlm.train.schedule import TimeBudget, lr_at, lr_continued
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_and_exits_cleanly(tmp_path, tiny_dataset, sig):
    """SIGTERM, and Ctrl-C (SIGINT): finish the step, checkpoint, exit 0, no KeyboardInterrupt."""
    args = ["pretrain", "--config", "tiny", "--data", str(tiny_dataset), "--set", "train.max_steps=100000",
            "--set", "train.checkpoint_every=0", "--set", f"run.out_dir={tmp_path}", "--set", "run.name=t"] + \
           [x for s in SMALL for x in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "-m", "scratchlm", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run = tmp_path / "t"
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 3):
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by signal" in err and "interrupted" not in err
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


# --- issue 11: the loop one can trust ---------------------------------------------------------



class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_time_budget_replans_never_raise_the_lr_after_warmup():
    """Random speeds, evaluation costs and stalls: the plan only shrinks, so the LR never rises after
    warm-up. (The old re-plan was capped at max_steps: lr_at(500, 800) = 0.41 -> lr_at(501, 1000) = 0.59.)"""
    import random
    tc = load_config("tiny", ["train.warmup_steps=10", "train.max_steps=5000"]).train
    for schedule in ("cosine", "wsd"):
        tc.schedule = schedule
        rng = random.Random(0)
        clock = FakeClock()
        budget = TimeBudget(1.0, clock=clock)
        plan, lrs, plans = tc.max_steps, [], []
        for step in range(5000):
            if step >= plan or budget.expired():
                break
            lrs.append(lr_continued(step, plan, tc))
            clock.t += rng.choice([0.01, 0.02, 0.05]) * (20 if rng.random() < 0.01 else 1)  # a stall now and then
            evaluated = (step + 1) % 25 == 0
            if evaluated:
                budget.add_busy(rng.uniform(0, 0.5))
                clock.t += budget.busy
            plan = budget.after_step(step + 1, plan, evaluated=evaluated, eval_every=25)
            plans.append(plan)
        assert all(a >= b for a, b in zip(plans, plans[1:])), "a re-plan made the run longer"
        after = lrs[tc.warmup_steps:]
        assert all(a >= b - 1e-12 for a, b in zip(after, after[1:])), f"{schedule}: the LR rose after warm-up"
        assert plans[-1] < tc.max_steps  # the budget did bind


def test_time_budget_grows_the_plan_only_on_a_wsd_plateau():
    """A wsd run whose first estimate was too careful (the machine got faster) lengthens its plan
    while the rate is flat and so uses its budget; the LR still never rises after warm-up, and the
    plan never grows once the decay has begun."""
    from scratchlm.train.schedule import plateau
    tc = load_config("tiny", ["train.warmup_steps=10", "train.max_steps=5000", "train.schedule=wsd"]).train
    clock = FakeClock()
    budget = TimeBudget(1.0, clock=clock)
    plan, lrs, plans, decaying = tc.max_steps, [], [], []
    for step in range(5000):
        if step >= plan or budget.expired():
            break
        lrs.append(lr_continued(step, plan, tc))
        clock.t += 0.2 if step < 100 else 0.1  # twice as fast after step 100
        grow = plateau(step + 1, plan, tc)
        decaying.append(not grow and step + 1 > tc.warmup_steps)
        plan = budget.after_step(step + 1, plan, may_grow=grow, cap=tc.max_steps)
        plans.append(plan)
    assert max(plans[20:]) > plans[19], "the plan never grew"
    grew_late = [b > a for a, b, d in zip(plans, plans[1:], decaying[1:]) if d]
    assert not any(grew_late), "the plan grew during the decay"
    after = lrs[tc.warmup_steps:]
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:])), "the LR rose after warm-up"
    assert budget.elapsed() > 0.95 * 60, f"only {budget.elapsed():.1f} s of the 60 s budget trained"
    assert lrs[-1] < tc.lr * 0.2, "the run ended before its decay"


def test_time_budget_plans_from_the_measured_speed():
    clock = FakeClock()
    budget = TimeBudget(1.0, clock=clock)  # 60 s
    plan = 10_000
    for step in range(1, 21):
        clock.t += 5.0 if step <= 10 else 0.5  # the first ten steps (compiling) are slow, then 0.5 s/step
        plan = budget.after_step(step, plan)
    # 60 - 55 s spent = 5 s left at 0.5 s/step = 10 steps, 90% of that: 9 more
    assert plan == 20 + 9
    budget = TimeBudget(1.0, elapsed=59.0, clock=clock)  # a resumed run counts the time already spent
    assert not budget.expired() and budget.replan(1000, 5, 0.5, 1.0) == 7
    clock.t += 1.0
    assert budget.expired()


def test_lr_continued_when_a_finished_run_is_extended():
    tc = load_config("tiny", ["train.warmup_steps=2", "train.lr=1.0", "train.min_lr_ratio=0.1"]).train
    before = [lr_continued(s, 10, tc) for s in range(10)]
    anchor = (10, lr_continued(10, 10, tc))  # the rate the next step would have had: the floor
    after = [lr_continued(s, 20, tc, anchor) for s in range(10, 20)]
    assert after[0] == pytest.approx(before[-1], abs=0.05) and max(after) <= before[-1] + 1e-12
    assert min(after) >= 0.1 - 1e-12
    tc.schedule = "wsd"  # a WSD run cut in its stable phase decays from where it is to the new end
    anchor = (8, lr_continued(8, 100, tc))
    cut = [lr_continued(s, 28, tc, anchor) for s in range(8, 28)]
    assert cut[0] == pytest.approx(1.0) and cut[-1] < cut[0] and all(a >= b for a, b in zip(cut, cut[1:]))


def test_resume_with_a_larger_max_steps_extends_a_finished_run(tmp_path, tiny_dataset):
    cfg = load_config("tiny", SMALL + ["train.max_steps=6", "train.checkpoint_every=3", f"run.out_dir={tmp_path}",
                                       "run.name=r"])
    pretrain(cfg, tiny_dataset, quiet=True, log=lambda *_: None)
    messages = []
    more = load_config("tiny", SMALL + ["train.max_steps=10", f"run.out_dir={tmp_path}", "run.name=r"])
    res = pretrain(more, tiny_dataset, resume=True, quiet=True, log=messages.append)
    assert res.step == 10 and res.stopped_by == "steps"
    assert any("train.max_steps 6 -> 10" in m for m in messages)
    records = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    assert len(lrs) == 10
    assert all(a >= b - 1e-12 for a, b in zip(lrs[3:], lrs[4:])), lrs  # no jump up after warm-up
    # resuming the finished run with the same budget trains nothing more
    again = pretrain(load_config("tiny", SMALL + ["train.max_steps=10", f"run.out_dir={tmp_path}", "run.name=r"]),
                     tiny_dataset, resume=True, quiet=True, log=messages.append)
    assert again.step == 10 and any("whole budget" in m for m in messages)


def test_validation_split_shorter_than_a_window_is_an_error(tmp_path, tiny_dataset):
    from scratchlm.data.shards import load_split
    n_val, n_train = len(load_split(tiny_dataset, "val")), len(load_split(tiny_dataset, "train"))
    assert n_val + 10 < n_train
    cfg = load_config("tiny", SMALL + [f"model.context_length={n_val + 10}", f"run.out_dir={tmp_path}"])
    with pytest.raises(UserError, match="validation split .* less than one context window.*val_fraction"):
        pretrain(cfg, tiny_dataset, quiet=True)


def test_best_checkpoint_is_named_and_recorded_by_its_step(tmp_path, tiny_dataset):
    cfg = load_config("tiny", SMALL + ["train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=0",
                                       f"run.out_dir={tmp_path}", "run.name=r"])
    pretrain(cfg, tiny_dataset, quiet=True, log=lambda *_: None)
    evals = {r["step"]: r["val_loss"] for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").open())
             if r.get("type") == "eval"}
    best_step = min(evals, key=evals.get)
    (best,) = ckpt.list_checkpoints(tmp_path / "r" / "best")
    assert best.name == f"step_{best_step:06d}" and ckpt.read_state(best)["step"] == best_step
    assert ckpt.read_state(best)["task"] == {"kind": "pretrain"}
    from scratchlm.train.checkpoint import load_for_inference
    _, _, meta = load_for_inference(tmp_path / "r", device="cpu")
    assert meta["path"] == str(best) and meta["state"]["task"]["kind"] == "pretrain"


def test_resume_removes_what_a_killed_save_left(tmp_path, tiny_dataset):
    cfg = load_config("tiny", SMALL + ["train.max_steps=3", f"run.out_dir={tmp_path}", "run.name=r"])
    pretrain(cfg, tiny_dataset, quiet=True, log=lambda *_: None)
    root = tmp_path / "r" / "checkpoints"
    for name in (".step_000006.k2j4.tmp", ".step_000006.tmp", ".step_000003.old"):  # staged, FSDP-staged, replaced
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"\0" * 1000)
    messages = []
    more = load_config("tiny", SMALL + ["train.max_steps=4", f"run.out_dir={tmp_path}", "run.name=r"])
    pretrain(more, tiny_dataset, resume=True, quiet=True, log=messages.append)
    assert sorted(p.name for p in root.iterdir()) == ["step_000003", "step_000004"]
    assert sum("left by an interrupted save" in m for m in messages) == 3
    # killed between the two renames of a re-save: step_4 is gone and `.old` is its only copy — put back, not deleted
    (root / "step_000004").rename(root / ".step_000004.old")
    (root / ".step_000004.tmp").mkdir()
    messages = []
    longer = load_config("tiny", SMALL + ["train.max_steps=5", f"run.out_dir={tmp_path}", "run.name=r"])
    pretrain(longer, tiny_dataset, resume=True, quiet=True, log=messages.append)
    assert any("resumed from" in m and "step_000004" in m for m in messages), messages
    assert sorted(p.name for p in root.iterdir()) == ["step_000004", "step_000005"]


@pytest.mark.parametrize("override,match", [
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("train.grad_accum=0", "train.grad_accum must be >= 1"),
    ("train.schedule=bogus", "train.schedule must be one of cosine, wsd, constant"),
    ("train.lr=-1", "train.lr must be > 0"),
    ("train.precision=fp16", "train.precision must be auto, fp32 or bf16"),
    ("train.parallel=zero", "train.parallel must be ddp or fsdp"),
    ("train.eval_batches=0", "train.eval_batches must be >= 1"),
    ("train.batch_size=10", "divisible by train.grad_accum"),
    ("run.device=gpu", "run.device must be auto, cpu"),
    ("data.val_fraction=1.5", "data.val_fraction must be in"),
    ("tokenizer.vocab_size=100", "tokenizer.vocab_size must be >= 257"),
    ("train.optimizer=sgd", "train.optimizer must be adamw or muon"),
    ("train.muon_lr=0", "train.muon_lr must be > 0"),
])
def test_config_values_that_cannot_work_fail_when_the_config_loads(override, match):
    extra = ["train.grad_accum=4"] if override.startswith("train.batch_size") else []
    with pytest.raises(UserError, match=match) as e:
        load_config("tiny", extra + [override])
    assert "\n" not in str(e.value)


def test_config_types_bool_is_not_a_number_and_prompts_keep_commas(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nlr = true\n")
    with pytest.raises(UserError, match="train.lr must be a number, got True"):
        load_config(str(toml))
    assert load_config("tiny", ["eval.prompts=And God said,"]).eval.prompts == ["And God said,"]
    assert load_config("tiny", ['eval.prompts=["And God said,", "Blessed are"]']).eval.prompts == \
        ["And God said,", "Blessed are"]


@pytest.mark.parametrize("preset", ["tiny", "quickstart", "sheet", "llama-small", "gpt2-124m"])
def test_every_preset_dry_runs_at_the_readme_world_sizes(preset):
    from scratchlm.train.dry_run import dry_run
    cfg = load_config(preset)
    for world in (1, 2, 8, 16):  # the README launches gpt2-124m on 8 GPUs and on 2 nodes x 8
        plan = dry_run(cfg, world)
        assert plan["micro_batch_per_rank"] * cfg.train.grad_accum * world == cfg.train.batch_size
        assert plan["tokens_per_step"] == cfg.train.batch_size * cfg.model.context_length
        assert plan["parameters"] > 0 and plan["memory_per_rank_gb"] > 0
    if preset == "gpt2-124m":
        assert 124e6 < plan["parameters"] < 125e6


def test_dry_run_cli_prints_the_step_and_refuses_a_batch_that_does_not_split():
    r = cli("pretrain", "--config", "gpt2-124m", "--dry-run", "--world-size", "8")
    assert r.returncode == 0, r.stderr
    assert "8 per rank per micro-step x 8 micro-steps x 8 ranks" in r.stdout and "524,288" in r.stdout
    assert "124.5M" in r.stdout and "GB" in r.stdout
    r = cli("pretrain", "--config", "gpt2-124m", "--dry-run", "--world-size", "3")
    assert r.returncode == 2 and "divisible" in r.stderr


def test_mfu_uses_a_stated_peak_and_tokens_per_s_counts_training_steps_only(tmp_path, tiny_dataset, monkeypatch):
    from scratchlm.train import hardware
    from scratchlm.train.objective import PretrainObjective
    assert hardware.datasheet_peak("NVIDIA H100 80GB HBM3", "bf16") == (989e12, "datasheet H100 SXM bf16 dense")
    assert hardware.datasheet_peak("NVIDIA H100 PCIe", "bf16")[0] == 756e12
    assert hardware.datasheet_peak("NVIDIA A100-SXM4-40GB", "tf32")[0] == 156e12
    assert hardware.datasheet_peak("NVIDIA L40S", "bf16") is None  # not an L4
    assert hardware.datasheet_peak("NVIDIA L4", "bf16")[0] == 121e12
    peak, where = hardware.peak_flops(torch.device("cpu"), "fp32")
    assert where.startswith("measured on this CPU") and peak > 1e8

    real_evaluate = PretrainObjective.evaluate

    def slow_evaluate(self, model):
        time.sleep(0.4)
        return real_evaluate(self, model)

    monkeypatch.setattr(PretrainObjective, "evaluate", slow_evaluate)
    messages = []
    cfg = load_config("tiny", SMALL + ["train.max_steps=8", "train.eval_every=2", "train.keep_best=false",
                                       f"run.out_dir={tmp_path}", "run.name=r"])
    res = pretrain(cfg, tiny_dataset, quiet=True, log=messages.append)
    assert res.tokens_per_s > 2 * res.tokens / res.seconds  # four 0.4 s evaluations are not training time
    assert any("measured on this CPU" in m for m in messages)
    last = [r for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").open()) if "mfu" in r][-1]
    from scratchlm.model import GPT
    expected = last["tok_per_s"] * GPT(cfg.model).flops_per_token() / peak
    assert last["mfu"] == pytest.approx(expected, rel=0.01, abs=1e-4)


def test_ddp_max_minutes_ranks_end_identical(tmp_path, tiny_dataset):
    """Two ranks under a time budget with evaluations (so the plan is re-made mid-run): every rank
    trains with the same learning rates, stops after the same step, and ends with the same weights."""
    worker = Path(__file__).parent / "ddp_worker.py"
    sets = SMALL + ["train.max_steps=100000", "train.max_minutes=0.12", "train.eval_every=15",
                    "train.checkpoint_every=0", "train.grad_accum=2", "model.dropout=0.1",
                    f"run.out_dir={tmp_path}", "run.name=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", str(worker), str(tiny_dataset), str(tmp_path / "out"),
                        *[x for s in sets for x in ("--set", s)]], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["stopped_by"] == ranks[1]["stopped_by"] == "minutes"
    assert ranks[0]["step"] == ranks[1]["step"] > 20           # past the first plan, and the same last step
    assert ranks[0]["lrs"] == ranks[1]["lrs"]                    # the same learning rate at every step
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    a, b = (torch.load(tmp_path / f"out.rank{i}.pt") for i in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lrs = ranks[0]["lrs"][3:]
    assert all(x >= y - 1e-12 for x, y in zip(lrs, lrs[1:]))   # and it never rose after warm-up
    evals = [json.loads(ln) for ln in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert sum(e.get("type") == "eval" for e in evals) >= 2     # re-planned after at least one evaluation
    print(f"2-rank max_minutes: step {ranks[0]['step']} on both ranks, weights sha256 "
          f"{ranks[0]['weights_sha256'][:16]} == {ranks[1]['weights_sha256'][:16]}")


def test_exact_resume_with_dropout_across_an_evaluation(tmp_path, tiny_dataset):
    import shutil
    sets = SMALL + ["model.dropout=0.2", "train.max_steps=10", "train.checkpoint_every=4", "train.keep_last=5",
                    "train.eval_every=6", f"run.out_dir={tmp_path}"]
    pretrain(load_config("tiny", sets + ["run.name=straight"]), tiny_dataset, quiet=True, log=lambda *_: None)
    shutil.copytree(tmp_path / "straight", tmp_path / "again")
    for name in ("step_000008", "step_000010"):  # as if killed just after step 4's checkpoint
        shutil.rmtree(tmp_path / "again" / "checkpoints" / name)
    shutil.rmtree(tmp_path / "again" / "best")
    pretrain(load_config("tiny", sets + ["run.name=again"]), tiny_dataset, resume=True, quiet=True,
             log=lambda *_: None)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(tmp_path / "again")
    pretrain(load_config("tiny", sets + ["run.name=nodrop", "model.dropout=0", "train.max_steps=1"]), tiny_dataset,
             quiet=True, log=lambda *_: None)
    assert losses(tmp_path / "straight")[0] != losses(tmp_path / "nodrop")[0]  # dropout really was on


def test_dropout_masks_differ_across_ranks_and_repeat_on_resume():
    from scratchlm.train.trainer import step_seed
    assert step_seed(1337, 0, 5) != step_seed(1337, 1, 5) != step_seed(1337, 1, 6)
    assert step_seed(1337, 1, 5) == step_seed(1337, 1, 5)


def test_loss_weighs_every_term_the_same_across_uneven_micro_batches():
    """A fine-tuning micro-batch may hold 1 loss token, the next 7: the step's gradient must be that of
    the mean over all 8 tokens, not the mean of the two micro-batch means."""
    from scratchlm.model import GPT, ModelConfig
    from scratchlm.train.distributed import DistInfo, parallelize
    from scratchlm.train.objective import Objective
    from scratchlm.train.trainer import train_step
    import contextlib
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (2, 9), generator=g)
    mask = torch.zeros(2, 8)
    mask[0, 7] = 1  # 1 loss token in the first micro-batch
    mask[1, 1:] = 1  # 7 in the second

    class Masked(Objective):
        def __init__(self, rows):
            self.rows, self.i = rows, 0

        def next_batch(self):
            r = self.rows[self.i % len(self.rows)]
            self.i += 1
            return {"x": x[r, :-1], "y": x[r, 1:], "m": mask[r]}

        def count(self, b):
            return int(b["m"].sum())

        def tokens(self, b):
            return b["x"].numel()

        def loss(self, model, b):
            logits, _ = model(b["x"])
            nll = F.cross_entropy(logits.flatten(0, 1), b["y"].flatten(), reduction="none")
            return (nll * b["m"].flatten()).sum(), {"terms": float(b["m"].sum())}

    def one_step(rows, accum):
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=50, context_length=8, d_model=32, n_layers=1, n_heads=2, d_ff=64))
        par = parallelize(model, DistInfo(), "ddp", torch.device("cpu"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = train_step(par, Masked(rows), opt, 0.1, accum, 0.0, contextlib.nullcontext(), seed=0)
        return model, out

    split, s_out = one_step([slice(0, 1), slice(1, 2)], accum=2)
    whole, w_out = one_step([slice(0, 2)], accum=1)
    for (name, a), b in zip(split.named_parameters(), whole.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert s_out["loss"] == pytest.approx(w_out["loss"], rel=1e-5) and s_out["terms"] == 1.0


def test_weight_decay_only_on_matrices_that_are_not_embeddings():
    from scratchlm.model import GPT, ModelConfig
    from scratchlm.train.trainer import make_optimizer
    for tied in (True, False):
        model = GPT(ModelConfig(vocab_size=64, context_length=8, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                bias=True, tie_embeddings=tied))
        model.layers[1].ffn.up_proj.weight.requires_grad_(False)  # frozen: not optimised at all
        opt = make_optimizer(model, load_config("tiny").train, torch.device("cpu"))
        names = {id(p): n for n, p in model.named_parameters()}
        decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
        no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
        expected = {f"layers.{i}.{w}.weight" for i in (0, 1) for w in ("attn.qkv", "attn.out", "ffn.up_proj",
                                                                        "ffn.down_proj")}
        expected -= {"layers.1.ffn.up_proj.weight"}
        if not tied:
            expected.add("lm_head.weight")
        assert decay == expected and opt.param_groups[0]["weight_decay"] > 0
        assert "embed_tokens.weight" in no_decay and "pos_embed.weight" in no_decay
        assert all(n.endswith("bias") or "norm" in n or "embed" in n for n in no_decay)
        assert "layers.1.ffn.up_proj.weight" not in decay | no_decay


def test_compile_true_trains(tmp_path, tiny_dataset):
    """torch.compile either works (the loss matches eager) or falls back with one message."""
    messages = []
    sets = SMALL + ["train.max_steps=3", f"run.out_dir={tmp_path}"]
    compiled = pretrain(load_config("tiny", sets + ["run.name=c", "train.compile=true"]), tiny_dataset, quiet=True,
                        log=messages.append)
    eager = pretrain(load_config("tiny", sets + ["run.name=e"]), tiny_dataset, quiet=True, log=lambda *_: None)
    assert compiled.step == 3
    fell_back = any("torch.compile failed" in m for m in messages)
    import shutil
    if shutil.which("gcc") or shutil.which("cc"):  # with a C++ toolchain, compile must really run, not fall back
        assert not fell_back, messages
    if not fell_back:
        assert losses(tmp_path / "c") == pytest.approx(losses(tmp_path / "e"), abs=1e-4)


def test_seq_length_warmup_schedule():
    from scratchlm.train.schedule import seq_length_at, train_lengths
    assert train_lengths(96, 0) == [24, 48, 96] and train_lengths(256, 32) == [32, 64, 128, 256]
    assert train_lengths(30, 0) == [15, 30]            # 30 halves once exactly, not twice
    for context, start in ((96, 0), (256, 32), (30, 0)):
        seen = [seq_length_at(s, 20, context, start) for s in range(30)]
        assert seen[0] == train_lengths(context, start)[0] and seen[20:] == [context] * 10
        assert all(a <= b for a, b in zip(seen, seen[1:])) and all(context % n == 0 for n in seen)
        assert len(set(seen)) <= 4
    assert [seq_length_at(s, 0, 96) for s in (0, 5)] == [96, 96]  # off
    with pytest.raises(UserError, match="seq_warmup_steps needs a shorter length"):
        load_config("tiny", ["model.context_length=31", "train.seq_warmup_steps=5"])
    with pytest.raises(UserError, match="seq_warmup_start must be in"):
        load_config("tiny", ["model.context_length=32", "train.seq_warmup_start=64"])


def test_seq_length_warmup_grows_the_shapes_keeps_tokens_and_resumes_exactly(tmp_path, tiny_dataset):
    """The model sees (16 x 8) then (8 x 16) then (4 x 32) tokens: the same 128 a micro-step, counted as
    such; a run resumed from a checkpoint inside the warm-up continues bit for bit."""
    import shutil
    from scratchlm.model import GPT
    from scratchlm.train.objective import PretrainObjective
    from scratchlm.train.trainer import train
    sets = SMALL + ["train.seq_warmup_steps=6", "train.max_steps=10", "train.checkpoint_every=4",
                    "train.keep_last=5", "train.grad_accum=2", f"run.out_dir={tmp_path}"]

    def run(name: str, resume: bool = False) -> list[tuple[int, int]]:
        cfg = load_config("tiny", sets + [f"run.name={name}"])
        objective = PretrainObjective(tiny_dataset, cfg.model.context_length)
        cfg.model.vocab_size = objective.tokenizer.vocab_size
        torch.manual_seed(cfg.run.seed)
        model, shapes = GPT(cfg.model), []
        model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)) if m.training else None)
        train(cfg, model, objective, resume=resume, quiet=True, log=lambda *_: None)
        return shapes

    shapes = run("straight")
    assert shapes == [(16, 8)] * 4 + [(8, 16)] * 8 + [(4, 32)] * 8  # 2 micro-steps a step: 2, 4, 4 steps
    rows = [json.loads(ln) for ln in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["seq_len"] for r in steps] == [8, 8, 16, 16, 16, 16, 32, 32, 32, 32]  # ramp 8 + 4·step
    assert [r["tokens"] for r in steps] == [256 * (i + 1) for i in range(10)]  # real tokens, the same each step
    shutil.copytree(tmp_path / "straight", tmp_path / "again")
    for name in ("step_000008", "step_000010"):  # as if killed just after step 4's checkpoint
        shutil.rmtree(tmp_path / "again" / "checkpoints" / name)
    shutil.rmtree(tmp_path / "again" / "best", ignore_errors=True)
    assert run("again", resume=True) == [(8, 16)] * 4 + [(4, 32)] * 8  # steps 5-10: the schedule goes on
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(tmp_path / "again")


def test_shards_of_another_tokenizer_refused_before_training(tmp_path, tiny_dataset, small_tokenizer):
    """index.json's tokenizer fingerprint is checked wherever training meets the shards: a given
    tokenizer, a swapped tokenizer/ directory beside the shards, and the quickstart's val split."""
    import shutil
    from scratchlm.quickstart import val_documents
    from scratchlm.train.objective import PretrainObjective
    with pytest.raises(UserError, match="tokenized by another tokenizer"):
        PretrainObjective(tiny_dataset, 32, tokenizer=small_tokenizer)
    with pytest.raises(UserError, match="tokenized by another tokenizer"):
        val_documents(tiny_dataset, small_tokenizer)
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_dataset, swapped)
    small_tokenizer.save(swapped / "tokenizer")
    sets = [a for kv in SMALL + [f"run.out_dir={tmp_path}", "train.max_steps=1"] for a in ("--set", kv)]
    r = cli("pretrain", "--config", "tiny", "--data", str(swapped), *sets)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
    assert "tokenized by another tokenizer" in r.stderr and not list(tmp_path.glob("*/checkpoints/*"))
    assert PretrainObjective(tiny_dataset, 32).tokenizer.fingerprint != small_tokenizer.fingerprint  # its own is fine


def test_a_checkpoint_older_than_a_config_field_resumes_with_its_default(tmp_path, tiny_dataset, monkeypatch):
    """A checkpoint written before model.qk_norm / train.optimizer existed names neither: it had the
    defaults, so it resumes (and a differing value is still refused)."""
    sets = SMALL + ["train.max_steps=3", "train.checkpoint_every=3", f"run.out_dir={tmp_path}", "run.name=r"]
    pretrain(load_config("tiny", sets), tiny_dataset, quiet=True, log=lambda *_: None)
    real = ckpt.read_state

    def older(path):
        state = real(path)
        state["model"].pop("qk_norm")
        state["config"]["train"].pop("optimizer")
        return state
    monkeypatch.setattr(ckpt, "read_state", older)
    more = [s.replace("max_steps=3", "max_steps=5") for s in sets]
    assert pretrain(load_config("tiny", more), tiny_dataset, resume=True, quiet=True, log=lambda *_: None).step == 5
    with pytest.raises(UserError, match="model config changed \\(qk_norm\\)"):
        pretrain(load_config("tiny", more + ["model.qk_norm=true"]), tiny_dataset, resume=True, quiet=True,
                 log=lambda *_: None)


def test_training_keeps_freed_memory_for_the_next_step():
    """keep_freed_memory (the trainer sets it on CPU): a large tensor comes from the heap, not straight from the OS,
    and freeing it keeps the memory for the next one (no page faults to pay again every step)."""
    import ctypes
    import platform

    from scratchlm.train import hardware
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert hardware.keep_freed_memory() is False  # elsewhere it says it did nothing
        return

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    assert hardware.keep_freed_memory() is True
    mapped = libc.mallinfo2().hblkhd
    big = torch.ones(50_000_000)  # 200 MB: glibc would map it from the OS on its own
    assert libc.mallinfo2().hblkhd - mapped < 1 << 20 and libc.mallinfo2().arena >= big.nbytes
    del big
    top = libc.malloc(300 << 20)  # bigger than any free block: it grows the heap at its top
    grown = libc.mallinfo2().arena
    libc.free(top)  # a free block at the top of the heap: glibc would trim it straight back to the OS
    assert libc.mallinfo2().arena == grown  # kept for the next step
