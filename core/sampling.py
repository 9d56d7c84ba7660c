"""Which examples form each training batch: a length-grouped, resumable sampler.

Task adapters tokenize examples once without padding and pad each batch only to its own longest
example (core.adapters). With group_by_length, batches are drawn from random "mega-batches" sorted by length (as in
transformers' LengthGroupedSampler), so examples of similar length share a batch and padding, the
main waste on CPU, nearly vanishes, while batch order stays random. An epoch's batches depend only
on (seed, epoch), so a position (epoch, batch index) is enough to resume mid-epoch; `batch_rng`
derives each batch's augmentation randomness from the same position.
"""

from __future__ import annotations

import random

import numpy as np
import torch

MEGABATCH_FACTOR = 50  # transformers' LengthGroupedSampler default


class BatchSampler:
    """The batches (lists of example indices) of each epoch, reproducible from (seed, epoch).

    Args:
        lengths: token count of each example.
        batch_size: examples per batch (the last batch of an epoch may be smaller).
        seed: the job's seed; epoch e shuffles with seed + e.
        group_by_length: group similar lengths into batches; else a plain seeded shuffle.
    """

    def __init__(self, lengths: list[int], *, batch_size: int, seed: int, group_by_length: bool):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch`, in the order they are trained."""
        rng = random.Random(self.seed + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if not self.group_by_length:
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        mega = self.batch_size * MEGABATCH_FACTOR
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: self.lengths[i], reverse=True)
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        rng.shuffle(batches)
        # The longest batch goes first so that a configuration too large for memory fails at once.
        longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
        return batches

    def batches_from(self, epoch: int, batch_index: int) -> list[list[int]]:
        """The batches of `epoch` still to train after `batch_index` of them (resume)."""
        return self.batches(epoch)[batch_index:]


def batch_rng(seed: int, epoch: int, batch: int) -> np.random.Generator:
    """The random source of one training batch's augmentation: a function of its position only,
    so that a resumed run draws exactly what an uninterrupted one would."""
    return np.random.default_rng([seed, epoch, batch])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices
