"""A search's trial, from inside its training process: at each evaluation the trial records its
objective on its own row (`child_info.intermediate`, keyed by the evaluation's number) and asks
the search's pruner, on the study rebuilt from its siblings' rows (lathe.search.study), whether
to stop. Both happen in one transaction fenced on the attempt (worker.sink.DbSink.write), so a
stale attempt neither records nor decides anything.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from lathe.db.session import session_scope
from lathe.db.tables import Job
from lathe.search.space import objective_of, space_of
from lathe.search.study import Study
from worker.sink import DbSink


class TrialPruning:
    """The engine's `should_prune(evaluation, step, metrics)` for the trial `job_id`."""

    def __init__(self, sink: DbSink, url: str, job_id: str):
        self.sink, self.job_id = sink, job_id
        with session_scope(url) as session:
            job = session.get(Job, job_id)
            parent = session.get(Job, job.parent_job)
            self.parent_id, self.seed = parent.id, parent.seed
            self.warm = list((parent.search or {}).get("warm_start") or [])
            spec = parent.job_spec()
        self.config = spec.config.search
        self.metric, self.maximize = objective_of(spec)
        self.space = space_of(self.config, spec.task)

    def __call__(self, evaluation: int, step: int, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)):
            return False
        decided: dict[str, bool] = {}

        def record(session: Any) -> None:
            own = session.get(Job, self.job_id)
            info = dict(own.child_info or {})
            info["intermediate"] = {**(info.get("intermediate") or {}), str(evaluation): float(value)}
            info["steps"] = step  # trained so far (the last evaluation is at the last step)
            prune = False
            if self.config.pruner.type != "none":
                parent = session.get(Job, self.parent_id)
                siblings = session.scalars(select(Job).where(Job.parent_job == self.parent_id)
                                           .order_by(Job.child_index)).all()
                records = self.warm + [info if s.id == own.id else (s.child_info or {}) for s in siblings]
                study = Study(self.parent_id, maximize=self.maximize, space=self.space, sampler=self.config.sampler,
                              pruner=self.config.pruner, seed=self.seed, records=records,
                              study_attrs=(parent.search or {}).get("study_attrs"))
                prune, info["system_attrs"] = study.should_prune(len(self.warm) + own.child_index)
            info["state"] = "pruned" if prune else "running"
            if prune:
                info["pruned_at"] = {"evaluation": evaluation, "step": step, "value": float(value)}
            own.child_info = info
            decided["prune"] = prune

        self.sink.write(record)
        if decided["prune"]:
            self.sink.event(f"Pruned by the search's {self.config.pruner.type} pruner at evaluation {evaluation} "
                            f"(step {step}): {self.metric}={value:.4f}", data={"evaluation": evaluation, "step": step})
        return decided["prune"]
