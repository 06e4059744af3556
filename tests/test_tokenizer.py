import json
from collections import Counter

import pytest
from scratchlm.errors import UserError
from scratchlm.tokenizer import GPT2_PATTERN, Tokenizer
from scratchlm.tokenizer.bpe import count_chunks, learn_merges

TRICKY = [
    "Hello, world! It's a test; we'll see 12345678 numbers.",
    "héllo naïve café Ünïcödé — “quotes” ‘and’ …",
    "日本語のテキスト 中文字符 한국어 текст на русском",
    "emoji 🌍🚀👩‍👩‍👧‍👦 flags 🇬🇧 and 🤖",
    "line\r\nwindows\r\n\r\nendings\n\n\n\ttabs\t\t  and   many      spaces     ",
    "control \x00\x01\x07\x1b[31m chars \x7f",
    "def f(x):\n    return x ** 2  # code\n\nclass A:\n\tpass\n",
    "   leading and trailing   ",
    "",
    "a",
    "<|endoftext|> is a special token",
]


def naive_bpe(chunk_counts: Counter, num_merges: int) -> list[tuple[int, int]]:
    """The textbook O(merges x corpus) algorithm, as the ground truth for the fast trainer."""
    words = {tuple(k.encode()): v for k, v in chunk_counts.items()}
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    while len(merges) < num_merges:
        counts = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                counts[p] += f
        best = None
        for p, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if vocab[p[0]] + vocab[p[1]] not in vocab:
                best = p
                break
        if best is None:
            break
        new = len(vocab)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        merges.append(best)
        nw = {}
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            nw[tuple(out)] = nw.get(tuple(out), 0) + f
        words = nw
    return merges


def test_fast_trainer_equals_naive_bpe(shared):
    text = (shared / "the-verdict.txt").read_text()
    counts = count_chunks([text], GPT2_PATTERN)
    assert learn_merges(counts, 300) == naive_bpe(counts, 300)


def test_training_is_deterministic_and_parallel_counting_agrees(shared, monkeypatch):
    from scratchlm.tokenizer import bpe
    texts = [(shared / "tinyshakespeare.txt").read_text()[:200_000]]
    a = Tokenizer.train(texts, 600, num_workers=0)
    b = Tokenizer.train(texts, 600, num_workers=2)
    assert a.merges == b.merges and a.fingerprint == b.fingerprint
    # None (what `prepare` and `tokenizer train` pass): one counting process per usable core
    workers = []
    count = bpe.count_chunks
    monkeypatch.setattr(bpe, "usable_cores", lambda: 3)
    monkeypatch.setattr(bpe, "count_chunks", lambda *a, **kw: workers.append(kw["num_workers"]) or count(*a, **kw))
    c = Tokenizer.train(texts, 600, num_workers=None)
    assert workers == [3] and c.merges == a.merges


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_counting_pieces_add_up_to_the_whole_text(shared, pattern):
    """Long texts are cut into pieces for the counting workers; for the built-in patterns the cut
    points must be chunk boundaries, so the counts are exactly the whole text's."""
    import regex
    from scratchlm.tokenizer.bpe import PATTERNS, pieces
    pat = PATTERNS[pattern]
    text = "\n".join(TRICKY) + "x\nY\n\nZ \nW.\nV\r\nU\n" + (shared / "tinyshakespeare.txt").read_text()[:100_000] \
        + (shared / "wikitext2_valid.txt").read_text()[:100_000]
    cut = list(pieces([text], pat, 500))
    assert "".join(cut) == text and len(cut) > 50
    whole, parts = Counter(regex.findall(pat, text)), Counter()
    for piece in cut:
        parts.update(regex.findall(pat, piece))
    assert parts == whole
    assert list(pieces([text], r"\S+|\s+", 500)) == [text]  # a custom pattern: never cut


@pytest.mark.parametrize("text", TRICKY)
def test_roundtrip_any_string(small_tokenizer, text):
    ids = small_tokenizer.encode(text, disallowed_special=())
    assert small_tokenizer.decode(ids) == text


def test_lone_surrogates_are_replaced_documented_policy(small_tokenizer):
    ids = small_tokenizer.encode("a\ud800b")
    assert small_tokenizer.decode(ids) == "a\ufffdb"


def test_partial_utf8_decodes_with_replacement(small_tokenizer):
    ids = small_tokenizer.encode("🌍")
    raw = small_tokenizer.decode_bytes(ids)
    assert raw == "🌍".encode()
    if len(ids) > 1:
        assert "\ufffd" in small_tokenizer.decode(ids[:1])


