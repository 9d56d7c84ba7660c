"""Which folder (or hub id) a job's `model` names, and the name its fine-tuned model gets.

Torch-free: the Celery process resolves the model before it starts the training child, so that a
model that does not exist fails the job at once with a clear error instead of a crashed child.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from sqlalchemy import select
from sqlalchemy.orm import Session

from lathe.db.tables import File, FilePurpose, Job, Model, Tenant
from lathe.db.queries import get_checkpoint
from lathe.settings import Settings
from core.errors import ModelError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def resolve_start(session: Session, settings: Settings, job: Job) -> tuple[str, str | None]:
    """(base model folder or hub id, checkpoint folder to start from or None) for the job's `model`.

    A checkpoint of an earlier job of the tenant ("<model>:ckpt-step-N" or "ftckpt-...") starts
    from that job's base model with the checkpoint's weights loaded over it.

    Raises:
        ModelError: "model_not_found" (param "model") when nothing matches or the checkpoint's
            files are gone (only the last checkpoints and the best one of a job are kept).
    """
    found = get_checkpoint(session, tenant_id=job.tenant_id, name=job.model)
    if found is None:
        return resolve_base_model(session, settings, job), None
    checkpoint, source = found
    if not Path(checkpoint.path).is_dir():
        raise ModelError(f"The files of checkpoint {job.model!r} are gone (a job keeps its last checkpoints and "
                         "its best one).", param="model", code="model_not_found")
    base, _ = resolve_start(session, settings, source)
    return base, checkpoint.path


def resolve_base_model(session: Session, settings: Settings, job: Job) -> str:
    """A local folder path for the job's base model, or a hub id.

    Order: an uploaded purpose=model file of the tenant (its extracted `files_dir/<id>/model`), a
    folder in `settings.models_dir`, an earlier fine-tuned model of the same tenant (its exported
    folder), else a Hugging Face hub id when `allow_hub_models`.

    Raises:
        ModelError: code "model_not_found" (param "model") when nothing matches.
    """
    name = job.model
    if name.startswith("file-"):
        file = session.scalar(select(File).where(File.id == name, File.tenant_id == job.tenant_id))
        if file is None or file.purpose != FilePurpose.MODEL:
            raise ModelError(f"No uploaded model file {name!r} (upload it with purpose=model).",
                             param="model", code="model_not_found")
        folder = settings.files_dir / file.id / "model"
        if not folder.is_dir():
            raise ModelError(f"The model archive {name!r} has not been extracted (status {file.status!r}).",
                             param="model", code="model_not_found")
        return str(folder)

    if settings.models_dir is not None and _safe_relative(name):
        root = settings.models_dir.expanduser().resolve()
        folder = (root / name).resolve()
        if folder.is_relative_to(root) and (folder / "config.json").is_file():
            return str(folder)

    if name.startswith("ft:"):
        model = session.scalar(select(Model).where(Model.id == name, Model.tenant_id == job.tenant_id))
        if model is None or not Path(model.path).is_dir():
            raise ModelError(f"No fine-tuned model {name!r}.", param="model", code="model_not_found")
        return model.path

    if HUB_ID.match(name) and settings.hub_model_allowed(name):
        return name
    where = f" in the models directory ({settings.models_dir})" if settings.models_dir else ""
    raise ModelError(f"Model {name!r} not found{where}; name an uploaded model file id, a fine-tuned model"
                     + (" or a Hugging Face hub id." if settings.allow_hub_models else "."),
                     param="model", code="model_not_found")


def _safe_relative(name: str) -> bool:
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and "\\" not in name


def _slug(text: str, *, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.")
    return slug[:limit] or "model"


def base_short_name(session: Session, job: Job) -> str:
    """The base model's short name: a hub id's last part, an upload's file name without extension,
    a fine-tuned model's own base (so continued training keeps the original name)."""
    name = job.model
    if name.startswith("ft:") and name.count(":") >= 4:
        return _slug(name.split(":")[1])
    if name.startswith("file-"):
        file = session.get(File, name)
        if file is not None:
            stem = file.filename.rsplit("/", 1)[-1]
            for ext in (".tar.gz", ".tgz", ".tar", ".zip"):
                if stem.lower().endswith(ext):
                    stem = stem[: -len(ext)]
                    break
            return _slug(stem)
    return _slug(name.rstrip("/").rsplit("/", 1)[-1])


def fine_tuned_model_name(session: Session, job: Job, suffix: str | None) -> str:
    """OpenAI's `ft:{base}:{org}:{suffix}:{id}` shape, e.g. `ft:tiny-bert:acme:spam:3f9c2a1b7d0e`."""
    tenant = session.get(Tenant, job.tenant_id)
    org = _slug(tenant.name if tenant else job.tenant_id)
    job_suffix = job.id.split("-", 1)[-1][-12:]
    return f"ft:{base_short_name(session, job)}:{org}:{_slug(suffix, limit=64) if suffix else ''}:{job_suffix}"
