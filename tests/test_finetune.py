"""Fine-tuning: where silent bugs hide — the prompt/response boundary, which tokens carry loss, how
the loss is averaged, the last real token of a padded batch — plus the commands end to end."""

import json
import subprocess
import sys

import pytest
import torch

from scratchlm.errors import UserError
from scratchlm.finetune.classify import (ClassifyObjective, classification_metrics, label_names,
                                         last_token_logits)
from scratchlm.finetune.data import (Conversation, EpochSampler, load_conversations, load_labeled, pad_right,
                                     split_indices)
from scratchlm.finetune.sft import SFTObjective, collate, encode_examples, pack, token_losses
from scratchlm.finetune.templates import encode_conversation, get_template, task_prompts
from scratchlm.model import GPT, ModelConfig


def tiny_gpt(vocab: int, ctx: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=vocab, context_length=ctx, d_model=32, n_layers=2, n_heads=2, d_ff=64))


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scratchlm", *args], capture_output=True, text=True)


# --- the prompt/response boundary and the loss mask --------------------------------------------

@pytest.mark.parametrize("template", ["alpaca", "chat"])
@pytest.mark.parametrize("instruction", ["Say hi ", "Say hi\n", "Say hi  \n\n", "x"])
def test_ids_are_prompt_then_response_then_end_at_an_exact_boundary(small_tokenizer, template, instruction):
    tok, t = small_tokenizer, get_template(template)
    msgs = [{"role": "user", "content": instruction}, {"role": "assistant", "content": " hello there\n"}]
    ids, mask = encode_conversation(tok, t, msgs)
    prompt = tok.encode(t.prompt(msgs[:1]), allowed_special="all")
    response = tok.encode_ordinary(" hello there\n")
    assert ids == prompt + response + [tok.special_tokens[t.end_token]]
    assert mask == [False] * len(prompt) + [True] * (len(response) + 1)


@pytest.mark.parametrize("template", ["alpaca", "chat"])
@pytest.mark.parametrize("answer", ["\n\nhello", "  hello", "\n   two spaces", " hello"])
def test_a_response_that_merges_with_the_prompts_end_keeps_its_own_tokens(small_tokenizer, template, answer):
    """Every prompt ends in a newline; a response that starts with whitespace merges with it when the
    joined string is encoded ("\n" + "\n\n" -> one token), so "count the prompt's tokens and mask the
    rest" would mask the wrong tokens. Built piece by piece, the masked tokens are exactly the response."""
    tok, t = small_tokenizer, get_template(template)
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": answer}]
    ids, mask = encode_conversation(tok, t, msgs)
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained[:-1]) == answer and trained[-1] == tok.special_tokens[t.end_token]
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == t.prompt(msgs[:1])


def test_end_token_carries_loss_even_when_padding_is_end_of_text(small_tokenizer):
    tok = small_tokenizer
    t = get_template("alpaca")  # end token = <|endoftext|>, and we pad with the same id here
    convs = [Conversation([{"role": "user", "content": "Hi", "input": ""}, {"role": "assistant", "content": a}], "x")
             for a in ("Yes.", "A much longer answer than the first one.")]
    enc, _ = encode_examples(tok, t, convs, 200)
    batch = collate(enc, pad=tok.eot_id)
    short = len(enc[0].ids)
    assert batch["target"][0, short - 2] == tok.eot_id and batch["loss_mask"][0, short - 2]  # the end token counts
    assert not batch["loss_mask"][0, short - 1:].any()                                       # the pads do not
    assert batch["target"][0, short - 1:].eq(tok.eot_id).all()
    assert int(batch["loss_mask"].sum()) == sum(sum(e.mask[1:]) for e in enc)


def test_train_on_prompt_covers_every_token(small_tokenizer):
    t = get_template("chat")
    conv = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "x")
    (plain,), _ = encode_examples(small_tokenizer, t, [conv], 100)
    (full,), _ = encode_examples(small_tokenizer, t, [conv], 100, train_on_prompt=True)
    assert plain.ids == full.ids and all(full.mask) and sum(plain.mask) < len(plain.mask)


