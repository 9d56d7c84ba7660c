"""GPU classes: the kind of machine a job trains on.

A job's `resources` (Lathe's extension on a create: `{"gpu": "a100", "gpus": 1}`) names a class;
its `lathe.run_job` messages go to `<LATHE_QUEUE>.gpu.<class>` (lathe.queue.run_queue decides, for
every publisher), which only the workers that serve the class consume (`lathe worker --gpu-class
a100`, LATHE_WORKER_GPU_CLASSES). A worker also claims only jobs it serves: the claim's
compare-and-set is fenced on the class (`Served.fence`), so a message on the wrong queue never runs
a job on the wrong machine. A job without `resources` goes to LATHE_QUEUE, which the `default`
class stands for: a worker that names no class serves it alone, as before classes existed.

Who serves what is told by heartbeats in Redis rather than by asking Celery
(`app.control.inspect().active_queues()` broadcasts to every worker and waits out a timeout for
their answers, on each sweep of each worker): every `LATHE_HEARTBEAT_SECONDS` a worker sets
`<LATHE_QUEUE>:gpu-served:<class>` for each class it serves, to expire after LATHE_LEASE_SECONDS
(its jobs' leases last as long). A queued job whose class has no such key gets one warn event from
the sweeper (`note_unserved`) and waits: its message stays in its class's queue, and a worker that
starts serving the class takes it, with nobody acting.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import ColumnElement, false, or_, select, update

from lathe.db.queries import add_event
from lathe.db.session import session_scope
from lathe.db.tables import Event, Job, JobStatus
from lathe.errors import BadRequest
from lathe.queue import run_queue
from lathe.settings import Settings

log = logging.getLogger(__name__)

NAME = r"[a-z0-9][a-z0-9_-]{0,31}"
# What a worker names to serve jobs without a class (LATHE_QUEUE); never a job's class.
DEFAULT = "default"
# GPUs one job trains on at most: the engine trains on one device. Multi-GPU training (DDP) would
# raise it; until then more is refused rather than accepted and ignored.
MAX_GPUS = 1


class Resources(BaseModel):
    """Lathe: what a job needs of the machine that trains it."""

    model_config = ConfigDict(extra="forbid")
    gpu: str = Field(..., pattern=f"^{NAME}$", description=(
        "The GPU class (e.g. `a100`): the job runs only on a worker that serves it (`lathe worker --gpu-class "
        "a100`), and waits in the queue, saying so in its events, while none does. Lower-case letters, digits, "
        "`_` and `-`, at most 32; `default` is reserved (leave `resources` out for the default queue)."))
    gpus: int = Field(1, ge=1, le=MAX_GPUS, description=(
        "GPUs the job trains on: 1 (multi-GPU training is not supported yet; more is refused)."))

    @field_validator("gpu")
    @classmethod
    def _not_default(cls, value: str) -> str:
        if value == DEFAULT:
            raise BadRequest(f"resources.gpu: {DEFAULT!r} names the queue of jobs without a GPU class; leave "
                             "`resources` out for it.", param="resources.gpu", code="invalid_value")
        return value

    @field_validator("gpus", mode="before")
    @classmethod
    def _one_gpu(cls, value: Any) -> Any:
        # Before the bound's own check, so that the answer says why rather than "at most 1".
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_GPUS:
            raise BadRequest(f"resources.gpus: {value} GPUs were asked for, but a job trains on one GPU; "
                             "multi-GPU training is not supported yet.", param="resources.gpus",
                             code="unsupported_value")
        return value


@dataclass(frozen=True)
class Served:
    """What one worker serves: GPU classes, and whether jobs without one (`default`)."""

    classes: tuple[str, ...]
    default: bool

    def queues(self, settings: Settings) -> list[str]:
        """The run queues it consumes: a queue per class, and LATHE_QUEUE for `default`."""
        return [run_queue(settings, c) for c in self.classes] + ([settings.queue] if self.default else [])

    def serves(self, gpu_class: str | None) -> bool:
        return gpu_class in self.classes if gpu_class else self.default

    def fence(self) -> ColumnElement[bool]:
        """The SQL condition of a job this worker may claim."""
        conditions = [Job.gpu_class.in_(self.classes)] if self.classes else []
        if self.default:
            conditions.append(Job.gpu_class.is_(None))
        return or_(*conditions) if conditions else false()


def served(settings: Settings) -> Served:
    """The classes in LATHE_WORKER_GPU_CLASSES (comma-separated; empty: `default` alone).

    Raises:
        ValueError: a name that is not a class name or `default`.
    """
    names = [n.strip() for n in settings.worker_gpu_classes.split(",") if n.strip()] or [DEFAULT]
    bad = [n for n in names if not re.fullmatch(NAME, n)]
    if bad:
        raise ValueError(f"not GPU class names: {', '.join(bad)} (lower-case letters, digits, _ and -, at most 32)")
    classes = tuple(dict.fromkeys(n for n in names if n != DEFAULT))
    return Served(classes=classes, default=DEFAULT in names)


# --- heartbeats ----------------------------------------------------------------------------------

def served_key(settings: Settings, gpu_class: str) -> str:
    return f"{settings.queue}:gpu-served:{gpu_class}"


def _client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.broker_url, socket_timeout=5, socket_connect_timeout=5)


def announce(settings: Settings, classes: Iterable[str], *, worker: str = "") -> None:
    """One heartbeat: each class counts as served for LATHE_LEASE_SECONDS from now."""
    client = _client(settings)
    try:
        pipe = client.pipeline()
        for gpu_class in classes:
            pipe.set(served_key(settings, gpu_class), worker or "worker", ex=max(1, int(settings.lease_seconds)))
        pipe.execute()
    finally:
        client.close()


def unserved(settings: Settings, classes: Iterable[str]) -> set[str]:
    """Which of `classes` no live worker serves (no heartbeat within LATHE_LEASE_SECONDS).

    Raises:
        redis.RedisError: Redis could not be asked.
    """
    classes = sorted(set(classes))
    if not classes:
        return set()
    client = _client(settings)
    try:
        pipe = client.pipeline()
        for gpu_class in classes:
            pipe.exists(served_key(settings, gpu_class))
        return {c for c, found in zip(classes, pipe.execute(), strict=True) if not found}
    finally:
        client.close()


class Announcer:
    """A worker's heartbeat thread for its classes: started when the worker is ready (its first beat
    before that returns), stopped at its shutdown (the keys then expire unless another worker beats)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, settings: Settings) -> None:
        classes = served(settings).classes
        if not classes or self._thread is not None:
            return
        worker = f"{socket.gethostname()}:{os.getpid()}"
        self._stop.clear()
        self._beat(settings, classes, worker)
        self._thread = threading.Thread(target=self._run, args=(settings, classes, worker), name="gpu-classes",
                                        daemon=True)
        self._thread.start()
        log.info("serving GPU classes %s (heartbeat every %ss)", ", ".join(classes), settings.heartbeat_seconds)

    def _run(self, settings: Settings, classes: tuple[str, ...], worker: str) -> None:
        while not self._stop.wait(settings.heartbeat_seconds):
            self._beat(settings, classes, worker)

    @staticmethod
    def _beat(settings: Settings, classes: tuple[str, ...], worker: str) -> None:
        try:
            announce(settings, classes, worker=worker)
        except redis.RedisError:  # the broker is down: the worker consumes nothing either; beat again later
            log.warning("could not announce GPU classes %s", ", ".join(classes), exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


announcer = Announcer()


# --- jobs nobody serves ----------------------------------------------------------------------------

def unserved_message(gpu_class: str) -> str:
    return (f"No worker serves GPU class {gpu_class}; the job waits until one does "
            f"(`lathe worker --gpu-class {gpu_class}`)")


def waits_for_a_worker(status: str, search: Any, ensemble: Any) -> bool:
    """A queued job that a worker is to run (a search, or an ensemble between its members, is moved
    by its steps instead; an ensemble combining is run)."""
    return status == JobStatus.QUEUED and not search and (not ensemble or ensemble.get("phase") == "combine")


def note_unserved(settings: Settings) -> list[str]:
    """One warn event on each queued job whose GPU class no worker serves (once per job: a job that
    has it gets no second); returns the jobs that got it. Redis unreachable: nothing is noted."""
    with session_scope(settings.sqlalchemy_url) as session:
        rows = session.execute(select(Job.id, Job.status, Job.search, Job.ensemble, Job.gpu_class)
                               .where(Job.status == JobStatus.QUEUED, Job.gpu_class.is_not(None))).all()
    waiting = [(job_id, gpu_class) for job_id, status, search, ensemble, gpu_class in rows
               if waits_for_a_worker(status, search, ensemble)]
    try:
        missing = unserved(settings, {gpu_class for _, gpu_class in waiting})
    except redis.RedisError:
        log.warning("could not tell which GPU classes are served", exc_info=True)
        return []
    noted = []
    for job_id, gpu_class in waiting:
        if gpu_class in missing and _note(settings, job_id, unserved_message(gpu_class), gpu_class):
            noted.append(job_id)
    return noted


def _note(settings: Settings, job_id: str, message: str, gpu_class: str) -> bool:
    said = select(Event.seq).where(Event.job_id == job_id, Event.message == message).limit(1)
    with session_scope(settings.sqlalchemy_url) as session:
        if session.scalar(said) is not None:  # the common case, read only
            return False
        # The job's row lock (a no-op UPDATE), then the check again: two sweepers never both write it.
        locked = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                                 .values(attempt=Job.attempt).execution_options(synchronize_session=False)).rowcount
        if not locked or session.scalar(said) is not None:
            return False
        add_event(session, job_id=job_id, level="warn", message=message, data={"gpu_class": gpu_class})
        return True
