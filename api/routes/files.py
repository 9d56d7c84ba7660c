"""Files: datasets (`purpose=fine-tune`) and base models (`purpose=model`). The upload is received
and checked here (HTTP streaming, api.archives); storing, listing and deleting are lathe.files'."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from api import archives
from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import (
    V1_ERRORS,
    Deleted,
    FileObject,
    ListPage,
    error_responses,
    file_object,
)
from api.uploads import receive_upload
from core.errors import DataError
from core.formats import check_file, dataset_format
from lathe import files as service
from lathe.db.tables import FilePurpose, new_id
from lathe.errors import BadRequest

router = APIRouter(prefix="/v1/files", tags=["files"], responses=V1_ERRORS)

UPLOAD_PURPOSES = (FilePurpose.FINE_TUNE, FilePurpose.MODEL)
MEDIA_TYPES = {"csv": "text/csv", "jsonl": "application/jsonl", "parquet": "application/vnd.apache.parquet",
               "zip": "application/zip"}
# The route streams the raw body itself (api.uploads), so FastAPI can't see the form: documented here.
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": (
            "fine-tune: .jsonl, .csv, .parquet or a .zip of label/image folders; model: a .zip/.tar(.gz) of a "
            "Hugging Face folder with safetensors weights. The name is kept as metadata only.")},
        "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
    }}}}}}
CONTENT_TYPES = {t: {} for t in (*MEDIA_TYPES.values(), "application/octet-stream")}
# OpenAPI links: what a new file's id is for (clients and schemathesis' stateful tests follow them).
_CREATE_JOB = "#/paths/~1v1~1fine_tuning~1jobs/post"
FILE_LINKS = {
    "TrainOnFile": {"operationRef": _CREATE_JOB, "requestBody": {"training_file": "$response.body#/id"},
                    "description": "A fine-tune file is a job's training_file (or validation_file, test_file)."},
    "StartFromModelFile": {"operationRef": _CREATE_JOB, "requestBody": {"model": "$response.body#/id"},
                           "description": "A model file is a job's base model."},
}


def _check_dataset(path: Path, filename: str) -> tuple[Path, dict]:
    """Validate a dataset upload and move it to data.<fmt>; a 400 names the line."""
    try:
        fmt = dataset_format(filename)
        details = check_file(path, fmt, param="file")
    except DataError as exc:
        raise BadRequest(exc.message, param="file", code=exc.code) from None
    final = path.with_name(f"data.{fmt}")
    path.rename(final)
    return final, {"format": fmt, **details}


def _unpack_model(path: Path, filename: str, *, max_bytes: int, max_members: int) -> tuple[Path, dict]:
    """Check a model archive from its index, then extract it to model/ and drop the archive."""
    kind = archives.archive_kind(filename)
    members, total = archives.inspect_archive(path, kind, max_bytes=max_bytes, max_members=max_members)
    dest = path.parent / "model"
    archives.extract_archive(path, kind, dest, members)
    path.unlink()
    files = sorted("/".join(m.parts) for m in members if not m.is_dir)
    return dest, {"format": "hf-folder", "archive": kind, "extracted_bytes": total, "files": files[:100]}


@router.post("", response_model=FileObject, responses={200: {"links": FILE_LINKS}, **error_responses(413)},
             openapi_extra=UPLOAD_BODY)
async def create_file(request: Request, settings: SettingsDep, tenant: TenantDep, session: SessionDep) -> FileObject:
    """Upload a file (multipart `file` + `purpose`): a dataset (fine-tune) or a model archive (model)."""
    file_id = new_id("file")
    folder = settings.files_dir / file_id
    try:
        upload = await receive_upload(request, dest=folder / "upload.part", max_bytes=settings.max_upload_bytes)
        purpose = upload.fields.get("purpose", "").strip()
        if not purpose:
            raise BadRequest("Missing form field `purpose` (fine-tune or model).", param="purpose")
        if purpose not in UPLOAD_PURPOSES:
            raise BadRequest(f"Unsupported purpose {purpose!r}: use 'fine-tune' or 'model'.", param="purpose",
                             code="invalid_purpose")
        if upload.path is None or upload.filename is None:
            raise BadRequest("Missing form field `file`.", param="file")
        if upload.bytes == 0:
            raise BadRequest("The uploaded file is empty.", param="file")
        if purpose == FilePurpose.FINE_TUNE:
            stored, details = await run_in_threadpool(_check_dataset, upload.path, upload.filename)
        else:
            stored, details = await run_in_threadpool(
                _unpack_model, upload.path, upload.filename,
                max_bytes=settings.max_archive_bytes, max_members=settings.max_archive_members)
        # Committed by the service (the storage quota is checked there, at flush).
        row = await run_in_threadpool(
            service.store_file, session, tenant_id=tenant.id, file_id=file_id, purpose=purpose,
            filename=upload.filename, size=upload.bytes, sha256=upload.sha256, path=stored, details=details)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return file_object(row)


@router.get("", response_model=ListPage[FileObject], responses=error_responses(404))
def list_files(
    tenant: TenantDep, session: SessionDep,
    purpose: str | None = None,
    after: Annotated[str | None, Query(description="A file id: list the files older than it.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
) -> ListPage[FileObject]:
    """List the tenant's files, newest first."""
    rows = service.list_files(session, tenant_id=tenant.id, purpose=purpose, after=after, order=order,
                              limit=limit + 1)
    data = [file_object(f) for f in rows[:limit]]
    return ListPage(data=data, has_more=len(rows) > limit, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


@router.get("/{file_id}", response_model=FileObject, responses=error_responses(404))
def retrieve_file(file_id: str, tenant: TenantDep, session: SessionDep) -> FileObject:
    """Get a file's metadata."""
    return file_object(service.owned_file(session, tenant_id=tenant.id, file_id=file_id))


@router.delete("/{file_id}", response_model=Deleted, responses=error_responses(404, 409))
def delete_file(file_id: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> Deleted:
    """Delete a file; refused (409) while an unfinished job uses it."""
    service.delete_file(session, settings, tenant_id=tenant.id, file_id=file_id)
    return Deleted(id=file_id, object="file")


@router.get("/{file_id}/content", response_class=FileResponse,
            responses={200: {"content": CONTENT_TYPES}, **error_responses(404)})
def file_content(file_id: str, tenant: TenantDep, session: SessionDep) -> FileResponse:
    """Download a dataset file's bytes (model files are stored extracted and can't be downloaded)."""
    row, path = service.file_content(session, tenant_id=tenant.id, file_id=file_id)
    fmt = (row.details or {}).get("format", "")
    return FileResponse(path, media_type=MEDIA_TYPES.get(fmt, "application/octet-stream"), filename=row.filename)