def test_long_examples_lose_prompt_tokens_never_the_end_token(small_tokenizer):
    tok, t = small_tokenizer, get_template("alpaca")
    long_prompt = Conversation([{"role": "user", "content": "word " * 80, "input": ""},
                                {"role": "assistant", "content": "Short answer."}], "a")
    long_answer = Conversation([{"role": "user", "content": "Hi", "input": ""},
                                {"role": "assistant", "content": "long " * 80}], "b")
    enc, rep = encode_examples(tok, t, [long_prompt, long_answer], 40)
    assert (rep.kept, rep.truncated, rep.skipped) == (1, 1, 1) and "cut from the start" in rep.warning(40)
    (e,) = enc
    assert len(e.ids) == 40 and e.ids[-1] == tok.eot_id and e.mask[-1]
    assert tok.decode([i for i, m in zip(e.ids, e.mask) if m]) == "Short answer.<|endoftext|>"


def sft_objective(tok, examples, micro):
    obj = SFTObjective(tok, get_template("alpaca"), examples, [], {"kind": "sft"})
    obj.setup(0, 1, micro, seed=0)
    return obj


def test_loss_is_averaged_over_all_response_tokens_of_the_step_not_per_micro_batch(small_tokenizer):
    tok = small_tokenizer
    answers = ["No.", "Yes, certainly: " + "and more " * 12, "Ok.", "A medium answer here."]
    convs = [Conversation([{"role": "user", "content": f"Q{i}", "input": ""}, {"role": "assistant", "content": a}],
                          str(i)) for i, a in enumerate(answers)]
    enc, _ = encode_examples(tok, get_template("alpaca"), convs, 200)
    model = tiny_gpt(tok.vocab_size, ctx=256)
    whole = sft_objective(tok, enc, 4)
    b = collate(enc, whole.pad)
    reference = whole.loss(model, b)[0].detach() / whole.count(b)  # one batch: mean over every response token
    sums, counts, means = 0.0, 0, []
    for pair in (enc[:2], enc[2:]):                              # the same step as two micro-batches
        mb = collate(pair, whole.pad)
        s, _ = whole.loss(model, mb)
        sums, counts = sums + s.detach(), counts + whole.count(mb)
        means.append(float(s.detach()) / whole.count(mb))
    assert float(sums / counts) == pytest.approx(float(reference), rel=1e-5)
    assert sum(means) / 2 != pytest.approx(float(reference), rel=1e-3)  # what a per-micro-batch mean would give


def test_packing_gives_the_same_loss_as_padding(small_tokenizer):
    tok = small_tokenizer
    convs = [Conversation([{"role": "user", "content": f"Question {i}?", "input": ""},
                           {"role": "assistant", "content": "Answer " * (i + 1)}], str(i)) for i in range(5)]
    enc, _ = encode_examples(tok, get_template("alpaca"), convs, 60)
    model = tiny_gpt(tok.vocab_size, ctx=256).eval()
    padded = collate(enc, 0)
    packed = pack(enc, 255, 0)
    assert packed["input"].size(0) < len(enc)  # it did pack
    with torch.no_grad():
        a, b = token_losses(model, padded), token_losses(model, packed)
    assert int(padded["loss_mask"].sum()) == int(packed["loss_mask"].sum())
    assert float(a.sum()) == pytest.approx(float(b.sum()), rel=1e-4)


# --- classification -----------------------------------------------------------------------------

def test_classifier_reads_the_last_real_token_of_a_right_padded_batch():
    from scratchlm.finetune.base import attach_classifier_head
    model = attach_classifier_head(tiny_gpt(100), 3).eval()
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    ids, real = pad_right(seqs, 0)
    batched = last_token_logits(model, ids, real.sum(1))
    for i, s in enumerate(seqs):
        alone = last_token_logits(model, torch.tensor([s]), torch.tensor([len(s)]))
        assert torch.allclose(batched[i], alone[0], atol=1e-5)
    assert not torch.allclose(batched[1], model(ids)[0][1, -1].float(), atol=1e-3)  # position -1 is a pad


