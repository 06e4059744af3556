import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scratchlm.errors import UserError
from scratchlm.eval.multiple_choice import encode_pair, loglikelihoods, score_items
from scratchlm.eval.perplexity import evaluate_tokens, token_byte_lengths
from scratchlm.eval.tasks import LoadOptions, MCItem, load_arc, load_hellaswag, load_mmlu, load_task
from scratchlm.model import GPT, ModelConfig


@pytest.fixture(scope="module")
def model(small_tokenizer):
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=small_tokenizer.vocab_size, context_length=64, d_model=32, n_layers=2,
                           n_heads=2, d_ff=64)).eval()


def test_loaders_on_the_standard_files(shared):
    mmlu = load_mmlu(shared / "mmlu" / "test" / "astronomy_test.csv", shots=5)
    assert len(mmlu) == 152 and mmlu[0].choices == ["A", "B", "C", "D"]
    assert mmlu[0].context.startswith("The following are multiple choice questions (with answers) about astronomy.")
    assert mmlu[0].context.count("Answer:") == 6 and mmlu[0].context.endswith("Answer:")
    hs = load_hellaswag(shared / "hellaswag_val_part1.txt")
    assert len(hs) == 5021 and hs[0].gold == 3 and len(hs[0].choices) == 4
    assert hs[0].context.startswith("Roof shingle removal: A man is sitting on a roof.")
    arc = load_arc(shared / "arc" / "arc_easy_validation.jsonl")
    assert len(arc) == 570 and arc[0].context.startswith("Question: ") and arc[0].context.endswith("\nAnswer:")


def test_headerless_mmlu_and_bad_rows(tmp_path):
    p = tmp_path / "x_test.csv"
    p.write_text('What is 2+2?,3,4,5,6,B\n"Bad row",1,2\nQ?,a,b,c,d,Z\n')
    with pytest.raises(UserError, match=r"x_test.csv:2: expected 6 columns"):
        load_mmlu(p)
    items = load_mmlu(p, opts=LoadOptions("skip"))
    assert len(items) == 1 and items[0].gold == 1 and items[0].subject == "x"
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        load_task("arc", tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, '
                                        '"answerKey": "C"}\n')
    with pytest.raises(UserError, match="answerKey 'C' is not among"):
        load_arc(tmp_path / "bad.jsonl")


def test_encode_pair_follows_lm_eval(small_tokenizer):
    ctx, cont = encode_pair(small_tokenizer, "Question: the cat \nAnswer: ", "sat")
    whole = small_tokenizer.encode_ordinary("Question: the cat \nAnswer: sat")
    assert ctx + cont == whole
    assert small_tokenizer.decode(cont).startswith(" ")  # trailing space moved to the continuation
    ctx, _ = encode_pair(small_tokenizer, "", "hello")
    assert ctx == [small_tokenizer.eot_id]


def test_loglikelihood_equals_manual_sum(model, small_tokenizer):
    ctx, cont = encode_pair(small_tokenizer, "To be or not to be,", " that is the question")
    (ll, _), = loglikelihoods(model, [(ctx, cont)])
    ids = torch.tensor([ctx + cont])
    logp = F.log_softmax(model(ids[:, :-1])[0], dim=-1)[0]
    manual = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert ll == pytest.approx(manual, abs=1e-4)
    # batching (padding, ordering) must not change scores
    many = [encode_pair(small_tokenizer, f"context {i} " * (i + 1), f" choice {i}") for i in range(7)]
    batched = loglikelihoods(model, many, batch_size=3)
    single = [loglikelihoods(model, [r], batch_size=1)[0] for r in many]
    assert [b[0] for b in batched] == pytest.approx([s[0] for s in single], abs=1e-4)


def test_acc_norm_divides_by_characters(model, small_tokenizer):
    item = MCItem("The sky is", ["blue", "a very long and winding answer"], 0)
    res, details = score_items(model, small_tokenizer, [item])
    lls = details[0]["loglikelihoods"]
    assert details[0]["pred"] == int(np.argmax(lls))
    assert details[0]["pred_norm"] == int(np.argmax([lls[0] / 4, lls[1] / 30]))
    assert res.random_baseline == 0.5


def test_perplexity_sliding_window_scores_every_token_once(model, small_tokenizer, shared):
    tokens = np.asarray(small_tokenizer.encode_ordinary((shared / "the-verdict.txt").read_text()[:3000]))
    tb = token_byte_lengths(small_tokenizer)
    a = evaluate_tokens(model, tokens, tb)               # stride = context
    b = evaluate_tokens(model, tokens, tb, stride=16)    # more context per token: different loss
    assert a.tokens == b.tokens == len(tokens) - 1
    assert a.bytes == sum(len(small_tokenizer.vocab[t]) for t in tokens[1:])
    assert a.perplexity == pytest.approx(math.exp(a.loss))
    assert a.bits_per_byte == pytest.approx(a.loss * a.tokens / math.log(2) / a.bytes, rel=1e-6)
    assert a.loss != b.loss


