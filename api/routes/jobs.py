"""Fine-tuning jobs: create, list, get, cancel, pause, resume (the work is lathe.jobs')."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import V1_ERRORS, FineTuningJob, JobEstimate, ListPage, error_responses, job_object
from lathe import jobs as service
from lathe.estimate import estimate_job
from lathe.queue import VALIDATE_TASK

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=V1_ERRORS)

# The request schema is documented from JobCreate (see api.main.custom_openapi); the route reads
# the raw object so that a bad field is a 400 naming it, like OpenAI, not a 422.
JOB_CREATE_BODY = {"x-lathe-body": "JobCreate"}


@router.post("", response_model=FineTuningJob | JobEstimate, openapi_extra=JOB_CREATE_BODY,
             responses=error_responses(404, 409, 503, 504))
def create_job(
    request: Request, tenant: TenantDep, session: SessionDep, settings: SettingsDep,
    payload: Annotated[dict[str, Any], Body()],
    # An empty key was stored like a real one and the second such request hit the unique index: a 500.
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=256)] = None,
) -> FineTuningJob | JobEstimate:
    """Create a fine-tuning job; it starts in validating_files. With `"dry_run": true`, check the request and
    its files in full and answer an estimate (fine_tuning.job.estimate) instead: nothing is stored or queued."""
    body = service.job_request(payload)
    if body.dry_run:
        return JobEstimate.model_validate(estimate_job(session, settings, tenant_id=tenant.id, body=body))
    job, new = service.create_job(session, settings, tenant_id=tenant.id, payload=body,
                                  idempotency_key=idempotency_key)
    if new:
        request.app.state.publish(VALIDATE_TASK, job.id)  # after commit: the worker must find the row
    return job_object(job)


@router.get("", response_model=ListPage[FineTuningJob], responses=error_responses(404))
def list_jobs(
    request: Request, tenant: TenantDep, session: SessionDep,
    after: Annotated[str | None, Query(description="A job id: list the jobs created before it.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    parent_job: Annotated[str | None, Query(max_length=40, description="A search's id: list its trials only.")] = None,
) -> ListPage[FineTuningJob]:
    """List the tenant's jobs, newest first; filter with `metadata[key]=value`, or `parent_job`."""
    filters = {key[9:-1]: value for key, value in request.query_params.multi_items()
               if key.startswith("metadata[") and key.endswith("]")}
    rows = service.list_jobs(session, tenant_id=tenant.id, metadata=filters, after=after, limit=limit + 1,
                             parent_job=parent_job)
    data = [job_object(j) for j in rows[:limit]]
    return ListPage(data=data, has_more=len(rows) > limit, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


@router.get("/{fine_tuning_job_id}", response_model=FineTuningJob, responses=error_responses(404))
async def retrieve_job(fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep) -> FineTuningJob:
    """Get a job."""
    # What clients poll. One trip to the threadpool for the query and the rendering (a plain `def`
    # route makes FastAPI take a second one to check the answer; here it does so in the loop).
    return await run_in_threadpool(_retrieve, session, tenant.id, fine_tuning_job_id)


def _retrieve(session: Session, tenant_id: str, job_id: str) -> FineTuningJob:
    try:
        return job_object(service.owned_job(session, tenant_id=tenant_id, job_id=job_id))
    finally:
        session.close()  # ends the read transaction here, so closing it later is no I/O


def _act(request: Request, session, tenant, job_id: str, action: str) -> FineTuningJob:  # noqa: ANN001
    job, messages = service.act(session, tenant_id=tenant.id, job_id=job_id, action=action)
    for task, target in messages:
        request.app.state.publish(task, target)  # after commit
    return job_object(job)


@router.post("/{fine_tuning_job_id}/cancel", response_model=FineTuningJob, responses=error_responses(404, 409))
def cancel_job(request: Request, fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep) -> FineTuningJob:
    """Cancel a job: at once when it is not running, else it becomes cancelling until the worker stops it.
    Cancelling a search cancels its unfinished trials."""
    return _act(request, session, tenant, fine_tuning_job_id, "cancel")


@router.post("/{fine_tuning_job_id}/pause", response_model=FineTuningJob, responses=error_responses(404, 409))
def pause_job(request: Request, fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep) -> FineTuningJob:
    """Pause a job: a running one checkpoints and frees its worker; resume continues from there.
    A search is not paused (409): pause its trials."""
    return _act(request, session, tenant, fine_tuning_job_id, "pause")


@router.post("/{fine_tuning_job_id}/resume", response_model=FineTuningJob, responses=error_responses(404, 409))
def resume_job(request: Request, fine_tuning_job_id: str, tenant: TenantDep, session: SessionDep) -> FineTuningJob:
    """Resume a paused job: back to the queue (or to file validation if it was paused before it)."""
    return _act(request, session, tenant, fine_tuning_job_id, "resume")
