"""A search request, judged before it is stored: its space (every trial a valid job), its objective,
and its warm start; and the parent's first record."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import EngineError
from core.spec import JobSpec
from lathe.db.queries import get_job
from lathe.db.tables import Job
from lathe.errors import BadRequest, NotFound
from lathe.search.space import check_space, objective_of, space_of


def engine_check(check: Callable[[JobSpec], None]) -> Callable[[JobSpec], None]:
    """`check` with an EngineError (core.applicability's refusals) raised as a BadRequest."""
    def checked(spec: JobSpec) -> None:
        try:
            check(spec)
        except EngineError as e:
            raise BadRequest(e.message, param=e.param, code=e.code) from None
    return checked


def check_search(session: Session, *, tenant_id: str, spec: JobSpec, stored: dict[str, Any],
                 check: Callable[[JobSpec], None]) -> dict[str, Any]:
    """Judge a search request; returns the parent's first `search` record.

    Args:
        spec: the request's spec (config.search set).
        stored: what the jobs table keeps of it (the fields set).
        check: the checks a job request's spec must pass, as BadRequest (see `engine_check`).

    Raises:
        BadRequest: the space, the objective or the warm start, naming the field.
        NotFound: warm_start_from is not one of the tenant's jobs.
    """
    search = spec.config.search
    metric, maximize = objective_of(spec)
    chosen = spec.config.metric_for_best_model
    if search.objective.metric and "metric_for_best_model" in spec.config.model_fields_set and chosen != metric:
        raise BadRequest(f"config.search.objective.metric is {metric!r} but config.metric_for_best_model is "
                         f"{chosen!r}: a trial's exported model is its best by the objective; set only one.",
                         param="config.search.objective.metric")
    space = space_of(search, spec.task)
    if search.sampler.type == "grid":
        for key, param in space.items():
            try:
                param.grid()
            except ValueError as e:
                raise BadRequest(f"config.search.space.{key}: {e}.", param=f"config.search.space.{key}",
                                 code="invalid_search_space") from None
    check_space(stored, space, objective=metric, check=check)
    record: dict[str, Any] = {"objective": {"metric": metric, "mode": "max" if maximize else "min"},
                              "best_trial": None, "trials": []}
    if search.warm_start_from:
        record["warm_start"] = warm_start(session, tenant_id=tenant_id, job_id=search.warm_start_from,
                                          metric=metric, maximize=maximize)
    return record


def a_search(session: Session, *, tenant_id: str, job_id: str, param: str) -> Job:
    """The tenant's search `job_id`, named by a request's field `param`.

    Raises:
        NotFound: not one of the tenant's jobs. BadRequest: a job, but not a search.
    """
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    if job is None:
        raise NotFound(f"No such job: {job_id!r}.", param=param)
    if not job.search:
        raise BadRequest(f"Job {job_id} is not a search; {param.rsplit('.', 1)[-1]} takes a search's id.", param=param)
    return job


def warm_start(session: Session, *, tenant_id: str, job_id: str, metric: str, maximize: bool) -> list[dict[str, Any]]:
    """The finished trials of an earlier search of the tenant, as records for the new study (their
    parameters, state, value and curve; not the sampler's notes, which belong to that study).

    Raises:
        NotFound / BadRequest: param config.search.warm_start_from.
    """
    param = "config.search.warm_start_from"
    earlier = a_search(session, tenant_id=tenant_id, job_id=job_id, param=param)
    objective = earlier.search.get("objective") or {}
    if objective.get("metric") != metric or objective.get("mode") != ("max" if maximize else "min"):
        raise BadRequest(f"Search {job_id} optimised {objective.get('metric')} ({objective.get('mode')}); this one "
                         f"optimises {metric} ({'max' if maximize else 'min'}): their values do not compare.",
                         param=param)
    trials = session.scalars(select(Job).where(Job.parent_job == earlier.id).order_by(Job.child_index))
    records = [{"params": t.child_info["params"], "state": t.child_info["state"], "value": t.child_info.get("value"),
                "intermediate": t.child_info.get("intermediate") or {}, "from": t.id}
               for t in trials if (t.child_info or {}).get("state") in ("complete", "pruned")]
    if not records:
        raise BadRequest(f"Search {job_id} has no finished trial to start from yet.", param=param)
    return records
