import gzip
import json
import os
import threading
from functools import partial
from http.server import HTTPServer, SimpleHTTPRequestHandler

import numpy as np
import pytest

from scratchlm.data.clean import CleanStats, QualityFilter, clean_document, normalize, strip_gutenberg
from scratchlm.data.dataset import RandomWindowLoader, SlidingWindowDataset
from scratchlm.data.decontam import Decontaminator, load_eval_texts
from scratchlm.data.dedup import deduplicate, jaccard
from scratchlm.config import DataConfig, TokenizerConfig
from scratchlm.data.prepare import prepare, split_documents
from scratchlm.data.shards import ShardedTokens, load_split, read_index
from scratchlm.data.sources import ReadOptions, iter_documents
from scratchlm.errors import UserError
from scratchlm.tokenizer import Tokenizer


def test_sources_txt_jsonl_gz_parquet_dir_glob(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n{"text": "second", "id": 2}\n')
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write('{"body": "zipped"}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "d.parquet")
    texts = [d.text for d in iter_documents(str(tmp_path), ReadOptions(on_bad_record="skip"))]
    assert texts == ["plain text document", "first", "second", "p1", "p2"]  # c skipped: no text field
    assert [d.text for d in iter_documents(str(tmp_path / "*.jsonl.gz"), ReadOptions("body"))] == ["zipped"]


def test_zstd_and_hf_dataset(tmp_path):
    import zstandard
    (tmp_path / "z.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("zstd text".encode()))
    assert [d.text for d in iter_documents(str(tmp_path / "z.txt.zst"))] == ["zstd text"]
    import datasets
    datasets.Dataset.from_dict({"text": ["hf one", "hf two"]}).save_to_disk(str(tmp_path / "hfds"))
    assert [d.text for d in iter_documents(f"hf:{tmp_path / 'hfds'}")] == ["hf one", "hf two"]


def test_url_source_downloads_from_local_server(tmp_path, monkeypatch):
    served = tmp_path / "www"
    served.mkdir()
    (served / "corpus.txt").write_text("downloaded over http")
    handler = partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/corpus.txt"
        opts = ReadOptions(cache_dir=str(tmp_path / "cache"))
        assert [d.text for d in iter_documents(url, opts)] == ["downloaded over http"]
        with pytest.raises(UserError, match="could not download"):
            list(iter_documents(url.replace("corpus", "missing"), opts))
    finally:
        server.shutdown()


def test_malformed_jsonl_reports_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{broken\n{"text": "also ok"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        list(iter_documents(str(p)))
    assert [d.text for d in iter_documents(str(p), ReadOptions(on_bad_record="skip"))] == ["ok", "also ok"]


def test_missing_and_empty_corpus(tmp_path):
    with pytest.raises(UserError, match="not found"):
        list(iter_documents(str(tmp_path / "nope.txt")))
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(UserError, match="no documents left"):
        prepare(DataConfig(corpus=str(tmp_path / "empty.txt")), TokenizerConfig(), tmp_path / "out", log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_cleaning_and_gutenberg_strip(shared):
    raw = (shared / "gutenberg" / "pg11.txt").read_text(encoding="utf-8-sig")
    body = strip_gutenberg(raw)
    assert "Project Gutenberg License" not in body and "Alice" in body
    assert normalize("a\r\nb \t\n\n\n\nc\x00") == "a\nb\n\nc\n"
    stats = CleanStats()
    qf = QualityFilter(min_chars=10)
    assert clean_document("short", qf, stats) is None
    assert clean_document("1234 5678 9999 0000 1111 2222", qf, stats) is None
    assert stats.removed["too_short"]["docs"] == 1 and stats.removed["low_alpha"]["docs"] == 1


def test_neardup_pairs_told_apart(shared):
    names = ["treasure_island_120-0.txt", "treasure_island_pg120.txt", "grimm_pg2591.txt", "grimm_pg19068.txt"]
    texts = [strip_gutenberg((shared / "neardup" / n).read_text(encoding="utf-8-sig")) for n in names]
    res = deduplicate(texts, threshold=0.8)
    assert res.keep == [True, False, True, True]
    assert res.clusters == [[0, 1]]


def test_exact_duplicate_sms(shared):
    msgs = [ln.split("\t", 1)[1] for ln in (shared / "sms_spam_part1.tsv").read_text().splitlines()]
    res = deduplicate(msgs, near=False)
    assert res.exact_dups == len(msgs) - len({" ".join(m.lower().split()) for m in msgs}) > 0


def test_minhash_recall_and_precision_on_synthetic_edits(shared):
    import random
    rng = random.Random(0)
    words = (shared / "gutenberg" / "pg98.txt").read_text(encoding="utf-8-sig").split()
    docs = [" ".join(words[i * 200:(i + 1) * 200]) for i in range(300)]
    dups = []
    for k in range(30):
        w = docs[k].split()
        for _ in range(5):
            w[rng.randrange(len(w))] = "edited"
        dups.append(" ".join(w))
    res = deduplicate(docs + dups, threshold=0.7)
    assert all(not k for k in res.keep[300:])  # every injected near-duplicate found
    assert all(res.keep[:300])                 # no original thrown away
    assert jaccard(docs[0], dups[0]) > 0.7


def test_decontamination_flags_leaked_eval_text(shared):
    from scratchlm.eval.tasks import load_arc
    items = load_arc(shared / "arc" / "arc_easy_validation.jsonl")[:50]
    evals = {"arc": [it.context + " " + " ".join(it.choices) for it in items]}
    clean_doc = (shared / "the-verdict.txt").read_text()
    leaked = clean_doc[:2000] + " " + items[3].context + " " + " ".join(items[3].choices)
    rep = Decontaminator(evals).check([clean_doc, leaked])
    assert rep.flagged == [1]
    assert rep.per_eval_set["arc"]["docs_flagged"] == 1


def test_prepare_shards_index_and_refuses_overwrite(tiny_dataset):
    index = read_index(tiny_dataset)
    assert index["dtype"] == "uint16" and index["tokenizer_fingerprint"]
    train, val = load_split(tiny_dataset, "train"), load_split(tiny_dataset, "val")
    assert len(train) == index["splits"]["train"]["tokens"] and len(val) > 0
    assert int((np.asarray(train) == index["eot_id"]).sum()) == index["splits"]["train"]["documents"]
    # each document's ids (prepare encodes to arrays) are what the tokenizer's own encode gives for its text
    tok, val_ids = Tokenizer.load(tiny_dataset / "tokenizer"), np.asarray(val)
    docs = np.split(val_ids, np.flatnonzero(val_ids == index["eot_id"]) + 1)[:-1]
    assert docs and all(tok.encode(tok.decode(d[:-1].tolist())) == d[:-1].tolist() for d in docs)
    with pytest.raises(UserError, match="already holds"):
        prepare(DataConfig(corpus="x"), TokenizerConfig(), tiny_dataset, log=lambda *_: None)


def test_prepare_writes_the_same_shards_from_id_arrays_as_from_lists(tmp_path, shared, monkeypatch):
    """prepare encodes to arrays where the tokenizer can; the shards must be byte for byte those of the
    list path (and the array path must actually be taken)."""
    calls = []
    arrays = Tokenizer.encode_batch_arrays
    monkeypatch.setattr(Tokenizer, "encode_batch_arrays", lambda self, texts: calls.append(1) or arrays(self, texts))
    cfg = DataConfig(corpus=str(shared / "the-verdict.txt"), shard_tokens=2000)
    prepare(cfg, TokenizerConfig(vocab_size=300), tmp_path / "arrays", log=lambda *_: None)
    assert calls
    monkeypatch.delattr(Tokenizer, "encode_batch_arrays")
    prepare(cfg, TokenizerConfig(vocab_size=300), tmp_path / "lists", log=lambda *_: None)
    shards = sorted(p.name for p in (tmp_path / "arrays").glob("*.bin"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "lists").glob("*.bin"))
    assert all((tmp_path / "arrays" / n).read_bytes() == (tmp_path / "lists" / n).read_bytes() for n in shards)


def test_truncated_shard_detected(tiny_dataset, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    shard = copy / read_index(copy)["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated"):
        load_split(copy, "train")


def test_split_is_deterministic_and_order_independent():
    docs = [f"document number {i} " * 5 for i in range(100)]
    tr1, va1 = split_documents(docs, 0.1, seed=0)
    tr2, va2 = split_documents(list(reversed(docs)), 0.1, seed=0)
    assert sorted(va1) == sorted(va2) and len(va1) == 10 and not set(va1) & set(tr1)


def test_sliding_window_dataset():
    tokens = np.arange(100, dtype=np.uint16)
    ds = SlidingWindowDataset(tokens, context_length=10, stride=5)
    x, y = ds[3]
    assert x.tolist() == list(range(15, 25)) and y.tolist() == list(range(16, 26))
    assert len(ds) == (100 - 11) // 5 + 1
    with pytest.raises(UserError, match="fewer than one context window"):
        SlidingWindowDataset(tokens[:5], context_length=10)


def test_loader_resumes_at_exactly_the_next_batch_and_shards_by_rank():
    tokens = np.arange(5000, dtype=np.uint16)
    a = RandomWindowLoader(tokens, batch_size=8, context_length=16, seed=3)
    for _ in range(50):  # crosses epoch boundaries
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_batch()[0] for _ in range(5)]
    b = RandomWindowLoader(tokens, batch_size=8, context_length=16, seed=3)
    b.load_state_dict(state)
    assert all((e == b.next_batch()[0]).all() for e in expected)
    full = RandomWindowLoader(tokens, 8, 16, seed=3).next_batch()[0]
    r0 = RandomWindowLoader(tokens, 8, 16, seed=3, rank=0, world_size=2).next_batch()[0]
    r1 = RandomWindowLoader(tokens, 8, 16, seed=3, rank=1, world_size=2).next_batch()[0]
    assert (full == np.concatenate([r0, r1])).all()


# --- issue 12: every number printed must be one a user can trust ------------------------------

def quiet(*_):
    pass


def test_one_file_without_blank_lines_gets_a_validation_split(tmp_path, shared):
    text = (shared / "tinyshakespeare.txt").read_text()[:60_000].replace("\n\n", "\n")
    (tmp_path / "one.txt").write_text(text)
    s = prepare(DataConfig(corpus=str(tmp_path / "one.txt")), TokenizerConfig(vocab_size=300), tmp_path / "out", log=quiet)
    assert s["split_by"] == "span" and s["val_docs"] >= 1
    assert 0.02 < s["val_tokens"] / (s["val_tokens"] + s["train_tokens"]) < 0.1   # about val_fraction = 5%
    tok = Tokenizer.load(tmp_path / "out" / "tokenizer")
    val_text = tok.decode([t for t in load_split(tmp_path / "out", "val") if t != tok.eot_id])
    assert val_text.strip() and val_text.split("\n")[3] in text  # a real contiguous span of the corpus
    (tmp_path / "tiny.txt").write_text("One short line of text that cannot be cut into a train and a val part.\n")
    with pytest.raises(UserError, match="too small to hold out a validation split"):
        prepare(DataConfig(corpus=str(tmp_path / "tiny.txt")), TokenizerConfig(vocab_size=300), tmp_path / "o2", log=quiet)
    assert not (tmp_path / "o2").exists()


def test_val_gets_its_share_of_the_text_when_documents_differ_in_size(tmp_path, shared):
    """One long document and 20 short notes: a split by document count can give val only notes
    (a fraction of a percent of the text). Val must hold about val_fraction of the text."""
    book = (shared / "tinyshakespeare.txt").read_text()[:200_000]
    notes = [f"Note {i}: remember to buy {i} apples and {i + 3} pears on the way home." for i in range(20)]
    with open(tmp_path / "mixed.jsonl", "w") as f:
        for text in [book] + notes:
            f.write(json.dumps({"text": text}) + "\n")
    logs = []
    s = prepare(DataConfig(corpus=str(tmp_path / "mixed.jsonl")), TokenizerConfig(vocab_size=300), tmp_path / "o",
                log=logs.append)
    share = s["val_tokens"] / (s["val_tokens"] + s["train_tokens"])
    assert 0.025 < share < 0.1, (share, s)
    assert s["split_by"] == "span" and any("of the characters" in line for line in logs), logs
    train, val = split_documents([book] + notes, 0.05, seed=0)  # the in-memory split agrees
    assert 0.025 < sum(map(len, val)) / (len(book) + sum(map(len, notes))) < 0.1


def test_split_documents_spans_concatenate_back(shared):
    text = (shared / "the-verdict.txt").read_text()
    train, val = split_documents([text], 0.1, seed=0)
    assert len(val) >= 1 and sorted(train + val, key=text.index) and "".join(sorted(train + val, key=text.index)) == text


def test_shards_refuse_another_tokenizer(tiny_dataset, small_tokenizer):
    with pytest.raises(UserError, match="tokenized by another tokenizer"):
        load_split(tiny_dataset, "val", tokenizer=small_tokenizer)
    own = Tokenizer.load(tiny_dataset / "tokenizer")
    assert len(load_split(tiny_dataset, "val", tokenizer=own)) == read_index(tiny_dataset)["splits"]["val"]["tokens"]


def test_multi_shard_split_is_read_without_joining(tmp_path, shared):
    s = prepare(DataConfig(corpus=str(shared / "the-verdict.txt"), shard_tokens=2000), TokenizerConfig(vocab_size=300),
                tmp_path / "ds", log=quiet)
    index = read_index(tmp_path / "ds")
    assert len(index["splits"]["train"]["shards"]) > 3
    tokens = load_split(tmp_path / "ds", "train")
    assert isinstance(tokens, ShardedTokens) and len(tokens) == s["train_tokens"]
    joined = np.concatenate([np.fromfile(tmp_path / "ds" / sh["file"], dtype=np.uint16)
                             for sh in index["splits"]["train"]["shards"]])
    for a, b in [(0, 10), (1990, 2050), (5, 7000), (len(joined) - 3, len(joined) + 5), (100, 100)]:
        assert tokens[a:b].tolist() == joined[a:b].tolist()
    assert tokens[2001] == joined[2001] and tokens[-1] == joined[-1]
    loader = RandomWindowLoader(tokens, batch_size=4, context_length=64, seed=1)
    x, y = loader.next_batch()
    assert (x[:, 1:] == y[:, :-1]).all()


PREPARE_AND_LOAD = r"""
import json, resource, sys
from scratchlm.config import DataConfig, TokenizerConfig
from scratchlm.data.dataset import RandomWindowLoader
from scratchlm.data.prepare import prepare
from scratchlm.data.shards import load_split

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

corpus, out = sys.argv[1], sys.argv[2]
base = rss()
s = prepare(DataConfig(corpus=corpus, shard_tokens=1_000_000, val_fraction=0.01), TokenizerConfig(vocab_size=300),
            out, log=lambda *_: None)
s["prepare_growth"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
loader = RandomWindowLoader(load_split(out, "train"), batch_size=8, context_length=64, seed=0)
for _ in range(20):
    x, y = loader.next_batch()
print(json.dumps({**s, "loader": type(loader.tokens).__name__}))
"""


def test_prepare_and_loader_memory_does_not_grow_with_the_corpus(tmp_path, shared):
    """Prepare a 6 MB and an 18 MB corpus in fresh processes: the peak resident memory over what
    the imports took may hold a fixed working set, but not the corpus. Tripling the corpus adds
    less than half of the extra 12 MB (keeping the documents, as prepare used to, adds more than
    all of it), so a corpus larger than RAM prepares. The loader then reads the multi-shard split
    through memory maps (`ShardedTokens`), never joined into one array."""
    import random
    import subprocess
    import sys
    rng = random.Random(0)
    words = sorted(set((shared / "tinyshakespeare.txt").read_text().split()))[:3000]
    growth, sizes = [], []
    for n_docs in (600, 1800):
        corpus = tmp_path / f"c{n_docs}.jsonl"
        with open(corpus, "w") as f:
            for i in range(n_docs):
                f.write(json.dumps({"text": " ".join(rng.choices(words, k=1300))}) + "\n")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
        r = subprocess.run([sys.executable, "-c", PREPARE_AND_LOAD, str(corpus), str(tmp_path / f"o{n_docs}")],
                           capture_output=True, text=True, env=env, timeout=240)
        assert r.returncode == 0, r.stderr[-2000:]
        s = json.loads(r.stdout.splitlines()[-1])
        assert s["train_docs"] + s["val_docs"] == n_docs and s["val_docs"] == n_docs // 100
        assert s["loader"] == "ShardedTokens"
        growth.append(s["prepare_growth"])
        sizes.append(corpus.stat().st_size)
    assert len(read_index(tmp_path / "o1800")["splits"]["train"]["shards"]) > 5
    assert growth[1] - growth[0] < (sizes[1] - sizes[0]) / 2, ([g / 1e6 for g in growth], [x / 1e6 for x in sizes])


CAPPED_PREPARE = r"""
import json, os, resource, sys
import scratchlm.data.prepare as P, scratchlm.data.sources as S
from scratchlm.config import DataConfig, TokenizerConfig
from scratchlm.data.sources import iter_documents
from scratchlm.errors import UserError
# Smaller pieces and batches than the defaults, so that a corpus of tens of MB outgrows the cap.
S.PIECE_CHARS = S.READ_BYTES = P.BATCH_CHARS = 1 << 18

def vm(field="VmPeak"):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def run(corpus, out):
    return P.prepare(DataConfig(corpus=corpus, val_fraction=0.01, shard_tokens=1_000_000),
                     TokenizerConfig(vocab_size=300), out, log=lambda *_: None)

small, big, big_json, out, margin = sys.argv[1:6]
run(small, out + "-warm")  # imports, malloc arenas, tiktoken's threads, the tokenizer's worker pool
cap = vm() + int(margin)  # address space: everything so far, and `margin` more
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
headroom = cap - vm("VmSize")  # what prepare may still map: less than either corpus, or this tests nothing
assert headroom < min(os.path.getsize(big), os.path.getsize(big_json)), (headroom, os.path.getsize(big))
try:
    s = run(big, out)
    records = sum(1 for _ in iter_documents(big_json))
except UserError as e:
    print(json.dumps({"error": str(e)}))
    sys.exit(1)
print(json.dumps({**s, "json_records": records, "cap_over_baseline": int(margin), "headroom": headroom}))
"""


def test_prepare_streams_one_huge_text_file_under_a_memory_cap(tmp_path, shared):
    """One 48 MB .txt file (and a 48 MB .json array) under an address-space cap of 32 MB over what a
    small warm-up prepare needed: reading either file whole would need more than the cap, so they
    must stream, in pieces cut at blank lines, through every pass (clean, dedup, tokenizer training
    in worker processes, encoding). Malloc gets one arena (MALLOC_ARENA_MAX=1) so that threads do
    not reserve 64 MB arenas of address space each."""
    import random
    import subprocess
    import sys
    rng = random.Random(0)
    words = sorted(set((shared / "tinyshakespeare.txt").read_text().split()))[:3000]

    def paragraphs(n_chars):
        n = 0
        while n < n_chars:
            para = "\n".join(" ".join(rng.choices(words, k=12)) for _ in range(8)) + "\n\n"
            n += len(para)
            yield para
    (tmp_path / "small.txt").write_text("".join(paragraphs(1_000_000)))
    big, big_json = tmp_path / "big.txt", tmp_path / "big.json"
    with open(big, "w") as f:
        f.writelines(paragraphs(48_000_000))
    with open(big_json, "w") as f:
        f.write("[")
        for i, para in enumerate(paragraphs(48_000_000)):
            f.write((", " if i else "") + json.dumps({"id": i, "text": para}))
        f.write("]")
    margin = 32 << 20
    assert big.stat().st_size > margin and big_json.stat().st_size > margin
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
    r = subprocess.run([sys.executable, "-c", CAPPED_PREPARE, str(tmp_path / "small.txt"), str(big), str(big_json),
                        str(tmp_path / "out"), str(margin)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    s = json.loads(r.stdout.splitlines()[-1])
    assert 0 < s["headroom"] < big.stat().st_size  # checked inside the capped process too
    assert s["json_records"] == i + 1
    index = read_index(tmp_path / "out")
    assert index["stats"]["clean"]["bytes_in"] == big.stat().st_size
    assert s["split_by"] == "document" and s["train_docs"] + s["val_docs"] == index["stats"]["clean"]["docs_out"] > 100


def test_wordless_documents_are_not_near_duplicates_of_each_other(shared):
    texts = ["!!! ??? ...", "--- *** ---", "12 34 56"[:0] + "### ### ###", "... ... ,,,",
             (shared / "the-verdict.txt").read_text()[:3000]]
    res = deduplicate(texts, threshold=0.8)
    assert res.near_dups == 0 and res.clusters == [] and all(res.keep)


def test_bad_input_gives_one_line_not_a_traceback_or_a_surprise(tmp_path, capsys):
    (tmp_path / "bad.txt.zst").write_bytes(b"this is not zstd data at all")
    with pytest.raises(UserError, match="corrupt or truncated"):
        list(iter_documents(str(tmp_path / "bad.txt.zst")))
    (tmp_path / "table.csv").write_text("question,answer\nwhat,that\n")
    with pytest.raises(UserError, match="is a table, not a text corpus"):
        list(iter_documents(str(tmp_path / "table.csv")))
    (tmp_path / "blank.jsonl").write_text('\n\n{"text": "ok"}\n\n{broken\n')
    with pytest.raises(UserError, match=r"blank.jsonl:5: malformed"):
        list(iter_documents(str(tmp_path / "blank.jsonl")))
    # undecodable bytes are counted, reported, and recorded in the index
    (tmp_path / "latin1").mkdir()
    for i in range(3):
        (tmp_path / "latin1" / f"{i}.txt").write_bytes(("Caf\xe9 cr\xe8me and more words to keep it long. " * 20).encode("latin-1"))
    logs = []
    prepare(DataConfig(corpus=str(tmp_path / "latin1"), dedup=False), TokenizerConfig(vocab_size=300), tmp_path / "o",
            log=logs.append)
    assert read_index(tmp_path / "o")["stats"]["clean"]["bad_bytes"] == 3 * 40
    assert any("120 undecodable byte sequences" in m for m in logs)


def test_decontamination_reads_every_eval_file_or_refuses(tmp_path, shared):
    (tmp_path / "notmmlu.csv").write_text("id,text\n1,hello\n")
    (tmp_path / "other.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    for bad, msg in (("notmmlu.csv", "unrecognised MMLU layout"), ("other.jsonl", "not a recognised eval file")):
        with pytest.raises(UserError, match=msg):
            load_eval_texts([str(tmp_path / bad)])
    # one word definition: a hyphenated 8-"word" item has 19 \w+ words, so it does have 13-grams
    item = "A state-of-the-art, well-to-do, up-to-date mother-in-law met the editor-in-chief."
    assert len(item.split()) < 13
    rep = Decontaminator({"hyphens": [item]}).check(["unrelated text " * 20, "He said: " + item.lower() + " Then left."])
    assert rep.flagged == [1]


def test_unusable_eval_file_fails_before_the_corpus_is_read(tmp_path, monkeypatch):
    import scratchlm.data.prepare as P
    (tmp_path / "c.txt").write_text("Some text to prepare.\n" * 100)
    (tmp_path / "other.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    read = []
    monkeypatch.setattr(P, "iter_documents", lambda *a: read.append(1) or iter_documents(*a))
    with pytest.raises(UserError, match="not a recognised eval file"):
        prepare(DataConfig(corpus=str(tmp_path / "c.txt"), decontaminate=[str(tmp_path / "other.jsonl")]),
                TokenizerConfig(vocab_size=300), tmp_path / "o", log=quiet)
    assert not read and not (tmp_path / "o").exists()


def test_prepare_decontaminates_while_streaming(tmp_path, shared):
    from scratchlm.eval.tasks import load_arc
    arc = shared / "arc" / "arc_easy_validation.jsonl"
    leaked = load_arc(arc)[7]
    words = (shared / "tinyshakespeare.txt").read_text().split()
    (tmp_path / "c").mkdir()
    for i in range(30):
        extra = (" " + leaked.context + " " + " ".join(leaked.choices)) if i == 17 else ""
        (tmp_path / "c" / f"{i:02d}.txt").write_text(" ".join(words[i * 300:(i + 1) * 300]) + extra)
    s = prepare(DataConfig(corpus=str(tmp_path / "c"), decontaminate=[str(arc)], drop_contaminated=True),
                TokenizerConfig(vocab_size=300), tmp_path / "o", log=quiet)
    rep = read_index(tmp_path / "o")["stats"]["decontamination"]
    assert rep["docs_flagged"] == 1 and rep["per_eval_set"][str(arc)]["items"] == 570
    assert s["train_docs"] + s["val_docs"] == 29


def test_minhash_signatures_do_not_depend_on_chunking_or_threads(shared):
    """The cache-sized chunks and per-thread document ranges are a speed-up only: every chunk size
    and thread count gives bit-identical signatures (minima are exact)."""
    from scratchlm.data.dedup import MinHasher
    text = (shared / "tinyshakespeare.txt").read_text()[:200_000]
    docs = [text[i:i + 700] for i in range(0, len(text), 700)] + ["", "one two", "a b c d e f"]
    h = MinHasher(num_perm=64)
    ref = h.signatures(docs, chunk_rows=1 << 20, threads=1)
    for chunk_rows, threads in [(1024, 2), (7, 3), (64, 1), (1 << 16, 2)]:
        assert np.array_equal(h.signatures(docs, chunk_rows=chunk_rows, threads=threads), ref)


def test_json_array_and_text_files_stream_in_pieces(tmp_path, monkeypatch):
    """With tiny read and piece sizes, every boundary case is crossed many times: a UTF-8 character or
    \r\n split between reads, records split between reads, a one-line JSON array. The pieces join
    back to the file; bad bytes are counted once; errors still name the record."""
    import scratchlm.data.sources as sources
    monkeypatch.setattr(sources, "READ_BYTES", 7)
    monkeypatch.setattr(sources, "PIECE_CHARS", 64)
    text = "First line, ü é\r\nsecond line 1.5\r\n\r\nA paragraph of words that runs on for a while. " * 12
    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbf" + text.encode() + b"tail \xff\xfe \xef\xbf\xbd")
    docs = list(iter_documents(str(tmp_path / "t.txt")))
    assert len(docs) > 10 and max(len(d.text) for d in docs) <= 64
    assert "".join(d.text for d in docs) == text.replace("\r\n", "\n") + "tail \ufffd\ufffd \ufffd"
    assert sum(d.bad_bytes for d in docs) == 2 and docs[0].text.startswith("First line")
    records = [{"n": 1.25e3 * i, "text": "héllo, wörld " * (i % 7) + str(i)} for i in range(40)]
    (tmp_path / "a.json").write_text("\n \n" + json.dumps(records))  # one line after blank ones
    docs = list(iter_documents(str(tmp_path / "a.json")))
    assert "".join(d.text for d in docs) == "".join(r["text"] for r in records) and len(docs) > 40
    assert docs[0].source.endswith("a.json:1") and docs[-1].source.endswith("a.json:40")
    (tmp_path / "b.json").write_text('[{"text": "a"}, {"text": "b"}, {"text": "c" ')
    with pytest.raises(UserError, match=r"b.json: not valid JSON in record 3"):
        list(iter_documents(str(tmp_path / "b.json")))
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n' + json.dumps({"text": "x" * 30}) + "\n{bad\n")
    with pytest.raises(UserError, match=r"c.jsonl:4: malformed"):
        list(iter_documents(str(tmp_path / "c.jsonl")))
    assert list(iter_documents(str(tmp_path / "c.jsonl"), ReadOptions(on_bad_record="skip")))[1].text == "x" * 30


def test_pipelined_batches_give_the_one_batch_result(shared, tmp_path):
    """Signatures computed in the background while the next batch is shingled: any batch size,
    in memory or spilled, gives the clusters and kept documents of one single batch."""
    from scratchlm.data.dedup import deduplicate
    text = (shared / "tinyshakespeare.txt").read_text()[:120_000]
    docs = [text[i:i + 600] for i in range(0, len(text), 600)]
    docs += [d.replace(" the ", " a ", 1) for d in docs[:40:3]] + ["", docs[5]]  # near and exact copies
    ref = deduplicate(docs, threshold=0.7, batch=len(docs))
    assert ref.near_dups >= 10 and ref.exact_dups == 1
    for batch, spill in [(7, None), (64, tmp_path / "spill")]:
        got = deduplicate(docs, threshold=0.7, batch=batch, spill_dir=spill)
        assert got.keep == ref.keep and got.clusters == ref.clusters
