"""Dry runs (`"dry_run": true` on a create): the request checked as a create checks it
(lathe.jobs.check_request) and its files as validation checks them (lathe.validation.judge_files),
then estimated: each file's rows, examples and tokens as training sees them, the values "auto"
resolves to, optimizer steps, trained tokens, FLOPs and a duration (lathe.throughput). Nothing is
stored or published and no quota is counted; an Idempotency-Key is not looked at.

A search or an ensemble is estimated whole: an ensemble's every member (its own rows: a bootstrap
draw, all folds but one) and its combine step; a search's trials as its space, drawn at random
(or walked, for the grid sampler), makes them on average, times the trials it will run.

Counting tokens needs the base model's tokenizer and the engine's own encoding (chat templates,
truncation, packing), which import torch: the torch-free API has a worker's prediction process count
them (a "count" request over lathe.predictions' channel, answered with core.estimate's functions),
from the files and model folder at the paths resolved here (the shared data folder, LATHE_MODELS_DIR).
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core.architectures import model_facts
from core.datasets import FILE_PARAMS
from core.errors import EngineError
from core.spec import JobSpec, Task, TrainingConfig
from core.spec.search import SearchParam
from lathe.ensemble import check_ensemble, member_spec, plan
from lathe.errors import BadRequest, LatheError
from lathe.jobs import JobCreate, check_request, stored_spec
from lathe.model_source import ModelSource
from lathe.predictions import request_counts
from lathe.search.space import grid_size, objective_of, space_of, trial_spec, validated_trial
from lathe.settings import Settings
from lathe.throughput import FORMULA, Rate, coefficient, job_rate, work_tokens
from lathe.validation import job_files, judge_files, local_paths

SPACE_SAMPLES = 256  # trials drawn from a search's space to average its trials' steps over
# Searched, these change a trial's tokens, which are counted at the job's own values.
ENCODING_KEYS = ("max_length", "packing", "truncation_side", "train_on_inputs")


def estimate_job(session: Session, settings: Settings, *, tenant_id: str, body: JobCreate) -> dict[str, Any]:
    """The estimate of a job request (api.schemas.JobEstimate); reads only.

    Raises:
        BadRequest / NotFound: as a create, and what validation would fail the job for (a bad file,
            naming the param and line; a field the data makes inapplicable), or what training would
            (no chat template, nothing left within max_length).
        LatheError: 503 when no worker serves the count, 504 when it takes too long (count_inputs).
    """
    checked = check_request(session, settings, tenant_id=tenant_id, body=body)
    spec, source = checked.spec, checked.source
    stored = stored_spec(spec)
    files = job_files(session, tenant_id=tenant_id, ids={p: getattr(spec, p) for p in FILE_PARAMS})
    try:
        task, infos, check = judge_files(spec, stored, files, source)
        if spec.config.ensemble:  # every member, judged as validation judges it
            check_ensemble(session, tenant_id=tenant_id, spec=spec, stored=stored, check=check)
        paths = local_paths(files)
    except EngineError as e:
        raise BadRequest(e.message, param=e.param, code=e.code) from None
    spec = spec.model_copy(update={"task": task})
    members = _members(spec, stored, task)
    counted = count_inputs(settings, source, task, paths, [spec, *(s for _, s in members)])
    params = counted.get("parameters")
    facts = model_facts(Path(source.base)) if source.kind != "hub" else None
    layers = facts.num_layers if facts else None
    compute = params["compute"] if params else None
    rate = job_rate(session, tenant_id=tenant_id, model=body.model, compute_params=compute,
                    num_layers=layers) or (FORMULA if compute else None)
    cost = Cost(task, compute, params["total"] if params else None, layers, rate)
    own = cost.run(spec, counted["runs"][0])
    del own["examples"]  # the training file's, below
    estimate: dict[str, Any] = {
        "object": "fine_tuning.job.estimate", "model": body.model, "task": str(task), "method": spec.method,
        "seed": spec.seed, "parameters": params,
        **{p: ({"id": getattr(spec, p), "rows": infos[p].rows, **counted["runs"][0][p]} if p in infos else None)
           for p in FILE_PARAMS},
        **own, "children": None, "warnings": [],
        "basis": rate.basis if rate else {"kind": "unknown", "description": (
            "The base model's size could not be read (no safetensors weights, or a hub model whose config "
            "is unreachable), and none of your finished jobs used it: no duration is estimated.")},
    }
    if spec.config.search:
        _search(estimate, cost, spec, stored, counted["runs"][0])
    elif spec.config.ensemble:
        _ensemble(estimate, cost, spec, members, counted["runs"], checked.ensemble or {})
    _warn(estimate, spec)
    return estimate


class Cost:
    """One training run's figures for a spec and its counted files (see lathe.throughput)."""

    def __init__(self, task: Task, compute: int | None, total: int | None, layers: int | None, rate: Rate | None):
        self.task, self.total, self.layers, self.rate = task, total, layers, rate
        self.compute = compute or 1  # unknown size: FLOPs per compute parameter, as a same-model rate counts them
        self.known = compute is not None

    def run(self, spec: JobSpec, counts: dict[str, dict[str, int]]) -> dict[str, Any]:
        cfg = spec.config
        n = counts["training_file"]["examples"]
        epochs, batch = spec.n_epochs(n), spec.batch_size(n)
        steps_per_epoch = math.ceil(math.ceil(n / batch) / cfg.gradient_accumulation_steps)
        steps = epochs * steps_per_epoch
        tokens = epochs * counts["training_file"]["tokens"]
        evaluations = _evaluations(cfg, steps_per_epoch, steps) if "validation_file" in counts else 0
        train = coefficient(spec, self.layers) * self.compute * work_tokens(self.task, tokens, epochs * n)
        reference = sum(self.work(counts, p) for p in FILE_PARAMS) if spec.method == "dpo" else 0  # once, before
        forward = 2 * self.compute * (evaluations * self.work(counts, "validation_file")
                                      + 2 * self.work(counts, "test_file") + reference)
        return {
            "examples": n, "hyperparameters": spec.resolved_hyperparameters(n, self.task, self.total),
            "learning_rate": spec.learning_rate(self.task, self.total), "steps_per_epoch": steps_per_epoch,
            "optimizer_steps": steps, "evaluations": evaluations, "trained_tokens": tokens,
            "flops": train + forward if self.known else None,
            "estimated_duration_seconds": round(self.rate.seconds(train, forward)) if self.rate else None,
        }

    def work(self, counts: dict[str, dict[str, int]], param: str) -> int:
        """Tokens one pass over a split costs (IMAGE_TOKENS per image); 0 when not given."""
        split = counts.get(param)
        return work_tokens(self.task, split["tokens"], split["examples"]) if split else 0

    def forward_seconds(self, tokens: int) -> int | None:
        """A step that only runs models forward over `tokens` (an ensemble's combine)."""
        flops = 2 * self.compute * tokens
        return round(self.rate.seconds(flops, 0)) if self.rate else None  # forward passes timed as the rate's work


