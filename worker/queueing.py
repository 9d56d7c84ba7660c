"""Publishing from the worker side: one Celery app per (broker, queue), made by api.queue's
`make_celery` (the one configuration). Tasks called directly (tests, the sweeper) publish through
the same cache, so nothing here depends on the Celery worker being the caller."""

from __future__ import annotations

import threading

from celery import Celery

from api.queue import RUN_TASK, VALIDATE_TASK, make_celery
from api.settings import Settings

_apps: dict[tuple[str, str], Celery] = {}
_lock = threading.Lock()


def celery_for(settings: Settings) -> Celery:
    """The Celery app for these settings' broker and queue (made once per process)."""
    key = (settings.broker_url, settings.queue)
    with _lock:
        if key not in _apps:
            _apps[key] = make_celery(settings)
        return _apps[key]


def publish_validate(settings: Settings, job_id: str) -> None:
    celery_for(settings).send_task(VALIDATE_TASK, args=[job_id], queue=settings.queue)


def publish_run(settings: Settings, job_id: str, *, countdown: float | None = None) -> None:
    """Enqueue `lathe.run_job`; call only after the job row is committed as `queued`."""
    celery_for(settings).send_task(RUN_TASK, args=[job_id], queue=settings.queue, countdown=countdown)


def retry_backoff(attempt: int, base: float = 5.0) -> float:
    """Seconds before attempt `attempt + 1` starts: base, 2 base, 4 base, ... (5, 10, 20, ... by
    default), capped at 5 minutes."""
    return float(min(300, base * 2 ** max(0, attempt - 1)))
