"""Running a search: `Search.step`, one idempotent step (called by lathe.parents.advance, under
the parent's row lock) that reads the search's trials from the database and does what is due —
record the trials that finished, start new ones up to `parallel` (and the tenant's quota), or
finish the search with its best trial. A trial's (parent, number) is unique in the jobs table, so
a trial is never created twice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.spec import JobSpec
from lathe import lifecycle
from lathe.db.queries import add_event
from lathe.db.tables import TERMINAL, Job, JobStatus, now
from lathe.errors import LatheError
from lathe.lifecycle import Actor
from lathe.parents import close_cancelled, create_child, fail_child, fail_parent, mark_running, room
from lathe.search.space import grid_size, objective_of, space_of, trial_spec, validated_trial
from lathe.settings import Settings

log = logging.getLogger(__name__)
S = JobStatus
O = Actor.ORCHESTRATOR


class Search:
    """One step's view of a search: the parent (locked), its trials, the study."""

    def __init__(self, session: Session, settings: Settings, parent: Job):
        self.session, self.settings, self.parent = session, settings, parent
        self.spec: JobSpec = parent.job_spec()
        self.config = self.spec.config.search
        self.state: dict[str, Any] = dict(parent.search)
        self.metric, self.maximize = objective_of(self.spec)
        self.space = space_of(self.config, self.spec.task)
        self.children = list(session.scalars(select(Job).where(Job.parent_job == parent.id).order_by(Job.child_index)))
        self.active = [c for c in self.children if c.status not in TERMINAL]
        total = self.config.trials
        self.total = min(total, grid_size(self.space)) if self.config.sampler.type == "grid" else total

    def step(self) -> tuple[str, list[str], list[str]]:
        """Do what is due: (what was done, the trials to validate, the jobs to run) once committed."""
        started: list[str] = []
        self.record_finished()
        if self.parent.status == S.CANCELLING:
            did = close_cancelled(self.session, self.parent, active=self.active)
        elif len(self.children) >= self.total and not self.active:
            did = self.finish()
        else:
            started = self.start_trials()
            did = f"started {len(started)}" if started else ""
        self.save_board()
        return did, started, []

    # -- trials that ended ----------------------------------------------------------------------

    def record_finished(self) -> None:
        """Each trial that ended since the last step: its final state and value on its record, and
        an event on the parent (once: `reported` marks it)."""
        for child in self.children:
            info = dict(child.child_info or {})
            if child.status not in TERMINAL or info.get("reported"):
                continue
            info.update(self._outcome(child, info), reported=True)
            child.child_info = info
            add_event(self.session, job_id=self.parent.id, level="warn" if info["state"] == "failed" else "info",
                      message=self._ended_message(child, info), data={"trial": info["number"], "job": child.id,
                                                                       "state": info["state"], "value": info.get("value")})

    def _outcome(self, child: Job, info: dict[str, Any]) -> dict[str, Any]:
        if child.status == S.SUCCEEDED:
            value = trial_value(child, self.metric)
            if value is None:
                return {"state": "failed", "value": None, "error": f"no validation {self.metric} was recorded"}
            return {"state": "complete", "value": value}
        if child.status == S.CANCELLED:
            return {"state": "pruned" if info.get("state") == "pruned" else "cancelled"}
        return {"state": "failed", "value": None, "error": (child.error or {}).get("message")}

    def _ended_message(self, child: Job, info: dict[str, Any]) -> str:
        n, state = info["number"], info["state"]
        if state == "complete":
            best = self._best()
            mark = " (best so far)" if best is not None and best.id == child.id else ""
            return f"Trial {n} ({child.id}) finished: {self.metric}={info['value']:.4f}{mark}"
        if state == "pruned":
            at = info.get("pruned_at") or {}
            return f"Trial {n} ({child.id}) pruned at evaluation {at.get('evaluation')} (step {at.get('step')})"
        if state == "cancelled":
            return f"Trial {n} ({child.id}) was cancelled"
        return f"Trial {n} ({child.id}) failed: {info.get('error') or 'no reason recorded'}"

    def _best(self) -> Job | None:
        done = [c for c in self.children if (c.child_info or {}).get("state") == "complete"]
        if not done:
            return None
        sign = -1 if self.maximize else 1
        return min(done, key=lambda c: (sign * c.child_info["value"], c.child_index))

    # -- new trials ------------------------------------------------------------------------------

    def start_trials(self) -> list[str]:
        """Create the trials that are due (committed by the caller); their ids, to validate."""
        want = min(self.config.parallel - len(self.active), self.total - len(self.children))
        if want <= 0:
            return []
        free = room(self.session, self.settings, self.parent, self.state, active=len(self.active), child="trial")
        if free <= 0:
            return []
        from lathe.search.study import Study  # Optuna (and numpy) only where a search starts trials

        warm = list(self.state.get("warm_start") or [])
        study = Study(self.parent.id, maximize=self.maximize, space=self.space, sampler=self.config.sampler,
                      pruner=self.config.pruner, seed=self.parent.seed,
                      records=warm + [c.child_info or {} for c in self.children], study_attrs=self.state.get("study_attrs"))
        ids = []
        for _ in range(min(want, free)):
            number = len(self.children)
            params, attrs = study.propose(len(warm) + number)
            child = self._create_trial(number, params, attrs)
            self.children.append(child)
            if child.status != S.FAILED:
                ids.append(child.id)
        self.state["study_attrs"] = study.study_attrs
        mark_running(self.session, self.parent)
        return ids

    def _create_trial(self, number: int, params: dict[str, Any], attrs: dict[str, Any]) -> Job:
        parent = self.parent
        record = {"number": number, "params": params, "state": "running", "system_attrs": attrs, "intermediate": {}}
        body, error = trial_spec(parent.spec, params, objective=self.metric), None
        try:
            validated_trial(body)
        except LatheError as e:  # a combination of values the space's corners did not show
            error = {"code": "invalid_trial", "param": e.param, "message": e.message}
            body = trial_spec(parent.spec, {}, objective=self.metric)
        child = create_child(self.session, self.settings, parent, number=number, spec=body, info=record,
                             data={"trial": number, "params": params})
        shown = ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in params.items())
        add_event(self.session, job_id=parent.id, message=f"Trial {number} started: {child.id} ({shown})",
                  data={"trial": number, "job": child.id, "params": params})
        if error is not None:
            fail_child(self.session, child, error)
        return child

    # -- the end -----------------------------------------------------------------------------------

    def finish(self) -> str:
        best = self._best()
        if best is None:
            states = [(c.child_info or {}).get("state") for c in self.children]
            first = next((c.child_info.get("error") for c in self.children if (c.child_info or {}).get("error")), None)
            counts = ", ".join(f"{states.count(s)} {s}" for s in ("failed", "pruned", "cancelled") if states.count(s))
            error = {"code": "search_failed", "param": None,
                     "message": f"No trial of the search finished ({counts})" + (f"; the first error: {first}" if first else "")}
            return fail_parent(self.session, self.parent, error)
        info = best.child_info
        tokens = sum(c.trained_tokens or 0 for c in self.children)
        if not lifecycle.move(self.session, job_id=self.parent.id, source=S.RUNNING, target=S.SUCCEEDED, by=O,
                              fine_tuned_model=best.fine_tuned_model, metrics=best.metrics,
                              hyperparameters=best.hyperparameters, trained_tokens=tokens,
                              result_files=list(best.result_files or []), finished_at=now()):
            return ""
        add_event(self.session, job_id=self.parent.id, data={"best_trial": best.id, "value": info["value"]},
                  message=f"Search finished: the best of {len(self.children)} trials is trial {info['number']} "
                          f"({best.id}), {self.metric}={info['value']:.4f}")
        add_event(self.session, job_id=self.parent.id, message=f"New fine-tuned model created: {best.fine_tuned_model}",
                  data={"fine_tuned_model": best.fine_tuned_model})
        add_event(self.session, job_id=self.parent.id, message="The job has successfully completed")
        return "succeeded"

    # -- the leaderboard -------------------------------------------------------------------------

    def save_board(self) -> None:
        self.state.update(board(self.children, metric=self.metric, maximize=self.maximize, total=self.total))
        self.parent.search = self.state


