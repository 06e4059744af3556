"""The quickstart's settings for a time budget (train/recipe.py)."""

import json
import math

from scratchlm.config import load_config
from scratchlm.model import GPT
from scratchlm.train import recipe


def params(shape: dict) -> int:
    cfg = load_config("quickstart", [f"model.{k}={v}" for k, v in shape.items()] + ["model.vocab_size=1024"])
    return sum(p.numel() for p in GPT(cfg.model).parameters())


def test_more_compute_never_chooses_a_smaller_model():
    sizes = [params(recipe.size_for(m)) for m in (0.5, 1, 2, 3, 5, 10, 20, 30, 100)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    # a machine twice as fast gets what the reference machine gets in twice the time
    assert recipe.choose(5, 10**6, 2 * recipe.REFERENCE_FLOPS) == {**recipe.choose(10, 10**6, recipe.REFERENCE_FLOPS),
                                                                  "train.compile": True}


def test_vocabulary_grows_with_the_corpus_within_bounds():
    sizes = [recipe.vocab_for(b) for b in (10**4, 10**5, 10**6, 4 * 10**6, 16 * 10**6, 10**9)]
    assert sizes == sorted(sizes) and sizes[0] == 512 and sizes[-1] == 8192
    assert recipe.vocab_for(10**6) == 1024 and recipe.vocab_for(None) == 1024
    assert all(v & (v - 1) == 0 for v in sizes)  # powers of two


def test_short_budgets_train_eager():
    assert recipe.choose(1, 10**6, recipe.REFERENCE_FLOPS)["train.compile"] is False
    assert recipe.choose(3, 10**6, recipe.REFERENCE_FLOPS)["train.compile"] is True


def test_an_explicit_setting_wins_over_the_recipe():
    cfg = load_config("quickstart", ["model.d_model=96"])
    applied = recipe.apply(cfg, recipe.choose(30, 10**6, recipe.REFERENCE_FLOPS), {"model.d_model"})
    assert cfg.model.d_model == 96 and not applied.keys() & recipe.SHAPE  # the shape stays the user's
    assert cfg.tokenizer.vocab_size == applied["tokenizer.vocab_size"] == 1024
    load_config("quickstart", ["model.d_model=96"]).model.validate()


def test_corpus_size_is_read_from_disk_without_reading_the_text(tmp_path, shared):
    assert recipe.corpus_bytes(str(shared / "tinyshakespeare.txt")) == 1_115_394
    assert recipe.corpus_bytes(str(shared / "tinyshakespeare.txt"), max_chars=1000) == 1000
    assert recipe.corpus_bytes("hf:some/dataset") is None
    assert recipe.corpus_bytes("builtin") == recipe.KJV_TEXT_BYTES


def test_quickstart_prints_and_saves_the_settings_it_chose(tmp_path, shared):
    from scratchlm.quickstart import run_quickstart
    logs = []
    run_quickstart(str(shared / "the-verdict.txt"), minutes=0.05, out=str(tmp_path / "qs"), log=logs.append,
                   overrides=["model.context_length=32", "train.batch_size=8", "train.eval_every=0",
                              "eval.mc_limit=10"], max_steps=4)
    line = next(m for m in logs if m.startswith("[0/5]"))
    chosen = json.loads((tmp_path / "qs" / "results.json").read_text())["settings_chosen"]
    assert chosen["tokenizer.vocab_size"] == 512 and chosen["train.compile"] is False  # 20 kB of text, 3 s
    assert "tokenizer.vocab_size=512" in line and "model.d_model" in line
    saved = (tmp_path / "qs" / "config.toml").read_text()
    assert f"d_model = {chosen['model.d_model']}" in saved and "vocab_size = 512" in saved


def test_an_interrupted_quickstart_resumes_with_the_settings_it_started_with(tmp_path, shared, monkeypatch):
    """The choice depends on a speed measurement; a resumed run must not choose again (a different
    shape could not load the checkpoint)."""
    from scratchlm.quickstart import run_quickstart
    out = tmp_path / "qs"
    sets = ["model.context_length=32", "train.batch_size=8", "train.eval_every=0", "eval.mc_limit=10",
            "train.checkpoint_every=2"]
    run_quickstart(str(shared / "the-verdict.txt"), minutes=0.05, out=str(out), overrides=sets, max_steps=2,
                   log=lambda *_: None)
    first = json.loads((out / "results.json").read_text())["settings_chosen"]
    (out / "report.md").unlink()  # as if it had been killed before the end
    monkeypatch.setattr(recipe, "matmul_speed", lambda *a, **k: 1e16)  # now "a machine 30,000x faster"
    assert recipe.choose(0.05, 20_000, 1e16)["model.d_model"] != first["model.d_model"]
    logs = []
    run_quickstart(str(shared / "the-verdict.txt"), minutes=0.05, out=str(out), overrides=sets, max_steps=4,
                   log=logs.append)
    assert any("resuming with the settings this run started with" in m for m in logs)
    again = json.loads((out / "results.json").read_text())
    assert again["settings_chosen"] == first and again["train"]["steps"] == 4


def test_a_budget_that_reads_a_small_corpus_many_times_turns_dropout_on_and_stops_early():
    """Measured on 1 MB: 10 minutes of d=128 without dropout (20 passes) scored worse than 3 minutes (6
    passes); dropout 0.1 fixed it at 10 minutes and cost 0.10 bits/byte at 3; 30 minutes with dropout
    (30 passes) was worse again. A corpus 100x larger needs neither at the same budget."""
    ref, ts_tokens, step = recipe.REFERENCE_FLOPS, 365_176, 32 * 128
    assert recipe.repetition(3, ref, ts_tokens, step)["model.dropout"] == 0.0
    assert recipe.repetition(10, ref, ts_tokens, step)["model.dropout"] == recipe.DROPOUT > 0
    assert recipe.repetition(10, ref, 100 * ts_tokens, step)["model.dropout"] == 0.0
    # the cap is MAX_EPOCHS passes whatever the budget: more minutes never train past it
    caps = {recipe.repetition(m, ref, ts_tokens, step)["train.max_steps"] for m in (1, 3, 10, 30, 100)}
    assert caps == {math.ceil(recipe.MAX_EPOCHS * ts_tokens / step)}
    # on each side of the switch to the slower d=192, dropout follows that shape's own passes
    for minutes in (7.9, 8.1, 30):
        passes = recipe.epochs(minutes, ts_tokens)
        assert (recipe.repetition(minutes, ref, ts_tokens, step)["model.dropout"] > 0) == (passes > recipe.DROPOUT_AFTER_EPOCHS)


def test_a_small_corpus_caps_the_steps_and_a_resumed_run_keeps_dropout(tmp_path, shared, monkeypatch):
    """The quickstart applies the repetition rule once the corpus is tokenized, says so, stops at the
    cap, and a resumed run takes dropout and the cap back from its config, whatever the speed is now."""
    from scratchlm.config import load_config
    from scratchlm.quickstart import run_quickstart
    out = tmp_path / "qs"
    sets = ["model.context_length=32", "train.batch_size=8", "train.eval_every=0", "eval.mc_limit=10",
            "train.checkpoint_every=2", "train.compile=false"]
    monkeypatch.setattr(recipe, "matmul_speed", lambda *a, **k: 1e11)  # ~1/4 of the reference: the d=128 shape
    monkeypatch.setattr(recipe, "MAX_EPOCHS", 0.01)  # a cap of a few steps, so the test is short
    logs = []
    run_quickstart(str(shared / "the-verdict.txt"), minutes=5, out=str(out), overrides=sets, log=logs.append)
    res = json.loads((out / "results.json").read_text())
    train_tokens = json.loads((out / "data" / "index.json").read_text())["splits"]["train"]["tokens"]
    chosen = res["settings_chosen"]
    assert chosen["model.d_model"] == 128 and chosen["model.dropout"] == recipe.DROPOUT  # ~1.2 min, 20 kB: many passes
    assert chosen["train.max_steps"] == math.ceil(0.01 * train_tokens / (8 * 32))
    assert res["train"]["steps"] == chosen["train.max_steps"]  # stopped by the cap, long before 5 minutes
    assert any("training tokens ~" in m and "model.dropout=0.1" in m for m in logs)
    (out / "report.md").unlink()  # as if it had been killed before the end
    monkeypatch.setattr(recipe, "matmul_speed", lambda *a, **k: 1e6)  # now "very slow": no dropout if chosen anew
    assert recipe.repetition(5, 1e6, train_tokens, 8 * 32)["model.dropout"] == 0.0
    logs = []
    run_quickstart(str(shared / "the-verdict.txt"), minutes=5, out=str(out), overrides=sets, log=logs.append)
    assert any("resuming with the settings" in m for m in logs)
    saved = load_config(out / "config.toml")
    assert saved.model.dropout == recipe.DROPOUT and saved.train.max_steps == chosen["train.max_steps"]
