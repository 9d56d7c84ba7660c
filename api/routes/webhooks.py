"""Webhook endpoints, as OpenAI's `client.webhooks` calls them (`/v1/webhook_endpoints`,
`/v1/webhook_event_types`), and Lathe's delivery log. The service is lathe.webhooks.endpoints';
deliveries themselves run on the workers (worker.webhooks), never in a request, except the
synchronous sample of `/test`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import V1_ERRORS, Deleted, ListPage, error_responses
from lathe.db.tables import WebhookEndpoint
from lathe.errors import BadRequest
from lathe.webhooks import endpoints as service
from lathe.webhooks.outbox import EVENT_TYPES

router = APIRouter(tags=["webhooks"], responses=V1_ERRORS)
PREFIX = "/v1/webhook_endpoints"


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=256, description="A human-readable name.")
    url: str = Field(..., min_length=1, max_length=2048, description=(
        "The HTTPS URL that receives deliveries; public addresses only (LATHE_WEBHOOK_ALLOW_PRIVATE)."))
    event_types: list[str] = Field(..., min_length=1, description=f"Events to deliver: {', '.join(EVENT_TYPES)}.")


class EndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=256)
    url: str | None = Field(None, min_length=1, max_length=2048)
    event_types: list[str] | None = Field(None, min_length=1, description="The complete new set.")


class RotateSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_old_secret_active_for_24_hours: bool = Field(False, description=(
        "Sign with the old secret too (a second signature) for 24 hours; false: it stops now."))


class TestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_type: str = Field(..., description="The event type to send as a sample delivery.")


class EndpointObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    name: str
    url: str
    event_types: list[str]
    signing_secret_hint: str
    created_at: int
    updated_at: int


class EndpointWithSecret(EndpointObject):
    signing_secret: str = Field(description="Shown only at create and rotate_secret: keep it.")


class TestResult(BaseModel):
    object: Literal["webhook_endpoint.test"] = "webhook_endpoint.test"
    webhook_endpoint_id: str
    event_type: str
    status_code: int
    success: Literal[True] = True


class EventTypeList(BaseModel):
    object: Literal["list"] = "list"
    data: list[str]


class AttemptLog(BaseModel):
    number: int
    status_code: int | None
    error: str | None
    duration_ms: int
    created_at: int


class Delivery(BaseModel):
    """Lathe: one event's delivery to the endpoint; `id` is the `webhook-id` every attempt carries."""

    id: str
    object: Literal["webhook_endpoint.delivery"] = "webhook_endpoint.delivery"
    webhook_endpoint_id: str
    event_id: str
    event_type: str
    job_id: str | None
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    last_attempt_at: int | None
    next_attempt_at: int | None
    next_attempt_in_seconds: float | None
    delivered_at: int | None
    created_at: int
    attempt_log: list[AttemptLog]


def endpoint_object(row: WebhookEndpoint, *, with_secret: bool = False) -> EndpointObject:
    fields: dict[str, Any] = dict(id=row.id, name=row.name, url=row.url, event_types=list(row.event_types),
                                  signing_secret_hint=service.secret_hint(row.secret), created_at=row.created_at,
                                  updated_at=row.updated_at)
    return EndpointWithSecret(**fields, signing_secret=row.secret) if with_secret else EndpointObject(**fields)


@router.post(PREFIX, response_model=EndpointWithSecret, responses=error_responses(400))
def create_endpoint(body: EndpointCreate, tenant: TenantDep, session: SessionDep, settings: SettingsDep
                    ) -> EndpointObject:
    """Create an endpoint; the answer holds its signing secret, the only time it is shown."""
    row = service.create_endpoint(session, settings, tenant_id=tenant.id, name=body.name, url=body.url,
                                  event_types=body.event_types)
    return endpoint_object(row, with_secret=True)