def test_reference_and_tiktoken_paths_agree(small_tokenizer, shared):
    texts = TRICKY + [(shared / "wikitext2_valid.txt").read_text()[:50_000],
                      (shared / "alpaca_seed_tasks.jsonl").read_text()[:30_000],
                      open(__file__).read()]
    for t in texts:
        assert small_tokenizer.encode_python(t, allowed_special="all") == \
            small_tokenizer.encode(t, allowed_special="all")


def test_batch_encoders_give_the_ordinary_ids(small_tokenizer, shared):
    """encode_batch and encode_batch_arrays skip per-text work for GPT-4's pattern and hand the
    text to tiktoken directly; the ids must still be encode_ordinary's, lone surrogates included."""
    texts = TRICKY + ["lone \ud800 surrogate \udfff", (shared / "wikitext2_valid.txt").read_text()[:50_000]]
    want = [small_tokenizer.encode_ordinary_python(t) for t in texts]
    assert small_tokenizer.encode_batch(texts) == want
    arrays = small_tokenizer.encode_batch_arrays(texts)
    assert all(a.dtype.name == "uint32" for a in arrays) and [a.tolist() for a in arrays] == want


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_hf_export_gives_identical_ids(tmp_path, shared, pattern):
    import tokenizers  # the test extra installs it: a missing peer is a failure, not a skip
    from transformers import PreTrainedTokenizerFast

    from scratchlm.tokenizer.hf_export import export_hf
    tok = Tokenizer.train([(shared / "tinyshakespeare.txt").read_text()[:400_000]], 1500, pattern=pattern)
    export_hf(tok, tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    texts = TRICKY + [(shared / "wikitext2_valid.txt").read_text()[:40_000], open(__file__).read()]
    for t in texts:
        ours = tok.encode(t, allowed_special="all")
        assert hf.encode(t).ids == ours
        assert fast(t)["input_ids"] == ours
        assert hf.decode(ours, skip_special_tokens=False) == t


def test_special_tokens_never_merged_and_only_when_allowed(small_tokenizer):
    eot = small_tokenizer.eot_id
    assert small_tokenizer.encode("a<|endoftext|>b", allowed_special="all").count(eot) == 1
    assert eot not in small_tokenizer.encode("a<|endoftext|>b", disallowed_special=())
    with pytest.raises(UserError, match="special token"):
        small_tokenizer.encode("a<|endoftext|>b")
    assert small_tokenizer.token_to_id("<|assistant|>") in small_tokenizer.special_tokens.values()
    assert eot not in small_tokenizer.encode_ordinary("<|endoftext|>")


def test_save_load_roundtrip_and_human_readable(tmp_path, small_tokenizer):
    path = small_tokenizer.save(tmp_path)
    text = path.read_text()
    assert '"pattern"' in text and "\n  [" in text  # one merge per line
    again = Tokenizer.load(tmp_path)
    assert again.merges == small_tokenizer.merges and again.fingerprint == small_tokenizer.fingerprint


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="too small"):
        Tokenizer.train(["hello"], 100)
    with pytest.raises(UserError, match="empty"):
        Tokenizer.train(["   \n\t  "], 300)
    with pytest.raises(UserError, match="no tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.scratchlm.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.scratchlm.json").write_text(json.dumps({"format": "scratchlm-bpe", "version": 99}))
    with pytest.raises(UserError, match="version 99"):
        Tokenizer.load(tmp_path)


def test_compression_beats_char_level(small_tokenizer, shared):
    text = (shared / "tinyshakespeare.txt").read_text()[-5000:]
    assert len(small_tokenizer.encode(text)) < len(text) / 2.0  # ~2.3x at vocab 1024


def test_gpt4_pattern_is_cl100k_exactly(monkeypatch):
    """Compared with tiktoken's own cl100k_base pattern (its merges are never downloaded)."""
    import regex
    from tiktoken_ext import openai_public

    from scratchlm.tokenizer import GPT4_PATTERN
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: {})
    cl100k = openai_public.cl100k_base()["pat_str"]
    probe = "Hello world  \n\n  x\t \n  end   \n\n \t \r\n  9999 tabs\t\t\n   "
    assert regex.findall(GPT4_PATTERN, probe) == regex.findall(cl100k, probe)
    assert regex.findall(GPT4_PATTERN, probe)[-1] == "\t\t\n   "  # trailing whitespace: one chunk, as in GPT-4
    assert GPT4_PATTERN == cl100k


def test_bad_patterns_refused_with_one_line():
    for pattern, msg in (("(", "not a valid regex"), ("gpt3", "unknown pre-tokenizer pattern"),
                         (r"\w+", r"skips .* characters")):
        with pytest.raises(UserError, match=msg):
            Tokenizer.train(["Hello, world! " * 50], 300, pattern=pattern, num_workers=2)


