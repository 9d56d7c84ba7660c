"""The tenant's fine-tuned models: list, get, delete, download, quick predictions (the rows are
lathe.registry's; a prediction runs here, in a subprocess per request)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from fastapi import APIRouter, Request
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
from lathe.errors import BadRequest, LatheError

router = APIRouter(prefix="/v1/models", tags=["models"], responses=V1_ERRORS)
log = logging.getLogger("lathe.api")

ROOT = Path(__file__).resolve().parents[2]  # the checkout, so `python -m core.predict` resolves


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
             responses=error_responses(404, 504))
async def predict(model: str, body: PredictRequest, request: Request, tenant: TenantDep,
                  session: SessionDep) -> PredictResponse:
    """Run a small batch of inputs through the model (a quick check, not a serving endpoint)."""
    row = await run_in_threadpool(registry.owned_model, session, tenant_id=tenant.id, model_id=model)
    state = request.app.state
    payload = json.dumps(body.model_dump()).encode()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = await asyncio.create_subprocess_exec(
        *state.predict_command, row.path, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env, cwd=str(ROOT))
    try:
        out, err = await asyncio.wait_for(proc.communicate(payload), timeout=state.predict_timeout_seconds)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise LatheError("Prediction timed out.", status_code=504, code="timeout") from None
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    try:
        result = json.loads(out or b"{}")
    except json.JSONDecodeError:
        result = {}
    if proc.returncode != 0 or "predictions" not in result:
        error = result.get("error") if isinstance(result, dict) else None
        if proc.returncode == 1 and isinstance(error, dict) and error.get("message"):
            raise BadRequest(str(error["message"]), param=error.get("param"), code=error.get("code"))
        log.error("predict failed (exit %s): %s", proc.returncode, err.decode(errors="replace")[-2000:])
        raise RuntimeError("prediction process failed")
    return PredictResponse(data=result["predictions"])


@router.get("/{model:path}", response_model=ModelObject, responses=error_responses(404))
def retrieve_model(model: str, tenant: TenantDep, session: SessionDep) -> ModelObject:
    """Get a fine-tuned model."""
    return model_object(registry.owned_model(session, tenant_id=tenant.id, model_id=model))


@router.delete("/{model:path}", response_model=Deleted, responses=error_responses(404, 409))
def delete_model(model: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> Deleted:
    """Delete a fine-tuned model and its files; refused (409) while an unfinished job trains from it."""
    registry.delete_model(session, settings, tenant_id=tenant.id, model_id=model)
    return Deleted(id=model, object="model")