ORDER = {"complete": 0, "pruned": 1, "running": 2, "cancelled": 3, "failed": 4}


def board(children: list[Job], *, metric: str, maximize: bool, total: int) -> dict[str, Any]:
    """The parent's public record: the objective, the best trial and the leaderboard (best first:
    finished trials by value, then pruned ones by their last value, then the rest by number)."""
    clock = time.time()
    rows = []
    for c in children:
        info = c.child_info or {}
        state = info.get("state", "running")
        value = info.get("value")
        if value is None and info.get("intermediate"):
            value = info["intermediate"][max(info["intermediate"], key=int)]
        seconds = ((c.finished_at or clock) - c.started_at) if c.started_at else None
        rows.append({"trial": c.child_index, "job": c.id, "status": c.status, "state": state, "params": info.get("params"),
                     "value": value, "steps": info.get("steps"), "seconds": int(seconds) if seconds is not None else None})
    sign = -1 if maximize else 1
    rows.sort(key=lambda r: (ORDER.get(r["state"], 5), sign * r["value"] if r["value"] is not None and
                             r["state"] in ("complete", "pruned") else 0, r["trial"]))
    best = next((r for r in rows if r["state"] == "complete"), None)
    return {"objective": {"metric": metric, "mode": "max" if maximize else "min"}, "trials_planned": total,
            "best_trial": best, "trials": rows}


def trial_value(job: Job, metric: str) -> float | None:
    """A finished trial's objective: of the weights it exported (its best evaluation when it loads
    the best model at the end, else its last)."""
    metrics = job.metrics or {}
    which = metrics.get("best") if job.job_spec().config.load_best_model_at_end else metrics.get("latest")
    value = (which or metrics.get("latest") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
