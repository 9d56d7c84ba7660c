"""Queue publishing: the one Celery configuration and the one publisher, shared by the API (which
publishes by task name after its commit) and the worker side (retries, the sweeper). Torch-free.

Two queues: `lathe.run_job` goes to LATHE_QUEUE, whose consumers are the training slots
(LATHE_WORKER_CONCURRENCY per worker); the light tasks, `lathe.validate_job` and
`lathe.advance_search` (one step of a search, lathe.search.orchestrate), go to
`<LATHE_QUEUE>.validate`, consumed by every worker's light-task pool
(worker.celery_app.ValidationPool), so checking a job's files or starting a search's trials never
waits for a training slot.

Prediction requests and dry runs' token counts (lathe.predictions) are not Celery messages: the API
pushes them as JSON onto the Redis list `<LATHE_QUEUE>.predict` (predict_queue), where every
worker's predict pool (worker.predict_pool) takes them, and reads the answer from a reply key of the
request's own.

A job with a GPU class (`resources.gpu`, lathe.gpu_classes) has its `lathe.run_job` messages on
`<LATHE_QUEUE>.gpu.<class>` instead, consumed by the workers that serve the class: `run_queue`
decides, and the publisher reads the job's class from its committed row, so no publisher (the
validator, a retry, the sweeper, a resume, a search's or an ensemble's step) routes it elsewhere.

Job messages carry job ids, never payloads; there is no result backend: state lives in SQL. Publishing
never raises: the job row is already committed when a message goes out, and the sweeper publishes
again for a job whose message was lost (a broker that was down, a FLUSHALL).
"""

from __future__ import annotations

import logging
import threading

from celery import Celery
from sqlalchemy import select

from lathe.db.session import session_scope
from lathe.db.tables import Job
from lathe.settings import Settings

log = logging.getLogger("lathe.queue")

VALIDATE_TASK = "lathe.validate_job"
RUN_TASK = "lathe.run_job"
ADVANCE_TASK = "lathe.advance_search"
LIGHT_TASKS = (VALIDATE_TASK, ADVANCE_TASK)

# Longest job we expect a late-acked message to wait for before Redis redelivers it; the job's
# lease, not this timeout, decides whether a redelivered message may run (see worker.tasks).
VISIBILITY_TIMEOUT_S = 7 * 24 * 3600


def validate_queue(settings: Settings) -> str:
    """The queue of the light tasks' messages (LIGHT_TASKS): `<LATHE_QUEUE>.validate`."""
    return f"{settings.queue}.validate"


def predict_queue(settings: Settings) -> str:
    """The Redis list of prediction requests (lathe.predictions): `<LATHE_QUEUE>.predict`."""
    return f"{settings.queue}.predict"


def queue_for(settings: Settings, task_name: str) -> str:
    """Where a task's messages go: the light tasks to their own queue, training to LATHE_QUEUE."""
    return validate_queue(settings) if task_name in LIGHT_TASKS else settings.queue


def run_queue(settings: Settings, gpu_class: str | None) -> str:
    """The queue of a job's `lathe.run_job` messages: `<LATHE_QUEUE>.gpu.<class>` for a job with a
    GPU class, LATHE_QUEUE for one without."""
    return f"{settings.queue}.gpu.{gpu_class}" if gpu_class else settings.queue


def job_run_queue(settings: Settings, job_id: str) -> str:
    """`run_queue` for the job's class, as its committed row says."""
    with session_scope(settings.sqlalchemy_url) as session:
        gpu_class = session.scalar(select(Job.gpu_class).where(Job.id == job_id))
    return run_queue(settings, gpu_class)


def make_celery(settings: Settings) -> Celery:
    """A Celery app for these settings' broker and queue (the worker registers its tasks on one)."""
    app = Celery("lathe", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=settings.queue,
        task_routes={name: {"queue": validate_queue(settings)} for name in LIGHT_TASKS},
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S, **settings.broker_transport_options},
        worker_hijack_root_logger=False,
        worker_concurrency=settings.worker_concurrency,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


class Publisher:
    """Sends job messages. Builds its Celery app lazily, so a process starts while the broker is down."""

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
        """Publish `task_name(job_id)`; call only after the job row is committed. False when the
        broker could not be reached (logged; the sweeper publishes again later)."""
        try:
            queue = job_run_queue(self.settings, job_id) if task_name == RUN_TASK else queue_for(self.settings, task_name)
            self.celery.send_task(task_name, args=[job_id], queue=queue)
            return True
        except Exception:  # noqa: BLE001 - the broker being down must not undo a committed change
            log.exception("could not publish %s for %s; the sweeper will publish it again", task_name, job_id)
            return False

    def close(self) -> None:
        if self._celery is not None:
            self._celery.close()


_publishers: dict[tuple[str | None, str], Publisher] = {}
_publishers_lock = threading.Lock()


def publisher_for(settings: Settings) -> Publisher:
    """This process's publisher for the settings' broker and queue (made once)."""
    key = (settings.redis_url, settings.queue)
    with _publishers_lock:
        if key not in _publishers:
            _publishers[key] = Publisher(settings)
        return _publishers[key]


def publish_validate(settings: Settings, job_id: str) -> bool:
    """Enqueue `lathe.validate_job` on the validation queue; call only after the job row is committed."""
    return publisher_for(settings)(VALIDATE_TASK, job_id)


def publish_advance(settings: Settings, job_id: str) -> bool:
    """Enqueue `lathe.advance_search` for a search (after its change is committed)."""
    return publisher_for(settings)(ADVANCE_TASK, job_id)


def publish_run(settings: Settings, job_id: str) -> bool:
    """Enqueue `lathe.run_job` on the job's run queue (`run_queue`); call only after the job row is
    committed as `queued`."""
    return publisher_for(settings)(RUN_TASK, job_id)


def retry_backoff(attempt: int, base: float = 5.0) -> float:
    """Seconds before attempt `attempt + 1` starts: base, 2 base, 4 base, ... (5, 10, 20, ... by
    default), capped at 5 minutes."""
    return float(min(300, base * 2 ** max(0, attempt - 1)))