def test_metrics_precision_recall_f1_and_confusion():
    m = classification_metrics([0, 0, 0, 1, 1], [0, 1, 0, 1, 0], ["ham", "spam"])
    assert m["accuracy"] == 0.6 and m["confusion_matrix"]["rows_true_cols_pred"] == [[2, 1], [1, 1]]
    assert m["per_class"]["spam"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "n": 2}
    assert m["per_class"]["ham"]["precision"] == pytest.approx(0.6667, abs=1e-4)


def test_split_is_deterministic_and_balanced_sampling_draws_classes_equally():
    a, b = split_indices(100, 0.1, 0.2, seed=3), split_indices(100, 0.1, 0.2, seed=3)
    assert a == b and sorted(a["train"] + a["val"] + a["test"]) == list(range(100)) and len(a["test"]) == 20
    assert split_indices(100, 0.1, 0.2, seed=4) != a
    s = EpochSampler(10, 0, groups=[list(range(8)), [8, 9]])
    drawn = s.take(16)
    assert sum(i >= 8 for i in drawn) == 8
    s2 = EpochSampler(10, 0, groups=[list(range(8)), [8, 9]])
    s2.take(5)
    state = s2.state_dict()
    s3 = EpochSampler(10, 0, groups=[list(range(8)), [8, 9]])
    s3.load_state_dict(state)
    assert s3.take(7) == s2.take(7)  # the position resumes exactly


def test_classify_objective_counts_examples_and_correct(small_tokenizer):
    tok = small_tokenizer
    train = [([5, 6, 7], 0), ([8, 9], 1), ([10], 0)]
    obj = ClassifyObjective(tok, train, train, ["a", "b"], {"kind": "classify"})
    obj.setup(0, 1, 3, 0)
    from scratchlm.finetune.base import attach_classifier_head
    model = attach_classifier_head(tiny_gpt(tok.vocab_size), 2)
    batch = obj.next_batch()
    loss, terms = obj.loss(model, batch)
    assert obj.count(batch) == 3 and 0 <= terms["correct"] <= 3 and loss.requires_grad
    assert set(obj.evaluate(model)) == {"val_loss", "val_acc"}


# --- bad input: one line each -----------------------------------------------------------------

def test_loaders_read_tsv_csv_and_jsonl_alike(tmp_path):
    (tmp_path / "a.tsv").write_text("ham\tsee you\nspam\tWIN now\n")
    (tmp_path / "a.csv").write_text('label,text\nham,see you\nspam,"WIN now"\n')
    (tmp_path / "a.jsonl").write_text('{"text": "see you", "label": "ham"}\n{"text": "WIN now", "label": "spam"}\n')
    got = [[(r.label, r.text) for r in load_labeled(tmp_path / f"a.{ext}")] for ext in ("tsv", "csv", "jsonl")]
    assert got[0] == got[1] == got[2] == [("ham", "see you"), ("spam", "WIN now")]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "Hello"}]}) + "\n")
    (conv,) = load_conversations(tmp_path / "c.jsonl")
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]


@pytest.mark.parametrize("name,content,message", [
    ("missing.json", '[{"instruction": "a", "input": ""}]', r"missing.json\[record 0\]: the record has no 'output'"),
    ("empty.jsonl", '{"instruction": "a", "input": "", "output": "  "}', r"empty.jsonl:1: empty response"),
    ("role.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                   '{"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     r"role.jsonl:2: messages\[0\]: unknown role 'robot'"),
    ("notab.tsv", "ham\tok\nno tab here\n", r"notab.tsv:2: expected label<TAB>text"),
])
def test_bad_records_are_one_line_with_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    loader = load_labeled if name.endswith(".tsv") else load_conversations
    with pytest.raises(UserError, match=message) as e:
        loader(tmp_path / name)
    assert "\n" not in str(e.value)


def test_one_class_and_unknown_held_out_label_are_refused(tmp_path):
    (tmp_path / "a.tsv").write_text("ham\ta\nham\tb\nspam\tc\nodd\td\n")
    recs = load_labeled(tmp_path / "a.tsv")
    with pytest.raises(UserError, match="only one class"):
        label_names(recs[:2], [])
    with pytest.raises(UserError, match=r"a.tsv:4: label 'odd' does not occur in the training split"):
        label_names(recs[:3], recs[3:])


