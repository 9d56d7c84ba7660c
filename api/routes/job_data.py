"""What a job produces over time: events (paged or streamed as SSE), checkpoints, metrics (the
reads are lathe.job_data's; the stream's polling loop is HTTP's, here)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, TenantDep
from api.schemas import (
    V1_ERRORS,
    JobCheckpoint,
    JobEvent,
    ListPage,
    MetricSeries,
    checkpoint_object,
    error_responses,
    event_object,
    metric_point,
)
from lathe import job_data as service
from lathe.db.tables import Event

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=V1_ERRORS)


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
    if stream:
        after = after or request.headers.get("last-event-id")
        after_seq = service.stream_start(session, tenant_id=tenant.id, job_id=fine_tuning_job_id, after=after)
        return EventSourceResponse(_follow(request, tenant.id, fine_tuning_job_id, after_seq), ping=15)
    rows = service.list_events(session, tenant_id=tenant.id, job_id=fine_tuning_job_id, after=after, limit=limit + 1)
    data = [event_object(e) for e in rows[:limit]]
    return ListPage(data=data, has_more=len(rows) > limit, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


def _poll(factory, tenant_id: str, job_id: str, after_seq: int) -> tuple[list[Event], bool]:  # noqa: ANN001
    # A session per poll, opened here because the stream outlives the request's session and none
    # may stay open while it waits. Only reads, so no commit: closing ends the read transaction.
    with factory() as session:
        return service.stream_batch(session, tenant_id=tenant_id, job_id=job_id, after_seq=after_seq)


async def _follow(request: Request, tenant_id: str, job_id: str, after_seq: int) -> AsyncIterator[dict]:
    factory = request.app.state.session_factory
    interval = request.app.state.sse_poll_seconds
    while True:
        events, finished = await run_in_threadpool(_poll, factory, tenant_id, job_id, after_seq)
        for ev in events:
            after_seq = ev.seq
            yield {"id": ev.id, "event": "message", "data": json.dumps(event_object(ev).model_dump())}
        # A terminal job's last events are already committed when its status is: drain, then stop.
        if finished and len(events) < service.STREAM_BATCH:
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
    job, rows = service.list_checkpoints(session, tenant_id=tenant.id, job_id=fine_tuning_job_id, after=after,
                                         limit=limit + 1)
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
    rows = service.list_metrics(session, tenant_id=tenant.id, job_id=fine_tuning_job_id, split=split,
                                after_step=after_step)
    return MetricSeries(data=[metric_point(m) for m in rows])
