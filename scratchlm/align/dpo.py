"""Direct Preference Optimization (Rafailov et al., 2023), written out to be read.

RLHF fits a reward model to human preferences, then maximises that reward with a KL leash to the
starting model. DPO notices that the best policy under that leash is known in closed form,
pi*(y|x) ∝ pi_ref(y|x) · exp(r(x, y) / beta), so the reward can be read back from the policy:

    r(x, y) = beta · log( pi(y|x) / pi_ref(y|x) )          (+ a term that depends only on x)

Put that into the Bradley-Terry model of "chosen y_w is preferred to rejected y_l",
P = sigmoid(r(x, y_w) - r(x, y_l)), and maximise the likelihood of the observed preferences:

    loss = -log sigmoid( beta · [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

The x-only term cancels in the difference, so no reward model is ever trained. log pi(y|x) is the
*sum* of the response tokens' log-probabilities (as in the paper and TRL); `length_normalize`
averages them instead (the variant in the LLMs-from-scratch notebook). At the first step the
policy *is* the reference: both log-ratios are 0, the loss is -log sigmoid(0) = ln 2.

Conservative DPO (label smoothing eps) assumes a share eps of the labels are flipped:
    loss = -(1 - eps) · log sigmoid(beta·m) - eps · log sigmoid(-beta·m)

The reference's log-probs never change, so they can be computed once before training and kept
with the pairs (`precompute_reference`): then no reference model sits in memory.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchlm.align.data import EncodedPair
from scratchlm.train.objective import Objective


# --- the loss ----------------------------------------------------------------------------------------

@dataclass
class DPOTerms:
    """Per-pair tensors (shape (B,))."""
    losses: torch.Tensor
    chosen_rewards: torch.Tensor     # beta · log pi/pi_ref of the chosen response
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def correct(self) -> torch.Tensor:
        """1 where the implicit reward prefers the chosen response (a tie is not a preference)."""
        return (self.chosen_rewards > self.rejected_rewards).float()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0) -> DPOTerms:
    """The DPO loss of each pair from the sequence log-probs of its two responses (all shape (B,))."""
    chosen_logratio = policy_chosen - ref_chosen          # how much more likely the policy makes y_w
    rejected_logratio = policy_rejected - ref_rejected    # ... and y_l, relative to the reference
    logits = beta * (chosen_logratio - rejected_logratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    # Rewards are reported, not trained on directly: detach them from the graph.
    return DPOTerms(losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach())


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, response_mask: torch.Tensor,
                   length_normalize: bool = False) -> torch.Tensor:
    """log pi(response | prompt) for each row: the sum (or mean) over response tokens of log p(token | all
    before it). Rows are right-padded; under causal attention the padding after a sequence cannot
    change the logits of its real tokens, so no attention mask is needed."""
    logits, _ = model(input_ids)
    # logits at position t predict token t+1: drop the last logit and the first token.
    targets = input_ids[:, 1:]
    token_logps = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    mask = response_mask[:, 1:].float()
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if length_normalize else total


# --- batches -----------------------------------------------------------------------------------------

def collate(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one right-padded (2B, T) batch: rows 0..B-1 are prompt+chosen, B..2B-1 prompt+rejected,
    so policy and reference each take one forward pass per batch."""
    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    resp = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (r, n) in enumerate(zip(rows, resp)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, len(r) - n:len(r)] = True  # padding is masked by position, never by id
    batch = {"input_ids": ids, "response_mask": mask}
    if pairs and pairs[0].ref_chosen is not None:
        batch["ref_chosen"] = torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float64)
        batch["ref_rejected"] = torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float64)
    return batch