def test_template_without_its_special_tokens_is_refused(shared):
    from scratchlm.tokenizer import Tokenizer
    tok = Tokenizer.train([(shared / "the-verdict.txt").read_text()], 300, special_tokens=("<|endoftext|>",))
    conv = Conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "x")
    with pytest.raises(UserError, match="no special token.*<\\|system\\|>.*chat"):
        encode_examples(tok, get_template("chat"), [conv], 50)
    encode_examples(tok, get_template("alpaca"), [conv], 50)  # alpaca needs only <|endoftext|>


def test_generate_prompts_follow_the_stored_template(small_tokenizer):
    tok = small_tokenizer
    prompts, stops = task_prompts({"kind": "sft", "template": "chat"}, tok, ["Hi"])
    assert prompts == ["<|user|>\nHi<|end|>\n<|assistant|>\n"] and tok.special_tokens["<|end|>"] in stops
    assert task_prompts({"kind": "pretrain"}, tok, ["Hi"]) == (["Hi"], [tok.eot_id])
    assert task_prompts({"kind": "sft", "template": "chat"}, tok, ["Hi"], raw=True)[0] == ["Hi"]
    with pytest.raises(UserError, match="classifier"):
        task_prompts({"kind": "classify"}, tok, ["Hi"])


# --- the commands, end to end (tiny base, a few steps) -----------------------------------------