def _evaluations(cfg: TrainingConfig, steps_per_epoch: int, steps: int) -> int:
    """How often core.callbacks.EvaluationSchedule evaluates in `steps` (always at the last)."""
    if cfg.eval_every_steps:
        return steps // cfg.eval_every_steps + (1 if steps % cfg.eval_every_steps else 0)
    per = cfg.evaluations_per_epoch or 1
    marks = {max(1, round(steps_per_epoch * k / per)) for k in range(1, per + 1)}
    return steps // steps_per_epoch * len(marks)


def _members(spec: JobSpec, stored: dict[str, Any], task: Task) -> list[tuple[dict[str, Any], JobSpec]]:
    """An ensemble's children to train, as lathe.ensemble creates them: ({member, fold}, spec)."""
    cfg = spec.config.ensemble
    if cfg is None:
        return []
    return [({"member": m, "fold": f}, validated_trial(member_spec(stored, cfg, seed=spec.seed, member=m, fold=f))
             .model_copy(update={"task": task})) for m, f in plan(cfg)]


SUMMED = ("optimizer_steps", "trained_tokens", "evaluations", "flops", "estimated_duration_seconds")


def _totals(estimate: dict[str, Any], runs: list[dict[str, Any]], count: int, last_seconds: int | None = 0) -> None:
    """The parent's whole figures: `count` children like the mean of `runs`, then a last step (an
    ensemble's combine) of `last_seconds`."""
    for key in SUMMED:
        values = [r[key] for r in runs]
        if any(v is None for v in values) or (key == "estimated_duration_seconds" and last_seconds is None):
            estimate[key] = None
            continue
        total = count * sum(values) / len(values) if values else 0
        total += last_seconds if key == "estimated_duration_seconds" else 0
        estimate[key] = total if key == "flops" else round(total)


def _spread(runs: list[dict[str, Any]]) -> dict[str, dict[str, float] | None]:
    out: dict[str, dict[str, float] | None] = {}
    for key in ("optimizer_steps", "trained_tokens", "estimated_duration_seconds"):
        values = [r[key] for r in runs]
        out[key] = ({"min": min(values), "mean": sum(values) / len(values), "max": max(values)}
                    if values and all(v is not None for v in values) else None)
    return out