# Five real records of rowanz/hellaswag data/hellaswag_val.jsonl (inds 24, 106, 116, 149, 180: the
# 1st, 3rd, 5th, 7th and 9th validation items, so the first five of hellaswag_val_part1.txt).
REAL_HELLASWAG = [
    ("Roof shingle removal", "A man is sitting on a roof.", "he"),
    ("Canoeing", "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the "
     "water, with other individuals visible in the background.", "the child and a different man"),
    ("High jump", "The boy lifts his body above the height of a pole. The boy lands on his back on to a red mat.",
     "the boy"),
    ("Playing harmonica", "A man is standing in front of a camera. He starts playing a harmonica for the camera.", "he"),
    ("Sharpening knives", "A man is holding a pocket knife while sitting on some rocks in the wilderness.", "then he"),
]


def test_hellaswag_text_form_gives_lm_evals_query_of_the_real_records(shared):
    import importlib.util
    from pathlib import Path

    import datasets
    import lm_eval
    spec = importlib.util.spec_from_file_location(
        "hs_utils", Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    real = datasets.Dataset.from_list([{"activity_label": a, "ctx_a": ca, "ctx_b": cb, "endings": ["x"] * 4,
                                        "label": "0"} for a, ca, cb in REAL_HELLASWAG])
    ours = load_hellaswag(shared / "hellaswag_val_part1.txt")[:5]
    assert [d["query"] for d in utils.process_docs(real)] == [it.context for it in ours]
    assert ours[0].context == "Roof shingle removal: A man is sitting on a roof. He"


def test_mmlu_csv_layouts_and_subject_column(tmp_path):
    hf = tmp_path / "export.csv"  # a CSV export of the HF cais/mmlu dataset: one `choices` list column
    hf.write_text('question,subject,choices,answer\n'
                  '"What is 2+2?",elementary_mathematics,"[\'3\', \'4\', \'5\', \'6\']",1\n'
                  '"Capital of France?",geography,"[\'Paris\', \'Rome\', \'Bonn\', \'Oslo\']",0\n')
    items = load_mmlu(hf)
    assert [it.gold for it in items] == [1, 0] and [it.subject for it in items] == ["elementary_mathematics", "geography"]
    assert "A. 3\nB. 4\nC. 5\nD. 6\nAnswer:" in items[0].context
    assert items[1].context.startswith("The following are multiple choice questions (with answers) about geography.")
    letters = tmp_path / "letters_test.csv"
    letters.write_text("question,A,B,C,D,answer\nQ?,w,x,y,z,C\n")
    (it,) = load_mmlu(letters)
    assert it.gold == 2 and "C. y" in it.context and it.subject == "letters"
    odd = tmp_path / "odd.csv"
    odd.write_text("question,opt1,opt2,answer\nQ?,a,b,0\n")
    with pytest.raises(UserError, match="unrecognised MMLU layout"):
        load_mmlu(odd)


def test_eval_perplexity_refuses_a_dataset_of_another_tokenizer(tmp_path, tiny_dataset, shared, capsys):
    from scratchlm.cli import main
    from scratchlm.config import DataConfig, TokenizerConfig, load_config
    from scratchlm.data.prepare import prepare
    from scratchlm.train.trainer import pretrain
    prepare(DataConfig(corpus=str(shared / "the-verdict.txt")), TokenizerConfig(vocab_size=300), tmp_path / "other",
            log=lambda *_: None)
    cfg = load_config("tiny", ["model.context_length=32", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                               "model.d_ff=64", "train.batch_size=4", "train.max_steps=2", "train.eval_every=0",
                               f"run.out_dir={tmp_path}", "run.name=m"])
    pretrain(cfg, tiny_dataset, log=lambda *_: None, quiet=True)
    assert main(["eval", "perplexity", "--ckpt", str(tmp_path / "m"), "--data", str(tmp_path / "other")]) == 2
    assert "tokenized by another tokenizer" in capsys.readouterr().err
    assert main(["eval", "perplexity", "--ckpt", str(tmp_path / "m"), "--data", str(tiny_dataset)]) == 0


def test_eval_file_is_recognised_from_its_head_without_reading_it_whole(tmp_path, shared, monkeypatch):
    """load_task_items sniffs a JSONL file's first 4,000 characters; an unrecognised (possibly
    huge) file is refused without being read whole, and a real ARC file still loads."""
    import pathlib
    from scratchlm.eval.tasks import load_task_items
    (tmp_path / "other.jsonl").write_text('{"prompt": "x", "completion": "y"}\n' * 2000)

    def whole(self, *a, **k):
        raise AssertionError(f"read {self} whole")
    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "read_text", whole)
        with pytest.raises(UserError, match="not a recognised eval file"):
            load_task_items(tmp_path / "other.jsonl")
    assert len(load_task_items(shared / "arc" / "arc_easy_validation.jsonl")) == 570
