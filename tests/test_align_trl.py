"""Parity with a peer: our per-pair DPO loss and rewards equal TRL's on the same tiny model and pairs.

TRL (1.x) computes DPO inside `DPOTrainer._compute_loss`: it runs the policy and the reference on
its collated batch, sums the completion tokens' log-probs, and applies the loss. We build a real
DPOTrainer around a tiny random Llama and call that method one pair at a time (its loss is a
batch mean, so one pair gives the per-pair value), then score the very same token ids — TRL's
tokenization, read back from its prepared dataset — with our code and the same two models.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from scratchlm.align.data import EncodedPair
from scratchlm.align.dpo import collate, dpo_loss, pair_logps

WORDS = "<pad> <eos> the a cat dog sat ran on mat fast slow yes no why how good bad".split()
PAIRS = [
    {"prompt": "the cat sat", "chosen": " on the mat", "rejected": " fast"},
    {"prompt": "why", "chosen": " yes good", "rejected": " no bad bad"},
    {"prompt": "how a dog ran", "chosen": " fast on a mat", "rejected": " slow slow"},
]


class _Logits(nn.Module):
    """A Hugging Face causal LM seen through our model interface: ids -> (logits, None)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, idx):
        return self.hf(input_ids=idx).logits, None


def _trainer(tmp_path, loss_type: str, beta: float, label_smoothing: float = 0.0):
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    policy, ref = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)  # two different random models
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=[loss_type], label_smoothing=label_smoothing,
                     per_device_train_batch_size=1, report_to=[], use_cpu=True, max_length=None)
    return DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(PAIRS),
                      processing_class=tok)


def _trl_per_pair(tr) -> list[dict]:
    out = []
    for i in range(len(PAIRS)):
        ex = tr.train_dataset[i]
        tr._metrics["train"].clear()
        with torch.no_grad():
            loss = tr._compute_loss(tr.model, tr.data_collator([ex]), return_outputs=False)
        m = tr._metrics["train"]
        out.append({"ids": EncodedPair(ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]), "loss": loss.item(),
                    "chosen": m["rewards/chosen"][-1], "rejected": m["rewards/rejected"][-1]})
    return out


def _ours(tr, pairs: list[EncodedPair], beta: float, label_smoothing: float = 0.0, length_normalize: bool = False):
    policy, ref = _Logits(tr.model).eval(), _Logits(tr.ref_model).eval()
    batch = collate(pairs, pad_id=0)  # all pairs in one padded batch (TRL saw them one at a time)
    with torch.no_grad():
        c, r = pair_logps(policy, batch, length_normalize)
        rc, rr = pair_logps(ref, batch, length_normalize)
    return dpo_loss(c, r, rc, rr, beta, label_smoothing)


def test_dpo_loss_and_rewards_match_trl(tmp_path):
    import trl
    assert int(trl.__version__.split(".")[0]) >= 1
    tr = _trainer(tmp_path, "sigmoid", beta=0.3)
    theirs = _trl_per_pair(tr)
    assert theirs[0]["ids"].chosen_ids[-1] == 1  # TRL appended <eos>, as our builder appends the end token
    ours = _ours(tr, [t["ids"] for t in theirs], beta=0.3)
    for i, t in enumerate(theirs):
        assert ours.losses[i].item() == pytest.approx(t["loss"], abs=1e-5)
        assert ours.chosen_rewards[i].item() == pytest.approx(t["chosen"], abs=1e-5)
        assert ours.rejected_rewards[i].item() == pytest.approx(t["rejected"], abs=1e-5)
    assert len({round(t["loss"], 4) for t in theirs}) == 3 and any(abs(t["chosen"]) > 1e-3 for t in theirs)


def test_label_smoothing_and_length_normalisation_match_trl(tmp_path):
    # Conservative DPO: TRL 1.x's "aot" loss is -(1-eps) log s(beta m) - eps log s(-beta m) after sorting
    # the batch's margins; with one pair per batch the sort is the identity, so it is exactly cDPO.
    tr = _trainer(tmp_path / "a", "aot", beta=0.2, label_smoothing=0.25)
    theirs = _trl_per_pair(tr)
    ours = _ours(tr, [t["ids"] for t in theirs], beta=0.2, label_smoothing=0.25)
    assert ours.losses.tolist() == pytest.approx([t["loss"] for t in theirs], abs=1e-5)
    # The averaged variant: TRL's "sigmoid_norm" divides each log-ratio by the completion length.
    tr = _trainer(tmp_path / "b", "sigmoid_norm", beta=0.5)
    theirs = _trl_per_pair(tr)
    ours = _ours(tr, [t["ids"] for t in theirs], beta=0.5, length_normalize=True)
    assert ours.losses.tolist() == pytest.approx([t["loss"] for t in theirs], abs=1e-5)
