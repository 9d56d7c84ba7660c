"""Ending an attempt: every outcome is one compare-and-set fenced on the attempt, so a stale
supervisor (its lease taken over, or the job already finished) changes nothing.

    child result            job status now          ->  new status
    succeeded               running                     succeeded (Model row, results file; the
                                                        download archive is packed after the commit)
    pruned                  running                     cancelled (a search's trial its pruner stopped)
    any                     cancelling                  cancelled
    cancelled               paused                      paused (lease released; resume requeues)
    not succeeded, deadline running                     failed "deadline_exceeded" (checkpoint kept)
    failed, user error      running                     failed with the engine's error, never retried
    failed, internal error  running                     failed "internal_error" (exit 1: not retried)
    none, exit 1..127       running                     failed "internal_error" (Kubeflow: not retryable)
    none, signal / exit 0   running                     queued again (attempt < max) or failed "worker_lost"
                                                        (published after the backoff: publish_retry)
    cancelled               running                     queued again (someone else SIGTERMed it)
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import signal
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.export import archive_path_for, ensure_archive
from lathe.db.queries import add_event
from lathe.db.session import session_scope
from lathe.db.tables import (
    File,
    FilePurpose,
    Job,
    JobStatus,
    Metric,
    Model,
    new_id,
    now,
)
from lathe.lifecycle import RELEASE_LEASE, Actor, move, release_lease
from lathe.model_source import fine_tuned_model_name
from lathe.queue import publish_run, retry_backoff
from lathe.settings import Settings
from worker.supervisor import ChildExit

log = logging.getLogger(__name__)



def fail(session: Session, job: Job, attempt: int, error: dict[str, Any], *,
         from_states=(JobStatus.RUNNING,)) -> bool:
    """Fail the job with OpenAI's error object; an error event says why."""
    error = {"code": error.get("code") or "internal_error", "message": error.get("message") or "",
             "param": error.get("param")}
    if not move(session, job_id=job.id, source=from_states, target=JobStatus.FAILED, by=Actor.RUNNER,
                attempt=attempt, error=error, finished_at=now(), **RELEASE_LEASE):
        return False
    add_event(session, job_id=job.id, attempt=attempt, level="error",
              message=f"The job failed: {error['message']}" + (f" (param {error['param']})" if error["param"] else ""),
              data={"error": error})
    return True


def finalise(settings: Settings, job_id: str, attempt: int, done: ChildExit) -> str:
    """Record the attempt's outcome; returns the job's new status ("" when this attempt no longer
    owned the job)."""
    if done.lost:
        return ""
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id)
        if job is None or job.attempt != attempt:
            return ""
        status, result = job.status, done.result or {}
        outcome = result.get("status")
        if status == JobStatus.CANCELLING:
            ok = move(session, job_id=job_id, source=JobStatus.CANCELLING, target=JobStatus.CANCELLED,
                      by=Actor.RUNNER, attempt=attempt, finished_at=now(), **RELEASE_LEASE)
            if ok:
                add_event(session, job_id=job_id, attempt=attempt, message="The job was cancelled")
            return JobStatus.CANCELLED if ok else ""
        if status == JobStatus.PAUSED:
            if outcome == "succeeded":  # it finished before it saw the pause: keep the result
                return _succeed(session, settings, job, attempt, result, from_states=[JobStatus.PAUSED])
            release_lease(session, job_id=job_id, attempt=attempt)
            add_event(session, job_id=job_id, attempt=attempt, message="The job is paused")
            return JobStatus.PAUSED
        if status != JobStatus.RUNNING:
            return ""
        if outcome == "succeeded":
            return _succeed(session, settings, job, attempt, result)
        if outcome == "pruned":  # a search's trial, stopped by its pruner: nothing exported
            ok = move(session, job_id=job_id, source=JobStatus.RUNNING, target=JobStatus.CANCELLED, by=Actor.RUNNER,
                      attempt=attempt, finished_at=now(), trained_tokens=result.get("trained_tokens"),
                      metrics=result.get("metrics"), **RELEASE_LEASE)
            if ok:
                add_event(session, job_id=job_id, attempt=attempt, message="The trial was pruned by its search")
            return JobStatus.CANCELLED if ok else ""
        if done.deadline_exceeded:
            limit = job.job_spec().config.max_runtime_seconds
            return JobStatus.FAILED if fail(session, job, attempt, {
                "code": "deadline_exceeded", "param": "config.max_runtime_seconds",
                "message": f"The job ran past its max_runtime_seconds ({limit} s); "
                           "it was stopped after saving a checkpoint."}) else ""
        if outcome == "failed":  # user errors and internal errors alike: retrying would fail the same way
            return JobStatus.FAILED if fail(session, job, attempt, result.get("error") or {}) else ""
        if outcome is None and 0 < done.returncode < 128:
            return JobStatus.FAILED if fail(session, job, attempt, {
                "code": "internal_error",
                "message": f"The training process exited with code {done.returncode} without a result."}) else ""
        # Infrastructure: killed by a signal (OOM killer, node shutdown), no result, or stopped by
        # someone else's SIGTERM. Retry from the last checkpoint while attempts remain.
        why = _describe(done)
        max_attempts = job.max_attempts or settings.max_attempts
        if attempt >= max_attempts:
            return JobStatus.FAILED if fail(session, job, attempt, {
                "code": "worker_lost",
                "message": f"The training process was lost ({why}) on each of {attempt} attempts."}) else ""
        if not move(session, job_id=job_id, source=JobStatus.RUNNING, target=JobStatus.QUEUED, by=Actor.RUNNER,
                    attempt=attempt, queued_at=now(), **RELEASE_LEASE):
            return ""
        delay = retry_backoff(attempt, settings.retry_backoff_seconds)
        add_event(session, job_id=job_id, attempt=attempt, level="warn",
                  message=f"The training process was lost ({why}); retrying in {delay:.0f}s "
                          f"(attempt {attempt + 1} of {max_attempts}) from the last checkpoint")
    return JobStatus.QUEUED  # the caller publishes it after the backoff (`publish_retry`)


