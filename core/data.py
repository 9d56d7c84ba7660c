"""From texts to padded batches: tokenization, dynamic padding and a length-grouped sampler.

Examples are tokenized once without padding; each batch is padded only to its own longest example.
With group_by_length, batches are drawn from random "mega-batches" sorted by length (as in
transformers' LengthGroupedSampler), so examples of similar length share a batch and padding, the
main waste on CPU, nearly vanishes, while batch order stays random. An epoch's batches depend only
on (seed, epoch), so a position (epoch, batch index) is enough to resume mid-epoch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

MEGABATCH_FACTOR = 50  # transformers' LengthGroupedSampler default


@dataclass
class Encoded:
    """A tokenized split: unpadded token ids per example and class ids."""

    features: dict[str, list[list[int]]]  # input_ids, attention_mask, token_type_ids (if the model uses them)
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.features["input_ids"]]


def encode(tokenizer, texts: list[str], labels: list[int], *, max_length: int, truncation_side: str) -> Encoded:
    """Tokenize texts with truncation to max_length (cutting on truncation_side), without padding.

    Args:
        tokenizer: a fast tokenizer.
        texts: the inputs.
        labels: class ids, one per text.
        max_length: tokens per example, special tokens included.
        truncation_side: "right" or "left".
    """
    tokenizer.truncation_side = truncation_side
    batch = tokenizer(
        texts, truncation=True, max_length=max_length, padding=False, return_attention_mask=True
    )
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch]
    return Encoded(features={k: list(batch[k]) for k in keys}, labels=list(labels))


def collate(
    data: Encoded, indices: list[int], *, pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Pad the examples at `indices` to the batch's longest one (right padding).

    Returns:
        A dict of LongTensors: input_ids, attention_mask, token_type_ids (when present) and labels.
    """
    longest = max(len(data.features["input_ids"][i]) for i in indices)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    batch: dict[str, torch.Tensor] = {}
    for key, rows in data.features.items():
        pad = pad_token_id if key == "input_ids" else 0
        batch[key] = torch.tensor([rows[i] + [pad] * (longest - len(rows[i])) for i in indices], dtype=torch.long)
    batch["labels"] = torch.tensor([data.labels[i] for i in indices], dtype=torch.long)
    return batch


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


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches for evaluation: sorted by length (least padding); order does not matter there."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
