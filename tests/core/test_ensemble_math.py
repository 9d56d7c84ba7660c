"""core.ensemble: members' rows are pure functions of (seed, member), SAMME matches its hand
computation, votes combine as documented, and ensemble selection picks what improves the score."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.ensemble import bootstrap_rows, combine, ensemble_selection, folds, samme_step, subsample_rows


def test_a_members_bootstrap_rows_are_a_pure_function_of_seed_and_member():
    a = bootstrap_rows(500, seed=7, member=2)
    assert np.array_equal(a, bootstrap_rows(500, seed=7, member=2))
    assert not np.array_equal(a, bootstrap_rows(500, seed=7, member=3))
    assert not np.array_equal(a, bootstrap_rows(500, seed=8, member=2))
    assert len(a) == 500 and a.min() >= 0 and a.max() < 500 and (np.diff(a) >= 0).all()
    assert 0.55 < len(np.unique(a)) / 500 < 0.70  # ~63.2% distinct rows in a bootstrap resample


def test_a_subsample_draws_distinct_rows():
    rows = subsample_rows(100, 0.3, seed=1, member=0)
    assert len(rows) == 30 == len(set(rows.tolist()))
    assert np.array_equal(rows, subsample_rows(100, 0.3, seed=1, member=0))
    assert len(subsample_rows(3, 0.01, seed=1, member=0)) == 1
    with pytest.raises(ValueError):
        subsample_rows(10, 0, seed=1, member=0)


def test_folds_are_even_and_stratified():
    labels = ["a"] * 10 + ["b"] * 7 + ["c"] * 3
    fold = folds(20, 3, seed=4, labels=labels)
    assert np.array_equal(fold, folds(20, 3, seed=4, labels=labels))
    sizes = np.bincount(fold, minlength=3)
    assert sizes.max() - sizes.min() <= 1
    for label in "abc":
        per_fold = np.bincount(fold[[i for i, y in enumerate(labels) if y == label]], minlength=3)
        assert per_fold.max() - per_fold.min() <= 1, label
    plain = folds(10, 5, seed=0)
    assert sorted(np.bincount(plain).tolist()) == [2] * 5
    with pytest.raises(ValueError):
        folds(2, 3, seed=0)


def test_samme_matches_the_hand_computation():
    # 4 rows, 3 classes; the member gets the last row wrong.
    step = samme_step(np.ones(4), np.array([True, True, True, False]), 3)
    assert step.error == pytest.approx(0.25)
    assert step.alpha == pytest.approx(math.log(0.75 / 0.25) + math.log(2))  # log 6
    assert step.weights == pytest.approx(np.array([1, 1, 1, 6]) * 4 / 9)
    # Weighted rows: the error is the wrong rows' share of the weight.
    step = samme_step(np.array([0.5, 0.5, 2.0, 1.0]), np.array([False, True, True, True]), 2)
    assert step.error == pytest.approx(0.5 / 4)
    assert step.alpha == pytest.approx(math.log(0.875 / 0.125))
    raised = np.array([0.5 * 7, 0.5, 2.0, 1.0])
    assert step.weights == pytest.approx(raised * 4 / raised.sum())


def test_a_member_no_better_than_chance_gets_no_vote_and_leaves_the_weights():
    step = samme_step(np.ones(4), np.array([True, False, False, False]), 2)
    assert step.alpha < 0 and step.weights == pytest.approx(np.ones(4))
    perfect = samme_step(np.ones(3), np.ones(3, dtype=bool), 3)
    assert perfect.error == 0 and math.isfinite(perfect.alpha) and perfect.weights == pytest.approx(np.ones(3))


def test_votes():
    a = np.array([[0.9, 0.1], [0.4, 0.6]])
    b = np.array([[0.3, 0.7], [0.2, 0.8]])
    assert combine([a, b]) == pytest.approx(np.array([[0.6, 0.4], [0.3, 0.7]]))
    assert combine([a, b], weights=[3, 1]) == pytest.approx(0.75 * a + 0.25 * b)
    assert combine([a, b], vote="hard") == pytest.approx(np.array([[0.5, 0.5], [0, 1]]))
    assert combine([a, b], vote="hard", weights=[2, 1]) == pytest.approx(np.array([[2 / 3, 1 / 3], [0, 1]]))
    assert combine([np.array([[1.0], [2.0]]), np.array([[3.0], [6.0]])], vote="mean") == pytest.approx(np.array([[2.0], [4.0]]))
    with pytest.raises(ValueError):
        combine([a, b], weights=[0, 0])


def test_ensemble_selection_adds_what_improves_the_score():
    target = np.array([0, 1, 0, 1])
    accuracy = lambda p: float((p.argmax(-1) == target).mean())  # noqa: E731
    # m0 and m1 are each wrong on one row (3 and 0), m2 on two; m0 + m1 together are right on all four.
    m0 = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.55, 0.45]])
    m1 = np.array([[0.4, 0.6], [0.3, 0.7], [0.8, 0.2], [0.1, 0.9]])
    m2 = np.array([[0.3, 0.7], [0.4, 0.6], [0.3, 0.7], [0.4, 0.6]])
    counts = ensemble_selection([m2, m0, m1], accuracy, rounds=3)
    assert counts == [0, 1, 1]  # the best single model (m0, the first of the tied), then m1; m2 never helps
    assert accuracy(combine([m2, m0, m1], weights=counts)) == 1.0
    log_loss = lambda p: float(-np.log(p[np.arange(4), target]).mean())  # noqa: E731
    picks = ensemble_selection([m2, m0, m1], log_loss, rounds=5, maximize=False)
    assert log_loss(combine([m2, m0, m1], weights=picks)) <= min(log_loss(m) for m in (m2, m0, m1))
