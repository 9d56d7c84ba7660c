"""The arithmetic of ensembles, torch-free (numpy only): which rows each member trains on, how
boosting reweighs them, how members' predictions combine, and how an ensemble is selected from
finished models. The orchestration (members as child jobs) and the artifact build on these.

Every draw is a pure function of its arguments: a member's rows depend on (seed, member) and the
number of rows only, so a member retried or re-run on another worker trains on the same rows.

    bootstrap_rows(n, seed=, member=)          n draws with replacement (bagging)
    subsample_rows(n, fraction, seed=, member=) a sorted fraction without replacement (bagging)
    folds(n, k, seed=, labels=)                 each row's fold, stratified by label when given (stacking)
    train_rows(method, n, ...)                  the rows a job's config.train_rows keeps (one of the above)
    samme_step(weights, correct, n_classes)     SAMME (multi-class AdaBoost): member weight, new row weights
    combine(probabilities, ...)                 soft vote, hard vote, weighted vote, mean (regression)
    ensemble_selection(...)                     Caruana et al. (2004): greedy forward selection with replacement
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

VOTES = ("soft", "hard", "mean")


PURPOSES = {"bootstrap": 1, "subsample": 2, "folds": 3}


def _rng(seed: int, member: int, purpose: str) -> np.random.Generator:
    """A generator for one member's draw, independent of every other member's and purpose's."""
    return np.random.default_rng([seed, member, PURPOSES[purpose]])


def bootstrap_rows(n: int, *, seed: int, member: int) -> np.ndarray:
    """`n` row indices drawn with replacement (a bootstrap resample), sorted.

    About 63.2% of the rows appear at least once; the others are the member's out-of-bag rows.
    """
    if n < 1:
        raise ValueError("a resample needs at least one row")
    return np.sort(_rng(seed, member, "bootstrap").integers(0, n, size=n))


def subsample_rows(n: int, fraction: float, *, seed: int, member: int) -> np.ndarray:
    """round(fraction x n) distinct row indices (at least 1), sorted."""
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    size = max(1, round(fraction * n))
    return np.sort(_rng(seed, member, "subsample").choice(n, size=size, replace=False))


def folds(n: int, k: int, *, seed: int, labels: Sequence[object] | None = None) -> np.ndarray:
    """Each row's fold (0..k-1), sizes within one of each other; with `labels`, every class is
    spread over the folds as evenly as it can be (stratified, as scikit-learn's StratifiedKFold).

    Raises:
        ValueError: fewer rows than folds, or k < 2.
    """
    if k < 2:
        raise ValueError("stacking needs at least 2 folds")
    if n < k:
        raise ValueError(f"{n} rows cannot make {k} folds")
    rng = _rng(seed, 0, "folds")
    assignment = np.empty(n, dtype=np.int64)
    if labels is None:
        order = rng.permutation(n)
        assignment[order] = np.arange(n) % k
        return assignment
    keys = [repr(label) for label in labels]
    offset = 0  # each class continues the round-robin where the previous one stopped: fold sizes stay even
    for key in sorted(set(keys)):
        rows = rng.permutation([i for i, other in enumerate(keys) if other == key])
        assignment[rows] = (np.arange(len(rows)) + offset) % k
        offset += len(rows)
    return assignment


def train_rows(method: str, n: int, *, seed: int, stream: int = 0, fraction: float | None = None,
               folds_: int | None = None, holdout: int | None = None,
               labels: Sequence[object] | None = None) -> np.ndarray:
    """The training rows a `config.train_rows` draw keeps (indices, sorted; repeated for a bootstrap).

    Args:
        method: bootstrap, subsample or folds (every row outside fold `holdout` of `folds_`).
        labels: single-label classes, to stratify folds (None: unstratified).
    """
    if method == "bootstrap":
        return bootstrap_rows(n, seed=seed, member=stream)
    if method == "subsample":
        return subsample_rows(n, float(fraction), seed=seed, member=stream)
    return np.flatnonzero(folds(n, int(folds_), seed=seed, labels=labels) != holdout)


