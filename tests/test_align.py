"""DPO: the loss against the paper's formula, sequence log-probs by hand, pair formats, bad input."""

from __future__ import annotations

import copy
import gzip
import json
import math

import pytest
import torch
import torch.nn as nn

from scratchlm.align.data import (EncodedPair, PreferencePair, encode_pairs, load_pairs, split_pairs,
                                  split_transcript)
from scratchlm.align.dpo import (DPOObjective, PairLoader, collate, dpo_loss, evaluate_pairs, precompute_reference,
                                 sequence_logps, wilson_interval)
from scratchlm.errors import UserError
from scratchlm.finetune.templates import encode_prompt_response, get_template
from scratchlm.model import GPT, ModelConfig


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- the loss --------------------------------------------------------------------------------------

@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_loss_and_gradient_equal_the_formula(ls):
    beta = 0.5
    pc = torch.tensor([-2.0, -7.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-3.0, -4.0], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-2.5, -6.0], dtype=torch.float64)
    rr = torch.tensor([-2.5, -5.0], dtype=torch.float64)
    t = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=ls)
    t.losses.sum().backward()
    for i in range(2):
        m = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())   # 1.0, then -1.0
        want = -(1 - ls) * math.log(_sigmoid(beta * m)) - ls * math.log(_sigmoid(-beta * m))
        assert t.losses[i].item() == pytest.approx(want, abs=1e-12)
        # d/d(pc) of -(1-ls) log s(bm) - ls log s(-bm) = -beta[(1-ls)(1 - s(bm)) - ls s(-bm)]
        dpc = -beta * ((1 - ls) * (1 - _sigmoid(beta * m)) - ls * (1 - _sigmoid(-beta * m)))
        assert pc.grad[i].item() == pytest.approx(dpc, abs=1e-12)
        assert pr.grad[i].item() == pytest.approx(-dpc, abs=1e-12)   # the rejected log-prob gets the opposite push
        assert t.chosen_rewards[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()))
        assert t.rejected_rewards[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()))
    assert t.losses[0].item() == pytest.approx(-(1 - ls) * math.log(_sigmoid(0.5)) - ls * math.log(_sigmoid(-0.5)))
    assert t.correct.tolist() == [1.0, 0.0]  # second pair: margin -1 · beta < 0


