"""The one Celery configuration, shared by the API (which only publishes by task name) and the
worker (which consumes). Torch-free. Messages carry job ids, never payloads; no result backend:
state lives in SQL."""

from __future__ import annotations

from celery import Celery

from api.settings import Settings

VALIDATE_TASK = "lathe.validate_job"
RUN_TASK = "lathe.run_job"

# Longest job we expect a late-acked message to wait for before Redis redelivers it; the job's
# lease, not this timeout, decides whether a redelivered message may run (see worker.tasks).
VISIBILITY_TIMEOUT_S = 7 * 24 * 3600


def make_celery(settings: Settings) -> Celery:
    app = Celery("lathe", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=settings.queue,
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


def publish(app: Celery, task_name: str, job_id: str, queue: str) -> None:
    app.send_task(task_name, args=[job_id], queue=queue)
