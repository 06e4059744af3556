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


def test_val_documents_reads_only_the_first_documents_it_needs(tmp_path, shared):
    """The quickstart decodes val documents for a passage, prompts and cloze items: it must read
    the split from the start only as far as it needs, not join and decode all of it."""
    import random
    import numpy as np
    from scratchlm.config import DataConfig, TokenizerConfig
    from scratchlm.data.prepare import prepare
    from scratchlm.data.shards import load_split
    from scratchlm.quickstart import val_documents
    from scratchlm.tokenizer import Tokenizer
    rng = random.Random(0)
    words = (shared / "tinyshakespeare.txt").read_text().split()[:5000]
    with open(tmp_path / "c.jsonl", "w") as f:
        for i in range(400):
            text = "\n".join(f"Line {j} of document {i}: " + " ".join(rng.choices(words, k=10)) for j in range(4))
            f.write(json.dumps({"text": text}) + "\n")
    prepare(DataConfig(corpus=str(tmp_path / "c.jsonl"), val_fraction=0.1), TokenizerConfig(kind="char"),
            tmp_path / "ds", log=lambda *_: None)
    tok = Tokenizer.load(tmp_path / "ds" / "tokenizer")
    val = np.asarray(load_split(tmp_path / "ds", "val"))
    cuts = np.flatnonzero(val == tok.eot_id)
    full = [tok.decode(val[a + 1 if i else 0:b].tolist()) for i, (a, b) in enumerate(zip([0, *cuts], cuts))]
    assert len(full) > 30
    few = val_documents(tmp_path / "ds", tok, lines=0, min_docs=4, chunk=256)
    assert 4 <= len(few) < 10 and few == full[:len(few)]  # the first documents, read a chunk at a time
    enough = val_documents(tmp_path / "ds", tok, lines=40, chunk=256)
    assert 10 <= len(enough) < len(full) and enough == full[:len(enough)]  # 4 lines of 8+ words each
    assert val_documents(tmp_path / "ds", tok, lines=10**9, chunk=256) == full  # all of it when asked
    capped = val_documents(tmp_path / "ds", tok, lines=10**9, max_tokens=1000, chunk=256)
    assert sum(len(tok.encode(d)) + 1 for d in capped) <= 1001 and capped[:-1] == full[:len(capped) - 1]
