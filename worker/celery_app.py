"""The Celery worker: `celery -A worker.celery_app worker -Q <queue> --concurrency <n> --loglevel INFO`.

Torch-free (a test imports it in a fresh interpreter and checks `sys.modules`): the tasks only
supervise training processes. The thread pool is the default because a task spends its life
waiting on a child process; there is no CPU work to spread over forked pool processes, and no DB
connection pool is ever shared across a fork.
"""

from __future__ import annotations

from lathe.queue import RUN_TASK, VALIDATE_TASK, publisher_for
from lathe.settings import get_settings
from worker import tasks

app = publisher_for(get_settings()).celery  # lathe.queue.make_celery: the one configuration
app.conf.worker_pool = "threads"


@app.task(name=VALIDATE_TASK, ignore_result=True)
def validate_job(job_id: str) -> str:
    return tasks.validate_job(job_id)


@app.task(name=RUN_TASK, ignore_result=True)
def run_job(job_id: str) -> str:
    return tasks.run_job(job_id)
