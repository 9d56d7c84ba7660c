"""Fine-tuning jobs: create (validated into a core JobSpec), list, get, cancel, pause, resume."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request
from pydantic import BaseModel, ValidationError
from sqlalchemy import select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lathe.db.tables import Event, FilePurpose, Job, JobStatus, Model, new_id, now
from lathe.db.queries import add_event, get_checkpoint, get_file, get_job, transition
from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import BadRequest, Conflict, NotFound, dotted_param
from lathe.queue import RUN_TASK, VALIDATE_TASK
from api.schemas import V1_ERRORS, FineTuningJob, JobCreate, ListPage, error_responses, job_object
from lathe.settings import Settings
from core.spec import Hyperparameters, JobSpec

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=V1_ERRORS)

# As strict as lathe.model_source.HUB_ID, so what is accepted here resolves there.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
LOCAL_NAME = re.compile(r"^[\w][\w.-]*$")
FILE_PARAMS = ("training_file", "validation_file", "test_file")
# The request schema is documented from JobCreate (see api.main.custom_openapi); the route reads
# the raw object so that a bad field is a 400 naming it, like OpenAI, not a 422.
JOB_CREATE_BODY = {"x-lathe-body": "JobCreate"}


def validated(model: type[BaseModel], data: Any, *, prefix: str = "") -> Any:
    """`model.model_validate(data)`, a ValidationError becoming a 400 that names the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = dotted_param(err["loc"])
        param = ".".join(p for p in (prefix, param) if p) or None
        raise BadRequest(f"{param}: {err['msg']}" if param else err["msg"], param=param, code="invalid_value") from None


def _hyperparameters(body: JobCreate) -> Hyperparameters:
    from_method = body.method.supervised.hyperparameters if body.method and body.method.supervised else None
    if body.hyperparameters and from_method and body.hyperparameters != from_method:
        raise BadRequest("Give hyperparameters either at the top level or in method.supervised, not both.",
                         param="hyperparameters")
    return from_method or body.hyperparameters or Hyperparameters()


def build_spec(body: JobCreate, *, seed: int) -> JobSpec:
    data = {
        "task": body.task, "model": body.model, "training_file": body.training_file,
        "validation_file": body.validation_file, "test_file": body.test_file,
        "hyperparameters": _hyperparameters(body).model_dump(), "seed": seed, "suffix": body.suffix,
    }
    if body.config is not None:
        data["config"] = body.config.model_dump()
    return validated(JobSpec, data)


def check_files(session: Session, *, tenant_id: str, body: JobCreate) -> None:
    for param in FILE_PARAMS:
        file_id = getattr(body, param)
        if file_id is None:
            continue
        row = get_file(session, tenant_id=tenant_id, file_id=file_id)
        if row is None:
            raise NotFound(f"No such file: {file_id!r}.", param=param, code="file_not_found")
        if row.purpose != FilePurpose.FINE_TUNE:
            raise BadRequest(f"File {file_id} has purpose {row.purpose!r}; {param} needs 'fine-tune'.", param=param)


def resolve_model(session: Session, settings: Settings, *, tenant_id: str, name: str) -> str:
    """Where `model` comes from: "file", "local", "fine_tuned", "checkpoint" or "hub"; 400/404 param model else."""
    if name.startswith("file-"):
        row = get_file(session, tenant_id=tenant_id, file_id=name)
        if row is None:
            raise NotFound(f"No such model file: {name!r}.", param="model", code="model_not_found")
        if row.purpose != FilePurpose.MODEL:
            raise BadRequest(f"File {name} has purpose {row.purpose!r}; a base model needs 'model'.", param="model")
        return "file"
    if settings.models_dir and LOCAL_NAME.match(name) and ".." not in name:
        folder = settings.models_dir.expanduser().resolve() / name
        if (folder / "config.json").is_file():
            return "local"
    if session.scalar(select(Model.id).where(Model.id == name, Model.tenant_id == tenant_id)):
        return "fine_tuned"
    if get_checkpoint(session, tenant_id=tenant_id, name=name) is not None:
        return "checkpoint"
    if settings.allow_hub_models and HUB_ID.match(name) and ".." not in name:
        if not settings.hub_model_allowed(name):
            raise BadRequest(f"Hub model {name!r} is not in this server's allow-list (LATHE_HUB_MODEL_ALLOWLIST).",
                             param="model", code="model_not_allowed")
        return "hub"
    raise NotFound(f"Model {name!r} not found: name an uploaded model file, a server model, one of your "
                   "fine-tuned models or checkpoints" + (" or a hub id." if settings.allow_hub_models else "."),
                   param="model", code="model_not_found")


