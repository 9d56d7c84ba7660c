"""The jobs service: a job request typed into a JobSpec and stored (a search's judged by
lathe.search first), and a user's cancel, pause and resume (a search's cancel reaching its trials).
Keyword-only functions that the API's routes call; the caller commits nothing itself: each
function commits what it changes.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.applicability import check_applicable, model_facts
from core.spec import Hyperparameters, JobSpec, Task, TrainingConfig
from lathe import lifecycle
from lathe.db.queries import add_event, get_file, get_job
from lathe.db.tables import TERMINAL, Event, FilePurpose, Job, JobStatus, new_id, now
from lathe.errors import BadRequest, Conflict, NotFound, dotted_param
from lathe.gpu_classes import Resources
from lathe.integrations import Integration, check_integrations, parse_integrations
from lathe.model_source import ModelSource, resolve_model
from lathe.queue import ADVANCE_TASK, RUN_TASK, VALIDATE_TASK
from lathe.ensemble import check_ensemble
from lathe.search.requests import check_search, engine_check
from lathe.settings import Settings

FILE_PARAMS = ("training_file", "validation_file", "test_file")
CREATED = "Created fine-tuning job"


class MethodOptions(BaseModel):
    """OpenAI's `method.supervised` / `method.dpo`: the hyperparameters (beta for DPO only)."""

    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    """OpenAI's `method`: supervised, or dpo (causal LMs); reinforcement is refused."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"] = Field(
        description="supervised, or dpo (preference pairs, causal-lm); reinforcement is not supported.")
    supervised: MethodOptions | None = None
    dpo: MethodOptions | None = None
    reinforcement: dict[str, Any] | None = None

    def options(self) -> tuple[MethodOptions | None, str]:
        """The options given for this type, and their param; another type's options are a 400."""
        for other in ("supervised", "dpo", "reinforcement"):
            if other != self.type and getattr(self, other) is not None:
                raise BadRequest(f"method.{other} was given but method.type is {self.type!r}.",
                                 param=f"method.{other}")
        return getattr(self, self.type), f"method.{self.type}"


class JobCreate(BaseModel):
    """A fine-tuning job request: OpenAI's fields plus Lathe's `task`, `test_file` and `config`."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=512, description=(
        "Base model: an uploaded purpose=model file id, a name from the server's models directory, "
        "an earlier job's fine_tuned_model (continue training), or a Hugging Face hub id."))
    training_file: str = Field(..., min_length=1, max_length=40, description="A purpose=fine-tune file id.")
    validation_file: str | None = Field(None, max_length=40, description="A purpose=fine-tune file id.")
    test_file: str | None = Field(None, max_length=40, description="Lathe: held-out file evaluated once at the end.")
    hyperparameters: Hyperparameters | None = Field(None, description="Legacy OpenAI hyperparameters; prefer `method`.")
    method: Method | None = None
    suffix: str | None = Field(None, max_length=64, description="Added to the fine_tuned_model name.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Random seed; chosen at random when absent.")
    metadata: dict[str, str] | None = Field(None, max_length=16, description="Up to 16 string pairs.")
    integrations: list[Integration] | None = Field(None, description=(
        "Experiment trackers the training process logs to: OpenAI's `{type: wandb, wandb: {project, name, "
        "entity, tags}}` and Lathe's `{type: mlflow, mlflow: {experiment, run_name}}` (each type once); "
        "a search's trials and an ensemble's members inherit them, each its own run."))
    task: Task | None = Field(None, description="Lathe: what is trained; inferred from the data when absent.")
    config: TrainingConfig | None = Field(None, description="Lathe: the training toolbox (see TrainingConfig).")
    resources: Resources | None = Field(None, description=(
        "Lathe: the GPU class the job runs on (`{\"gpu\": \"a100\"}`): only workers serving that class take it. "
        "Absent: any worker serving the default queue. A search's trials and an ensemble's members inherit it."))
    dry_run: bool = Field(False, description=(
        "Lathe: check the request and its files as a create would and answer an estimate "
        "(object fine_tuning.job.estimate: examples, tokens, optimizer steps, duration) instead of a job; "
        "nothing is stored or queued."))

    @field_validator("integrations", mode="before")
    @classmethod
    def _integrations(cls, value: Any) -> Any:
        # Judged item by item, its BadRequest passing through pydantic: the param reads
        # `integrations[0].wandb.project`, not the union's inner path.
        return parse_integrations(value)


def validated(model: type[BaseModel], data: Any, *, prefix: str = "") -> Any:
    """`model.model_validate(data)`, a ValidationError becoming a 400 that names the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = dotted_param(err["loc"])
        param = ".".join(p for p in (prefix, param) if p) or None
        raise BadRequest(f"{param}: {err['msg']}" if param else err["msg"], param=param, code="invalid_value") from None


