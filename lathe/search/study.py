"""Optuna, without Optuna's storage: the study of a search is rebuilt in memory, each time it is
needed, from the trial records kept in our own rows (each trial job's `child_info`, plus the warm
start's records on the parent). Nothing of the search lives in a process: whichever worker asks
next gets the same study, and a killed one loses nothing.

Why not Optuna's RDB storage on our database: its tables and engine beside ours (on SQLite, a
second writer to contend for the lock), and the trials' truth in two places. Here a trial's record
is one JSON column of its job, written in the same fenced transactions as the job's other rows.

A record: {"number", "params", "state": running|complete|pruned|failed, "value", "intermediate":
{"<evaluation>": value}, "system_attrs"} — what Optuna's FrozenTrial needs (system_attrs carry the
grid sampler's grid ids and the successive-halving pruner's rungs).

Determinism: the sampler is seeded per trial from the search's seed and the trial's number, so the
same seed and the same finished trials propose the same parameters, in any process.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from core.spec.search import PrunerConfig, SamplerConfig, SearchParam

optuna.logging.set_verbosity(logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

STATES = {"running": TrialState.RUNNING, "complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED,
          "failed": TrialState.FAIL}


def distribution(param: SearchParam) -> BaseDistribution:
    if param.type == "categorical":
        return CategoricalDistribution(param.choices)
    if param.type == "int":
        return IntDistribution(int(param.low), int(param.high), log=param.log, step=int(param.step or 1))
    return FloatDistribution(param.low, param.high, log=param.log, step=param.step)


def make_sampler(cfg: SamplerConfig, space: dict[str, SearchParam], *, seed: int) -> optuna.samplers.BaseSampler:
    options = {"n_startup_trials": cfg.n_startup_trials} if cfg.n_startup_trials is not None else {}
    if cfg.type == "tpe":
        # constant_liar: running trials count as bad ones, so parallel trials spread out.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, **options)
    if cfg.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.type == "grid":
        return optuna.samplers.GridSampler({k: p.grid() for k, p in space.items()}, seed=seed)
    if cfg.type == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False, **options)
    if cfg.type == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)
    return optuna.samplers.GPSampler(seed=seed, **options)  # imports torch, in the process that asks


def make_pruner(cfg: PrunerConfig) -> optuna.pruners.BasePruner:
    if cfg.type in ("median", "percentile"):
        options = {"n_startup_trials": cfg.n_startup_trials, "n_warmup_steps": cfg.n_warmup_evaluations}
        options = {k: v for k, v in options.items() if v is not None}
        if cfg.type == "median":
            return optuna.pruners.MedianPruner(**options)
        return optuna.pruners.PercentilePruner(cfg.percentile if cfg.percentile is not None else 25.0, **options)
    options = {k: v for k, v in (("min_resource", cfg.min_resource), ("reduction_factor", cfg.reduction_factor))
               if v is not None}
    if cfg.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**options)
    if cfg.type == "hyperband":
        return optuna.pruners.HyperbandPruner(**options)
    return optuna.pruners.NopPruner()


class Study:
    """A search's Optuna study, rebuilt from its trial records.

    Args:
        name: the parent job's id (Hyperband assigns brackets by study name and trial number).
        maximize: the objective's direction.
        space: the searched fields.
        sampler, pruner: the search's choices.
        seed: the search's seed.
        records: the warm start's records, then the trials' in number order (a trial's study
            number is its place in this list).
        study_attrs: what `study_attrs` said after the last proposal.
    """

    def __init__(self, name: str, *, maximize: bool, space: dict[str, SearchParam], sampler: SamplerConfig,
                 pruner: PrunerConfig, seed: int, records: list[dict[str, Any]],
                 study_attrs: dict[str, Any] | None = None):
        self.space = space
        self.distributions = {k: distribution(p) for k, p in space.items()}
        self.sampler_cfg, self.seed = sampler, seed
        self.study = optuna.create_study(study_name=name, direction="maximize" if maximize else "minimize",
                                         sampler=make_sampler(sampler, space, seed=seed), pruner=make_pruner(pruner))
        for key, value in (study_attrs or {}).items():
            self.study._storage.set_study_system_attr(self.study._study_id, key, value)
        for record in records:
            self.study.add_trial(_frozen(record, self.distributions))

    @property
    def study_attrs(self) -> dict[str, Any]:
        """The study's own notes (the QMC sampler counts its samples there): kept on the parent."""
        return dict(self.study._storage.get_study_system_attrs(self.study._study_id))

    def propose(self, number: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The next trial's parameters and the sampler's notes on it (system_attrs), from a sampler
        seeded by (seed, study number). The grid sampler keeps the search's seed: it shuffles the
        grid by it once and hands out points by trial number; QMC too: it scrambles one sequence
        by it and walks that."""
        if self.sampler_cfg.type not in ("grid", "qmc"):
            self.study.sampler = make_sampler(self.sampler_cfg, self.space, seed=(self.seed * 1_000_003 + number) % 2**32)
        trial = self.study.ask(self.distributions)
        frozen = self.study._storage.get_trial(trial._trial_id)
        return dict(trial.params), dict(frozen.system_attrs)

    def should_prune(self, position: int) -> tuple[bool, dict[str, Any]]:
        """Whether the pruner stops the running trial at `position`, and its system_attrs after the
        pruner looked (successive halving records the rungs it reached there)."""
        frozen = self.study.get_trials(deepcopy=False)[position]
        prune = self.study.pruner.prune(self.study, frozen)
        return bool(prune), dict(self.study._storage.get_trial(frozen._trial_id).system_attrs)


def _frozen(record: dict[str, Any], distributions: dict[str, BaseDistribution]) -> FrozenTrial:
    state = STATES[record.get("state", "running")]
    intermediate = {int(k): float(v) for k, v in (record.get("intermediate") or {}).items() if v is not None}
    value = record.get("value")
    if state == TrialState.PRUNED and value is None and intermediate:
        value = intermediate[max(intermediate)]  # as Optuna's tell does for a pruned trial
    if state == TrialState.COMPLETE and value is None:
        state = TrialState.FAIL
    params = {k: v for k, v in (record.get("params") or {}).items() if k in distributions}
    dists = {k: distributions[k] for k in params}
    params = {k: v for k, v in params.items() if _within(dists[k], v)}
    return optuna.trial.create_trial(
        state=state, value=value if state in (TrialState.COMPLETE, TrialState.PRUNED) else None,
        params=params, distributions={k: dists[k] for k in params}, intermediate_values=intermediate,
        system_attrs=dict(record.get("system_attrs") or {}))


def _within(dist: BaseDistribution, value: Any) -> bool:
    """Whether `value` is one `dist` can produce (a warm start's trial may come from another space)."""
    try:
        return dist._contains(dist.to_internal_repr(value))
    except (ValueError, TypeError):
        return False
