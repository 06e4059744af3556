"""tokenizer.kind = "char": the 256 bytes + special tokens, no merges. One token per character on
ASCII text; every path (prepare, fast encoding, training, export) is the BPE code with no merges."""

import json
import subprocess
import sys

import numpy as np
import pytest

from scratchlm.config import DataConfig, TokenizerConfig, load_config
from scratchlm.data.prepare import prepare
from scratchlm.data.shards import load_split, read_index
from scratchlm.errors import UserError
from scratchlm.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer, compression_stats

ASCII = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n\tAll: Speak, speak!  "
NON_ASCII = "naïve café — «quotes», 日本語のテキスト, 한국어, emoji 🤖🎉 and a ZWJ 👩‍💻."


@pytest.fixture(scope="module")
def char_dataset(tmp_path_factory, shared):
    """Tiny Shakespeare prepared with kind=char; vocab_size and pattern set but not used."""
    out = tmp_path_factory.mktemp("char") / "ds"
    lines = []
    prepare(DataConfig(corpus=str(shared / "tinyshakespeare.txt"), val_fraction=0.1, max_chars=60_000),
            TokenizerConfig(kind="char", vocab_size=4096, pattern="gpt2"), out, log=lines.append)
    return out, lines


def test_prepare_char_vocab_is_bytes_plus_specials(char_dataset):
    out, lines = char_dataset
    tok = Tokenizer.load(out / "tokenizer")
    assert tok.kind == "char" and tok.merges == []
    assert tok.vocab_size == 256 + len(DEFAULT_SPECIAL_TOKENS) == TokenizerConfig(kind="char").effective_vocab_size
    index = read_index(out)
    assert index["vocab_size"] == tok.vocab_size and index["options"]["tokenizer"]["kind"] == "char"
    assert any("vocab_size=4096 and pattern are not used" in m for m in lines)  # said once, in the log
    # Shakespeare is ASCII: one token per character (+ one end-of-text per span)
    train = np.asarray(load_split(out, "train"))
    n_docs = index["splits"]["train"]["documents"]
    assert len(train) == index["splits"]["train"]["bytes"] + n_docs and train.max() <= tok.eot_id
    text = tok.decode(train[train != tok.eot_id].tolist())
    assert len(text) == len(train) - n_docs and text.isascii()


@pytest.mark.parametrize("text", [ASCII, NON_ASCII, "", "<|endoftext|> as text", "\ud800 lone surrogate"])
def test_round_trip_and_fast_equals_reference(text):
    tok = Tokenizer.char_level()
    ids = tok.encode_ordinary(text)
    assert ids == tok.encode_python(text, disallowed_special=())  # tiktoken path == readable path
    assert ids == list(text.replace("\ud800", "\ufffd").encode("utf-8"))  # the ids are the bytes
    assert tok.decode(ids) == text.replace("\ud800", "\ufffd")
    if text.isascii():
        assert len(ids) == len(text)  # one token per character
    assert tok.encode("a<|endoftext|>b", allowed_special="all") == [97, tok.eot_id, 98]


def test_non_ascii_is_several_byte_tokens_and_stats_say_so():
    tok = Tokenizer.char_level()
    assert len(tok.encode("é")) == 2 and len(tok.encode("日")) == 3 and len(tok.encode("🤖")) == 4
    c = compression_stats(tok, NON_ASCII)
    assert c["kind"] == "char" and c["tokens"] == c["bytes"] == len(NON_ASCII.encode()) > c["characters"]
    assert compression_stats(tok, ASCII)["ratio"] == 1.0


def test_streamed_text_never_shows_half_a_character():
    """Char-level generation emits a non-ASCII character one byte at a time: the server's stream
    must hold the bytes until the character is whole (no U+FFFD in between)."""
    from scratchlm.serve.text import TextStream
    tok = Tokenizer.char_level()
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in tok.encode(NON_ASCII)] + [stream.finish()]
    assert "".join(pieces) == NON_ASCII and "\ufffd" not in "".join(pieces)
    assert pieces[tok.encode(NON_ASCII).index(0xC3)] == ""  # the first byte of "ï" alone shows nothing


def test_fast_equals_reference_on_real_text(shared):
    tok = Tokenizer.char_level()
    for name in ("tinyshakespeare.txt", "wikitext2_valid.txt"):
        text = (shared / name).read_text()[:30_000]
        assert tok.encode_ordinary(text) == tok.encode_python(text, disallowed_special=()) == list(text.encode())


