"""The webhook dispatcher: `lathe worker` runs `run_dispatcher` in a thread. Every
LATHE_WEBHOOK_POLL_SECONDS it claims the outbox's due deliveries (lathe.webhooks.delivery, a
compare-and-set on each one's lease) up to its free slots and sends them on a pool of
LATHE_WEBHOOK_CONCURRENCY threads, so a slow endpoint never holds the others up. Any number of
workers may dispatch at once: a delivery is claimed by one at a time, and one whose dispatcher died
mid-attempt is claimed again once its lease lapses (same `webhook-id`: at least once). Once an
hour it also deletes events older than LATHE_WEBHOOK_RETENTION_DAYS that are no longer being
delivered (their delivery logs go with them)."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from lathe.db.session import session_factory
from lathe.settings import Settings
from lathe.webhooks.delivery import attempt, claim_due, lease_seconds, prune

log = logging.getLogger(__name__)

PRUNE_EVERY_SECONDS = 3600.0


def run_dispatcher(settings: Settings, *, stop: threading.Event | None = None) -> None:
    """Dispatch until `stop` is set (forever without one); errors are logged, never raised."""
    stop = stop or threading.Event()
    factory = session_factory(settings.sqlalchemy_url)
    size, lease = settings.webhook_concurrency, lease_seconds(settings)
    running: set[Future] = set()
    lock = threading.Lock()

    def send(delivery_id: str, until: float) -> None:
        try:
            outcome = attempt(factory, settings, delivery_id, until)
            if outcome is not None:
                log.info("webhook %s: %s", delivery_id, outcome.status_code or outcome.error)
        except Exception:  # noqa: BLE001 - the lease lapses and another pass retries it
            log.exception("webhook %s: the attempt crashed", delivery_id)

    def forget(future: Future) -> None:
        with lock:
            running.discard(future)

    pruned_at = 0.0
    with ThreadPoolExecutor(size, thread_name_prefix="webhook") as pool:
        while not stop.is_set():
            if time.time() - pruned_at > PRUNE_EVERY_SECONDS:
                pruned_at = time.time()
                try:
                    with factory() as session:
                        prune(session, older_than=pruned_at - settings.webhook_retention_days * 86400)
                except Exception:  # noqa: BLE001 - next hour
                    log.exception("pruning old webhook events failed")
            with lock:
                free = size - len(running)
            try:
                claimed = []
                if free > 0:
                    with factory() as session:
                        claimed = claim_due(session, limit=free, lease=lease)
                for delivery_id, until in claimed:
                    future = pool.submit(send, delivery_id, until)
                    with lock:
                        running.add(future)
                    future.add_done_callback(forget)
            except Exception:  # noqa: BLE001 - a database hiccup: try again next pass
                log.exception("webhook dispatch failed")
            stop.wait(settings.webhook_poll_seconds)
