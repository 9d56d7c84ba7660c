"""EDA-style text augmentation: random deletion, swap, insertion and substitution.

After Wei & Zou, "EDA: Easy Data Augmentation Techniques for Boosting Performance on Text
Classification Tasks" (2019), with random vocabulary items standing in for EDA's synonyms so that
no word list or language is assumed. Two entry points share one editing routine:

- `augment_ids` edits a tokenized example (text-classification): special tokens ([CLS], [SEP],
  padding ...) never move and are never edited.
- `augment_words` edits a sentence word by word with its tags (token-classification): a
  substituted word keeps its tag, a deleted or swapped word takes its tag along, and an inserted
  word is tagged "O".

Every random number comes from the generator passed in, so the same generator state gives the same
edits (a resumed run sees the same augmented batches).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from core.spec import TextAugmentationConfig

Item = TypeVar("Item")

OUTSIDE = "O"


def augment_ids(
    ids: list[int],
    config: TextAugmentationConfig,
    rng: np.random.Generator,
    *,
    vocab_size: int,
    special_ids: set[int],
    max_length: int | None = None,
) -> list[int]:
    """An augmented copy of one tokenized example.

    With probability config.probability the example is edited at all; then each regular token is
    swapped with another regular token (config.swap), deleted (config.deletion) or replaced by a
    random regular vocabulary id (config.substitution), and gets a random regular id inserted
    after it (config.insertion). Special tokens keep their positions.

    Args:
        ids: the example's token ids, special tokens included.
        config: the per-token probabilities.
        rng: the only source of randomness.
        vocab_size: ids are drawn from range(vocab_size) ...
        special_ids: ... minus these; tokens with these ids are never edited or moved.
        max_length: when given, insertions stop where the result would grow past it.

    Returns:
        The edited ids; the original ones when every regular token would be deleted.

    Raises:
        ValueError: substitution/insertion asked for, but the vocabulary has no regular token.
    """
    if (config.substitution or config.insertion) and vocab_size <= len({i for i in special_ids if 0 <= i < vocab_size}):
        raise ValueError("no regular token in the vocabulary to substitute or insert")

    def random_id() -> int:
        # Rejection sampling: special ids are a handful among thousands, so this rarely loops.
        while True:
            candidate = int(rng.integers(vocab_size))
            if candidate not in special_ids:
                return candidate

    editable = [i not in special_ids for i in ids]
    room = None if max_length is None else max_length - len(ids)
    return _edit(
        ids, editable, config, rng,
        substitute=lambda _: random_id(), insert=random_id, room=room,
    )


def augment_words(
    words: list[str],
    tags: list[str],
    config: TextAugmentationConfig,
    rng: np.random.Generator,
    *,
    vocabulary: Sequence[str],
) -> tuple[list[str], list[str]]:
    """An augmented copy of one tagged sentence, tags kept aligned with their words.

    The same edits as `augment_ids`, word by word: a swap or deletion moves or removes a word with
    its tag, a substituted word keeps the tag of the word it replaces, an inserted word is tagged
    "O". Entity spans are not repaired: deleting the B- word of a span leaves its I- words opening
    the span, as the conlleval reading of IOB tags allows.

    Args:
        words: the sentence.
        tags: one tag per word.
        config: the per-word probabilities.
        rng: the only source of randomness.
        vocabulary: words to draw substitutions and insertions from (the training set's words).

    Returns:
        (words, tags), equally long; the originals when every word would be deleted.

    Raises:
        ValueError: words and tags differ in length, or substitution/insertion asked for with
            an empty vocabulary.
    """
    if len(words) != len(tags):
        raise ValueError(f"{len(words)} words but {len(tags)} tags")
    if (config.substitution or config.insertion) and not vocabulary:
        raise ValueError("an empty vocabulary cannot supply substitutions or insertions")

    def random_word() -> str:
        return vocabulary[int(rng.integers(len(vocabulary)))]

    pairs = _edit(
        list(zip(words, tags)), [True] * len(words), config, rng,
        substitute=lambda pair: (random_word(), pair[1]),
        insert=lambda: (random_word(), OUTSIDE),
    )
    return [w for w, _ in pairs], [t for _, t in pairs]


def _edit(
    items: list[Item],
    editable: list[bool],
    config: TextAugmentationConfig,
    rng: np.random.Generator,
    *,
    substitute: Callable[[Item], Item],
    insert: Callable[[], Item],
    room: int | None = None,
) -> list[Item]:
    """The shared routine: swaps first, then one pass of deletion/substitution/insertion.

    Deletion and substitution of a token are exclusive (one uniform draw decides: below deletion
    deletes, below deletion + substitution substitutes), so each happens with exactly its
    configured probability. `room` caps insertions net of deletions (None: no cap).
    """
    if rng.random() >= config.probability:
        return list(items)
    positions = [i for i, ok in enumerate(editable) if ok]
    if not positions:
        return list(items)
    original, items = list(items), list(items)
    if config.swap and len(positions) > 1:
        for i in positions:
            if rng.random() < config.swap:
                other = positions[int(rng.integers(len(positions) - 1))]
                j = other if other != i else positions[-1]  # skip i itself: draw among the others
                items[i], items[j] = items[j], items[i]
    out: list[Item] = []
    kept = 0
    for item, ok in zip(items, editable):
        if not ok:
            out.append(item)
            continue
        draw = rng.random()
        if draw < config.deletion:
            room = None if room is None else room + 1
        else:
            out.append(substitute(item) if draw < config.deletion + config.substitution else item)
            kept += 1
        if config.insertion and rng.random() < config.insertion and (room is None or room > 0):
            out.append(insert())
            kept += 1
            room = None if room is None else room - 1
    # An example with nothing left but special tokens says nothing: keep the original instead.
    return out if kept else original