SMALL = ["train.batch_size=4", "train.warmup_steps=1", "train.eval_every=3", "train.checkpoint_every=3",
         "train.log_every=100", "train.precision=fp32", "train.eval_batches=1", "train.sample_tokens=4"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_dataset):
    from scratchlm.config import load_config
    from scratchlm.train.trainer import pretrain
    out = tmp_path_factory.mktemp("base")
    cfg = load_config("tiny", ["model.context_length=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                               "model.d_ff=64", "train.max_steps=3", f"run.out_dir={out}", "run.name=base", *SMALL])
    pretrain(cfg, tiny_dataset, quiet=True, log=lambda *_: None)
    return out / "base"


def sets(*items):
    return [x for s in (*SMALL, *items) for x in ("--set", s)]


def test_finetune_classify_lora_classify_and_eval_commands(tmp_path, base_run, shared):
    data = tmp_path / "sms.tsv"
    data.write_text("\n".join((shared / "sms_spam_part1.tsv").read_text().splitlines()[:120]) + "\n")
    run = tmp_path / "spam"
    r = cli("finetune", "classify", "--ckpt", str(base_run), "--data", str(data), "--out", str(run),
            *sets("train.max_steps=6", "finetune.trainable=lora", "finetune.balanced=true", "lora.rank=2"))
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout.splitlines()[-1]
    assert "LoRA rank 2, alpha 16 (update scaled by alpha/rank = 8" in r.stdout
    report = json.loads((run / "finetune.json").read_text())
    assert report["test"]["n"] == 24 and set(report["test"]["per_class"]) == {"ham", "spam"}
    weights = run / "checkpoints" / "step_000006" / "model.safetensors"
    base_weights = next((base_run / "checkpoints").glob("step_*/model.safetensors"))
    assert weights.stat().st_size < base_weights.stat().st_size / 10  # adapters + head only
    out = cli("classify", "--ckpt", str(run), "--json", "Free prize! Call now", "see you later")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    assert [r["label"] in ("ham", "spam") for r in rows] == [True, True]
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1, abs=1e-3)
    ev = cli("eval", "classify", "--ckpt", str(run), "--data", str(data))
    assert ev.returncode == 0 and ev.stdout.startswith("classify: accuracy"), ev.stderr
    assert json.loads((run / "eval_classify.json").read_text())["n"] == 120
    (tmp_path / "odd.tsv").write_text("maybe\tsomething\n")
    bad = cli("eval", "classify", "--ckpt", str(run), "--data", str(tmp_path / "odd.tsv"))
    assert bad.returncode == 2 and "odd.tsv:1: label 'maybe' is not one the classifier knows" in bad.stderr
    gen = cli("generate", "--ckpt", str(run), "--prompt", "hi")
    assert gen.returncode == 2 and "classifier" in gen.stderr


def test_finetune_sft_stores_the_template_resumes_and_generate_uses_it(tmp_path, base_run, shared):
    data = tmp_path / "instr.json"
    data.write_text(json.dumps(json.loads((shared / "instruction-data.json").read_text())[:40]))
    run = tmp_path / "sft"
    common = ["finetune", "sft", "--ckpt", str(base_run), "--data", str(data), "--out", str(run)]
    first = cli(*common, *sets("train.max_steps=3", "finetune.template=chat", "finetune.trainable=lora"))
    assert first.returncode == 0, first.stderr
    again = cli(*common, "--resume", *sets("train.max_steps=6", "finetune.template=chat", "finetune.trainable=lora"))
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr
    from scratchlm.train.checkpoint import load_for_inference
    model, tok, meta = load_for_inference(run)
    task = meta["state"]["task"]
    assert task["kind"] == "sft" and task["template"] == "chat" and task["lora"]["rank"] == 8
    assert task["base"].startswith(str(base_run))
    gen = cli("generate", "--ckpt", str(run), "--prompt", "Name a colour.", "--greedy", "--max-new-tokens", "5")
    assert gen.returncode == 0 and gen.stdout.startswith("<|user|>\nName a colour.<|end|>\n<|assistant|>\n"), gen.stderr
    # A LoRA run refuses a base whose weights are not the ones it was trained on.
    from scratchlm.finetune.base import rebuild
    with pytest.raises(UserError, match="LoRA adapters only fit their own base"):
        rebuild(meta["config"], {**task, "base_fingerprint": "0" * 16}, meta["path"])


def test_sft_resume_is_exact(tmp_path, base_run, shared):
    """Kill-and-resume stand-in: drop the last checkpoint of a finished run and resume from the one
    before; the data position (packing on) and everything else must give the same weights."""
    import shutil
    from safetensors.torch import load_file
    data = tmp_path / "instr.jsonl"
    records = json.loads((shared / "instruction-data.json").read_text())[:30]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "sft"
    args = ["finetune", "sft", "--ckpt", str(base_run), "--data", str(data), "--out", str(run),
            *sets("train.max_steps=6", "finetune.packing=true", "train.keep_last=5")]
    assert cli(*args).returncode == 0
    last = run / "checkpoints" / "step_000006"
    straight = load_file(str(last / "model.safetensors"))
    shutil.rmtree(last)
    shutil.rmtree(run / "best")
    r = cli(*args, "--resume")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    resumed = load_file(str(last / "model.safetensors"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_sft_step_is_the_same_whatever_the_micro_batches_and_ranks(tmp_path, base_run, shared):
    """One optimizer step of 4 examples as 1 micro-batch, as 2 accumulated micro-batches, and as
    2 DDP ranks x 2 micro-batches: the loss is averaged over the step's response tokens, so all
    three give the same weights (a per-micro-batch mean would weigh short answers more)."""
    import os
    import socket
    from safetensors.torch import load_file
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = tmp_path / "instr.json"
    data.write_text(json.dumps(json.loads((shared / "instruction-data.json").read_text())[:40]))

    def args(name, *extra):
        return ["finetune", "sft", "--ckpt", str(base_run), "--data", str(data), "--out", str(tmp_path / name),
                *sets("train.max_steps=3", "train.lr=3e-3", "train.eval_every=0", "train.keep_best=false", *extra)]
    assert cli(*args("one")).returncode == 0
    assert cli(*args("accum", "train.grad_accum=2")).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={port}", "-m", "scratchlm", *args("ddp", "train.grad_accum=2")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    w = {n: load_file(str(tmp_path / n / "checkpoints" / "step_000003" / "model.safetensors"))
         for n in ("one", "accum", "ddp")}
    for other in ("accum", "ddp"):
        for k in w["one"]:
            torch.testing.assert_close(w["one"][k], w[other][k], atol=2e-5, rtol=1e-4)