class Bigram(nn.Module):
    """logits at position t = table[token t]: log-probs are easy to compute by hand."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, idx):
        return self.table[idx], None


def test_sequence_logps_sum_only_response_tokens_by_hand():
    torch.manual_seed(0)
    m = Bigram(7)
    pairs = [EncodedPair([1, 2, 3], [4, 5], [6]), EncodedPair([2], [3, 3, 1], [5, 4])]
    batch = collate(pairs, pad_id=0)
    assert batch["input_ids"].shape == (4, 5)
    lp = torch.log_softmax(m.table.detach(), -1)

    def by_hand(prompt, resp):
        seq = prompt + resp
        return sum(lp[seq[i - 1], seq[i]].item() for i in range(len(prompt), len(seq)))

    got = sequence_logps(m, batch["input_ids"], batch["response_mask"]).detach()
    want = [by_hand(p.prompt_ids, p.chosen_ids) for p in pairs] + [by_hand(p.prompt_ids, p.rejected_ids) for p in pairs]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    avg = sequence_logps(m, batch["input_ids"], batch["response_mask"], length_normalize=True).detach()
    lens = [2, 3, 1, 2]
    assert avg.tolist() == pytest.approx([w / n for w, n in zip(want, lens)], abs=1e-5)


def _tiny_gpt(vocab=300, ctx=64, seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=vocab, context_length=ctx, d_model=32, n_layers=2, n_heads=4, d_ff=64))


def _random_pairs(n, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
    return [EncodedPair(r(2, 12), r(1, 9), r(1, 9)) for _ in range(n)]


def test_step_zero_policy_equals_reference_loss_is_ln2_margin_zero():
    model = _tiny_gpt()
    pairs = _random_pairs(6)
    obj = DPOObjective(_FakeTok(), get_template("alpaca"), pairs, pairs[:2], beta=0.1, reference=copy.deepcopy(model))
    obj.setup(rank=0, world_size=1, micro_batch=6, seed=1)
    loss, metrics = obj.loss(model, obj.next_batch())
    assert loss.item() == pytest.approx(6 * math.log(2), abs=1e-6)
    assert metrics["reward_margin"] == 0.0 and metrics["reward_chosen"] == 0.0 and metrics["accuracy"] == 0.0
    # and each pair's loss is ln 2 exactly (in float32)
    c, r = sequence_logps(model, *collate(pairs, 0).values()).chunk(2)
    t = dpo_loss(c, r, c.detach(), r.detach())
    assert torch.equal(t.losses, torch.full_like(t.losses, math.log(2)))
    assert torch.equal(t.margins, torch.zeros_like(t.margins))


def test_precomputed_reference_equals_live_reference_and_padding_does_not_matter():
    model = _tiny_gpt()
    pairs = _random_pairs(5)
    alone = [sequence_logps(model, *collate([p], 0).values()).detach() for p in pairs]
    precompute_reference(model, pairs, pad_id=0, batch_size=5)  # padded together with longer pairs
    for p, (c, r) in zip(pairs, [a.tolist() for a in alone]):
        assert p.ref_chosen == pytest.approx(c, abs=1e-4) and p.ref_rejected == pytest.approx(r, abs=1e-4)
    live = evaluate_pairs(model, pairs, 0, reference=model)
    stored = evaluate_pairs(model, pairs, 0)
    assert live.margin == 0.0 and stored.margin == pytest.approx(0.0, abs=1e-4)
    assert stored.loss == pytest.approx(math.log(2), abs=1e-4)


def test_a_few_steps_of_dpo_raise_held_in_preference_accuracy():
    model = _tiny_gpt()
    pairs = _random_pairs(8)
    precompute_reference(model, pairs, pad_id=0)
    obj = DPOObjective(_FakeTok(), get_template("alpaca"), pairs, pairs, beta=0.5)
    obj.setup(0, 1, 8, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = obj.evaluate(model)
    for _ in range(15):
        loss, _ = obj.loss(model, obj.next_batch())
        (loss / 8).backward()
        opt.step()
        opt.zero_grad()
    after = obj.evaluate(model)
    assert before["val_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert after["val_loss"] < 0.5 and after["val_accuracy"] == 1.0 and after["val_margin"] > 0.3


def test_pair_loader_resumes_exactly_and_shards_ranks():
    pairs = list(range(10))
    a = PairLoader(pairs, 3, seed=4)
    seen = [a.next_batch() for _ in range(3)]
    b = PairLoader(pairs, 3, seed=4)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [a.next_batch() for _ in range(5)] == [b.next_batch() for _ in range(5)]
    first_epoch = [x for batch in seen for x in batch]
    assert len(set(first_epoch)) == 9  # no pair twice within an epoch
    r0 = PairLoader(pairs, 5, seed=4, rank=0, world_size=2).next_batch()
    r1 = PairLoader(pairs, 5, seed=4, rank=1, world_size=2).next_batch()
    assert sorted(r0 + r1) == pairs


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


class _FakeTok:
    special_tokens = {"<|endoftext|>": 1, "<|pad|>": 0}
    eot_id = 1


# --- formats -----------------------------------------------------------------------------------------

def test_hh_prompt_is_the_shared_prefix_up_to_the_last_assistant_turn():
    prefix = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke"
    # Both responses start with the same words: the shared prefix runs into the response.
    p = split_transcript(prefix + "\n\nAssistant: I think this one is funny: a pun.",
                         prefix + "\n\nAssistant: I think not.", "t")
    assert p.prompt == [{"role": "user", "content": "Hi there"},
                        {"role": "assistant", "content": "Hello! How can I help?"},
                        {"role": "user", "content": "Tell me a joke"}]
    assert p.chosen == "I think this one is funny: a pun." and p.rejected == "I think not."
    single = split_transcript("\n\nHuman: Why?\n\nAssistant: Because.", "\n\nHuman: Why?\n\nAssistant: No.", "t")
    assert single.prompt == [{"role": "user", "content": "Why?"}] and single.chosen == "Because."
    with pytest.raises(UserError, match="no '\\\\n\\\\nAssistant:' turn"):
        split_transcript("\n\nHuman: a", "\n\nHuman: b", "t")
    with pytest.raises(UserError, match="differ before their last assistant turn"):
        split_transcript(prefix + "\n\nAssistant: x\n\nHuman: more\n\nAssistant: y", prefix + "\n\nAssistant: z", "t")


def test_real_hh_rlhf_multi_turn_prompts_round_trip(shared):
    pairs, skipped = load_pairs(shared / "hh_rlhf_helpful_base_test.jsonl.gz", on_bad_record="skip")
    assert len(pairs) + len(skipped) == 2354 and len(skipped) < 30
    raw = [json.loads(line) for line in gzip.open(shared / "hh_rlhf_helpful_base_test.jsonl.gz", "rt")]
    by_where = {f"hh_rlhf_helpful_base_test.jsonl.gz line {i + 1}": r for i, r in enumerate(raw)}
    multi = [p for p in pairs if len(p.prompt) >= 5]
    assert len(multi) > 500
    for p in multi[:50]:
        # Rebuild the transcript from the parsed prompt: it must be the start of both originals.
        text = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in p.prompt)
        rec = by_where[p.where]
        for side, resp in (("chosen", p.chosen), ("rejected", p.rejected)):
            flat = " ".join(rec[side].split())
            assert flat.startswith(" ".join((text + "\n\nAssistant: " + resp).split()))


def test_book_preference_json_and_jsonl_formats(shared, tmp_path):
    pairs, skipped = load_pairs(shared / "instruction-data-with-preference.json", on_bad_record="skip")
    assert len(pairs) + len(skipped) == 1100 and all("identical" in s for s in skipped)
    first = json.loads((shared / "instruction-data-with-preference.json").read_text())[0]
    assert pairs[0].prompt[0]["content"] == first["instruction"] and pairs[0].prompt[0]["input"] == first["input"]
    assert pairs[0].chosen == first["chosen"].strip()
    with pytest.raises(UserError, match="record 123: chosen and rejected are identical.*--on-bad-record skip"):
        load_pairs(shared / "instruction-data-with-preference.json")
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}) + "\n\n" + json.dumps(
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
         "chosen": "Hello", "rejected": "Go away"}) + "\n")
    p, _ = load_pairs(f)
    assert p[0].prompt == [{"role": "user", "content": "Say hi"}] and p[1].prompt[0]["role"] == "system"
    assert p[1].where == "p.jsonl line 3"


@pytest.mark.parametrize("record,match", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "line 1: chosen and rejected are identical"),
    ({"prompt": "q", "chosen": "  ", "rejected": "x"}, "line 1: the chosen response is empty"),
    ({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: ho"}, "line 1: the transcripts share no"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "x",
      "rejected": "y"}, "must end with a user turn"),
    ({"prompt": "q", "chosen": "x"}, "missing 'rejected'"),
])
def test_bad_pairs_one_line_or_counted_skip(tmp_path, record, match):
    f = tmp_path / "bad.jsonl"
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    f.write_text(json.dumps(record) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(UserError, match=match) as e:
        load_pairs(f)
    assert "\n" not in str(e.value)
    pairs, skipped = load_pairs(f, on_bad_record="skip")
    assert len(pairs) == 1 and len(skipped) == 1


def test_encoding_shares_prompt_ids_and_refuses_prompts_longer_than_the_context(small_tokenizer):
    tok = small_tokenizer
    chat = get_template("chat")
    pair = PreferencePair([{"role": "user", "content": "Name a colour. "}], "Blue", "Bluish green", "x line 1")
    enc = encode_pairs([pair], tok, chat, context_length=64)[0]
    want_prompt, want_chosen = encode_prompt_response(tok, chat, pair.prompt, pair.chosen)
    assert enc.prompt_ids == want_prompt and enc.chosen_ids == want_chosen
    assert enc.chosen_ids[-1] == enc.rejected_ids[-1] == tok.special_tokens["<|end|>"]
    # prompt ids are a prefix of both full sequences exactly
    batch = collate([enc], tok.special_tokens["<|pad|>"])
    n = len(enc.prompt_ids)
    assert torch.equal(batch["input_ids"][0, :n], batch["input_ids"][1, :n])
    assert batch["response_mask"][0].sum() == len(enc.chosen_ids)
    long = PreferencePair([{"role": "user", "content": "word " * 200}], "a", "b", "x line 2")
    with pytest.raises(UserError, match="x line 2: the prompt is .* tokens, which leaves no room"):
        encode_pairs([long], tok, chat, context_length=64)
    skipped = []
    assert len(encode_pairs([pair, long], tok, chat, 64, on_bad_record="skip", skipped=skipped)) == 1
    assert len(skipped) == 1
    # the alpaca template renders a multi-turn HH prompt? no: one line, not a traceback
    multi = PreferencePair([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                            {"role": "user", "content": "c"}], "d", "e", "x line 3")
    with pytest.raises(UserError, match="x line 3: the alpaca template takes one user turn"):
        encode_pairs([multi], tok, get_template("alpaca"), 64)


def test_split_is_seeded_and_disjoint():
    items = list(range(100))
    tr, va = split_pairs(items, 0.1, seed=3)
    assert len(va) == 10 and not set(tr) & set(va) and sorted(tr + va) == items
    assert split_pairs(items, 0.1, seed=3) == (tr, va) and split_pairs(items, 0.1, seed=4)[1] != va