CREATED = "Created fine-tuning job"


def fingerprint(body: JobCreate) -> str:
    """The request as sent (a random seed is not part of it), to recognise a retried request."""
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _replay(session: Session, existing: Job, body: JobCreate) -> FineTuningJob:
    """The same Idempotency-Key: the same job for the same request, 409 for a different one.
    The fingerprint lives on the job's creation event (the worker later rewrites `spec`)."""
    data = session.scalar(select(Event.data).where(Event.job_id == existing.id, Event.message == CREATED)
                          .order_by(Event.seq).limit(1)) or {}
    if data.get("request_sha256") not in (None, fingerprint(body)):
        raise Conflict("This Idempotency-Key was used with a different request.", param="Idempotency-Key",
                       code="idempotency_key_reused")
    return job_object(existing)


def _by_key(session: Session, tenant_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


@router.post("", response_model=FineTuningJob, openapi_extra=JOB_CREATE_BODY,
             responses=error_responses(404, 409))
def create_job(
    request: Request, tenant: TenantDep, session: SessionDep, settings: SettingsDep,
    payload: Annotated[dict[str, Any], Body()],
    # An empty key was stored like a real one and the second such request hit the unique index: a 500.
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=256)] = None,
) -> FineTuningJob:
    """Create a fine-tuning job; it starts in validating_files."""
    body: JobCreate = validated(JobCreate, payload)
    if body.integrations:
        raise BadRequest("Integrations are not supported.", param="integrations")
    if idempotency_key and (existing := _by_key(session, tenant.id, idempotency_key)):
        return _replay(session, existing, body)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    spec = build_spec(body, seed=seed)
    check_files(session, tenant_id=tenant.id, body=body)
    source = resolve_model(session, settings, tenant_id=tenant.id, name=body.model)

    job = Job(
        id=new_id("ftjob"), tenant_id=tenant.id, status=JobStatus.VALIDATING_FILES,
        spec=spec.model_dump(mode="json"), model=body.model, task=spec.task.value if spec.task else None,
        training_file=body.training_file, validation_file=body.validation_file, test_file=body.test_file,
        result_files=[], job_metadata=body.metadata, seed=seed, attempt=0, max_attempts=settings.max_attempts,
        idempotency_key=idempotency_key, created_at=now(),
    )
    session.add(job)
    try:
        session.flush()  # the job row first: events reference it
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the unique index.
        session.rollback()
        existing = _by_key(session, tenant.id, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _replay(session, existing, body)
    add_event(session, job_id=job.id, message=CREATED,
              data={"model_source": source, "request_sha256": fingerprint(body)})
    session.commit()
    request.app.state.publish(VALIDATE_TASK, job.id)  # after commit: the worker must find the row
    return job_object(job)


@router.get("", response_model=ListPage[FineTuningJob], responses=error_responses(404))
def list_jobs(
    request: Request, tenant: TenantDep, session: SessionDep,
    after: Annotated[str | None, Query(description="A job id: list the jobs created before it.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ListPage[FineTuningJob]:
    """List the tenant's jobs, newest first; filter with `metadata[key]=value`."""
    stmt = select(Job).where(Job.tenant_id == tenant.id)
    for key, value in request.query_params.multi_items():
        if key.startswith("metadata[") and key.endswith("]"):
            stmt = stmt.where(Job.job_metadata[key[9:-1]].as_string() == value)
    if after:
        cursor = get_job(session, tenant_id=tenant.id, job_id=after)
        if cursor is None:
            raise NotFound(f"No job {after!r}.", param="after")
        stmt = stmt.where(tuple_(Job.created_at, Job.id) < tuple_(cursor.created_at, cursor.id))
    rows = list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    data = [job_object(j) for j in rows[:limit]]
    return ListPage(data=data, has_more=len(rows) > limit, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


def owned_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    if job is None:
        raise NotFound(f"No such job: {job_id!r}.", param="fine_tuning_job_id")
    return job


@router.get("/{fine_tuning_job_id}", response_model=FineTuningJob, responses=error_responses(404))
def retrieve_job(fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep) -> FineTuningJob:
    """Get a job."""
    return job_object(owned_job(session, tenant_id=tenant.id, job_id=fine_tuning_job_id))


def _move(session: Session, job: Job, moves: dict[JobStatus, JobStatus], message: str, **values: Any) -> bool:
    """Compare-and-set the job along `moves` from its current status; False when it isn't one."""
    current = JobStatus(job.status)
    if current not in moves:
        return False
    if not transition(session, job_id=job.id, from_states=[current], to_state=moves[current], **values):
        session.rollback()
        raise Conflict("The job changed state meanwhile; retry.", param="fine_tuning_job_id")
    add_event(session, job_id=job.id, message=message, attempt=job.attempt)
    session.commit()
    session.refresh(job)
    return True


@router.post("/{fine_tuning_job_id}/cancel", response_model=FineTuningJob, responses=error_responses(404, 409))
def cancel_job(fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep) -> FineTuningJob:
    """Cancel a job: at once when it is not running, else it becomes cancelling until the worker stops it."""
    job = owned_job(session, tenant_id=tenant.id, job_id=fine_tuning_job_id)
    if job.status == JobStatus.CANCELLING:
        return job_object(job)
    idle = {s: JobStatus.CANCELLED for s in (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.PAUSED)}
    if _move(session, job, idle, "Job cancelled", finished_at=now()):
        return job_object(job)
    if _move(session, job, {JobStatus.RUNNING: JobStatus.CANCELLING}, "Cancellation requested"):
        return job_object(job)
    raise Conflict(f"Job {job.id} is {job.status} and can't be cancelled.", param="fine_tuning_job_id")


@router.post("/{fine_tuning_job_id}/pause", response_model=FineTuningJob, responses=error_responses(404, 409))
def pause_job(fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep) -> FineTuningJob:
    """Pause a job: a running one checkpoints and frees its worker; resume continues from there."""
    job = owned_job(session, tenant_id=tenant.id, job_id=fine_tuning_job_id)
    if job.status == JobStatus.PAUSED:
        return job_object(job)
    moves = {s: JobStatus.PAUSED for s in (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING)}
    if _move(session, job, moves, "Pause requested" if job.status == JobStatus.RUNNING else "Job paused"):
        return job_object(job)
    raise Conflict(f"Job {job.id} is {job.status} and can't be paused.", param="fine_tuning_job_id")


@router.post("/{fine_tuning_job_id}/resume", response_model=FineTuningJob, responses=error_responses(404, 409))
def resume_job(request: Request, fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep) -> FineTuningJob:
    """Resume a paused job: back to the queue (or to file validation if it was paused before it)."""
    job = owned_job(session, tenant_id=tenant.id, job_id=fine_tuning_job_id)
    if job.status != JobStatus.PAUSED:
        raise Conflict(f"Job {job.id} is {job.status}, not paused.", param="fine_tuning_job_id")
    if job.lease_owner is not None:
        # The paused attempt is still saving its checkpoint; a new attempt now would race it.
        raise Conflict("The job is still stopping to pause; retry in a few seconds.",
                       param="fine_tuning_job_id", code="job_stopping", headers={"Retry-After": "5"})
    validated_before = job.queued_at is not None
    target, task = (JobStatus.QUEUED, RUN_TASK) if validated_before else (JobStatus.VALIDATING_FILES, VALIDATE_TASK)
    _move(session, job, {JobStatus.PAUSED: target}, "Job resumed")
    request.app.state.publish(task, job.id)
    return job_object(job)