def _search(estimate: dict[str, Any], cost: Cost, spec: JobSpec, stored: dict[str, Any],
            counts: dict[str, dict[str, int]]) -> None:
    search = spec.config.search
    space = space_of(search, cost.task)
    metric, _ = objective_of(spec)
    trials = min(search.trials, grid_size(space)) if search.sampler.type == "grid" else search.trials
    runs = []
    for params in space_points(space, grid=search.sampler.type == "grid", seed=spec.seed):
        try:
            trial = validated_trial(trial_spec(stored, params, objective=metric))
        except LatheError:  # a draw between the bounds the create checked that is still not a job
            continue
        runs.append(cost.run(trial.model_copy(update={"task": cost.task}), counts))
    _totals(estimate, runs, trials)
    estimate["children"] = {"kind": "trials", "count": trials, "parallel": search.parallel, "per_child": _spread(runs),
                            "varied": sorted(space), "members": None, "combine": None}
    walked = search.sampler.type == "grid" and grid_size(space) <= SPACE_SAMPLES
    estimate["warnings"].append(
        "A trial's figures are the mean over "
        + (f"the grid's {len(runs)} points; " if walked else
           f"{len(runs)} random draws from the space (the sampler chooses its own); ")
        + ("pruned trials stop early: the totals are for every trial run to its end."
           if search.pruner.type != "none" else "totals assume every trial runs to its end."))
    varied = [key for key in space if key.removeprefix("config.") in ENCODING_KEYS]
    if varied:
        estimate["warnings"].append(f"Tokens are counted with the job's own {', '.join(varied)}; the space varies "
                                    "it, so the trials' tokens differ from these.")


def _ensemble(estimate: dict[str, Any], cost: Cost, spec: JobSpec, members: list[tuple[dict[str, Any], JobSpec]],
              runs: list[dict[str, dict[str, int]]], record: dict[str, Any]) -> None:
    cfg = spec.config.ensemble
    full = runs[0]
    items = [{**info, **cost.run(member, counts)} for (info, member), counts in zip(members, runs[1:])]
    models = len(items) or len(record.get("from_search") or [])
    # The combine step runs every model over validation and test; stacking's fold models also over
    # the training rows they did not train on.
    tokens = models * (cost.work(full, "validation_file") + cost.work(full, "test_file"))
    if cfg.resolved_method == "stacking":
        everything = cost.work(full, "training_file")
        tokens += sum(max(0, everything - cost.work(counts, "training_file")) for counts in runs[1:])
    combine = {"models": models, "flops": 2 * cost.compute * tokens if cost.known else None,
               "estimated_duration_seconds": cost.forward_seconds(tokens)}
    _totals(estimate, items, len(items), combine["estimated_duration_seconds"])
    if combine["flops"] is not None and estimate["flops"] is not None:
        estimate["flops"] += combine["flops"]
    estimate["children"] = {"kind": "members", "count": len(items), "parallel": cfg.parallel,
                            "per_child": _spread(items), "varied": None, "members": items, "combine": combine}


def _warn(estimate: dict[str, Any], spec: JobSpec) -> None:
    cfg = spec.config
    seconds = estimate["estimated_duration_seconds"]
    if estimate["children"] is not None:
        spread = estimate["children"]["per_child"]["estimated_duration_seconds"]
        seconds = spread["max"] if spread else None
    if cfg.max_runtime_seconds and seconds and seconds > cfg.max_runtime_seconds:
        estimate["warnings"].append(f"config.max_runtime_seconds is {cfg.max_runtime_seconds} s but a run is estimated "
                                    f"at {seconds:.0f} s: it would stop with deadline_exceeded.")
    if cfg.early_stopping is not None:
        estimate["warnings"].append("config.early_stopping may stop a run sooner: steps, tokens and time are its most.")


def space_points(space: dict[str, SearchParam], *, grid: bool, seed: int) -> list[dict[str, Any]]:
    """Trials' parameters to average over: the whole grid (when it has at most SPACE_SAMPLES
    points), else SPACE_SAMPLES random draws, each parameter as its distribution spreads it."""
    if grid and grid_size(space) <= SPACE_SAMPLES:
        return [dict(zip(space, values)) for values in itertools.product(*(p.grid() for p in space.values()))]
    rng = random.Random(seed)
    return [{key: _draw(p, rng) for key, p in space.items()} for _ in range(SPACE_SAMPLES)]


def _draw(p: SearchParam, rng: random.Random) -> Any:
    if p.type == "categorical":
        return rng.choice(p.choices)
    low, high = float(p.low), float(p.high)
    value = math.exp(rng.uniform(math.log(low), math.log(high))) if p.log else rng.uniform(low, high)
    if p.step:
        value = min(high, low + round((value - low) / p.step) * p.step)
    return int(round(value)) if p.type == "int" else value


def count_inputs(settings: Settings, source: ModelSource, task: Task, paths: dict[str, Path | None],
                 specs: list[JobSpec]) -> dict[str, Any]:
    """core.estimate's counts, from a worker: {"parameters", "runs": one per spec}. At most
    LATHE_DRY_RUN_TIMEOUT_SECONDS; how many run at once is the workers' LATHE_PREDICT_CONCURRENCY.

    Raises:
        BadRequest: what the encoding refuses (its code, message and param).
        LatheError: 503 when no worker takes the count (lathe.predictions), 504 when one took it and
            did not answer in time, 500 when it failed there.
    """
    stored = [s.model_dump(mode="json", exclude_unset=True) for s in specs]  # as stored: the worker validates them
    return request_counts(settings, model=source.base, hub=source.kind == "hub", task=str(task),
                          files={p: str(v) for p, v in paths.items() if v}, specs=stored)
