"""The transactional outbox. `record` runs inside lathe.lifecycle's status UPDATE transaction: the
event and one pending delivery per subscribed endpoint commit with the job's new status or not at
all, so a crash between the change and the delivery loses nothing (a dispatcher finds the rows).

Events are the ends of a tenant's own jobs (OpenAI's `fine_tuning.job.succeeded|failed|cancelled`);
a search's trials and an ensemble's members are reported by their parent's event alone."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from lathe.db.tables import Job, JobStatus, WebhookDelivery, WebhookEndpoint, WebhookEvent, new_id, now

JOB_EVENTS: dict[JobStatus, str] = {
    JobStatus.SUCCEEDED: "fine_tuning.job.succeeded",
    JobStatus.FAILED: "fine_tuning.job.failed",
    JobStatus.CANCELLED: "fine_tuning.job.cancelled",
}
# What an endpoint may subscribe to (GET /v1/webhook_event_types).
EVENT_TYPES: tuple[str, ...] = tuple(JOB_EVENTS.values())


def event_payload(event_id: str, event_type: str, job_id: str, created_at: int) -> dict[str, Any]:
    """The body of an event, shaped as the SDK's `FineTuningJob*WebhookEvent`."""
    return {"id": event_id, "object": "event", "created_at": created_at, "type": event_type, "data": {"id": job_id}}


def body_bytes(payload: dict[str, Any]) -> bytes:
    """The exact bytes every attempt of a delivery sends (and signs)."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def record(session: Session, *, job_id: str, status: JobStatus) -> WebhookEvent | None:
    """Write the event for `job_id` having reached `status` and its deliveries, in the caller's
    transaction; None when nothing is to be sent (not an end, a child job, no endpoint subscribed)."""
    event_type = JOB_EVENTS.get(JobStatus(status))
    if event_type is None:
        return None
    tenant_id, parent = session.execute(select(Job.tenant_id, Job.parent_job).where(Job.id == job_id)).one()
    if parent is not None:
        return None
    endpoints = [e for e in session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id))
                 if event_type in e.event_types]
    if not endpoints:
        return None
    created = now()
    event = WebhookEvent(id=new_id("evt"), tenant_id=tenant_id, type=event_type, job_id=job_id, created_at=created)
    event.payload = event_payload(event.id, event_type, job_id, created)
    session.add(event)
    session.flush()  # the deliveries reference it
    due = time.time()
    session.add_all(WebhookDelivery(id=new_id("wh"), event_id=event.id, endpoint_id=e.id, status="pending",
                                    attempts=0, next_attempt_at=due, created_at=created) for e in endpoints)
    return event
