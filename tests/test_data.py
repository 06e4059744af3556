import gzip
import json
import threading
from functools import partial
from http.server import HTTPServer, SimpleHTTPRequestHandler

import numpy as np
import pytest

from scratchlm.data.clean import CleanStats, QualityFilter, clean_document, normalize, strip_gutenberg
from scratchlm.data.dataset import RandomWindowLoader, SlidingWindowDataset
from scratchlm.data.decontam import Decontaminator
from scratchlm.data.dedup import deduplicate, jaccard
from scratchlm.config import DataConfig, TokenizerConfig
from scratchlm.data.prepare import prepare, split_documents
from scratchlm.data.shards import load_split, read_index
from scratchlm.data.sources import ReadOptions, iter_documents
from scratchlm.errors import UserError


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
    with pytest.raises(UserError, match="already holds"):
        prepare(DataConfig(corpus="x"), TokenizerConfig(), tiny_dataset, log=lambda *_: None)


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
