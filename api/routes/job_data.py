"""What a job produces over time: events (paged or streamed as SSE), checkpoints, metrics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request
from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from lathe.db.tables import TERMINAL, Checkpoint, Event, Job, Metric
from api.deps import SessionDep, TenantDep
from lathe.errors import NotFound
from lathe.jobs import owned_job
from api.schemas import (V1_ERRORS, JobCheckpoint, JobEvent, ListPage, MetricSeries, checkpoint_object,
                         error_responses, event_object, metric_point)

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=V1_ERRORS)

STREAM_BATCH = 500


def _event_seq(session: Session, job_id: str, event_id: str, param: str = "after") -> int:
    seq = session.scalar(select(Event.seq).where(Event.job_id == job_id, Event.id == event_id))
    if seq is None:
        raise NotFound(f"No event {event_id!r} in job {job_id}.", param=param)
    return seq


@router.get("/{fine_tuning_job_id}/events", response_model=ListPage[JobEvent],
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "A page of events, or with stream=true an SSE stream, oldest first."},
                       **error_responses(404)})
def list_events(
    request: Request, fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep,
    after: Annotated[str | None, Query(description="An event id: older events (newest-first paging), "
                                                   "or where a stream starts after.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    stream: Annotated[bool, Query(description="Server-Sent Events until the job finishes.")] = False,
):
    """List a job's events newest first, or follow them as Server-Sent Events (oldest first)."""
    job = owned_job(session, tenant_id=tenant.id, job_id=fine_tuning_job_id)
    after = after or (request.headers.get("last-event-id") if stream else None)
    after_seq = _event_seq(session, job.id, after) if after else None
    if stream:
        return EventSourceResponse(_follow(request, job.id, after_seq or 0), ping=15)
    stmt = select(Event).where(Event.job_id == job.id)
    if after_seq is not None:
        stmt = stmt.where(Event.seq < after_seq)
    rows = list(session.scalars(stmt.order_by(Event.seq.desc()).limit(limit + 1)))
    data = [event_object(e) for e in rows[:limit]]
    return ListPage(data=data, has_more=len(rows) > limit, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


def _poll(factory, job_id: str, after_seq: int) -> tuple[list[Event], bool]:
    with factory() as session:
        events = list(session.scalars(
            select(Event).where(Event.job_id == job_id, Event.seq > after_seq).order_by(Event.seq).limit(STREAM_BATCH)))
        status = session.scalar(select(Job.status).where(Job.id == job_id))
    return events, status is None or status in TERMINAL


async def _follow(request: Request, job_id: str, after_seq: int) -> AsyncIterator[dict]:
    factory = request.app.state.session_factory
    interval = request.app.state.sse_poll_seconds
    while True:
        events, finished = await run_in_threadpool(_poll, factory, job_id, after_seq)
        for ev in events:
            after_seq = ev.seq
            yield {"id": ev.id, "event": "message", "data": json.dumps(event_object(ev).model_dump())}
        # A terminal job's last events are already committed when its status is: drain, then stop.
        if finished and len(events) < STREAM_BATCH:
            return
        if not events:
            if await request.is_disconnected():
                return
            await anyio.sleep(interval)


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=ListPage[JobCheckpoint],
            responses=error_responses(404))
def list_checkpoints(
    fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep,
    after: Annotated[str | None, Query(description="A checkpoint id: list older checkpoints.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> ListPage[JobCheckpoint]:
    """List a job's checkpoints with their step metrics, newest first."""
    job = owned_job(session, tenant_id=tenant.id, job_id=fine_tuning_job_id)
    stmt = select(Checkpoint).where(Checkpoint.job_id == job.id)
    key = tuple_(Checkpoint.created_at, Checkpoint.step, Checkpoint.id)
    if after:
        cursor = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.id == after))
        if cursor is None:
            raise NotFound(f"No checkpoint {after!r} in job {job.id}.", param="after")
        stmt = stmt.where(key < tuple_(cursor.created_at, cursor.step, cursor.id))
    order = (Checkpoint.created_at.desc(), Checkpoint.step.desc(), Checkpoint.id.desc())
    rows = list(session.scalars(stmt.order_by(*order).limit(limit + 1)))
    data = [checkpoint_object(c, job) for c in rows[:limit]]
    return ListPage(data=data, has_more=len(rows) > limit, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


@router.get("/{fine_tuning_job_id}/metrics", response_model=MetricSeries, responses=error_responses(404))
def list_metrics(
    fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep,
    split: Annotated[str | None, Query(pattern="^(train|valid|test|baseline_test)$")] = None,
    # Capped at the step column's range (PostgreSQL INTEGER): a larger value was a 500 (found by schemathesis).
    after_step: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="Only points after this step.")] = None,
) -> MetricSeries:
    """The metric time series of the job's current attempt, by step."""
    job = owned_job(session, tenant_id=tenant.id, job_id=fine_tuning_job_id)
    stmt = select(Metric).where(Metric.job_id == job.id, Metric.attempt == job.attempt)
    if split:
        stmt = stmt.where(Metric.split == split)
    if after_step is not None:
        stmt = stmt.where(Metric.step > after_step)
    rows = session.scalars(stmt.order_by(Metric.step, Metric.seq))
    return MetricSeries(data=[metric_point(m) for m in rows])
