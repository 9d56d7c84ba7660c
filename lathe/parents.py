"""Jobs of jobs: a search (lathe.search) or an ensemble (lathe.ensemble) is a parent job whose
children — trials, members — are ordinary jobs carrying `parent_job`.

`advance(settings, parent_id)` is one idempotent step of a parent: it reads the children from the
database and does what is due (record the children that ended, start new ones, finish). Nothing
waits in a process. A step runs (on a worker's light-task pool, `lathe.advance_search`) when the
parent's files are validated, when a child ends, when a user cancels a child, and at every sweep
(worker.sweeper), which also covers a step lost with its worker. Each step first locks the
parent's row, so steps of one parent never overlap, and a child's (parent, number) is unique in the
jobs table, so a child is never created twice. A worker killed mid-step rolls back everything the
step wrote; the next step redoes it.

What both kinds share is here: the lock, the quota a parent's children wait for, creating a child,
and closing a cancelled parent.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from lathe import lifecycle
from lathe.db.queries import add_event
from lathe.db.session import session_scope
from lathe.db.tables import Job, JobStatus, new_id, now
from lathe.lifecycle import Actor
from lathe.queue import publish_run, publish_validate
from lathe.quotas import active_jobs, lock_tenant
from lathe.settings import Settings

S = JobStatus
LIVE = (S.QUEUED, S.RUNNING, S.CANCELLING)
O = Actor.ORCHESTRATOR
CREATED = "Created fine-tuning job"  # as lathe.jobs writes it (its event carries the request's fingerprint)


def advance(settings: Settings, job_id: str) -> str:
    """One step of the parent `job_id`; returns what it did ("" when nothing was due)."""
    from lathe.ensemble import Ensemble
    from lathe.search.orchestrate import Search

    with session_scope(settings.sqlalchemy_url) as session:
        # The parent's row lock: a no-op UPDATE (as lathe.quotas.lock_tenant) on both dialects.
        locked = session.execute(update(Job).where(Job.id == job_id, Job.status.in_([str(s) for s in LIVE]))
                                 .values(attempt=Job.attempt).execution_options(synchronize_session=False)).rowcount
        parent = session.get(Job, job_id) if locked else None
        if parent is None or not parent.is_parent:
            return ""
        step = (Search if parent.search else Ensemble)(session, settings, parent)
        did, to_validate, to_run = step.step()
        session.commit()
    for child_id in to_validate:  # after the commit: the validator must find the rows
        publish_validate(settings, child_id)
    for run_id in to_run:
        publish_run(settings, run_id)
    return did


def room(session: Session, settings: Settings, parent: Job, state: dict[str, Any], *, active: int, child: str) -> int:
    """How many children may start now under the tenant's active-jobs quota (the parent's own place
    counts for its first child). At 0, an event on the parent says it waits (once per wait)."""
    quota = lock_tenant(session, tenant_id=parent.tenant_id, settings=settings)
    in_use = active_jobs(session, tenant_id=parent.tenant_id)
    free = quota.max_active_jobs - in_use + (0 if active else 1)
    if free <= 0:
        if not state.get("waiting"):
            state["waiting"] = True
            add_event(session, job_id=parent.id, message=(
                f"Waiting for room under the active-jobs quota ({in_use} of {quota.max_active_jobs} in use); "
                f"the next {child} starts when a job finishes"))
        return 0
    state["waiting"] = False
    return free


def create_child(session: Session, settings: Settings, parent: Job, *, number: int, spec: dict[str, Any],
                 info: dict[str, Any], data: dict[str, Any]) -> Job:
    """A child job in validating_files (flushed; the caller commits, then publishes its validation)."""
    child = Job(id=new_id("ftjob"), tenant_id=parent.tenant_id, spec=spec, model=parent.model, task=parent.task,
                training_file=parent.training_file, validation_file=parent.validation_file,
                test_file=parent.test_file, result_files=[], job_metadata=parent.job_metadata,
                seed=spec.get("seed", parent.seed), attempt=0, max_attempts=settings.max_attempts, created_at=now(),
                parent_job=parent.id, child_index=number, child_info=info,
                gpu_class=parent.gpu_class, gpus=parent.gpus,  # routed as the parent (lathe.queue.run_queue)
                integrations=parent.integrations)  # each child logs its own run (worker.tracking)
    session.add(child)
    session.flush()
    add_event(session, job_id=child.id, message=CREATED, data={"parent_job": parent.id, **data})
    return child


def fail_child(session: Session, child: Job, error: dict[str, Any]) -> None:
    """A child that can't run (its spec is invalid): failed at once, saying why."""
    lifecycle.move(session, job_id=child.id, source=S.VALIDATING_FILES, target=S.FAILED, by=O,
                   error=error, finished_at=now())
    session.refresh(child, ["status"])
    add_event(session, job_id=child.id, level="error", data={"error": error}, message=f"The job failed: {error['message']}")


def mark_running(session: Session, parent: Job) -> None:
    """queued -> running, when the parent's first children start."""
    if parent.status == S.QUEUED:
        lifecycle.move(session, job_id=parent.id, source=S.QUEUED, target=S.RUNNING, by=O, started_at=now())
        session.refresh(parent, ["status"])  # as the row now says (the UPDATE skips the session)


def fail_parent(session: Session, parent: Job, error: dict[str, Any]) -> str:
    if not lifecycle.move(session, job_id=parent.id, source=S.RUNNING, target=S.FAILED, by=O, error=error,
                          finished_at=now()):
        return ""
    add_event(session, job_id=parent.id, level="error", data={"error": error}, message=f"The job failed: {error['message']}")
    return "failed"


def close_cancelled(session: Session, parent: Job, *, active: list[Job]) -> str:
    """A cancelled parent becomes cancelled once every child has stopped."""
    if active or not lifecycle.move(session, job_id=parent.id, source=S.CANCELLING, target=S.CANCELLED, by=O,
                                    finished_at=now()):
        return ""
    add_event(session, job_id=parent.id, message="The job was cancelled")
    return "cancelled"
