"""Running one attempt's training child and watching it: the lease heartbeat, cancellation and
pause by signals to its process group, and reading what it left behind; and the standbys, training
processes started ahead of their jobs.

Torch-free: this runs inside the Celery worker. The child is `python -m worker.child --standby PID`
in a new session (its own process group), so signals reach it and whatever it spawns (data
loaders), and a Ctrl-C aimed at the worker's terminal does not. It imports torch, transformers and
the engine, then waits for its assignment on stdin: a Celery worker keeps one such process ready per
slot (`Standbys`), started when the worker is ready and again each time a job's slot frees, so a
job's child has done its imports before the job is claimed. A direct `run_job` call (tests, scripts)
starts its child for the job, the same way, unless standbys were enabled for its settings.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from lathe.db.session import session_scope
from lathe.db.tables import Job, JobStatus
from lathe.settings import Settings, get_settings
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


def spawn_training_process(settings: Settings, output: Path) -> subprocess.Popen:
    """A `worker.child --standby` process for these settings, in a session of its own, its stdout and
    stderr appended to `output` (it moves them to the attempt's log once assigned)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "ab") as out:
        return subprocess.Popen(
            # Our pid, so that the child notices even a death of ours during its start-up.
            [sys.executable, "-m", "worker.child", "--standby", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env=settings_env(settings), cwd=str(REPO_ROOT),
        )


def _assign(proc: subprocess.Popen, job_id: str, attempt: int) -> bool:
    """Hand the process its attempt (one line, then EOF); False when it is gone."""
    try:
        line = {"job_id": job_id, "attempt": attempt, "assigned_at": time.time()}
        proc.stdin.write(json.dumps(line).encode() + b"\n")
        proc.stdin.close()
        return True
    except (BrokenPipeError, ValueError, OSError):
        return False


def _discard(proc: subprocess.Popen) -> None:
    _killpg(proc, signal.SIGKILL)
    try:
        proc.stdin.close()
    except OSError:
        pass
    proc.wait()


def start_child(settings: Settings, job_id: str, attempt: int, plan: dict[str, Any], *,
                standby: subprocess.Popen | None = None) -> subprocess.Popen:
    """The attempt's training process: `standby` (started ahead of the job for these settings) if
    it is still alive and takes the assignment, else one started now."""
    paths = attempt_paths(settings.jobs_dir, job_id, attempt)
    paths["log"].parent.mkdir(parents=True, exist_ok=True)
    for stale in (paths["result.json"],):
        stale.unlink(missing_ok=True)
    write_json_atomic(paths["plan.json"], plan)
    paths["log"].touch()
    if standby is not None and (standby.poll() is not None or not _assign(standby, job_id, attempt)):
        log.warning("job %s: the standby training process %s had died (exit %s); starting another",
                    job_id, standby.pid, standby.poll())
        _discard(standby)
        standby = None
    proc = standby
    if proc is None:
        proc = spawn_training_process(settings, paths["log"])
        # A process that died at once (a crashing driver) refuses this; supervise reports its exit.
        _assign(proc, job_id, attempt)
    paths["pid"].write_text(f"{proc.pid}\n")
    return proc


def settings_key(settings: Settings) -> str:
    """What tells one Settings from another (not the rest of the environment, which changes: pytest
    sets PYTEST_CURRENT_TEST for each phase of a test)."""
    env = settings_env(settings)
    return json.dumps({k: v for k, v in env.items() if k.startswith("LATHE_") or k in ("PYTHONPATH", "HF_HUB_OFFLINE")},
                      sort_keys=True)


@dataclass
class _Standby:
    proc: subprocess.Popen
    key: str  # settings_key of the settings it was started for: it serves jobs run with those only


@dataclass
class Standbys:
    """Training processes started ahead of their jobs, one per slot of this worker
    (`settings.worker_concurrency`), for the Settings they were enabled with.

    `take` hands a job a live standby started for equal settings (`settings_key`), or None
    (the job's child starts cold, as a dead standby's job does); `release` after the job starts the
    slot's next standby, off the job's time. A standby never outlives the worker: it watches the
    worker's pid and exits when orphaned, `close` kills them, and until assigned it holds no job,
    lease or file.
    """

    _settings: Settings | None = None
    _ready: list[_Standby] = field(default_factory=list)
    _busy: int = 0  # slots running a job (with a standby or a process started for it)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def enable(self, settings: Settings) -> None:
        """Keep standbys for `settings` from now on; starts them."""
        with self._lock:
            if self._settings is None or settings_key(settings) != settings_key(self._settings):
                self._stop_all()
                self._settings, self._busy = settings, 0
        self._fill()

    def take(self, settings: Settings) -> subprocess.Popen | None:
        """A live standby for a job run with `settings`, or None; counts a slot as busy until
        `release(settings)`. Dead standbys found on the way are dropped (the slot's next start
        replaces them)."""
        with self._lock:
            if not self._ours(settings):
                return None
            self._busy += 1
            key = settings_key(settings)
            for standby in [s for s in self._ready if s.key == key]:
                self._ready.remove(standby)
                if standby.proc.poll() is None:
                    return standby.proc
                log.warning("standby training process %s died (exit %s); replacing it",
                            standby.proc.pid, standby.proc.returncode)
                _discard(standby.proc)
            return None

    def release(self, settings: Settings) -> None:
        """The job `take` was called for has ended: start standbys up to one per free slot."""
        with self._lock:
            if not self._ours(settings):
                return
            self._busy = max(0, self._busy - 1)
        self._fill()

    def ready(self) -> list[int]:
        """Pids of the standbys waiting now."""
        with self._lock:
            return [s.proc.pid for s in self._ready if s.proc.poll() is None]

    def close(self) -> None:
        """Kill every standby and keep none from now on."""
        with self._lock:
            self._stop_all()
            self._settings, self._busy = None, 0

    def _ours(self, settings: Settings) -> bool:
        return self._settings is not None and settings_key(settings) == settings_key(self._settings)

    def _fill(self) -> None:
        with self._lock:
            settings = self._settings
            if settings is None:
                return
            key = settings_key(settings)
            for standby in list(self._ready):
                if standby.proc.poll() is not None or standby.key != key:
                    if standby.proc.returncode is not None:
                        log.warning("standby training process %s died (exit %s); replacing it",
                                    standby.proc.pid, standby.proc.returncode)
                    self._ready.remove(standby)
                    _discard(standby.proc)
            while len(self._ready) + self._busy < settings.worker_concurrency:
                # Its output until assigned (import warnings, a crash while importing) goes to standby.log.
                proc = spawn_training_process(settings, settings.jobs_dir / "standby.log")
                self._ready.append(_Standby(proc, key))

    def _stop_all(self) -> None:
        for standby in self._ready:
            _discard(standby.proc)
        self._ready.clear()


standbys = Standbys()  # this worker process's


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
