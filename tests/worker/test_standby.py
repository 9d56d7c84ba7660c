"""Warm training processes (worker.supervisor.Standbys) and the archive packed after the commit:
run_job called directly against SQLite (the standbys do not touch the database before their job,
so PostgreSQL would test nothing more), with real `worker.child --standby` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from core import export
from lathe import registry
from lathe.db.session import session_scope
from lathe.db.tables import Job, JobStatus, Model
from tests.databases import scratch_database
from tests.worker.conftest import get_job, make_job
from tests.worker.test_tasks import events, explain
from worker import tasks
from worker.child import attempt_paths
from worker.supervisor import standbys

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db_url(tmp_path) -> Iterator[str]:  # this module's jobs run on SQLite only
    with scratch_database("sqlite", tmp_path, "lathe_worker") as url:
        yield url


@pytest.fixture
def warm(settings) -> Iterator[None]:
    """Standbys enabled for the test's settings, as a Celery worker enables them when ready."""
    standbys.enable(settings)
    try:
        yield
    finally:
        pids = standbys.ready()
        standbys.close()
        assert not [p for p in pids if alive(p)], "close() left a standby running"


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_idle(pid: int, timeout: float = 120.0) -> None:
    """Until the process uses no CPU for a second (a standby waiting for its assignment)."""
    proc = psutil.Process(pid)
    deadline = time.monotonic() + timeout
    before = sum(proc.cpu_times()[:2])
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = sum(proc.cpu_times()[:2])
        if now - before < 0.01:
            return
        before = now
    raise AssertionError(f"process {pid} never went idle")


def child_pid(settings, job_id: str, attempt: int = 1) -> int:
    return int(attempt_paths(settings.jobs_dir, job_id, attempt)["pid"].read_text())


def ready_events(settings, job_id: str) -> list[str]:
    return [e.message for e in events(settings, job_id) if e.message.startswith("Training process ready")]


def test_the_second_job_is_served_by_a_process_started_before_it_was_claimed(settings, warm):
    [first_standby] = standbys.ready()
    first = make_job(settings, status=JobStatus.QUEUED)
    assert tasks.run_job(first, settings=settings) == JobStatus.SUCCEEDED, explain(settings, first)
    assert child_pid(settings, first) == first_standby  # the one started when the pool was enabled
    assert not alive(first_standby)

    # The slot's next standby was started as the first job ended; it is alive before the claim.
    [waiting] = standbys.ready()
    assert waiting != first_standby and alive(waiting)
    started = psutil.Process(waiting).create_time()
    second = make_job(settings, status=JobStatus.QUEUED)
    wait_idle(waiting)  # its imports done: blocked reading its assignment
    claimed_after = time.time()
    assert tasks.run_job(second, settings=settings) == JobStatus.SUCCEEDED, explain(settings, second)
    assert child_pid(settings, second) == waiting and started < claimed_after
    [ready] = ready_events(settings, second)
    assert ready.startswith("Training process ready: started ") and ready.endswith(" s before this job"), ready

    # The engine says where the time to the first step went.
    messages = [e.message for e in events(settings, second)]
    assert any(m.startswith("First optimizer step (step 1) ") for m in messages), messages


def test_a_killed_standby_is_replaced_not_used(settings, warm):
    [victim] = standbys.ready()
    os.killpg(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(victim) and time.monotonic() < deadline:
        time.sleep(0.05)
    job_id = make_job(settings, status=JobStatus.QUEUED)
    assert tasks.run_job(job_id, settings=settings) == JobStatus.SUCCEEDED, explain(settings, job_id)
    assert get_job(settings, job_id).attempt == 1  # not a retry: the dead standby was never handed the job
    assert child_pid(settings, job_id) != victim
    [replacement] = standbys.ready()
    assert replacement not in (victim, child_pid(settings, job_id)) and alive(replacement)


def test_a_standby_is_not_used_for_other_settings(settings, warm):
    [waiting] = standbys.ready()
    other = settings.model_copy(update={"heartbeat_seconds": 0.25})
    job_id = make_job(settings, status=JobStatus.QUEUED)
    assert tasks.run_job(job_id, settings=other) == JobStatus.SUCCEEDED, explain(settings, job_id)
    assert child_pid(settings, job_id) != waiting
    assert standbys.ready() == [waiting] and alive(waiting)  # still there for its own settings
    [ready] = ready_events(settings, job_id)
    assert "after this job reached it" in ready, ready  # started for the job


WORKER = """
import sys, time
from lathe.settings import Settings
from worker.supervisor import standbys
standbys.enable(Settings(data_dir=sys.argv[1], worker_concurrency=2))
print(" ".join(map(str, standbys.ready())), flush=True)
time.sleep(600)
"""


def test_standbys_never_outlive_their_worker(tmp_path):
    """A worker SIGKILLed while its standbys are still importing: they see it gone and exit."""
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "data")], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    pids: list[int] = []
    try:
        pids = [int(p) for p in worker.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)  # one per slot
        assert {psutil.Process(p).ppid() for p in pids} == {worker.pid}  # below it: lathe serve's watchdog finds them
        assert all(os.getpgid(p) == p for p in pids)  # each in a process group of its own
        worker.kill()
        worker.wait()
        deadline = time.monotonic() + 30
        while any(map(alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if alive(p)]
    finally:
        worker.kill()
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_archive_is_packed_after_the_commit_or_by_the_first_download(settings, monkeypatch):
    job_id = make_job(settings, status=JobStatus.QUEUED)
    assert tasks.run_job(job_id, settings=settings) == JobStatus.SUCCEEDED, explain(settings, job_id)
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id)
        model = session.get(Model, job.fine_tuned_model)
        tenant, name, folder, archive = job.tenant_id, model.id, Path(model.path), Path(model.archive_path)
    # The child exported the folder only; the worker packed the tar beside it once the job was recorded.
    assert archive == export.archive_path_for(folder) and archive.is_file()
    assert '"archive_path": null' in attempt_paths(settings.jobs_dir, job_id, 1)["result.json"].read_text()
    packed = archive.read_bytes()
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == sorted(p.relative_to(folder).as_posix()
                                                for p in folder.rglob("*") if p.is_file())

    # A download before the worker packed it (or after a worker died first): packed by the request,
    # once however many ask at the same time.
    archive.unlink()
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Model, name).bytes = 1
    calls: list[Path] = []
    original = export.pack_archive

    def counting(model_dir: Path, path: Path) -> Path:
        calls.append(path)
        time.sleep(0.2)  # long enough for every request to arrive while the first packs
        return original(model_dir, path)

    monkeypatch.setattr(export, "pack_archive", counting)
    results: list[Path] = []

    def download() -> None:
        with session_scope(settings.sqlalchemy_url) as session:
            results.append(registry.model_archive(session, tenant_id=tenant, model_id=name)[1])

    threads = [threading.Thread(target=download) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [archive] * 4 and calls == [archive]
    assert archive.read_bytes() == packed
    assert not list(archive.parent.glob("*.tmp*"))
    with session_scope(settings.sqlalchemy_url) as session:
        assert session.get(Model, name).bytes == len(packed)