def _hyperparameters(body: JobCreate) -> tuple[Hyperparameters | None, str]:
    """The hyperparameters the request set, and the param name they came under.

    Raises:
        BadRequest: code unsupported_method for method.type reinforcement; hyperparameters given
            both at the top level and in the method.
    """
    if body.method is not None and body.method.type == "reinforcement":
        raise BadRequest("method.type 'reinforcement' is not supported; use 'supervised' or 'dpo'.",
                         param="method.type", code="unsupported_method")
    options, param = body.method.options() if body.method else (None, "")
    from_method = options.hyperparameters if options else None
    if body.hyperparameters and from_method and body.hyperparameters != from_method:
        raise BadRequest(f"Give hyperparameters either at the top level or in {param}, not both.",
                         param="hyperparameters")
    if from_method is not None:
        return from_method, f"{param}.hyperparameters"
    return body.hyperparameters, "hyperparameters"


def build_spec(body: JobCreate, *, seed: int) -> JobSpec:
    """The request as a JobSpec, typed all the way: the request's set fields stay marked as set
    (that is what `check_applicable` reads, and what is stored)."""
    hyperparameters, _ = _hyperparameters(body)
    fields: dict[str, Any] = {"model": body.model, "training_file": body.training_file, "seed": seed}
    optional = {"task": body.task, "validation_file": body.validation_file, "test_file": body.test_file,
                "method": "dpo" if body.method and body.method.type == "dpo" else None,
                "suffix": body.suffix, "hyperparameters": hyperparameters, "config": body.config}
    fields.update({k: v for k, v in optional.items() if v is not None})
    return validated(JobSpec, fields)


def check_spec(spec: JobSpec, body: JobCreate, source: ModelSource) -> None:
    """Refuse every field the request set that can't take effect, as far as the request and the
    model folder tell (the data is judged again in validating_files).

    Raises:
        BadRequest: code "inapplicable_field", param the dotted field (e.g. "config.packing").
    """
    _, hp_param = _hyperparameters(body)
    engine_check(partial(check_applicable, task=spec.task, model=_facts(source), hyperparameters_param=hp_param))(spec)


def _facts(source: ModelSource):  # noqa: ANN202
    return model_facts(Path(source.base)) if source.kind != "hub" else None


def stored_spec(spec: JobSpec) -> dict[str, Any]:
    """What the jobs table keeps: the fields that were set (defaults are filled when it is read)."""
    return spec.model_dump(mode="json", exclude_unset=True)


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


def fingerprint(body: JobCreate) -> str:
    """The request as sent (a random seed is not part of it), to recognise a retried request."""
    sent = body.model_dump(mode="json", exclude={"dry_run"})  # as fingerprinted before dry_run existed
    if sent.get("resources") is None:  # likewise before resources existed
        sent.pop("resources", None)
    return hashlib.sha256(json.dumps(sent, sort_keys=True).encode()).hexdigest()


def _replay(session: Session, existing: Job, body: JobCreate) -> Job:
    """The same Idempotency-Key: the same job for the same request, 409 for a different one.
    The fingerprint lives on the job's creation event (the worker later rewrites `spec`)."""
    data = session.scalar(select(Event.data).where(Event.job_id == existing.id, Event.message == CREATED)
                          .order_by(Event.seq).limit(1)) or {}
    if data.get("request_sha256") not in (None, fingerprint(body)):
        raise Conflict("This Idempotency-Key was used with a different request.", param="Idempotency-Key",
                       code="idempotency_key_reused")
    return existing


