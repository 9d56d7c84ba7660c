"""Query functions shared by the API and the worker. Keyword-only; the tenant is never optional
where a caller acts for a tenant. Every job state change is a compare-and-set in SQL."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from lathe.db.tables import Checkpoint, Event, File, Job, JobStatus, new_id, now


# Values that end an attempt's claim on a job (set with the transition that ends it).
RELEASE_LEASE: dict[str, Any] = {"lease_owner": None, "lease_until": None}


def get_job(session: Session, *, tenant_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))


def get_file(session: Session, *, tenant_id: str, file_id: str) -> File | None:
    return session.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id))


CHECKPOINT_SUFFIX = ":ckpt-step-"


def get_checkpoint(session: Session, *, tenant_id: str, name: str) -> tuple[Checkpoint, Job] | None:
    """A tenant's checkpoint named by its id ("ftckpt-...") or its fine_tuned_model_checkpoint
    ("<fine_tuned_model or job id>:ckpt-step-<N>"), with its job; None when there is none."""
    if name.startswith("ftckpt-"):
        row = session.execute(
            select(Checkpoint, Job).join(Job, Job.id == Checkpoint.job_id)
            .where(Checkpoint.id == name, Job.tenant_id == tenant_id)
        ).first()
        return (row[0], row[1]) if row else None
    prefix, sep, step = name.rpartition(CHECKPOINT_SUFFIX)
    if not sep or not step.isdigit():
        return None
    row = session.execute(
        select(Checkpoint, Job).join(Job, Job.id == Checkpoint.job_id)
        .where(Job.tenant_id == tenant_id, (Job.fine_tuned_model == prefix) | (Job.id == prefix),
               Checkpoint.step == int(step))
        .order_by(Checkpoint.created_at.desc()).limit(1)
    ).first()
    return (row[0], row[1]) if row else None


def transition(
    session: Session,
    *,
    job_id: str,
    from_states: Iterable[JobStatus],
    to_state: JobStatus,
    attempt: int | None = None,
    **values: Any,
) -> bool:
    """Move a job to `to_state` only if it is in one of `from_states` (and, when given, still on
    `attempt`: a stale attempt can't finalise). Returns whether this call made the change.
    The caller commits."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_([str(s) for s in from_states]))
        .values(status=str(to_state), **values)
        .execution_options(synchronize_session=False)
    )
    if attempt is not None:
        stmt = stmt.where(Job.attempt == attempt)
    return session.execute(stmt).rowcount == 1


def add_event(
    session: Session,
    *,
    job_id: str,
    message: str,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
    attempt: int = 0,
) -> Event:
    ev = Event(id=new_id("ftevent"), job_id=job_id, attempt=attempt, level=level, type=type,
               message=message, data=data, created_at=now())
    session.add(ev)
    return ev