def pair_logps(model: nn.Module, batch: dict, length_normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs of a collated batch."""
    logps = sequence_logps(model, batch["input_ids"], batch["response_mask"], length_normalize)
    return logps.chunk(2)


@torch.no_grad()
def precompute_reference(reference: nn.Module, pairs: list[EncodedPair], pad_id: int, batch_size: int = 16,
                         length_normalize: bool = False) -> None:
    """Store the reference's log-probs in each pair (in float64: they are subtracted from the policy's,
    and a rounding error here would be a bias at every step)."""
    was_training = reference.training
    reference.eval()
    device = next(reference.parameters()).device
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = collate(chunk, pad_id)
        c, r = pair_logps(reference, {k: v.to(device) for k, v in batch.items()}, length_normalize)
        for p, lc, lr in zip(chunk, c.tolist(), r.tolist()):
            p.ref_chosen, p.ref_rejected = lc, lr
    reference.train(was_training)


# --- evaluation --------------------------------------------------------------------------------------

def wilson_interval(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a proportion k/n (Wilson score: stays inside [0, 1], fine at 0% and 100%)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(centre - half, 0.0), min(centre + half, 1.0)


@dataclass
class PreferenceResult:
    n: int
    correct: int          # chosen reward > rejected reward
    ties: int
    loss: float           # mean DPO loss
    margin: float         # mean reward margin (beta · nats)
    reward_chosen: float
    reward_rejected: float

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.n, 1)

    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    def to_dict(self) -> dict:
        lo, hi = self.ci95()
        return {"n": self.n, "accuracy": self.accuracy, "accuracy_ci95": [lo, hi], "ties": self.ties,
                "margin": self.margin, "loss": self.loss, "reward_chosen": self.reward_chosen,
                "reward_rejected": self.reward_rejected}


@torch.no_grad()
def evaluate_pairs(model: nn.Module, pairs: list[EncodedPair], pad_id: int, beta: float = 0.1,
                   label_smoothing: float = 0.0, length_normalize: bool = False, batch_size: int = 16,
                   reference: nn.Module | None = None, autocast=None) -> PreferenceResult:
    """Implicit-reward preference accuracy, margin and loss of `model` on pairs. The reference's
    log-probs come from `reference` if given, else from the pairs (precomputed); pairs without
    either are scored against no reference (log-ratio = the policy's log-prob itself)."""
    import contextlib
    amp = autocast or contextlib.nullcontext()
    device = next(model.parameters()).device
    sums = {"loss": 0.0, "margin": 0.0, "chosen": 0.0, "rejected": 0.0, "correct": 0, "ties": 0}
    for i in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate(pairs[i:i + batch_size], pad_id).items()}
        with amp:
            c, r = pair_logps(model, batch, length_normalize)
            if reference is not None:
                rc, rr = pair_logps(reference, batch, length_normalize)
            elif "ref_chosen" in batch:
                rc, rr = batch["ref_chosen"], batch["ref_rejected"]
            else:
                rc = rr = torch.zeros_like(c)
        t = dpo_loss(c.double(), r.double(), rc.double(), rr.double(), beta, label_smoothing)
        sums["loss"] += t.losses.sum().item()
        sums["margin"] += t.margins.sum().item()
        sums["chosen"] += t.chosen_rewards.sum().item()
        sums["rejected"] += t.rejected_rewards.sum().item()
        sums["correct"] += int(t.correct.sum().item())
        sums["ties"] += int((t.chosen_rewards == t.rejected_rewards).sum().item())
    n = len(pairs)
    return PreferenceResult(n, sums["correct"], sums["ties"], sums["loss"] / n, sums["margin"] / n,
                            sums["chosen"] / n, sums["rejected"] / n)


# --- the training objective --------------------------------------------------------------------------

