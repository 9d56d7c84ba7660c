"""A tenant's webhook endpoints: created (the signing secret is shown once), listed, read,
updated, deleted, their secret rotated, a sample event sent, their delivery log read. Keyword-only
functions that the API's routes call; each commits what it changes."""

from __future__ import annotations

import base64
import secrets
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from lathe.db.tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent, new_id, now
from lathe.errors import BadRequest, NotFound
from lathe.settings import Settings
from lathe.webhooks.addresses import check_url
from lathe.webhooks.delivery import Outcome, live_secrets, send, signed_headers
from lathe.webhooks.outbox import EVENT_TYPES, body_bytes, event_payload

SECRET_PREFIX = "whsec_"
OVERLAP_SECONDS = 24 * 3600  # rotate_secret(keep_old_secret_active_for_24_hours=True)


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_hint(secret: str) -> str:
    return f"{SECRET_PREFIX}…{secret[-4:]}"


def check_event_types(event_types: list[str], *, param: str = "event_types") -> list[str]:
    """Raises: BadRequest when the list is empty or names an event this server never sends."""
    if not event_types:
        raise BadRequest("Subscribe to at least one event type.", param=param)
    for i, name in enumerate(event_types):
        if name not in EVENT_TYPES:
            raise BadRequest(f"Unsupported event type {name!r}: Lathe sends {', '.join(EVENT_TYPES)}.",
                             param=f"{param}[{i}]", code="unsupported_event_type")
    return list(dict.fromkeys(event_types))


def create_endpoint(session: Session, settings: Settings, *, tenant_id: str, name: str, url: str,
                    event_types: list[str]) -> WebhookEndpoint:
    row = WebhookEndpoint(
        id=new_id("we"), tenant_id=tenant_id, name=name, event_types=check_event_types(event_types),
        url=check_url(url, allow_private=settings.webhook_allow_private), secret=new_secret())
    row.created_at = row.updated_at = now()
    session.add(row)
    session.commit()
    return row


def owned_endpoint(session: Session, *, tenant_id: str, endpoint_id: str, param: str = "webhook_endpoint_id"
                   ) -> WebhookEndpoint:
    """Raises: NotFound unless the tenant has this endpoint."""
    row = session.scalar(select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id,
                                                       WebhookEndpoint.tenant_id == tenant_id))
    if row is None:
        raise NotFound(f"No webhook endpoint {endpoint_id!r}.", param=param)
    return row


def list_endpoints(session: Session, *, tenant_id: str, after: str | None, limit: int) -> list[WebhookEndpoint]:
    """Newest first, past endpoint `after`."""
    stmt = select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id)
    key = tuple_(WebhookEndpoint.created_at, WebhookEndpoint.id)
    if after:
        cursor = owned_endpoint(session, tenant_id=tenant_id, endpoint_id=after, param="after")
        stmt = stmt.where(key < tuple_(cursor.created_at, cursor.id))
    return list(session.scalars(stmt.order_by(WebhookEndpoint.created_at.desc(), WebhookEndpoint.id.desc())
                                .limit(limit)))


def update_endpoint(session: Session, settings: Settings, *, tenant_id: str, endpoint_id: str,
                    changes: dict[str, Any]) -> WebhookEndpoint:
    """Set the given `name` / `url` / `event_types`; `updated_at` moves only when one changes."""
    row = owned_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    if "url" in changes:
        changes["url"] = check_url(changes["url"], allow_private=settings.webhook_allow_private)
    if "event_types" in changes:
        changes["event_types"] = check_event_types(changes["event_types"])
    changed = {k: v for k, v in changes.items() if getattr(row, k) != v}
    for key, value in changed.items():
        setattr(row, key, value)
    if changed:
        row.updated_at = now()
    session.commit()
    return row


def delete_endpoint(session: Session, *, tenant_id: str, endpoint_id: str) -> None:
    """Its pending deliveries and its log go with it (the foreign keys cascade)."""
    session.delete(owned_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id))
    session.commit()


def rotate_secret(session: Session, *, tenant_id: str, endpoint_id: str, keep_old_for_24_hours: bool
                  ) -> WebhookEndpoint:
    """A new secret; the old one keeps signing (beside the new) for 24 hours, or stops now."""
    row = owned_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    old, row.secret = row.secret, new_secret()
    row.previous_secret = old if keep_old_for_24_hours else None
    row.previous_secret_expires_at = now() + OVERLAP_SECONDS if keep_old_for_24_hours else None
    row.updated_at = now()
    session.commit()
    return row


def send_test(session: Session, settings: Settings, *, tenant_id: str, endpoint_id: str, event_type: str) -> Outcome:
    """Send a sample `event_type` (about a job id that does not exist) now and answer what the
    endpoint said; nothing is stored or retried."""
    check_event_types([event_type], param="event_type")
    row = owned_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    url, keys = row.url, live_secrets(row)
    session.commit()  # no transaction held while the endpoint answers
    created = now()
    body = body_bytes(event_payload(new_id("evt"), event_type, "ftjob-test-" + secrets.token_hex(6), created))
    return send(url, body, signed_headers(new_id("wh"), body, keys, datetime.now(UTC)),
                timeout=settings.webhook_timeout_seconds, allow_private=settings.webhook_allow_private)


def deliveries(session: Session, *, tenant_id: str, endpoint_id: str, after: str | None, limit: int,
               attempts_per_delivery: int = 20) -> list[dict[str, Any]]:
    """The endpoint's delivery log, newest first, past delivery `after`: each delivery with its
    event and its attempts.

    Raises:
        NotFound: no such endpoint of the tenant's, or `after` is not one of its deliveries.
    """
    owned_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    stmt = (select(WebhookDelivery, WebhookEvent).join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .where(WebhookDelivery.endpoint_id == endpoint_id))
    if after:
        cursor = session.scalar(select(WebhookDelivery).where(WebhookDelivery.id == after,
                                                              WebhookDelivery.endpoint_id == endpoint_id))
        if cursor is None:
            raise NotFound(f"No delivery {after!r} of this endpoint.", param="after")
        stmt = stmt.where(tuple_(WebhookDelivery.created_at, WebhookDelivery.id) < tuple_(cursor.created_at, cursor.id))
    rows = session.execute(stmt.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
                           .limit(limit)).all()
    ids = [d.id for d, _ in rows]
    log: dict[str, list[WebhookAttempt]] = {i: [] for i in ids}
    for a in session.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(ids))
                             .order_by(WebhookAttempt.seq)):
        log[a.delivery_id].append(a)
    t = time.time()
    return [{
        "id": d.id, "object": "webhook_endpoint.delivery", "webhook_endpoint_id": endpoint_id,
        "event_id": e.id, "event_type": e.type, "job_id": e.job_id, "status": d.status, "attempts": d.attempts,
        "last_status_code": d.last_status_code, "last_error": d.last_error, "last_attempt_at": d.last_attempt_at,
        "next_attempt_at": round(d.next_attempt_at) if d.status == "pending" else None,
        "next_attempt_in_seconds": max(0.0, round(d.next_attempt_at - t, 1)) if d.status == "pending" else None,
        "delivered_at": d.delivered_at, "created_at": d.created_at,
        "attempt_log": [{"number": a.number, "status_code": a.status_code, "error": a.error,
                         "duration_ms": a.duration_ms, "created_at": a.created_at}
                        for a in log[d.id][-attempts_per_delivery:]],
    } for d, e in rows]
