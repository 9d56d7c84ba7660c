"""EDA-style augmentation: determinism, identity, special tokens in place, rates, aligned tags."""

from collections import Counter

import numpy as np
import pytest

from core.augment_text import augment_ids, augment_words
from core.spec import TextAugmentationConfig

CLS, SEP, PAD = 2, 3, 0
SPECIAL = {PAD, 1, CLS, SEP, 4}
VOCAB = 1000


def example(n: int) -> list[int]:
    """[CLS] n regular ids [SEP]; regular ids are 100, 101, ... so they are told apart from random ones."""
    return [CLS, *range(100, 100 + n), SEP]


def test_same_seed_same_edits_and_other_seed_other_edits():
    config = TextAugmentationConfig(deletion=0.2, swap=0.2, insertion=0.2, substitution=0.2)
    ids = example(50)
    first = augment_ids(ids, config, np.random.default_rng(7), vocab_size=VOCAB, special_ids=SPECIAL)
    again = augment_ids(ids, config, np.random.default_rng(7), vocab_size=VOCAB, special_ids=SPECIAL)
    other = augment_ids(ids, config, np.random.default_rng(8), vocab_size=VOCAB, special_ids=SPECIAL)
    assert first == again != ids
    assert other != first


def test_zero_probabilities_are_the_identity():
    config = TextAugmentationConfig()
    rng = np.random.default_rng(0)
    for n in (1, 5, 40):
        assert augment_ids(example(n), config, rng, vocab_size=VOCAB, special_ids=SPECIAL) == example(n)
    words, tags = ["alice", "went", "home"], ["B-PER", "O", "O"]
    assert augment_words(words, tags, config, rng, vocabulary=["x"]) == (words, tags)


def test_probability_zero_never_edits():
    config = TextAugmentationConfig(deletion=0.5, swap=0.5, insertion=0.5, substitution=0.5, probability=0.0)
    rng = np.random.default_rng(0)
    assert all(
        augment_ids(example(30), config, rng, vocab_size=VOCAB, special_ids=SPECIAL) == example(30) for _ in range(50)
    )


def test_special_tokens_stay_in_place_and_random_ids_are_regular():
    config = TextAugmentationConfig(deletion=0.5, swap=0.5, insertion=0.5, substitution=0.5)
    rng = np.random.default_rng(1)
    for _ in range(300):
        ids = [CLS, *range(100, 100 + int(rng.integers(1, 12))), SEP, PAD, PAD]
        out = augment_ids(ids, config, rng, vocab_size=VOCAB, special_ids=SPECIAL)
        assert out[0] == CLS and out[-3:] == [SEP, PAD, PAD]
        assert not SPECIAL & set(out[1:-3]), "a special id was drawn or moved into the text"
        assert len(out) > 4, "never an example with no regular token"
        assert all(0 <= i < VOCAB for i in out)


def test_a_special_token_in_the_middle_keeps_its_position():
    config = TextAugmentationConfig(swap=0.5, substitution=0.5)  # length-preserving edits
    rng = np.random.default_rng(2)
    ids = [CLS, 100, 101, 102, SEP, 200, 201, SEP]
    for _ in range(200):
        out = augment_ids(ids, config, rng, vocab_size=VOCAB, special_ids=SPECIAL)
        assert len(out) == len(ids)
        assert [out[0], out[4], out[7]] == [CLS, SEP, SEP]


def test_deletion_rate_matches_its_probability():
    n, draws = 1000, 20
    config = TextAugmentationConfig(deletion=0.5)
    rng = np.random.default_rng(3)
    deleted = sum(n + 2 - len(augment_ids(example(n), config, rng, vocab_size=VOCAB, special_ids=SPECIAL))
                  for _ in range(draws))
    # Binomial(20000, 0.5): the standard deviation of the fraction is 0.0035; 0.02 is > 5 of them.
    assert abs(deleted / (n * draws) - 0.5) < 0.02


def test_substitution_and_insertion_rates_match_their_probabilities():
    n, draws = 1000, 20
    rng = np.random.default_rng(4)
    kept = range(100, 100 + n)
    substituted = inserted = 0
    for _ in range(draws):
        out = augment_ids(example(n), TextAugmentationConfig(substitution=0.3), rng, vocab_size=VOCAB,
                          special_ids=SPECIAL)
        substituted += sum(a != b for a, b in zip(out[1:-1], kept))  # a random id may equal the original: rare
        out = augment_ids(example(n), TextAugmentationConfig(insertion=0.1), rng, vocab_size=VOCAB,
                          special_ids=SPECIAL)
        inserted += len(out) - n - 2
    assert abs(substituted / (n * draws) - 0.3 * (1 - 1 / VOCAB)) < 0.02
    assert abs(inserted / (n * draws) - 0.1) < 0.015


