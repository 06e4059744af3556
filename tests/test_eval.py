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
