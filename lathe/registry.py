"""The registry of a tenant's fine-tuned models (the rows a succeeded job exports): list, look up,
find the archive, delete. Keyword-only functions that the API's routes call; each function
commits what it changes. A prediction runs on a worker (lathe.predictions).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.export import archive_path_for, ensure_archive
from lathe.db.queries import get_model, unfinished_job_using
from lathe.db.tables import Model
from lathe.errors import Conflict, NotFound
from lathe.settings import Settings


def list_models(session: Session, *, tenant_id: str) -> list[Model]:
    """A tenant's fine-tuned models, newest first."""
    return list(session.scalars(select(Model).where(Model.tenant_id == tenant_id)
                                .order_by(Model.created_at.desc(), Model.id.desc())))


def owned_model(session: Session, *, tenant_id: str, model_id: str) -> Model:
    """Raises: NotFound (param "model", code "model_not_found") unless the tenant has this model."""
    row = get_model(session, tenant_id=tenant_id, model_id=model_id)
    if row is None:
        raise NotFound(f"The model {model_id!r} does not exist.", param="model", code="model_not_found")
    return row


def model_archive(session: Session, *, tenant_id: str, model_id: str) -> tuple[Model, Path]:
    """A model and its .tar (the exported Hugging Face folder), packed now if the worker has not
    yet (it packs after recording the job; this download may come first). Packing is atomic and
    happens once however many requests ask at the same time; the size it finds is recorded.

    Raises:
        NotFound: no such model, or neither its archive nor its folder is there.
    """
    row = owned_model(session, tenant_id=tenant_id, model_id=model_id)
    path, folder = Path(row.archive_path), Path(row.path)
    if not path.is_file():
        # Only where the worker records it, beside the exported folder; never somewhere else.
        if not row.archive_path or not folder.is_absolute() or path != archive_path_for(folder):
            raise NotFound(f"The archive of model {model_id!r} is missing.", param="model")
        try:
            ensure_archive(folder, path)
        except OSError:
            raise NotFound(f"The archive of model {model_id!r} is missing.", param="model") from None
        size = path.stat().st_size
        if row.bytes != size:
            row.bytes = size
            session.commit()
    return row, path


def delete_model(session: Session, settings: Settings, *, tenant_id: str, model_id: str) -> None:
    """Delete a model's row (committed), then its folder and archive where Lathe wrote them.

    Raises:
        NotFound: no such model for this tenant.
        Conflict: an unfinished job trains from it.
    """
    row = owned_model(session, tenant_id=tenant_id, model_id=model_id)
    in_use = unfinished_job_using(session, tenant_id=tenant_id, ref=model_id, columns=("model",))
    if in_use:
        raise Conflict(f"Model {model_id} is the base of job {in_use}, which has not finished.", param="model")
    paths = [Path(row.path), Path(row.archive_path)]
    session.delete(row)
    session.commit()
    data_dir = settings.resolved_data_dir
    for p in paths:  # only what Lathe itself wrote
        if p.exists() and p.resolve().is_relative_to(data_dir):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