class PairLoader:
    """Pairs in a seeded shuffled order, epoch after epoch; each rank takes every world_size-th pair.
    Its position is two integers, so a resumed run sees exactly the pairs the killed one would have."""

    def __init__(self, pairs: list[EncodedPair], batch: int, seed: int, rank: int = 0, world_size: int = 1):
        self.pairs, self.batch, self.seed = pairs, batch, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.pairs)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order[self.rank::self.world_size]

    def next_batch(self) -> list[EncodedPair]:
        out = []
        while len(out) < self.batch:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.pairs[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle()


class DPOObjective(Objective):
    """What the one training loop learns from in a DPO run (see scratchlm/train/objective.py):
    preference pairs, the DPO loss, held-out preference metrics and samples for fixed prompts.

    With precomputed reference log-probs (every pair carries ref_chosen/ref_rejected), `reference`
    is None; otherwise it is the frozen starting model, run under no_grad on each batch."""

    def __init__(self, tokenizer, template, train_pairs: list[EncodedPair], val_pairs: list[EncodedPair], *,
                 beta: float = 0.1, label_smoothing: float = 0.0, length_normalize: bool = False,
                 reference: nn.Module | None = None, reference_path: str = "", sample_prompts: list[str] = (),
                 sample_tokens: int = 48, eval_batch: int = 16):
        if reference is None and any(p.ref_chosen is None for p in train_pairs + val_pairs):
            raise ValueError("pairs without precomputed reference log-probs need a reference model")
        self.tokenizer, self.template = tokenizer, template
        self.train_pairs, self.val_pairs = train_pairs, val_pairs
        self.beta, self.label_smoothing, self.length_normalize = beta, label_smoothing, length_normalize
        self.reference, self.reference_path = reference, reference_path
        self.sample_prompts, self.sample_tokens, self.eval_batch = list(sample_prompts), sample_tokens, eval_batch
        self.pad_id = tokenizer.special_tokens.get("<|pad|>", tokenizer.eot_id)
        self.loader: PairLoader | None = None
        self._loader_state: dict | None = None

    def setup(self, rank: int, world_size: int, micro_batch: int, seed: int) -> None:
        self.loader = PairLoader(self.train_pairs, micro_batch, seed, rank, world_size)
        if self._loader_state is not None:
            self.loader.load_state_dict(self._loader_state)

    def next_batch(self) -> dict[str, torch.Tensor]:
        return collate(self.loader.next_batch(), self.pad_id)

    def count(self, batch: dict) -> int:
        return batch["input_ids"].size(0) // 2  # pairs

    def tokens(self, batch: dict) -> int:
        return batch["input_ids"].numel()

    def _reference_logps(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen" in batch:
            return batch["ref_chosen"], batch["ref_rejected"]
        device = batch["input_ids"].device
        if next(self.reference.parameters()).device != device:
            self.reference.to(device)
        with torch.no_grad():
            return pair_logps(self.reference, batch, self.length_normalize)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = pair_logps(model, batch, self.length_normalize)
        ref_chosen, ref_rejected = self._reference_logps(model, batch)
        t = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing)
        return t.losses.sum(), {"reward_chosen": t.chosen_rewards.sum().item(),
                                "reward_rejected": t.rejected_rewards.sum().item(),
                                "reward_margin": t.margins.sum().item(), "accuracy": t.correct.sum().item()}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out = {}
        # Held-out pairs, and as many training pairs (fixed ones) to see the gap between them.
        for name, pairs in (("val", self.val_pairs), ("train", self.train_pairs[:max(len(self.val_pairs), 16)])):
            if not pairs:
                continue
            r = evaluate_pairs(model, pairs, self.pad_id, self.beta, self.label_smoothing, self.length_normalize,
                               self.eval_batch, reference=None if pairs[0].ref_chosen is not None else self.reference)
            out.update({f"{name}_loss": r.loss, f"{name}_accuracy": r.accuracy, f"{name}_margin": r.margin,
                        f"{name}_reward_chosen": r.reward_chosen, f"{name}_reward_rejected": r.reward_rejected})
        return out

    def samples(self, model: nn.Module) -> dict[str, str]:
        from scratchlm.generate import SamplingConfig, generate
        if not self.sample_prompts:
            return {}
        texts = [self.template.prompt([{"role": "user", "content": p}]) for p in self.sample_prompts]
        end_id = self.tokenizer.special_tokens[self.template.end_token]
        outs = generate(model, self.tokenizer, texts, SamplingConfig(
            max_new_tokens=self.sample_tokens, temperature=0.0, stop_tokens=[end_id, self.tokenizer.eot_id]),
            truncate_prompt=True)
        return dict(zip(self.sample_prompts, outs))

    def state_dict(self) -> dict:
        return self.loader.state_dict() if self.loader else (self._loader_state or {"epoch": 0, "pos": 0})

    def load_state_dict(self, state: dict) -> None:
        self._loader_state = dict(state)
        if self.loader is not None:
            self.loader.load_state_dict(state)

    def checkpoint_meta(self) -> dict:
        return {"kind": "dpo", "template": self.template.name, "reference": self.reference_path, "beta": self.beta,
                "length_normalize": self.length_normalize, "label_smoothing": self.label_smoothing}