def test_save_load_and_hf_export_give_the_same_ids(tmp_path, shared):
    import tokenizers  # the test extra installs both: a missing peer is a failure, not a skip
    from transformers import PreTrainedTokenizerFast

    from scratchlm.interop.hf_tokenizer import tokenizer_from_hf
    from scratchlm.tokenizer.hf_export import export_hf
    tok = Tokenizer.char_level()
    tok.save(tmp_path)
    json.loads((tmp_path / "tokenizer.scratchlm.json").read_text())  # valid JSON with an empty merge list
    again = Tokenizer.load(tmp_path)
    assert again.kind == "char" and again.fingerprint == tok.fingerprint
    export_hf(tok, tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in (ASCII, NON_ASCII, (shared / "wikitext2_valid.txt").read_text()[:20_000],
                 "<|user|>\nHi<|end|><|endoftext|>"):
        ours = tok.encode(text, allowed_special="all")
        assert hf.encode(text).ids == ours and fast(text)["input_ids"] == ours
        assert hf.decode(ours, skip_special_tokens=False) == text
    back = tokenizer_from_hf(tmp_path)  # and importing the export gives a char tokenizer again
    assert back.kind == "char" and back.encode(NON_ASCII) == tok.encode(NON_ASCII)


def test_a_few_training_steps_and_generation(tmp_path, char_dataset):
    from scratchlm.generate import SamplingConfig, generate
    from scratchlm.train.checkpoint import latest_valid, load_for_inference
    from scratchlm.train.trainer import pretrain
    out, _ = char_dataset
    small = ["model.context_length=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
             "model.d_ff=64", "train.batch_size=8", "train.lr=1e-2", "train.warmup_steps=3", "train.eval_every=0",
             "train.log_every=1", "train.precision=fp32", "train.sample_tokens=4", "train.eval_batches=1",
             "train.max_steps=25", "tokenizer.kind=char", f"run.out_dir={tmp_path}"]
    cfg = load_config("tiny", small + ["run.name=r"])
    logs = []
    pretrain(cfg, out, log=logs.append, quiet=True)
    assert cfg.model.vocab_size == 262  # model.vocab_size = 0 took the tokenizer's, unpadded
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[0] > 5.0 and losses[-1] < losses[0] - 1.5  # ln(262) = 5.57 at the start, then it learns
    assert not any("output rows are never a target" in m for m in logs)
    model, tok, _ = load_for_inference(latest_valid(tmp_path / "r" / "checkpoints"), device="cpu")
    text = generate(model, tok, ["ROMEO:"], SamplingConfig(max_new_tokens=20, temperature=0.8, seed=0))[0]
    assert isinstance(text, str) and len(text) <= 20

    # the trained run exports: Hugging Face (transformers reads our ids) and GGUF (262 tokens)
    import gguf
    import transformers

    from scratchlm.interop.gguf import export_gguf
    from scratchlm.interop.hf import export_hf
    hf_tok = transformers.AutoTokenizer.from_pretrained(export_hf(tmp_path / "r", tmp_path / "hf"))
    assert hf_tok.encode(NON_ASCII, add_special_tokens=False) == tok.encode(NON_ASCII)
    fields = gguf.GGUFReader(export_gguf(tmp_path / "r", tmp_path / "m.gguf")).fields
    merges = fields["tokenizer.ggml.merges"]  # llama.cpp needs the key: one merge that never fires
    assert len(fields["tokenizer.ggml.tokens"].data) == 262
    assert [bytes(merges.parts[i]).decode() for i in merges.data] == ["\u00c0 \u00c1"]  # bytes C0, C1

    # a preset that fixes a BPE-sized model vocabulary: trains, and says the rows are wasted
    logs = []
    pretrain(load_config("tiny", small + ["run.name=wide", "model.vocab_size=4096", "train.max_steps=1"]),
             out, log=logs.append, quiet=True)
    assert any("4096 but the tokenizer has 262 tokens" in m for m in logs)


def test_bad_kind_is_one_line(tmp_path):
    with pytest.raises(UserError, match="tokenizer.kind must be bpe or char, got 'word'"):
        load_config("quickstart", ["tokenizer.kind=word"])
    r = subprocess.run([sys.executable, "-m", "scratchlm", "prepare", "--input", "builtin", "--out",
                        str(tmp_path / "d"), "--set", "tokenizer.kind=word"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "tokenizer.kind" in r.stderr
    assert not (tmp_path / "d").exists()
    # kind=char with vocab_size below a BPE's minimum is fine: it is not used
    assert load_config("quickstart", ["tokenizer.kind=char", "tokenizer.vocab_size=10"]).tokenizer.kind == "char"


def test_char_kind_refuses_a_bpe_tokenizer_path(tmp_path, small_tokenizer, shared):
    small_tokenizer.save(tmp_path / "bpe")
    with pytest.raises(UserError, match="holds a BPE tokenizer"):
        prepare(DataConfig(corpus=str(shared / "the-verdict.txt")),
                TokenizerConfig(kind="char", path=str(tmp_path / "bpe")), tmp_path / "d", log=lambda *_: None)


def test_cli_train_and_stats_label_char_tokens(tmp_path, shared):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "scratchlm", *args], capture_output=True, text=True)
    r = cli("tokenizer", "train", "--kind", "char", "--out", str(tmp_path))
    assert r.returncode == 0 and "a char-level tokenizer, 262 tokens" in r.stdout, r.stderr
    assert Tokenizer.load(tmp_path).kind == "char"
    (tmp_path / "t.txt").write_text(NON_ASCII)
    r = cli("tokenizer", "stats", "--tokenizer", str(tmp_path), "--input", str(tmp_path / "t.txt"))
    n = len(NON_ASCII.encode())
    assert f"byte (char) tokens   {n:,}" in r.stdout and "BPE" not in r.stdout
    assert cli("tokenizer", "train", "--out", str(tmp_path / "x")).returncode == 2  # bpe needs --input
    r = cli("prepare", "--input", str(shared / "the-verdict.txt"), "--out", str(tmp_path / "d"),
            "--tokenizer-kind", "char", "--vocab-size", "8192")
    assert r.returncode == 0, r.stderr
    assert read_index(tmp_path / "d")["vocab_size"] == 262


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_quickstart_reports_the_tokenizer_honestly(tmp_path, shared, kind):
    from scratchlm.quickstart import run_quickstart
    logs = []
    overrides = [f"tokenizer.kind={kind}", "tokenizer.vocab_size=300", "data.max_chars=60000", "model.n_layers=1",
                 "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.context_length=32",
                 "train.batch_size=8", "train.eval_every=0", "train.compile=false", "eval.mc_limit=10"]
    report = run_quickstart(str(shared / "tinyshakespeare.txt"), out=str(tmp_path / "qs"), overrides=overrides,
                            max_steps=3, log=logs.append).read_text()
    line = next(m for m in logs if m.startswith("[2/5]"))
    comp = json.loads((tmp_path / "qs" / "results.json").read_text())["compression"]
    assert comp["kind"] == kind and comp["bytes"] == comp["characters"]  # an ASCII passage
    if kind == "char":
        assert comp["tokens"] == comp["bytes"]
        assert "character-level (262 tokens, one per byte)" in line and "BPE" not in line
        assert f"{comp['characters']} characters ({comp['bytes']} bytes) is {comp['tokens']} tokens" in line
        assert "Character-level: 262 tokens" in report and "| byte tokens |" in report and "BPE" not in report
    else:
        assert comp["tokens"] < comp["characters"]  # 38 merges already shorten it
        assert f"{comp['char_level_tokens']} character-level tokens but {comp['tokens']} BPE tokens" in line
        assert "Byte-level BPE, 300 tokens" in report and f"| BPE tokens | {comp['tokens']} |" in report


def test_an_answer_longer_than_the_context_is_refused_in_one_line_or_left_out():
    """Char-level answers are ~4x longer than BPE's: one past the window is a clear refusal (it was a
    shape error deep in torch), and the quickstart leaves such items out instead of crashing."""
    import torch

    from scratchlm.eval.multiple_choice import fits, loglikelihoods
    from scratchlm.eval.tasks import MCItem
    from scratchlm.model import GPT
    from scratchlm.model.config import ModelConfig
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=262, context_length=8, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    tok = Tokenizer.char_level()
    (ll, _), = loglikelihoods(model, [(list(b"The cat"), list(b" sat on "))])  # 8 tokens: fits exactly
    assert ll < 0
    with pytest.raises(UserError, match="answer is 9 tokens, longer than the model's 8-token context"):
        loglikelihoods(model, [(list(b"The cat"), list(b" sat on a"))])
    assert fits(tok, MCItem("The cat", ["sat on ", "ran"], 0), 8)
    assert not fits(tok, MCItem("The cat", ["sat on a", "ran"], 0), 8)
