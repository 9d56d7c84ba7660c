"""`config.ensemble`: a job that trains several members (ordinary child jobs) and combines them into
one model; `config.train_rows`: which rows of the training file a job trains on (how an ensemble's
members get their resamples and folds, and usable on any job).

Only the shape and the values are judged here; lathe.ensemble plans the members and core.combine
builds the combined model. The engine never sees an `ensemble`: a member's spec has none.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from core.spec.base import Strict

METHODS = ("bagging", "boosting", "stacking", "soup", "selection")
MAX_MEMBERS = 16

Choice = bool | int | float | str


class TrainRowsConfig(Strict):
    """Train on a draw of the training file's rows (validation and test files are used whole).

    The draw is a pure function of (seed, stream) and the number of rows (core.ensemble), so a retry
    on another worker trains on the same rows."""

    method: Literal["bootstrap", "subsample", "folds"] = Field(
        description="bootstrap: as many rows as the file has, drawn with replacement (a row may appear several "
                    "times); subsample: `fraction` of the rows, without replacement; folds: every row except those "
                    "of fold `holdout` of `folds` (stratified by label for single-label classification).")
    fraction: Annotated[float, Field(gt=0, le=1)] | None = Field(None, description="subsample: the share of rows kept.")
    folds: Annotated[int, Field(ge=2, le=20)] | None = Field(None, description="folds: how many folds.")
    holdout: Annotated[int, Field(ge=0, le=19)] | None = Field(None, description="folds: the fold left out (from 0).")
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = Field(None, description="The draw's seed; default the "
                                                                                     "job's seed.")
    stream: int = Field(0, ge=0, le=10_000, description="bootstrap/subsample: draws with the same seed and another "
                                                          "stream are independent (an ensemble's members differ by it).")

    @model_validator(mode="after")
    def _consistent(self) -> TrainRowsConfig:
        if self.method == "subsample" and self.fraction is None:
            raise ValueError("subsample needs a fraction")
        if self.method != "subsample" and self.fraction is not None:
            raise ValueError(f"fraction does not apply to {self.method}")
        if self.method == "folds":
            if self.folds is None or self.holdout is None:
                raise ValueError("folds needs folds and holdout")
            if self.holdout >= self.folds:
                raise ValueError("holdout must be below folds")
        elif self.folds is not None or self.holdout is not None:
            raise ValueError(f"folds and holdout do not apply to {self.method}")
        return self


class MetaLearnerConfig(Strict):
    """stacking: the model fit on the members' out-of-fold predictions (scikit-learn; stored as numbers):
    logistic regression for classification (one per label when multi-label), ridge for regression."""

    c: float = Field(1.0, gt=0, le=1e6, description="Inverse regularisation strength (scikit-learn's C; ridge: "
                                                    "alpha = 1/c).")


class EnsembleConfig(Strict):
    """Several members (child jobs listed by GET /v1/fine_tuning/jobs?parent_job=) combined into one model."""

    method: Literal["bagging", "boosting", "stacking", "soup", "selection"] | None = Field(
        None, description="bagging: members on bootstrap resamples (or a subsample), combined by vote or mean; "
                          "stacking: each member trained on K-1 of `folds` folds, a meta-learner fit on their "
                          "out-of-fold predictions; soup: members' weights averaged greedily while validation "
                          "improves (one ordinary model); boosting: SAMME, members one after another on rows "
                          "reweighted where the earlier members erred, combined by a vote weighted by their "
                          "accuracy; selection (with from_search): greedy ensemble selection of a finished "
                          "search's trial models.")
    members: int | list[dict[Annotated[str, Field(min_length=3, max_length=200)], Choice]] = Field(
        3, description="How many members (the same job, varied seed and rows), or one object per member of dotted "
                       "paths into the job body, as a search space's keys (e.g. {\"config.lora.r\": 8}).")
    parallel: int = Field(2, ge=1, le=MAX_MEMBERS, description="Members training at once at most (boosting trains "
                                                              "them one after another).")
    vote: Literal["soft", "hard"] = Field("soft", description="bagging, selection: soft averages the members' "
                                                              "probabilities, hard counts their labels (regression: "
                                                              "always the mean).")
    subsample: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="bagging: each member trains on this share of the rows drawn without replacement (1: "
                          "every row, members differing by seed only); null: a bootstrap resample.")
    folds: int = Field(3, ge=2, le=10, description="stacking: folds per member (each member is trained this many times).")
    meta_learner: MetaLearnerConfig = Field(default_factory=MetaLearnerConfig, description="stacking: logistic "
                                            "regression (one per label when multi-label), ridge for regression.")
    from_search: str | None = Field(None, max_length=40, description="A finished search (ftjob-...) whose trial "
                                                                      "models are combined without retraining.")

    @model_validator(mode="after")
    def _consistent(self) -> EnsembleConfig:
        if self.from_search is not None:
            if self.method not in (None, "selection"):
                raise ValueError("from_search builds its ensemble by selection; leave method out or set \"selection\"")
            if "members" in self.model_fields_set:
                raise ValueError("from_search takes the search's trials as members; members does not apply")
            return self
        if self.method is None:
            raise ValueError("method is required (bagging, stacking or soup), or from_search")
        if self.method == "selection":
            raise ValueError("selection needs from_search")
        count = self.members if isinstance(self.members, int) else len(self.members)
        if not 2 <= count <= MAX_MEMBERS:
            raise ValueError(f"an ensemble has 2 to {MAX_MEMBERS} members, not {count}")
        if self.method == "stacking" and count * self.folds > 4 * MAX_MEMBERS:
            raise ValueError(f"stacking trains members x folds jobs; at most {4 * MAX_MEMBERS}")
        for name, methods in (("subsample", ("bagging",)), ("vote", ("bagging",)), ("folds", ("stacking",)),
                              ("meta_learner", ("stacking",)), ("parallel", ("bagging", "stacking", "soup"))):
            if name in self.model_fields_set and self.method not in methods:
                which = " and ".join(filter(None, (", ".join(methods[:-1]), methods[-1])))
                raise ValueError(f"{name} applies to {which} only, not {self.method}")
        return self

    @property
    def resolved_method(self) -> str:
        return self.method or "selection"

    def overrides(self) -> list[dict[str, Any]]:
        """Each member's own field values (dotted paths); empty ones for a count."""
        return [dict(m) for m in self.members] if isinstance(self.members, list) else [{} for _ in range(self.members)]