def _by_key(session: Session, tenant_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def job_request(payload: Any) -> JobCreate:
    """The request typed; a bad field is a 400 naming it."""
    return validated(JobCreate, payload)


@dataclass(frozen=True)
class Checked:
    """A job request that passed every check a create makes: what the job row is made of."""

    spec: JobSpec
    source: ModelSource
    search: dict[str, Any] | None
    ensemble: dict[str, Any] | None
    integrations: Any


def check_request(session: Session, settings: Settings, *, tenant_id: str, body: JobCreate) -> Checked:
    """Every check a create makes of a request (after its Idempotency-Key); reads only, so a dry run
    (lathe.estimate) makes the very same checks.

    Raises:
        BadRequest / NotFound: the request, its files or its model, naming the param.
    """
    integrations = check_integrations(body.integrations, settings)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    spec = build_spec(body, seed=seed)
    check_files(session, tenant_id=tenant_id, body=body)
    source = resolve_model(session, settings, tenant_id=tenant_id, name=body.model)
    check_spec(spec, body, source)
    check = engine_check(partial(check_applicable, task=spec.task, model=_facts(source)))
    search = check_search(session, tenant_id=tenant_id, spec=spec, stored=stored_spec(spec),
                          check=check) if spec.config.search else None
    ensemble = check_ensemble(session, tenant_id=tenant_id, spec=spec, stored=stored_spec(spec),
                              check=check) if spec.config.ensemble else None
    return Checked(spec, source, search, ensemble, integrations)


def create_job(session: Session, settings: Settings, *, tenant_id: str, payload: Any,
               idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Validate a job request and store it in validating_files (committed).

    Returns:
        (the job, whether it is new): a replayed Idempotency-Key returns the existing job, and the
        caller publishes `VALIDATE_TASK` only for a new one.

    Raises:
        BadRequest / NotFound / Conflict: the request, its files or its model, naming the param.
    """
    body: JobCreate = job_request(payload)
    if body.dry_run:  # a dry run is answered by lathe.estimate.estimate_job and never stored
        raise ValueError("create_job got a dry run")
    if idempotency_key and (existing := _by_key(session, tenant_id, idempotency_key)):
        return _replay(session, existing, body), False
    checked = check_request(session, settings, tenant_id=tenant_id, body=body)
    spec, source, seed, integrations = checked.spec, checked.source, checked.spec.seed, checked.integrations
    search, ensemble = checked.search, checked.ensemble

    job = Job(
        id=new_id("ftjob"), tenant_id=tenant_id, spec=stored_spec(spec), model=body.model,
        task=spec.task.value if spec.task else None, training_file=body.training_file,
        validation_file=body.validation_file, test_file=body.test_file, result_files=[],
        job_metadata=body.metadata, seed=seed, attempt=0, max_attempts=settings.max_attempts,
        idempotency_key=idempotency_key, created_at=now(), search=search, ensemble=ensemble,
        integrations=integrations, gpu_class=body.resources.gpu if body.resources else None,
        gpus=body.resources.gpus if body.resources else None,
    )
    session.add(job)
    try:
        session.flush()  # the job row first: events reference it
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the unique index.
        session.rollback()
        existing = _by_key(session, tenant_id, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _replay(session, existing, body), False
    add_event(session, job_id=job.id, message=CREATED,
              data={"model_source": source.kind, "request_sha256": fingerprint(body)})
    session.commit()
    return job, True


def list_jobs(session: Session, *, tenant_id: str, metadata: dict[str, str], after: str | None,
              limit: int, parent_job: str | None = None) -> list[Job]:
    """A tenant's jobs, newest first, created before job `after`, with these metadata values (and,
    with `parent_job`, only that search's trials).

    Raises:
        NotFound: `after` or `parent_job` is not one of the tenant's jobs (param "after" / "parent_job").
    """
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if parent_job is not None:
        if get_job(session, tenant_id=tenant_id, job_id=parent_job) is None:
            raise NotFound(f"No job {parent_job!r}.", param="parent_job")
        stmt = stmt.where(Job.parent_job == parent_job)
    for key, value in metadata.items():
        stmt = stmt.where(Job.job_metadata[key].as_string() == value)
    if after:
        cursor = get_job(session, tenant_id=tenant_id, job_id=after)
        if cursor is None:
            raise NotFound(f"No job {after!r}.", param="after")
        stmt = stmt.where(tuple_(Job.created_at, Job.id) < tuple_(cursor.created_at, cursor.id))
    return list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


def owned_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    if job is None:
        raise NotFound(f"No such job: {job_id!r}.", param="fine_tuning_job_id")
    return job


# What each user action says in the job's events, by the status it leads to.
_MESSAGES = {
    ("cancel", JobStatus.CANCELLED): "Job cancelled", ("cancel", JobStatus.CANCELLING): "Cancellation requested",
    ("pause", JobStatus.PAUSED): "Job paused", ("resume", JobStatus.QUEUED): "Job resumed",
    ("resume", JobStatus.VALIDATING_FILES): "Job resumed",
}
# Asking again for what is already under way answers the job as it is.
_ALREADY = {"cancel": JobStatus.CANCELLING, "pause": JobStatus.PAUSED}


def act(session: Session, *, tenant_id: str, job_id: str,
        action: Literal["cancel", "pause", "resume"]) -> tuple[Job, list[tuple[str, str]]]:
    """A user's cancel, pause or resume (committed). Cancelling a search cancels its unfinished
    trials in the same transaction; a search is not paused (its trials are).

    Returns:
        (the job as it is now, the (task, job id) messages to publish).

    Raises:
        NotFound: no such job for this tenant.
        Conflict: the action does not apply to the job's status, or the job changed meanwhile.
    """
    job = owned_job(session, tenant_id=tenant_id, job_id=job_id)
    if _ALREADY.get(action) == job.status:
        return job, []
    if job.is_parent and action != "cancel":
        kind, children = ("search", "trials") if job.search else ("ensemble", "members")
        raise Conflict(f"A {kind} can't be {action}d: {action} its {children} (GET /v1/fine_tuning/jobs?parent_job="
                       f"{job.id}), or cancel the {kind}.", param="fine_tuning_job_id", code=f"{kind}_not_pausable")
    if action == "resume" and job.status == JobStatus.PAUSED and job.lease_owner is not None:
        # The paused attempt is still saving its checkpoint; a new attempt now would race it.
        raise Conflict("The job is still stopping to pause; retry in a few seconds.",
                       param="fine_tuning_job_id", code="job_stopping", headers={"Retry-After": "5"})
    was_running = job.status == JobStatus.RUNNING
    try:
        target = lifecycle.user_move(session, job, action,
                                     **({"finished_at": now()} if action == "cancel" and not was_running else {}))
    except lifecycle.IllegalMove as e:
        raise Conflict(f"Job {job.id}: {e}", param="fine_tuning_job_id") from e
    if target is None:
        session.rollback()
        raise Conflict("The job changed state meanwhile; retry.", param="fine_tuning_job_id")
    message = "Pause requested" if action == "pause" and was_running else _MESSAGES[(action, target)]
    add_event(session, job_id=job.id, message=message, attempt=job.attempt)
    publish: list[tuple[str, str]] = []
    if job.is_parent:  # cancel: its children too, and the parent closes once they have stopped
        _cancel_trials(session, job)
        publish.append((ADVANCE_TASK, job.id))
    elif job.parent_job and target in TERMINAL:
        publish.append((ADVANCE_TASK, job.parent_job))  # the parent starts the next child
    session.commit()
    session.refresh(job)
    task = {JobStatus.QUEUED: RUN_TASK, JobStatus.VALIDATING_FILES: VALIDATE_TASK}.get(target) if action == "resume" else None
    return job, publish + ([(task, job.id)] if task else [])


def _cancel_trials(session: Session, parent: Job) -> None:
    trials = session.scalars(select(Job).where(Job.parent_job == parent.id, Job.status.not_in([str(s) for s in TERMINAL])))
    for trial in trials:
        if trial.status == JobStatus.CANCELLING:
            continue
        target = lifecycle.user_move(session, trial, "cancel",
                                     **({} if trial.status == JobStatus.RUNNING else {"finished_at": now()}))
        if target is not None:
            add_event(session, job_id=trial.id, message=f"{_MESSAGES[('cancel', target)]} with its parent {parent.id}",
                      attempt=trial.attempt)