@dataclass(frozen=True)
class SammeStep:
    """One boosting round: the member's weighted error, its vote weight (alpha), the rows' next weights."""

    error: float
    alpha: float
    weights: np.ndarray  # normalised to sum to the number of rows (a mean weight of 1)


def samme_step(weights: np.ndarray, correct: np.ndarray, n_classes: int, *, epsilon: float = 1e-10) -> SammeStep:
    """SAMME (Zhu, Zou, Rosset & Hastie 2009), as scikit-learn's AdaBoostClassifier(algorithm="SAMME"):

        error = sum(w where wrong) / sum(w)
        alpha = log((1 - error) / error) + log(K - 1)
        w     = w x exp(alpha) where wrong, unchanged where right; then normalised

    A member no better than chance (error >= 1 - 1/K) gets alpha <= 0; the caller stops boosting
    there, as scikit-learn does. A perfect member (error 0) is clipped to `epsilon` so alpha stays finite.

    Args:
        weights: the rows' weights this member trained with (any positive scale).
        correct: whether the member predicted each row's class.
        n_classes: K, the number of classes.
    """
    weights = np.asarray(weights, dtype=np.float64)
    wrong = ~np.asarray(correct, dtype=bool)
    if weights.shape != wrong.shape or weights.ndim != 1:
        raise ValueError("one weight and one outcome per row")
    if n_classes < 2:
        raise ValueError("boosting needs at least 2 classes")
    error = float(weights[wrong].sum() / weights.sum())
    clipped = min(max(error, epsilon), 1 - epsilon)
    alpha = math.log((1 - clipped) / clipped) + math.log(n_classes - 1)
    updated = weights * np.exp(alpha * wrong) if alpha > 0 else weights.copy()
    return SammeStep(error=error, alpha=alpha, weights=updated * (len(updated) / updated.sum()))


def combine(probabilities: Sequence[np.ndarray], *, vote: str = "soft", weights: Sequence[float] | None = None) -> np.ndarray:
    """The ensemble's output from its members' (rows x classes) outputs.

    vote:
        soft  the (weighted) mean of the members' probabilities
        hard  each member votes for its top class with its weight; the result is the share of
              votes per class (rows x classes, summing to 1): boosting's SAMME vote is this, with
              the members' alphas as weights
        mean  regression: the (weighted) mean of the members' values (rows x 1)
    """
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}")
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probabilities])  # members x rows x outputs
    w = np.ones(len(stacked)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(stacked),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("one non-negative weight per member, not all zero")
    w = w / w.sum()
    if vote in ("soft", "mean"):
        return np.tensordot(w, stacked, axes=1)
    votes = np.zeros(stacked.shape[1:])
    rows = np.arange(stacked.shape[1])
    for member_weight, member in zip(w, stacked):
        votes[rows, member.argmax(-1)] += member_weight
    return votes


def ensemble_selection(
    outputs: Sequence[np.ndarray],
    score: Callable[[np.ndarray], float],
    *,
    rounds: int,
    maximize: bool = True,
    vote: str = "soft",
) -> list[int]:
    """Caruana et al. (2004): start from the best single model, then add (with replacement) the
    model whose addition scores best, `rounds` times; the ensemble is the best prefix seen.

    Args:
        outputs: each candidate's validation outputs (rows x classes probabilities, or values).
        score: the validation metric of an ensemble's combined output.
        rounds: how many additions to try after the first model.

    Returns:
        How many times each candidate was picked (its weight in the vote; 0 for the unused).
    """
    if not outputs:
        raise ValueError("no candidates")
    sign = 1.0 if maximize else -1.0
    counts = [0] * len(outputs)
    best_counts: list[int] = []
    best_score = -math.inf
    for _ in range(rounds + 1):
        trials = []
        for candidate in range(len(outputs)):
            trial = counts.copy()
            trial[candidate] += 1
            trials.append((sign * score(combine(outputs, vote=vote, weights=trial)), -candidate, trial))
        value, _, counts = max(trials)  # ties: the earlier candidate
        if value > best_score:
            best_score, best_counts = value, counts
    return best_counts
