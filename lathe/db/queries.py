"""Query functions shared by the API and the worker. Keyword-only; the tenant is never optional
where a caller acts for a tenant. A job's status is written by lathe.lifecycle alone."""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from lathe.db.tables import TERMINAL, Checkpoint, Event, File, Job, Model, new_id, now


def get_job(session: Session, *, tenant_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))


def get_file(session: Session, *, tenant_id: str, file_id: str) -> File | None:
    return session.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id))


def get_model(session: Session, *, tenant_id: str, model_id: str) -> Model | None:
    """A tenant's fine-tuned model (lathe.registry's)."""
    return session.scalar(select(Model).where(Model.id == model_id, Model.tenant_id == tenant_id))


JobRef = Literal["training_file", "validation_file", "test_file", "model"]


def unfinished_job_using(session: Session, *, tenant_id: str, ref: str, columns: tuple[JobRef, ...]) -> str | None:
    """The id of one of the tenant's unfinished jobs that names `ref` in one of `columns`; None
    when there is none (a file or model such a job needs must not be deleted)."""
    uses = [getattr(Job, column) == ref for column in columns]
    return session.scalar(select(Job.id).where(
        Job.tenant_id == tenant_id, Job.status.not_in([str(s) for s in TERMINAL]), or_(*uses)).limit(1))


def count_jobs_by_status(session: Session) -> dict[str, int]:
    """Jobs by status over every tenant: the operator's view (Prometheus), never a tenant's."""
    return {status: n for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status))}


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
