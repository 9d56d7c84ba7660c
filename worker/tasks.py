"""The two Celery tasks, as plain functions (worker.celery_app registers them by name).

Thin tasks, fat database: each task claims its job with a compare-and-set, does its work outside
any transaction, and records the outcome with another compare-and-set. A duplicate or late message
finds nothing to claim and returns. Torch-free: training runs in `worker.child`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.datasets import FILE_PARAMS, DatasetSummary
from core.errors import EngineError, ModelError
from core.spec import JobSpec, Task
from lathe.db.queries import add_event
from lathe.db.session import session_scope
from lathe.db.tables import TERMINAL, Checkpoint, Job, JobStatus, now
from lathe.ensemble import boosted_by, check_ensemble, members_of
from lathe.errors import LatheError
from lathe.gpu_classes import served
from lathe.lifecycle import Actor, claim_job, move
from lathe.model_source import cache_only, resolve_model
from lathe.queue import publish_advance, publish_run
from lathe.parents import advance
from lathe.settings import Settings, get_settings
from lathe.validation import job_files, judge_files
from worker.finalise import fail, finalise, pack_model_archive, publish_retry
from worker.supervisor import standbys, start_child, supervise

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------
# lathe.validate_job


def validate_job(job_id: str, *, settings: Settings | None = None) -> str:
    """Check the job's datasets in full, then queue it for training (or fail it, saying why).

    Returns the job's new status, or "" when it was not `validating_files` (nothing to do).
    """
    settings = settings or get_settings()
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.VALIDATING_FILES:
            return ""
        spec_data, tenant_id, parent_job = job.spec, job.tenant_id, job.parent_job
        files = job_files(session, tenant_id=tenant_id, ids={p: getattr(job, p) for p in FILE_PARAMS})
        try:
            source = resolve_model(session, settings, tenant_id=tenant_id, name=job.model)
        except LatheError as e:
            source, model_error = None, e.to_dict()

    try:
        if source is None:
            raise ModelError(model_error["message"], param="model", code=model_error["code"])
        spec = JobSpec.model_validate(spec_data)
        task, infos, check = judge_files(spec, spec_data, files, source)  # the same checks as a dry run's
        if spec.config.ensemble:  # every member, judged as this job now is
            with session_scope(settings.sqlalchemy_url) as session:
                check_ensemble(session, tenant_id=tenant_id, spec=spec, stored=spec_data, check=check)
    except EngineError as e:
        error = e.to_dict()
    except LatheError as e:
        error = e.to_dict()
    except Exception as e:  # noqa: BLE001 - an unreadable file must fail the job, not loop
        log.exception("job %s: validation crashed", job_id)
        error = {"code": "internal_error", "param": None,
                 "message": f"The files could not be validated ({type(e).__name__})."}
    else:
        error = None

    if error is not None:
        with session_scope(settings.sqlalchemy_url) as session:
            ok = move(session, job_id=job_id, source=JobStatus.VALIDATING_FILES, target=JobStatus.FAILED,
                      by=Actor.VALIDATOR, error=error, finished_at=now(), lease_until=None)
            if ok:
                add_event(session, job_id=job_id, level="error", data={"error": error},
                          message=f"Validation failed: {error['message']}"
                                  + (f" (param {error['param']})" if error.get("param") else ""))
        if ok and parent_job:
            publish_advance(settings, parent_job)  # the search records it and goes on
        return JobStatus.FAILED if ok else ""
    with session_scope(settings.sqlalchemy_url) as session:
        resolved = spec.model_copy(update={"task": task})
        ok = move(session, job_id=job_id, source=JobStatus.VALIDATING_FILES, target=JobStatus.QUEUED,
                  by=Actor.VALIDATOR, queued_at=now(), task=str(task),
                  spec=resolved.model_dump(mode="json", exclude_unset=True), lease_until=None)
        if ok:
            add_event(session, job_id=job_id, message=_summary(task, infos),
                      data={p: {"rows": i.rows, "label_counts": i.label_counts, **i.details} for p, i in infos.items()})
    if ok:  # a parent trains nothing itself: its first step starts the trials or members
        (publish_advance if spec.config.search or spec.config.ensemble else publish_run)(settings, job_id)
    return JobStatus.QUEUED if ok else ""


def _summary(task: Task, infos: dict[str, DatasetSummary]) -> str:
    train = infos["training_file"]
    text = f"Files validated for {task}: {train.rows} rows"
    if train.labels:
        shown = ", ".join(f"{k} ({v})" for k, v in list(train.label_counts.items())[:10])
        more = f" and {len(train.labels) - 10} more" if len(train.labels) > 10 else ""
        text += f", labels {shown}{more}"
    return text + "".join(f"; {p.removesuffix('_file')} {i.rows} rows" for p, i in infos.items() if p != "training_file")


# ---------------------------------------------------------------------------------------------
# lathe.advance_search


def advance_search(job_id: str, *, settings: Settings | None = None) -> str:
    """One step of a search or an ensemble (lathe.parents.advance): record, start or finish its children."""
    return advance(settings or get_settings(), job_id)


# ---------------------------------------------------------------------------------------------
# lathe.run_job


def lease_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def claim(settings: Settings, job_id: str) -> int | None:
    """queued -> running, attempt + 1, a fresh lease; the new attempt, or None if not claimable
    (not queued, or for a GPU class this worker does not serve: a message on the wrong queue)."""
    serving = served(settings)
    with session_scope(settings.sqlalchemy_url) as session:
        attempt = claim_job(session, job_id=job_id, lease_owner=lease_owner(),
                            lease_until=time.time() + settings.lease_seconds, fences=[serving.fence()])
        if attempt is None:
            row = session.execute(select(Job.status, Job.gpu_class).where(Job.id == job_id)).first()
            if row is not None and row.status == JobStatus.QUEUED and not serving.serves(row.gpu_class):
                # Left queued: the sweeper publishes it again, to its class's queue.
                log.warning("job %s is for GPU class %s, which this worker does not serve; not claimed",
                            job_id, row.gpu_class or "default")
        return attempt


# What core.checkpoint.save_checkpoint writes (MODEL_FILE, TRAINING_FILE, STATE_FILE); spelled out
# here because that module imports torch and the worker must not.
CHECKPOINT_FILES = ("model.safetensors", "training_state.pt", "trainer_state.json")


def checkpoint_complete(path: Path) -> bool:
    """Whether a checkpoint folder still holds every file a resume loads. A recorded folder can lose
    files after the fact: a kill while rotation or a rerun of the same step deletes it, a full disk."""
    return all((path / name).is_file() and (path / name).stat().st_size > 0 for name in CHECKPOINT_FILES)


def latest_checkpoint(session, job_id: str) -> Checkpoint | None:  # noqa: ANN001
    """The newest recorded checkpoint of any attempt whose folder is still complete (older ones get
    rotated away; a damaged one is skipped for the one before it rather than failing the resume)."""
    rows = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)
                           .order_by(Checkpoint.step.desc(), Checkpoint.created_at.desc())).all()
    for checkpoint in rows:
        if checkpoint_complete(Path(checkpoint.path)):
            return checkpoint
        if Path(checkpoint.path).is_dir():
            log.warning("job %s: checkpoint %s is incomplete; resuming from an earlier one", job_id, checkpoint.path)
    return None


def run_job(job_id: str, *, settings: Settings | None = None) -> str:
    """Claim the job, train it in a supervised child process, record the outcome.

    Returns the job's new status ("" when there was nothing to claim or the attempt was lost).
    """
    settings = settings or get_settings()
    attempt = claim(settings, job_id)
    if attempt is None:
        log.info("job %s: nothing to claim (duplicate or late delivery)", job_id)
        return ""
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id)
        parent_job = job.parent_job
        try:
            source = resolve_model(session, settings, tenant_id=job.tenant_id, name=job.model)
        except LatheError as e:
            failed = fail(session, job, attempt, e.to_dict())
            session.commit()
            if failed and parent_job:
                publish_advance(settings, parent_job)
            return JobStatus.FAILED if failed else ""
        model, init_from = source.base, source.init_from
        checkpoint = latest_checkpoint(session, job_id)
        budget = job.job_spec().config.max_runtime_seconds
        deadline = job.started_at + budget if budget else None
        plan: dict[str, Any] = {"model": model, "init_from": init_from,
                                "resume_from": checkpoint.path if checkpoint else None,
                                "hub_cache_only": cache_only(settings, source)}
        if job.ensemble:  # the combine stage (lathe.ensemble): the members' models, not a training run
            plan["members"] = members_of(session, job)
        elif (earlier := boosted_by(session, job)) is not None:  # a boosting member: weighted by the ones before
            plan["boost_after"] = earlier
        if checkpoint is not None:
            message = f"Fine-tuning job resumed (attempt {attempt}) from the checkpoint at step {checkpoint.step}"
        elif attempt > 1:
            message = f"Fine-tuning job restarted (attempt {attempt}); no checkpoint to resume from"
        else:
            message = "Fine-tuning job started"
        if job.ensemble:
            message = f"Combining the ensemble's {len(plan['members'])} member models (attempt {attempt})"
        add_event(session, job_id=job_id, attempt=attempt, message=message,
                  data={"attempt": attempt, **{k: v for k, v in plan.items() if k not in ("members", "boost_after")}})

    log.info("job %s: attempt %s starts (model %s, resume %s)", job_id, attempt, model, plan["resume_from"])
    standby = standbys.take(settings)  # a training process that has done its imports, if one waits
    try:
        proc = start_child(settings, job_id, attempt, plan, standby=standby)
        done = supervise(settings, job_id, attempt, proc, deadline=deadline)
        status = finalise(settings, job_id, attempt, done)
    finally:
        standbys.release(settings)  # the slot's next standby imports while the archive is packed
    log.info("job %s: attempt %s ended (exit %s) -> %s", job_id, attempt, done.returncode, status or "not ours")
    if status == JobStatus.SUCCEEDED:  # after the commit: the job is done, the download is not yet packed
        pack_model_archive(settings, job_id)
    elif status == JobStatus.QUEUED:  # lost to the infrastructure: retried after the backoff
        publish_retry(settings, job_id, attempt)
    if status in TERMINAL and parent_job:
        publish_advance(settings, parent_job)  # a search's trial: the search records it and goes on
    return status
