import json
import subprocess
import sys


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "scratchlm", *args], capture_output=True, text=True, **kw)


def test_help_lists_every_command_with_defaults():
    r = cli("--help")
    for command in ("quickstart", "tokenizer", "prepare", "dedup", "pretrain", "eval", "generate", "finetune",
                    "classify", "align", "export", "import", "serve", "chat"):
        assert command in r.stdout
    r = cli("tokenizer", "train", "--help")
    assert "default: 4096" in r.stdout


def test_tokenizer_cli_train_encode_decode_stats(tmp_path, shared):
    r = cli("tokenizer", "train", "--input", str(shared / "tinyshakespeare.txt"), "--vocab-size", "600",
            "--out", str(tmp_path / "tok"), "--hf")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    text = "First Citizen: we are accounted poor citizens."
    enc = cli("tokenizer", "encode", "--tokenizer", str(tmp_path / "tok"), input=text)
    ids = json.loads(enc.stdout)
    dec = cli("tokenizer", "decode", "--tokenizer", str(tmp_path / "tok"), input=json.dumps(ids))
    assert dec.stdout == text
    stats = cli("tokenizer", "stats", "--tokenizer", str(tmp_path / "tok"), "--input",
                str(shared / "the-verdict.txt"))
    assert "bytes/token" in stats.stdout and "char-level / BPE" in stats.stdout
    bad = cli("tokenizer", "train", "--input", str(shared / "the-verdict.txt"), "--vocab-size", "10",
              "--out", str(tmp_path / "t2"))
    assert bad.returncode == 2 and "too small" in bad.stderr and not (tmp_path / "t2").exists()


def test_dedup_cli_reports_clusters(tmp_path, shared):
    out = tmp_path / "kept.jsonl"
    r = cli("dedup", str(shared / "neardup"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 3
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["near_duplicates"] == 1 and "treasure_island" in " ".join(report["clusters"][0])
    again = cli("dedup", str(shared / "neardup"), "--out", str(out))
    assert again.returncode == 2 and "exists" in again.stderr