def test_probability_is_the_fraction_of_examples_edited():
    config = TextAugmentationConfig(deletion=0.5, probability=0.3)
    rng = np.random.default_rng(5)
    edited = sum(augment_ids(example(200), config, rng, vocab_size=VOCAB, special_ids=SPECIAL) != example(200)
                 for _ in range(2000))
    assert abs(edited / 2000 - 0.3) < 0.05  # sd 0.01


def test_all_deleted_backs_off_to_the_original():
    config = TextAugmentationConfig(deletion=0.5)
    rng = np.random.default_rng(6)
    outcomes = Counter(tuple(augment_ids(example(1), config, rng, vocab_size=VOCAB, special_ids=SPECIAL))
                       for _ in range(200))
    assert set(outcomes) == {tuple(example(1))}  # one token: deleting it would leave nothing
    words, tags = augment_words(["paris"], ["B-LOC"], config, np.random.default_rng(0), vocabulary=["x"])
    assert (words, tags) == (["paris"], ["B-LOC"])


def test_max_length_caps_insertions():
    config = TextAugmentationConfig(insertion=0.5)
    rng = np.random.default_rng(7)
    for _ in range(100):
        out = augment_ids(example(10), config, rng, vocab_size=VOCAB, special_ids=SPECIAL, max_length=15)
        assert 12 <= len(out) <= 15 and out[0] == CLS and out[-1] == SEP


def test_swaps_only_permute_the_regular_tokens():
    config = TextAugmentationConfig(swap=0.5)
    out = augment_ids(example(30), config, np.random.default_rng(8), vocab_size=VOCAB, special_ids=SPECIAL)
    assert out != example(30) and sorted(out[1:-1]) == list(range(100, 130))


# --- words and tags ---------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(40)]
TAGS = [f"T{i}" for i in range(40)]  # each word's tag names it, so a pair shows whether it stayed aligned
VOCABULARY = ["apple", "banana", "cherry"]


def test_word_deletion_and_swap_move_tags_with_their_words():
    rng = np.random.default_rng(9)
    for config in (TextAugmentationConfig(deletion=0.3), TextAugmentationConfig(swap=0.3),
                   TextAugmentationConfig(deletion=0.3, swap=0.3)):
        words, tags = augment_words(WORDS, TAGS, config, rng, vocabulary=VOCABULARY)
        assert len(words) == len(tags)
        assert all(t == "T" + w[1:] for w, t in zip(words, tags))
        assert (words, tags) != (WORDS, TAGS)
    words, _ = augment_words(WORDS, TAGS, TextAugmentationConfig(swap=0.3), rng, vocabulary=VOCABULARY)
    assert sorted(words) == sorted(WORDS)


def test_inserted_words_are_tagged_outside():
    words, tags = augment_words(WORDS, TAGS, TextAugmentationConfig(insertion=0.3), np.random.default_rng(10),
                                vocabulary=VOCABULARY)
    inserted = [(w, t) for w, t in zip(words, tags) if w in VOCABULARY]
    assert inserted and all(t == "O" for _, t in inserted)
    assert [(w, t) for w, t in zip(words, tags) if w not in VOCABULARY] == list(zip(WORDS, TAGS))


def test_substituted_words_keep_the_tag_of_the_word_they_replace():
    words, tags = augment_words(WORDS, TAGS, TextAugmentationConfig(substitution=0.3), np.random.default_rng(11),
                                vocabulary=VOCABULARY)
    assert tags == TAGS
    changed = [i for i, (a, b) in enumerate(zip(words, WORDS)) if a != b]
    assert changed and all(words[i] in VOCABULARY for i in changed)


def test_words_and_tags_must_align_and_edits_need_a_vocabulary():
    with pytest.raises(ValueError, match="2 words but 1 tags"):
        augment_words(["a", "b"], ["O"], TextAugmentationConfig(), np.random.default_rng(0), vocabulary=["x"])
    with pytest.raises(ValueError, match="empty vocabulary"):
        augment_words(["a"], ["O"], TextAugmentationConfig(insertion=0.1), np.random.default_rng(0), vocabulary=[])
