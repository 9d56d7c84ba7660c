"""The tenant's fine-tuned models: list, get, delete, download, quick predictions (the rows are
lathe.registry's; a prediction runs on a worker: lathe.predictions)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import (
    V1_ERRORS,
    Deleted,
    ListPage,
    ModelObject,
    PredictRequest,
    PredictResponse,
    error_responses,
    model_object,
)
from lathe import registry
from lathe.predictions import request_predictions

router = APIRouter(prefix="/v1/models", tags=["models"], responses=V1_ERRORS)


@router.get("", response_model=ListPage[ModelObject])
def list_models(tenant: TenantDep, session: SessionDep) -> ListPage[ModelObject]:
    """List the tenant's fine-tuned models, newest first."""
    data = [model_object(m) for m in registry.list_models(session, tenant_id=tenant.id)]
    return ListPage(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)


# The {model:path} routes with a suffix come first: model ids contain ':' and may contain '/'.
@router.get("/{model:path}/content", response_class=FileResponse,
            responses={200: {"content": {"application/x-tar": {}}}, **error_responses(404)})
def model_content(model: str, tenant: TenantDep, session: SessionDep) -> FileResponse:
    """Download the model as a .tar of its Hugging Face folder (weights, config, tokenizer, spec, report)."""
    row, path = registry.model_archive(session, tenant_id=tenant.id, model_id=model)
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in row.id) + ".tar"
    return FileResponse(path, media_type="application/x-tar", filename=name)


@router.post("/{model:path}/predict", response_model=PredictResponse, response_model_exclude_none=True,
             responses=error_responses(404, 500, 503, 504))
async def predict(model: str, body: PredictRequest, tenant: TenantDep, session: SessionDep,
                  settings: SettingsDep) -> PredictResponse:
    """Run a small batch of inputs through the model on a worker (a quick check, not a serving endpoint)."""
    row = await run_in_threadpool(registry.owned_model, session, tenant_id=tenant.id, model_id=model)
    data = await request_predictions(settings, model_path=row.path, inputs=body.inputs, top_k=body.top_k,
                                     max_new_tokens=body.max_new_tokens)
    return PredictResponse(data=data)


@router.get("/{model:path}", response_model=ModelObject, responses=error_responses(404))
def retrieve_model(model: str, tenant: TenantDep, session: SessionDep) -> ModelObject:
    """Get a fine-tuned model."""
    return model_object(registry.owned_model(session, tenant_id=tenant.id, model_id=model))


@router.delete("/{model:path}", response_model=Deleted, responses=error_responses(404, 409))
def delete_model(model: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> Deleted:
    """Delete a fine-tuned model and its files; refused (409) while an unfinished job trains from it."""
    registry.delete_model(session, settings, tenant_id=tenant.id, model_id=model)
    return Deleted(id=model, object="model")
