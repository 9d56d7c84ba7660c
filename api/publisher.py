"""Publishing job messages after commit. A failure is logged, never raised: the job row is already
committed, and the sweeper re-publishes jobs whose message was lost."""

from __future__ import annotations

import logging
import threading

from celery import Celery

from api.queue import make_celery, publish
from api.settings import Settings

log = logging.getLogger("lathe.api")


class Publisher:
    """Builds the Celery app once (lazily: the API starts even when the broker is down)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._celery: Celery | None = None
        self._lock = threading.Lock()

    @property
    def celery(self) -> Celery:
        with self._lock:
            if self._celery is None:
                self._celery = make_celery(self.settings)
            return self._celery

    def __call__(self, task_name: str, job_id: str) -> bool:
        try:
            publish(self.celery, task_name, job_id, self.settings.queue)
            return True
        except Exception:  # noqa: BLE001 - the broker being down must not fail the request
            log.exception("could not publish %s for %s; the sweeper will retry", task_name, job_id)
            return False

    def close(self) -> None:
        if self._celery is not None:
            self._celery.close()