@router.get(PREFIX, response_model=ListPage[EndpointObject], responses=error_responses(404))
def list_endpoints(
    tenant: TenantDep, session: SessionDep,
    after: Annotated[str | None, Query(description="An endpoint id: list those created before it.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ListPage[EndpointObject]:
    """The tenant's endpoints, newest first."""
    rows = service.list_endpoints(session, tenant_id=tenant.id, after=after, limit=limit + 1)
    data = [endpoint_object(r) for r in rows[:limit]]
    return ListPage(data=data, has_more=len(rows) > limit, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


@router.get(PREFIX + "/{webhook_endpoint_id}", response_model=EndpointObject, responses=error_responses(404))
def retrieve_endpoint(webhook_endpoint_id: str, tenant: TenantDep, session: SessionDep) -> EndpointObject:
    return endpoint_object(service.owned_endpoint(session, tenant_id=tenant.id, endpoint_id=webhook_endpoint_id))


@router.post(PREFIX + "/{webhook_endpoint_id}", response_model=EndpointObject, responses=error_responses(400, 404))
def update_endpoint(webhook_endpoint_id: str, body: EndpointUpdate, tenant: TenantDep, session: SessionDep,
                    settings: SettingsDep) -> EndpointObject:
    """Change the name, the URL or the event types (the full new set)."""
    changes = body.model_dump(exclude_none=True)
    return endpoint_object(service.update_endpoint(session, settings, tenant_id=tenant.id,
                                                   endpoint_id=webhook_endpoint_id, changes=changes))


@router.delete(PREFIX + "/{webhook_endpoint_id}", response_model=Deleted, responses=error_responses(404))
def delete_endpoint(webhook_endpoint_id: str, tenant: TenantDep, session: SessionDep) -> Deleted:
    """Delete an endpoint; its pending deliveries are dropped."""
    service.delete_endpoint(session, tenant_id=tenant.id, endpoint_id=webhook_endpoint_id)
    return Deleted(id=webhook_endpoint_id, object="webhook_endpoint.deleted")


@router.post(PREFIX + "/{webhook_endpoint_id}/rotate_secret", response_model=EndpointWithSecret,
             responses=error_responses(404))
def rotate_secret(webhook_endpoint_id: str, tenant: TenantDep, session: SessionDep,
                  body: RotateSecret | None = None) -> EndpointObject:
    """A new signing secret, shown once; the old one keeps signing for 24 hours if asked."""
    keep = bool(body and body.keep_old_secret_active_for_24_hours)
    row = service.rotate_secret(session, tenant_id=tenant.id, endpoint_id=webhook_endpoint_id,
                                keep_old_for_24_hours=keep)
    return endpoint_object(row, with_secret=True)


@router.post(PREFIX + "/{webhook_endpoint_id}/test", response_model=TestResult, responses=error_responses(400, 404))
async def test_endpoint(webhook_endpoint_id: str, body: TestRequest, tenant: TenantDep, session: SessionDep,
                        settings: SettingsDep) -> TestResult:
    """Send a signed sample event now and answer the endpoint's HTTP status; 400 when no answer came."""
    outcome = await run_in_threadpool(service.send_test, session, settings, tenant_id=tenant.id,
                                      endpoint_id=webhook_endpoint_id, event_type=body.event_type)
    if outcome.status_code is None:
        raise BadRequest(f"The endpoint did not answer: {outcome.error}", param="url", code="webhook_unreachable")
    return TestResult(webhook_endpoint_id=webhook_endpoint_id, event_type=body.event_type,
                      status_code=outcome.status_code)


@router.get(PREFIX + "/{webhook_endpoint_id}/deliveries", response_model=ListPage[Delivery],
            responses=error_responses(404))
def list_deliveries(
    webhook_endpoint_id: str, tenant: TenantDep, session: SessionDep,
    after: Annotated[str | None, Query(description="A delivery id: list those created before it.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ListPage[Delivery]:
    """Lathe: the endpoint's delivery log, newest first: status, attempts, status codes, last error."""
    rows = service.deliveries(session, tenant_id=tenant.id, endpoint_id=webhook_endpoint_id, after=after,
                              limit=limit + 1)
    data = [Delivery(**d) for d in rows[:limit]]
    return ListPage(data=data, has_more=len(rows) > limit, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)


@router.get("/v1/webhook_event_types", response_model=EventTypeList)
def event_types() -> EventTypeList:
    """The event types an endpoint can subscribe to."""
    return EventTypeList(data=list(EVENT_TYPES))
