"""What a job produces over time, read for its tenant: events (a page, or the batches an SSE
stream polls), checkpoints, metrics. Keyword-only read functions that the API's routes call; they
change nothing, so none commits (the caller's session ends the read transaction).
"""

from __future__ import annotations

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from lathe.db.tables import TERMINAL, Checkpoint, Event, Job, Metric
from lathe.errors import NotFound
from lathe.jobs import owned_job

STREAM_BATCH = 500  # events per poll of a stream


def _event_seq(session: Session, *, job_id: str, event_id: str) -> int:
    seq = session.scalar(select(Event.seq).where(Event.job_id == job_id, Event.id == event_id))
    if seq is None:
        raise NotFound(f"No event {event_id!r} in job {job_id}.", param="after")
    return seq


def list_events(session: Session, *, tenant_id: str, job_id: str, after: str | None, limit: int) -> list[Event]:
    """A job's events newest first, older than event `after`.

    Raises:
        NotFound: no such job for this tenant (param "fine_tuning_job_id"), or `after` is not one of
            its events (param "after").
    """
    job = owned_job(session, tenant_id=tenant_id, job_id=job_id)
    stmt = select(Event).where(Event.job_id == job.id)
    if after:
        stmt = stmt.where(Event.seq < _event_seq(session, job_id=job.id, event_id=after))
    return list(session.scalars(stmt.order_by(Event.seq.desc()).limit(limit)))


def stream_start(session: Session, *, tenant_id: str, job_id: str, after: str | None) -> int:
    """Where a stream of the job's events starts: the position of event `after` (0: the first).

    Raises:
        NotFound: as `list_events`.
    """
    job = owned_job(session, tenant_id=tenant_id, job_id=job_id)
    return _event_seq(session, job_id=job.id, event_id=after) if after else 0


def stream_batch(session: Session, *, tenant_id: str, job_id: str, after_seq: int,
                 limit: int = STREAM_BATCH) -> tuple[list[Event], bool]:
    """The next events of a stream, oldest first, and whether the job has finished (or is gone).

    A finished job's last events are committed with its status, so a caller that sees `finished`
    with fewer than `limit` events has them all. The status is read first: each statement may see
    a newer snapshot (PostgreSQL's read committed, SQLite outside a write), and events read after a
    terminal status include those committed with it, where events read before it might not.
    """
    status = session.scalar(select(Job.status).where(Job.id == job_id, Job.tenant_id == tenant_id))
    events = list(session.scalars(
        select(Event).where(Event.job_id == job_id, Event.seq > after_seq).order_by(Event.seq).limit(limit)))
    return events, status is None or status in TERMINAL


def list_checkpoints(session: Session, *, tenant_id: str, job_id: str, after: str | None,
                     limit: int) -> tuple[Job, list[Checkpoint]]:
    """The job and its checkpoints, newest first, older than checkpoint `after`.

    Raises:
        NotFound: no such job for this tenant, or `after` is not one of its checkpoints.
    """
    job = owned_job(session, tenant_id=tenant_id, job_id=job_id)
    stmt = select(Checkpoint).where(Checkpoint.job_id == job.id)
    key = tuple_(Checkpoint.created_at, Checkpoint.step, Checkpoint.id)
    if after:
        cursor = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.id == after))
        if cursor is None:
            raise NotFound(f"No checkpoint {after!r} in job {job.id}.", param="after")
        stmt = stmt.where(key < tuple_(cursor.created_at, cursor.step, cursor.id))
    order = (Checkpoint.created_at.desc(), Checkpoint.step.desc(), Checkpoint.id.desc())
    return job, list(session.scalars(stmt.order_by(*order).limit(limit)))


def list_metrics(session: Session, *, tenant_id: str, job_id: str, split: str | None,
                 after_step: int | None) -> list[Metric]:
    """The metric points of the job's current attempt by step, of one split, after a step.

    Raises:
        NotFound: no such job for this tenant.
    """
    job = owned_job(session, tenant_id=tenant_id, job_id=job_id)
    stmt = select(Metric).where(Metric.job_id == job.id, Metric.attempt == job.attempt)
    if split:
        stmt = stmt.where(Metric.split == split)
    if after_step is not None:
        stmt = stmt.where(Metric.step > after_step)
    return list(session.scalars(stmt.order_by(Metric.step, Metric.seq)))
