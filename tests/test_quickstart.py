import json
import subprocess
import sys


def test_quickstart_end_to_end_tiny_budget(tmp_path):
    out = tmp_path / "qs"
    args = [sys.executable, "-m", "scratchlm", "quickstart", "--out", str(out), "--max-steps", "60",
            "--set", "model.n_layers=2", "--set", "model.d_model=64", "--set", "model.n_heads=2",
            "--set", "model.d_ff=128", "--set", "train.eval_every=30", "--set", "train.batch_size=16",
            "--set", "model.context_length=64", "--set", "tokenizer.vocab_size=1024", "--set", "eval.mc_limit=40",
            "--set", "train.compile=false"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "report:" in r.stdout and "BPE tokens" in r.stdout
    report = (out / "report.md").read_text()
    for needle in ("bits per byte", "loss.png", "Samples", "character-level tokens", "multiple choice"):
        assert needle in report
    assert (out / "loss.png").stat().st_size > 1000 and (out / "report.html").exists()
    results = json.loads((out / "results.json").read_text())
    assert 0 < results["val"]["bits_per_byte"] < 8
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in train if "loss" in x]
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 1.0  # loss falls
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already holds a finished quickstart" in again.stderr
