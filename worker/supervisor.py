"""Running one attempt's training child and watching it: the lease heartbeat, cancellation and
pause by signals to its process group, and reading what it left behind.

Torch-free: this runs inside the Celery worker. The child is `python -m worker.child` in a new
session (its own process group), so signals reach it and whatever it spawns (data loaders), and a
Ctrl-C aimed at the worker's terminal does not.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from lathe.db.session import session_scope
from lathe.db.tables import Job, JobStatus
from lathe.settings import Settings
from worker.child import attempt_paths, write_json_atomic

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
LIVE = (JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.PAUSED)
STOPPING = (JobStatus.CANCELLING, JobStatus.PAUSED)


@dataclass
class ChildExit:
    returncode: int
    result: dict[str, Any] | None  # the child's result file, if it wrote one
    lost: bool  # the lease was gone (requeued/taken over/finished elsewhere): we killed it
    signalled: bool  # we sent SIGTERM because the job was being cancelled or paused
    deadline_exceeded: bool = False  # we sent SIGTERM because config.max_runtime_seconds ran out

    @property
    def signal_exit(self) -> bool:
        """Killed by a signal (Popen reports -N; a shell reports 128+N): retryable, like Kubeflow."""
        return self.returncode < 0 or self.returncode >= 128


def settings_env(settings: Settings) -> dict[str, str]:
    """The child's environment: ours, with every setting spelled out so it sees exactly what the
    supervisor saw (tests pass a Settings object, not environment variables)."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        key = f"LATHE_{name.upper()}"
        if value is None:
            env.pop(key, None)
        elif isinstance(value, (dict, list)):  # pydantic-settings reads complex values as JSON
            env[key] = json.dumps(value)
        else:
            env[key] = str(value)
    env["LATHE_DATA_DIR"] = str(settings.resolved_data_dir)
    env["LATHE_DATABASE_URL"] = settings.sqlalchemy_url
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not settings.allow_hub_models:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def start_child(settings: Settings, job_id: str, attempt: int, plan: dict[str, Any]) -> subprocess.Popen:
    paths = attempt_paths(settings.jobs_dir, job_id, attempt)
    paths["log"].parent.mkdir(parents=True, exist_ok=True)
    for stale in (paths["result.json"],):
        stale.unlink(missing_ok=True)
    write_json_atomic(paths["plan.json"], plan)
    with open(paths["log"], "ab") as out:
        proc = subprocess.Popen(
            # Our pid, so that the child notices even a death of ours during its start-up.
            [sys.executable, "-m", "worker.child", job_id, str(attempt), str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env=settings_env(settings), cwd=str(REPO_ROOT),
        )
    paths["pid"].write_text(f"{proc.pid}\n")
    return proc


def heartbeat(settings: Settings, job_id: str, attempt: int) -> str | None:
    """Extend this attempt's lease; the job's status, or None when the lease is no longer ours."""
    with session_scope(settings.sqlalchemy_url) as session:
        renewed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.attempt == attempt, Job.status.in_([str(s) for s in LIVE]))
            .values(lease_until=time.time() + settings.lease_seconds)
            .execution_options(synchronize_session=False)
        ).rowcount == 1
        if not renewed:
            return None
        return session.scalar(select(Job.status).where(Job.id == job_id))


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def supervise(settings: Settings, job_id: str, attempt: int, proc: subprocess.Popen, *,
              deadline: float | None = None) -> ChildExit:
    """Wait for the child, renewing the lease every heartbeat. Lease gone → SIGKILL the group;
    cancelling/paused or past `deadline` (unix time) → SIGTERM (the child checkpoints and stops),
    SIGKILL after the grace period."""
    lost = False
    timed_out = False
    term_at: float | None = None
    try:
        while True:
            try:
                proc.wait(timeout=settings.heartbeat_seconds)
                break
            except subprocess.TimeoutExpired:
                pass
            try:
                status = heartbeat(settings, job_id, attempt)
            except Exception:  # a DB blip: keep training; the lease has slack for a few misses
                log.exception("job %s: heartbeat failed", job_id)
                continue
            if status is None:
                log.warning("job %s: attempt %s lost its lease; killing the training process", job_id, attempt)
                lost = True
                _killpg(proc, signal.SIGKILL)
                proc.wait()
                break
            if term_at is None and (status in STOPPING or (deadline is not None and time.time() > deadline)):
                timed_out = status not in STOPPING
                log.info("job %s: %s; asking the training process to checkpoint and stop", job_id,
                         "past its max_runtime_seconds" if timed_out else status)
                _killpg(proc, signal.SIGTERM)
                term_at = time.monotonic()
            elif term_at is not None and time.monotonic() - term_at > settings.cancel_grace_seconds:
                log.warning("job %s: no exit %.0fs after SIGTERM; killing", job_id, settings.cancel_grace_seconds)
                _killpg(proc, signal.SIGKILL)
    finally:
        if proc.poll() is None:  # we are leaving on an exception: never leave an orphan training
            _killpg(proc, signal.SIGKILL)
            proc.wait()
    _killpg(proc, signal.SIGKILL)  # stragglers the child left in its group (data loader workers)
    result_file = attempt_paths(settings.jobs_dir, job_id, attempt)["result.json"]
    result = None
    if result_file.exists():
        try:
            result = json.loads(result_file.read_text())
        except (OSError, ValueError):
            log.exception("job %s: unreadable result file %s", job_id, result_file)
    return ChildExit(returncode=proc.returncode, result=result, lost=lost, signalled=term_at is not None,
                     deadline_exceeded=timed_out)