def publish_retry(settings: Settings, job_id: str, attempt: int) -> None:
    """Publish the next attempt of a job `finalise` put back to queued, after its backoff.

    The wait happens here, in the slot the lost attempt has just freed (its standby importing
    meanwhile), not as a Celery countdown: a countdown message is reserved at once by whichever
    worker fetches it and then waits for that worker's slot, which may be busy with a long job
    while this one sits idle (the chaos bench saw ~60 s from a child kill to its retry). A worker
    killed during the wait leaves the job queued without a message: the sweeper publishes it again.
    """
    time.sleep(retry_backoff(attempt, settings.retry_backoff_seconds))
    publish_run(settings, job_id)


def _describe(done: ChildExit) -> str:
    code = done.returncode
    if code < 0 or code >= 128:
        num = -code if code < 0 else code - 128
        try:
            return f"killed by {signal.Signals(num).name}"
        except ValueError:
            return f"killed by signal {num}"
    if done.result and done.result.get("status") == "cancelled":
        return "stopped by SIGTERM"
    return f"exit code {code} without a result"


def _succeed(session: Session, settings: Settings, job: Job, attempt: int, result: dict[str, Any],
             from_states=(JobStatus.RUNNING,)) -> str:
    spec = job.job_spec()
    name = fine_tuned_model_name(session, job, spec.suffix)
    results_file = _results_file(session, settings, job)
    model_dir = Path(result["model_dir"]) if result.get("model_dir") else None
    # Packed after this commit (pack_model_archive) or by the first download, whichever comes first.
    archive = result.get("archive_path") or (str(archive_path_for(model_dir)) if model_dir else "")
    done = move(
        session, job_id=job.id, source=from_states, target=JobStatus.SUCCEEDED, by=Actor.RUNNER, attempt=attempt,
        fine_tuned_model=name, trained_tokens=result.get("trained_tokens"),
        hyperparameters=result.get("hyperparameters") or job.hyperparameters,
        metrics=result.get("metrics"), result_files=[results_file.id], finished_at=now(), **RELEASE_LEASE,
    )
    if not done:
        session.rollback()
        return ""
    session.add(results_file)
    session.add(Model(id=name, tenant_id=job.tenant_id, job_id=job.id, task=job.task or str(spec.task or ""),
                      path=str(model_dir or ""), archive_path=archive, bytes=_stored_bytes(model_dir, archive),
                      created_at=now()))
    add_event(session, job_id=job.id, attempt=attempt, message=f"New fine-tuned model created: {name}",
              data={"fine_tuned_model": name})
    add_event(session, job_id=job.id, attempt=attempt, message="The job has successfully completed")
    return JobStatus.SUCCEEDED


def _stored_bytes(folder: Path | None, archive: str) -> int:
    """The archive's size; until it exists, what the model's files take (within a few KiB of it)."""
    if archive and Path(archive).is_file():
        return Path(archive).stat().st_size
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder and folder.is_dir() else 0


def pack_model_archive(settings: Settings, job_id: str) -> Path | None:
    """Pack the succeeded job's model folder into the archive GET /v1/models/{id}/content serves
    (core.export.ensure_archive: once, atomically, whoever asks first) and record its size. A
    failure here is logged, not raised: the job stays succeeded and the first download packs it."""
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id)
        model = session.get(Model, job.fine_tuned_model) if job is not None and job.fine_tuned_model else None
        if model is None or not model.archive_path or not Path(model.path).is_absolute():
            return None
        name, folder, archive = model.id, Path(model.path), Path(model.archive_path)
    try:
        ensure_archive(folder, archive)
        size = archive.stat().st_size
    except OSError:
        log.exception("job %s: packing %s failed; the first download packs it", job_id, archive)
        return None
    with session_scope(settings.sqlalchemy_url) as session:
        session.execute(update(Model).where(Model.id == name).values(bytes=size)
                        .execution_options(synchronize_session=False))
    return archive


def step_metrics_csv(session: Session, job_id: str) -> str:
    """OpenAI's result file shape: one row per step, columns `step` and `{split}_{metric}`.
    Steps recorded again after a resume keep the newest attempt's values."""
    rows: dict[int, dict[str, Any]] = {}
    columns: dict[str, None] = {}
    order = {"train": 0, "valid": 1, "test": 2}
    metrics = session.scalars(select(Metric).where(Metric.job_id == job_id).order_by(Metric.seq)).all()
    for m in sorted(metrics, key=lambda m: (order.get(m.split, 3), m.seq)):
        for key, value in (m.values or {}).items():
            column = f"{m.split}_{key}"
            columns.setdefault(column, None)
            rows.setdefault(m.step, {})[column] = value
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["step", *columns], lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow({"step": step, **rows[step]})
    return out.getvalue()


def _results_file(session: Session, settings: Settings, job: Job) -> File:
    data = step_metrics_csv(session, job.id).encode()
    file_id = new_id("file")
    path = settings.files_dir / file_id / "step_metrics.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return File(id=file_id, tenant_id=job.tenant_id, purpose=str(FilePurpose.RESULTS), filename="step_metrics.csv",
                bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), path=str(path), status="processed",
                details={"format": "csv", "job_id": job.id}, created_at=now())
