"""`config.search`: a job that is a hyperparameter search (its trials are ordinary jobs).

Only the shape and the values are judged here; lathe.search checks the space against the job
(every trial a valid job), builds Optuna's samplers and pruners, and runs the trials. The engine
never sees a `search`: a trial's spec has none.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from core.spec.base import Strict, known_metric

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp", "qmc")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "none")

Choice = bool | int | float | str


class SearchParam(Strict):
    """One searched field: a float or int range, or a list of choices (Optuna's distributions)."""

    type: Literal["float", "int", "categorical"] = Field(description="float and int: a range; categorical: choices.")
    low: float | None = Field(None, description="float/int: the smallest value.")
    high: float | None = Field(None, description="float/int: the largest value (included).")
    log: bool = Field(False, description="float/int: sample on a log scale (low > 0).")
    step: float | None = Field(None, gt=0, description="float/int: only multiples of step above low.")
    choices: list[Choice] | None = Field(None, min_length=1, max_length=256, description="categorical: the values.")

    @model_validator(mode="after")
    def _consistent(self) -> SearchParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs choices")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("a categorical parameter takes choices only (no low, high, log or step)")
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.type} parameter takes low and high, not choices")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs low and high")
        if self.low > self.high:
            raise ValueError("low must not be above high")
        if self.log and self.low <= 0:
            raise ValueError("log needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.type == "int" and any(v is not None and v != int(v) for v in (self.low, self.high, self.step)):
            raise ValueError("an int parameter needs whole numbers for low, high and step")
        return self

    def extremes(self) -> list[Any]:
        """The values that bound what this parameter can produce (each checked as a job at creation)."""
        if self.type == "categorical":
            return list(self.choices or [])
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]

    def grid(self) -> list[Any]:
        """Every value, for the grid sampler: the choices, or the range walked by `step` (ints: by 1)."""
        if self.type == "categorical":
            return list(self.choices or [])
        step = self.step or (1 if self.type == "int" else None)
        if step is None:
            raise ValueError("a float range needs a step for the grid sampler")
        count = int((self.high - self.low) / step + 1e-9) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.type == "int" else [round(v, 12) for v in values]


class SearchObjective(Strict):
    metric: str | None = Field(None, description="A validation metric of the task; default config.metric_for_best_model.")
    mode: Literal["auto", "min", "max"] = Field("auto", description="auto: from the metric (loss: min, f1: max).")

    @field_validator("metric")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        return value if value is None else known_metric(value)


class SamplerConfig(Strict):
    type: Literal[SAMPLERS] = Field("tpe", description="Optuna's sampler: tpe, random, grid, cmaes, gp or qmc.")
    n_startup_trials: Annotated[int, Field(ge=0, le=1000)] | None = Field(
        None, description="tpe, gp, cmaes: random trials before the model kicks in (Optuna's default when null).")

    @model_validator(mode="after")
    def _applies(self) -> SamplerConfig:
        if self.n_startup_trials is not None and self.type not in ("tpe", "gp", "cmaes"):
            raise ValueError(f"n_startup_trials does not apply to the {self.type} sampler")
        return self


_PRUNER_FIELDS = {
    "median": {"n_startup_trials", "n_warmup_evaluations"},
    "percentile": {"n_startup_trials", "n_warmup_evaluations", "percentile"},
    "successive_halving": {"min_resource", "reduction_factor"},
    "hyperband": {"min_resource", "reduction_factor"},
    "none": set(),
}


class PrunerConfig(Strict):
    """Optuna's pruner. A trial reports its objective at each evaluation; the pruner compares trials
    at their n-th evaluation (so evaluate per epoch, or `config.evaluations_per_epoch`, when the
    batch size is searched: the n-th of `eval_every_steps` would mean different amounts of data)."""

    type: Literal[PRUNERS] = Field("median", description="median, percentile, successive_halving, hyperband or none.")
    n_startup_trials: int | None = Field(None, ge=0, le=1000, description="median/percentile: finished trials "
                                         "before any is pruned (Optuna's default 5).")
    n_warmup_evaluations: int | None = Field(None, ge=0, le=1000, description="median/percentile: evaluations a "
                                             "trial makes before it may be pruned (default 0).")
    percentile: float | None = Field(None, ge=0, le=100, description="percentile: the cut (default 25).")
    min_resource: int | None = Field(None, ge=1, le=10000, description="successive_halving/hyperband: evaluations "
                                     "before the first rung (default: Optuna's auto).")
    reduction_factor: int | None = Field(None, ge=2, le=100, description="successive_halving/hyperband: the "
                                         "fraction promoted at each rung is 1/reduction_factor (Optuna's default: "
                                         "4 and 3).")

    @model_validator(mode="after")
    def _applies(self) -> PrunerConfig:
        for name in ("n_startup_trials", "n_warmup_evaluations", "percentile", "min_resource", "reduction_factor"):
            if getattr(self, name) is not None and name not in _PRUNER_FIELDS[self.type]:
                raise ValueError(f"{name} does not apply to the {self.type} pruner")
        return self


def _by_name(value: Any) -> Any:
    """`"median"` is `{"type": "median"}`."""
    return {"type": value} if isinstance(value, str) else value


class SearchConfig(Strict):
    """A hyperparameter search: up to `trials` ordinary jobs with the fields in `space` set to values
    Optuna's `sampler` proposes, `parallel` at once; the best by `objective` is the result."""

    trials: int = Field(10, ge=1, le=500, description="How many trials (the grid sampler stops when its grid is done).")
    parallel: int = Field(2, ge=1, le=64, description="Trials running at once at most.")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="\"tpe\" or {\"type\": ..., options}.")
    pruner: PrunerConfig = Field(default_factory=PrunerConfig, description="\"median\" or {\"type\": ..., options}.")
    objective: SearchObjective = Field(default_factory=SearchObjective)
    space: dict[Annotated[str, Field(min_length=3, max_length=200)], SearchParam] | None = Field(
        None, max_length=32, description="Dotted path into the job body -> its range; null: the task's default "
                                         "space (learning rate, epochs, batch size, weight decay, warmup).")
    warm_start_from: str | None = Field(None, max_length=40, description="An earlier search (ftjob-...) whose "
                                        "finished trials seed this one's sampler.")

    _sampler_by_name = field_validator("sampler", mode="before")(classmethod(lambda cls, v: _by_name(v)))
    _pruner_by_name = field_validator("pruner", mode="before")(classmethod(lambda cls, v: _by_name(v)))
