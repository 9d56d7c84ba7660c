"""Sending an event: signed as Standard Webhooks (the SDK's `client.webhooks.unwrap` verifies it),
POSTed with a short timeout, redirects not followed, to an address checked at connect time.

At least once: a dispatcher (worker.webhooks) claims a due pending delivery by compare-and-set on
its lease, sends it, and records the attempt fenced on that lease. A 2xx ends it; anything else (a
status, a timeout, a refused connection or target) schedules the next attempt after an exponential
backoff with jitter, until LATHE_WEBHOOK_MAX_ATTEMPTS. Every attempt carries the same `webhook-id`
(the delivery's id) and a fresh `webhook-timestamp`. A dispatcher killed mid-attempt leaves a lease
that lapses; the next claim sends it again, with the same id.
"""

from __future__ import annotations

import random
import ssl
import time
import typing
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpcore
from sqlalchemy import delete, exists, or_, select, update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from lathe.db.tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent, now
from lathe.settings import Settings
from lathe.webhooks.addresses import UnsafeTarget, resolve
from lathe.webhooks.outbox import body_bytes

USER_AGENT = "Lathe-Webhooks/1"


class _CheckedBackend(httpcore.SyncBackend):
    """Connects only to addresses `resolve` allowed, so the address checked is the one used (TLS
    still verifies the URL's host name: httpcore passes it as the server name)."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: typing.Iterable[typing.Any] | None = None) -> httpcore.NetworkStream:
        try:
            addresses = resolve(host, port, allow_private=self.allow_private)
        except UnsafeTarget as exc:
            raise httpcore.ConnectError(str(exc)) from None
        error: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error or httpcore.ConnectError(f"{host} has no address")


@dataclass(frozen=True)
class Outcome:
    status_code: int | None  # None: no HTTP answer
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def live_secrets(endpoint: WebhookEndpoint, at: float | None = None) -> list[str]:
    """The secrets a delivery is signed with: the current one, and the previous one while a
    rotation's 24-hour overlap lasts (Standard Webhooks: several signatures, space-separated)."""
    at = time.time() if at is None else at
    keep = endpoint.previous_secret and (endpoint.previous_secret_expires_at or 0) > at
    return [endpoint.secret, *([endpoint.previous_secret] if keep else [])]


def signed_headers(webhook_id: str, body: bytes, secrets: list[str], at: datetime | None = None) -> dict[str, str]:
    at = at or datetime.now(UTC)
    signatures = " ".join(Webhook(secret).sign(webhook_id, at, body) for secret in secrets)
    return {"webhook-id": webhook_id, "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signatures, "content-type": "application/json", "user-agent": USER_AGENT}


def send(url: str, body: bytes, headers: dict[str, str], *, timeout: float, allow_private: bool) -> Outcome:
    """POST once; the response body is never read. Never raises for the target's faults."""
    started = time.monotonic()
    try:
        if urlsplit(url).scheme not in (("https", "http") if allow_private else ("https",)):
            raise httpcore.UnsupportedProtocol(f"{url} is not https")
        with httpcore.ConnectionPool(ssl_context=ssl.create_default_context(), max_connections=1,
                                     network_backend=_CheckedBackend(allow_private)) as pool:
            with pool.stream("POST", url, headers=list(headers.items()), content=body,
                             extensions={"timeout": dict.fromkeys(("connect", "read", "write", "pool"), timeout)}
                             ) as response:
                status = response.status
        return Outcome(status, None if 200 <= status < 300 else f"HTTP {status}", _ms(started))
    except httpcore.TimeoutException as exc:
        return Outcome(None, f"timed out after {timeout:g}s ({type(exc).__name__})", _ms(started))
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, ssl.SSLError) as exc:
        return Outcome(None, str(exc) or type(exc).__name__, _ms(started))


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def retry_delay(attempts: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Seconds before the attempt after the `attempts`-th failed one: base × 2^(attempts-1), capped,
    times a random factor in [0.5, 1) ("equal jitter": endpoints that failed together spread out)."""
    ceiling = min(settings.webhook_retry_max_seconds, settings.webhook_retry_base_seconds * 2 ** (attempts - 1))
    return ceiling * (0.5 + 0.5 * (rng or random).random())


def lease_seconds(settings: Settings) -> float:
    """How long a claim on a delivery lasts: an attempt's connect and read timeouts, and a margin."""
    return 2 * settings.webhook_timeout_seconds + 5


def claim_due(session: Session, *, limit: int, lease: float) -> list[tuple[str, float]]:
    """Claim up to `limit` due pending deliveries (compare-and-set on the lease; commits): their
    ids with the lease value that fences their record."""
    t = time.time()
    due = session.scalars(
        select(WebhookDelivery.id).where(
            WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= t,
            or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < t))
        .order_by(WebhookDelivery.next_attempt_at).limit(limit)).all()
    claimed = []
    for delivery_id in due:
        until = t + lease
        won = session.execute(
            update(WebhookDelivery).where(
                WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
                or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < t))
            .values(lease_until=until).execution_options(synchronize_session=False)).rowcount == 1
        if won:
            claimed.append((delivery_id, until))
    session.commit()
    return claimed


def attempt(factory: typing.Callable[[], Session], settings: Settings, delivery_id: str, lease: float) -> Outcome | None:
    """One attempt of a claimed delivery, recorded; None when it is gone (its endpoint was deleted)
    or another dispatcher took it over (this lease lapsed)."""
    with factory() as session:
        row = session.execute(
            select(WebhookDelivery, WebhookEvent, WebhookEndpoint)
            .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.lease_until == lease)).first()
        if row is None:
            return None
        delivery, event, endpoint = row
        url, number = endpoint.url, delivery.attempts + 1
        body = body_bytes(event.payload)
        headers = signed_headers(delivery.id, body, live_secrets(endpoint))
    outcome = send(url, body, headers, timeout=settings.webhook_timeout_seconds,
                   allow_private=settings.webhook_allow_private)
    with factory() as session:
        finished = outcome.ok or number >= settings.webhook_max_attempts
        values: dict[str, typing.Any] = {
            "attempts": number, "lease_until": None, "last_status_code": outcome.status_code,
            "last_error": outcome.error, "last_attempt_at": now(),
            "status": ("delivered" if outcome.ok else "failed") if finished else "pending"}
        if outcome.ok:
            values["delivered_at"] = now()
        elif not finished:
            values["next_attempt_at"] = time.time() + retry_delay(number, settings)
        recorded = session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id == delivery_id, WebhookDelivery.lease_until == lease)
            .values(**values).execution_options(synchronize_session=False)).rowcount == 1
        if recorded:
            session.add(WebhookAttempt(delivery_id=delivery_id, number=number, status_code=outcome.status_code,
                                       error=outcome.error, duration_ms=outcome.duration_ms, created_at=now()))
        session.commit()
    return outcome


def prune(session: Session, *, older_than: float) -> int:
    """Delete events created before `older_than` (unix seconds) that nothing is still delivering,
    with their deliveries and attempt logs (the foreign keys cascade); commits. Returns how many."""
    pending = exists().where(WebhookDelivery.event_id == WebhookEvent.id, WebhookDelivery.status == "pending")
    gone = session.execute(delete(WebhookEvent).where(WebhookEvent.created_at < older_than, ~pending)
                           .execution_options(synchronize_session=False)).rowcount
    session.commit()
    return gone
