"""The Celery worker: `lathe worker`, or `celery -A worker.celery_app worker -Q <queue> --concurrency <n>`.

Torch-free (a test imports it in a fresh interpreter and checks `sys.modules`): the tasks only
supervise training processes. The thread pool is the default because a task spends its life
waiting on a child process; there is no CPU work to spread over forked pool processes, and no DB
connection pool is ever shared across a fork.

Two pools in one process. Celery's pool (`--concurrency`, LATHE_WORKER_CONCURRENCY) is the training
slots: it consumes LATHE_QUEUE, where `lathe.run_job` goes. `ValidationPool`, a consumer bootstep
(Celery's documented way to add a message consumer to a worker), consumes `<LATHE_QUEUE>.validate`
on a channel of its own, with a prefetch of LATHE_VALIDATE_CONCURRENCY and a thread pool of that
size, so a file check never waits for a training slot and never takes one. Being part of the worker
process, it starts, stops (warm shutdown: validations in flight finish) and dies with it.

The worker's standby training processes (`worker.supervisor.standbys`) start when the worker is
ready and are killed when it shuts down; so do its prediction threads (`worker.predict_pool`:
LATHE_PREDICT_CONCURRENCY threads on the Redis list `<LATHE_QUEUE>.predict`, answered by a
prediction process, the one that imports torch, started on the first request and kept).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from celery import bootsteps
from celery.signals import worker_ready, worker_shutdown
from kombu.common import ignore_errors
from kombu import Consumer, Exchange, Message, Queue

from lathe.gpu_classes import announcer
from lathe.queue import ADVANCE_TASK, RUN_TASK, VALIDATE_TASK, publisher_for, validate_queue
from lathe.settings import get_settings
from worker import predict_pool, tasks
from worker.supervisor import standbys

log = logging.getLogger(__name__)

app = publisher_for(get_settings()).celery  # lathe.queue.make_celery: the one configuration
app.conf.worker_pool = "threads"


# The GPU classes this worker serves (LATHE_WORKER_GPU_CLASSES; `lathe worker --gpu-class` consumes
# their queues) count as served from when it is ready (lathe.gpu_classes); its heartbeats end with it.
@worker_ready.connect(weak=False)
def announce_gpu_classes(**_: Any) -> None:
    announcer.start(get_settings())


@worker_shutdown.connect(weak=False)
def stop_announcing(**_: Any) -> None:
    announcer.stop()


@worker_ready.connect(weak=False)
def start_standbys(**_: Any) -> None:
    standbys.enable(get_settings())


@worker_shutdown.connect(weak=False)
def stop_standbys(**_: Any) -> None:
    standbys.close()


@worker_ready.connect(weak=False)
def start_predictions(**_: Any) -> None:
    predict_pool.start(get_settings())


@worker_shutdown.connect(weak=False)
def stop_predictions(**_: Any) -> None:
    predict_pool.stop()


@app.task(name=VALIDATE_TASK, ignore_result=True)
def validate_job(job_id: str) -> str:
    # Messages published before validation had a queue of its own still arrive on LATHE_QUEUE.
    return tasks.validate_job(job_id)


@app.task(name=RUN_TASK, ignore_result=True)
def run_job(job_id: str) -> str:
    return tasks.run_job(job_id)


# The light tasks the pool runs (lathe.queue.LIGHT_TASKS), by name.
LIGHT = {VALIDATE_TASK: tasks.validate_job, ADVANCE_TASK: tasks.advance_search}


def message_job_id(body: Any, headers: dict[str, Any]) -> tuple[str, str] | None:
    """(task name, job id) of a light task's message (Celery's protocol 2: body `[args, kwargs,
    embed]`, the task name in the headers; protocol 1: a dict), None for anything else."""
    if isinstance(body, dict):  # protocol 1
        task, args = body.get("task"), body.get("args")
    else:
        task, args = headers.get("task"), body[0] if isinstance(body, (list, tuple)) and body else None
    if task not in LIGHT or not isinstance(args, (list, tuple)) or len(args) != 1 or not isinstance(args[0], str):
        return None
    return task, args[0]


class ValidationPool(bootsteps.ConsumerStep):
    """Runs the light tasks' messages (`lathe.validate_job`, `lathe.advance_search`) from
    `<LATHE_QUEUE>.validate` on threads of its own.

    The channel's prefetch equals the pool's size: a message is taken only when a thread is free, and
    acknowledged after the task returns (late, as Celery's tasks are), so one in flight when the
    worker is killed is delivered again; both tasks are idempotent, so a duplicate is a no-op.
    """

    def __init__(self, parent, **kwargs):  # noqa: ANN001 - Celery's signature
        super().__init__(parent, **kwargs)
        self.settings = get_settings()
        self.size = self.settings.validate_concurrency
        self.queue_name = validate_queue(self.settings)
        self.threads = ThreadPoolExecutor(self.size, thread_name_prefix="validate")
        self.running: set[Future] = set()
        self.lock = threading.Lock()

    def get_consumers(self, channel):  # noqa: ANN001, ANN201
        # The exchange and binding Celery declares when it publishes to a queue by name.
        queue = Queue(self.queue_name, Exchange(self.queue_name, type="direct"), routing_key=self.queue_name)
        log.info("validation pool: %s threads on queue %s", self.size, self.queue_name)
        return [Consumer(channel, queues=[queue], callbacks=[self.on_message], accept=["json"],
                         prefetch_count=self.size)]

    def on_message(self, body: Any, message: Message) -> None:
        # Called on the worker's event loop: hand the work over, never block here.
        parsed = message_job_id(body, message.headers or {})
        if parsed is None:
            log.error("validation queue %s: dropping a message that is not one of %s(job_id): %r",
                      self.queue_name, "/".join(LIGHT), (message.headers or {}).get("task"))
            message.reject()
            return
        future = self.threads.submit(self.run, *parsed, message)
        with self.lock:
            self.running.add(future)
        future.add_done_callback(self.forget)

    def forget(self, future: Future) -> None:
        with self.lock:
            self.running.discard(future)

    def run(self, task: str, job_id: str, message: Message) -> None:
        try:
            status = LIGHT[task](job_id)
            log.info("%s[%s] -> %s", task, job_id, status or "nothing to do")
        except Exception:  # noqa: BLE001 - the job stays where it was; the sweeper publishes it again
            log.exception("%s[%s] crashed", task, job_id)
        finally:
            try:
                message.ack()
            except Exception:  # noqa: BLE001 - the channel closed meanwhile; the message is redelivered
                log.warning("%s[%s]: could not acknowledge the message", task, job_id, exc_info=True)

    def drain(self, c) -> None:  # noqa: ANN001
        """Take no more messages; let the validations in flight finish and acknowledge theirs before
        the channel closes (closing it would hand their messages back to the queue)."""
        for consumer in self.consumers or []:
            ignore_errors(c.connection, consumer.cancel)
        with self.lock:
            running = set(self.running)
        wait(running)

    def stop(self, c):  # noqa: ANN001 - a warm shutdown, or a lost broker connection (start follows)
        self.drain(c)
        super().stop(c)

    def shutdown(self, c):  # noqa: ANN001
        self.drain(c)
        super().shutdown(c)
        self.threads.shutdown(wait=True)


app.steps["consumer"].add(ValidationPool)
