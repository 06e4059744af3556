import json
import subprocess
import sys


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "scratchlm", *args], capture_output=True, text=True, **kw)


def test_help_lists_every_command_with_defaults():
    r = cli("--help")
    for command in ("quickstart", "tokenizer", "prepare", "dedup", "pretrain", "eval", "generate"):
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


def test_prepare_takes_config_and_set_like_pretrain(tmp_path, shared):
    r = cli("prepare", "--config", "quickstart", "--set", f"data.corpus={shared / 'the-verdict.txt'}",
            "--set", "tokenizer.vocab_size=300", "--set", "data.val_fraction=0.1", "--out", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert index["vocab_size"] == 300 and index["options"]["data"]["val_fraction"] == 0.1
    assert index["splits"]["val"]["tokens"] > 0
    bad = cli("prepare", "--input", str(shared / "the-verdict.txt"), "--out", str(tmp_path / "e"), "--pattern", "gpt3")
    assert bad.returncode == 2 and "unknown pre-tokenizer pattern" in bad.stderr and "Traceback" not in bad.stderr
