import json
import subprocess
import sys

import pytest


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "scratchlm", *args], capture_output=True, text=True, **kw)


def test_help_lists_every_command_with_defaults():
    r = cli("--help")
    for command in ("quickstart", "tokenizer", "prepare", "dedup", "pretrain", "eval", "generate", "finetune",
                    "classify"):
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


def _all_parsers():
    import argparse

    from scratchlm.cli import build_parser
    todo = [("scratchlm", build_parser())]
    while todo:
        name, parser = todo.pop()
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {n}", p) for n, p in action.choices.items()]


def test_every_option_has_its_own_help_line():
    """An option without help text ran into the next one in --help ("--out OUT  --tokenizer ...")."""
    import re
    for name, parser in _all_parsers():
        for action in parser._actions:
            if action.option_strings or action.dest not in ("command", "action"):
                assert action.help and action.help.strip(" -"), f"{name}: {action.option_strings or action.dest}"
        for line in parser.format_help().splitlines():  # "  --out OUT   --tokenizer TOKENIZER" is the bug
            assert not re.match(r"^  -\S.*?\s{2,}-", line), f"{name}: options run together: {line!r}"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_dataset):
    from scratchlm.config import load_config
    from scratchlm.train.trainer import pretrain
    out = tmp_path_factory.mktemp("cli_run")
    cfg = load_config("tiny", ["model.context_length=32", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                               "model.d_ff=64", "train.batch_size=8", "train.max_steps=4", "train.eval_batches=1",
                               "train.precision=fp32", "train.sample_tokens=4", f"run.out_dir={out}", "run.name=r"])
    pretrain(cfg, tiny_dataset, quiet=True, log=lambda *_: None)
    return out / "r"


def test_generate_cli_end_to_end(trained_run):
    r = cli("generate", "--ckpt", str(trained_run), "--max-new-tokens", "12", "--seed", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr        # no --prompt: starts from <|endoftext|>
    assert r.stdout.strip()
    again = cli("generate", "--ckpt", str(trained_run), "--max-new-tokens", "12", "--seed", "1", "--device", "cpu")
    assert again.stdout == r.stdout           # a seed makes it reproducible
    r = cli("generate", "--ckpt", str(trained_run), "--prompt", "ROMEO:", "--prompt", "To be", "--greedy",
            "--max-new-tokens", "5", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "--- 'ROMEO:'" in r.stdout and "--- 'To be'" in r.stdout


def test_eval_cli_perplexity_end_to_end(trained_run, tiny_dataset):
    r = cli("eval", "perplexity", "--ckpt", str(trained_run), "--data", str(tiny_dataset), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    saved = json.loads((trained_run / "eval_perplexity.json").read_text())
    assert saved["loss"] == out["loss"] and 0 < out["loss"] < 10 and out["perplexity"] > 1
    assert out["bits_per_byte"] > 0 and out["tokens"] > 0
    r = cli("eval", "perplexity", "--ckpt", str(trained_run / "nope"), "--data", str(tiny_dataset))
    assert r.returncode == 2 and "not found" in r.stderr
