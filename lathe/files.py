"""The files service: a tenant's uploaded datasets (`purpose=fine-tune`) and base models
(`purpose=model`), stored, listed, read and deleted. Keyword-only functions that the API's routes
call; each function commits what it changes. Receiving and checking the upload itself is the
API's (api.uploads, api.archives); the file's bytes are already in place when `store_file` runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from lathe.db.queries import get_file, unfinished_job_using
from lathe.db.tables import File, FilePurpose, now
from lathe.errors import BadRequest, Conflict, NotFound
from lathe.settings import Settings


def store_file(session: Session, *, tenant_id: str, file_id: str, purpose: str, filename: str, size: int,
               sha256: str, path: Path, details: dict[str, Any]) -> File:
    """Record an upload whose bytes are at `path` (committed).

    Raises:
        TooLarge: the tenant's storage quota (lathe.quotas, checked at flush); the session is then
            unusable until rolled back, and the caller removes what it wrote to disk.
    """
    row = File(id=file_id, tenant_id=tenant_id, purpose=purpose, filename=filename, bytes=size, sha256=sha256,
               path=str(path), status="processed", details=details, created_at=now())
    session.add(row)
    session.commit()
    return row


def list_files(session: Session, *, tenant_id: str, purpose: str | None, after: str | None,
               order: Literal["asc", "desc"], limit: int) -> list[File]:
    """A tenant's files in creation order (`desc`: newest first), past file `after`.

    Raises:
        NotFound: `after` is not one of the tenant's files (param "after").
    """
    stmt = select(File).where(File.tenant_id == tenant_id)
    if purpose:
        stmt = stmt.where(File.purpose == purpose)
    key = tuple_(File.created_at, File.id)
    if after:
        cursor = get_file(session, tenant_id=tenant_id, file_id=after)
        if cursor is None:
            raise NotFound(f"No file {after!r}.", param="after")
        value = tuple_(cursor.created_at, cursor.id)
        stmt = stmt.where(key < value if order == "desc" else key > value)
    cols = (File.created_at.desc(), File.id.desc()) if order == "desc" else (File.created_at, File.id)
    return list(session.scalars(stmt.order_by(*cols).limit(limit)))


def owned_file(session: Session, *, tenant_id: str, file_id: str) -> File:
    """Raises: NotFound (param "file_id") unless the tenant has this file."""
    row = get_file(session, tenant_id=tenant_id, file_id=file_id)
    if row is None:
        raise NotFound(f"No such file: {file_id!r}.", param="file_id")
    return row


def file_content(session: Session, *, tenant_id: str, file_id: str) -> tuple[File, Path]:
    """A dataset file and where its bytes are.

    Raises:
        NotFound: no such file, or its bytes are gone.
        BadRequest: a model file (kept extracted; its archive is not kept).
    """
    row = owned_file(session, tenant_id=tenant_id, file_id=file_id)
    if row.purpose == FilePurpose.MODEL:
        raise BadRequest("Model files are stored extracted; their archive is not kept.", param="file_id",
                         code="content_unavailable")
    path = Path(row.path)
    if not path.is_file():
        raise NotFound(f"The content of file {file_id} is gone.", param="file_id")
    return row, path


def delete_file(session: Session, settings: Settings, *, tenant_id: str, file_id: str) -> None:
    """Delete a file's row (committed), then its folder under `settings.files_dir`.

    Raises:
        NotFound: no such file for this tenant.
        Conflict: an unfinished job uses it (as a data file or as its base model).
    """
    row = owned_file(session, tenant_id=tenant_id, file_id=file_id)
    in_use = unfinished_job_using(session, tenant_id=tenant_id, ref=file_id,
                                  columns=("training_file", "validation_file", "test_file", "model"))
    if in_use:
        raise Conflict(f"File {file_id} is used by job {in_use}, which has not finished.", param="file_id")
    session.delete(row)
    session.commit()
    folder = settings.files_dir / file_id
    if folder.resolve().is_relative_to(settings.files_dir.resolve()):
        shutil.rmtree(folder, ignore_errors=True)
