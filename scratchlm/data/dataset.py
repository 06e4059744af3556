"""From a flat array of token ids to (input, target) batches.

The language-modelling target is the input shifted by one: for a window of T+1 tokens,
x = tokens[s : s+T] and y = tokens[s+1 : s+T+1], so position t learns to predict token t+1.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from scratchlm.errors import UserError


class SlidingWindowDataset(Dataset):
    """The classic dataset: item i is the window starting at i * stride.

    stride == context_length gives non-overlapping windows; a smaller stride overlaps them.
    Backed by the (memory-mapped) token array: O(1) memory whatever the corpus size.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int | None = None):
        self.tokens, self.T = tokens, context_length
        self.stride = stride or context_length
        if len(tokens) < context_length + 1:
            raise UserError(f"dataset has {len(tokens)} tokens, fewer than one context window + 1 "
                            f"({context_length + 1}); use more text or a smaller model.context_length")
        self.n = (len(tokens) - context_length - 1) // self.stride + 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        s = i * self.stride
        chunk = torch.from_numpy(np.asarray(self.tokens[s:s + self.T + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:]


class RandomWindowLoader:
    """What pretraining uses: shuffled non-overlapping windows, epoch by epoch, resumable exactly.

    Each epoch picks a random offset in [0, T) and a random permutation of the windows that start
    there, both derived from (seed, epoch) alone. The position is just (epoch, batch index), so
    `state_dict()` is two integers and resuming continues with exactly the next batch. With
    several processes, every global batch is cut into `world_size` equal slices, one per rank.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, context_length: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise UserError(f"train.batch_size={batch_size} is not divisible by the number of processes ({world_size})")
        self.tokens, self.B, self.T = tokens, batch_size, context_length
        self.seed, self.rank, self.world = seed, rank, world_size
        if len(tokens) < context_length + 1:
            raise UserError(f"dataset has {len(tokens)} tokens, fewer than one context window + 1 "
                            f"({context_length + 1}); use more text or a smaller model.context_length")
        self.epoch, self.batch_in_epoch = 0, 0
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            offset = int(rng.integers(0, self.T)) if len(self.tokens) > 2 * self.T + 1 else 0
            starts = np.arange(offset, len(self.tokens) - self.T - 1 + 1, self.T)
            self._order = starts[rng.permutation(len(starts))]
        return self._order

    @property
    def batches_per_epoch(self) -> int:
        return max(len(self._epoch_order()) // self.B, 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = self._epoch_order()
        if (self.batch_in_epoch + 1) * self.B > len(order):
            if len(order) >= self.B:  # the epoch is used up: next epoch, new offset and order
                self.epoch, self.batch_in_epoch, self._order = self.epoch + 1, 0, None
                order = self._epoch_order()
        per_rank = self.B // self.world
        lo = self.batch_in_epoch * self.B + self.rank * per_rank
        idx = np.arange(lo, lo + per_rank) % len(order)  # tiny datasets: wrap around
        starts = order[idx]
        self.batch_in_epoch += 1
        window = np.stack([np.asarray(self.tokens[s:s + self.T + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(window)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self.seed = int(state.get("seed", self.seed))
        self._order = None