def test_hf_export_writes_merges_every_tokenizers_version_reads(tmp_path, small_tokenizer):
    from scratchlm.tokenizer.hf_export import export_hf
    export_hf(small_tokenizer, tmp_path)
    merges = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and all(isinstance(m, str) and m.count(" ") == 1 for m in merges)  # "a b", not ["a", "b"]


def test_compression_stats_is_the_one_used_by_the_cli(small_tokenizer, shared, tmp_path):
    import subprocess
    import sys

    from scratchlm.tokenizer import compression_stats
    text = (shared / "the-verdict.txt").read_text()
    c = compression_stats(small_tokenizer, text)
    assert c["tokens"] == len(small_tokenizer.encode_ordinary(text)) and c["ratio"] > 2
    small_tokenizer.save(tmp_path)
    r = subprocess.run([sys.executable, "-m", "scratchlm", "tokenizer", "stats", "--tokenizer", str(tmp_path),
                        "--input", str(shared / "the-verdict.txt")], capture_output=True, text=True)
    assert f"BPE tokens           {c['tokens']:,}" in r.stdout


def test_loaded_tokenizer_whose_pattern_skips_characters_refuses_to_encode(tmp_path, small_tokenizer):
    """Training checks coverage on its own text only; a loaded (or imported) tokenizer brings its own
    pattern. Every encoder checks that the ids spell every byte, and says how much would be lost."""
    lossy = Tokenizer(small_tokenizer.merges, pattern=r" ?\p{L}+")  # no alternative for punctuation or digits
    lossy.save(tmp_path)
    tok = Tokenizer.load(tmp_path)
    assert tok.decode(tok.fast.encode_ordinary("Hello, world!")) == "Hello world"  # what tiktoken alone gives
    for encode in (tok.encode, tok.encode_ordinary, tok.encode_python, lambda t: tok.encode_batch(["ok", t]),
                   lambda t: tok.encode_batch_arrays(["ok", t])):
        with pytest.raises(UserError, match=r"skips 2 of 13 bytes \(15\.38%\).*','"):
            encode("Hello, world!")
    with pytest.raises(UserError, match="skips 1 of"):
        tok.encode("Hi<|endoftext|>!", allowed_special="all")
    assert tok.decode(tok.encode("Hi<|endoftext|> there", allowed_special="all")) == "Hi<|endoftext|> there"
    text = "Hello, world! 1234 \n\t ü 中文 😀 <|endoftext|>"
    for ids in (small_tokenizer.encode(text, allowed_special="all"), small_tokenizer.encode_batch([text])[0],
                small_tokenizer.encode_python(text, allowed_special="all")):
        assert small_tokenizer.decode(ids) == text


WORKER_DIES = r"""
import os, signal, sys
import scratchlm.tokenizer.bpe as bpe
from scratchlm.errors import UserError

def killed(args):  # what the kernel's OOM killer does to a worker
    os.kill(os.getpid(), signal.SIGKILL)

def out_of_memory(args):
    raise MemoryError

for fail in (killed, out_of_memory):
    bpe._count_batch = fail  # the forked workers see the same module
    try:
        bpe.count_chunks(["Hello, world! " * 100] * 8, bpe.GPT4_PATTERN, num_workers=2)
    except UserError as e:
        print(e)
"""


def test_a_tokenizer_worker_that_dies_is_one_error_never_a_hang():
    """multiprocessing.Pool waits forever for the task of a worker that died; ours raises."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", WORKER_DIES], capture_output=True, text=True, timeout=60)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 2, r.stderr[-2000:]
    assert "BrokenProcessPool" in lines[0] and "MemoryError" in lines[1]
    assert all("tokenizer training worker ran out of memory or died" in line for line in lines)


def test_the_patterns_that_skip_the_coverage_check_cover_every_character():
    """Encoding skips the lossless check for GPT-2's and GPT-4's patterns; that is only right if their
    chunks spell every character of any text: random code points from every plane and category."""
    import random

    import regex

    from scratchlm.tokenizer.bpe import COMPLETE_PATTERNS
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x0, 0x3000)] + [chr(rng.randrange(0x3000, 0x110000)) for _ in range(20000)]
    alphabet = [c for c in alphabet if not 0xD800 <= ord(c) <= 0xDFFF]
    for pattern in COMPLETE_PATTERNS:
        compiled = regex.compile(pattern)
        for _ in range(50):
            text = "".join(rng.choice(alphabet) for _ in range(2000)) + rng.choice(["", " ", "\n", " \n\t "])
            assert "".join(compiled.findall(text)) == text
