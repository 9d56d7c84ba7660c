"""Which folder (or hub id) a job's `model` names, and the name its fine-tuned model gets.

One resolution for the API (at create) and the worker (before it starts the training child, so a
model that went away fails the job at once with a clear error instead of a crashed child). Torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sqlalchemy import select
from sqlalchemy.orm import Session

from lathe.db.queries import get_checkpoint, get_model
from lathe.db.tables import File, FilePurpose, Job, Tenant
from lathe.errors import BadRequest, NotFound
from lathe.settings import Settings

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a job's weights come from.

    kind: "file" (an uploaded purpose=model archive), "checkpoint" (an earlier job's checkpoint),
        "local" (a folder of the server's models directory), "fine_tuned" (an earlier job's
        model) or "hub" (a Hugging Face hub id).
    base: the base model's folder, or the hub id.
    init_from: a checkpoint folder whose weights are loaded over `base`, or None.
    """

    kind: str
    base: str
    init_from: str | None = None


def resolve_model(session: Session, settings: Settings, *, tenant_id: str, name: str) -> ModelSource:
    """What a job's `model` names, for `tenant_id`. The API calls it at create and the worker again
    before training, so what was accepted is what runs (unless its files went away meanwhile).

    Order: an uploaded model file ("file-..."), a checkpoint ("ftckpt-..." or
    "<fine_tuned_model or job id>:ckpt-step-N": that job's base model with the checkpoint's weights
    over it), a folder of `settings.models_dir` ("name" or "org/name"), a fine-tuned model of the
    tenant, else a hub id when the server allows it.

    Raises:
        NotFound: code "model_not_found" (param "model") when nothing matches or its files are gone
            (a job keeps its last checkpoints and its best one).
        BadRequest: a file that is not purpose=model; code "model_not_allowed" for a hub id outside
            LATHE_HUB_MODEL_ALLOWLIST.
    """
    if "\x00" in name:  # no path, id or hub name has one (and PostgreSQL refuses it in a query)
        raise BadRequest("model: a NUL character is not allowed.", param="model", code="invalid_value")
    if name.startswith("file-"):
        file = session.scalar(select(File).where(File.id == name, File.tenant_id == tenant_id))
        if file is None:
            raise NotFound(f"No such model file: {name!r}.", param="model", code="model_not_found")
        if file.purpose != FilePurpose.MODEL:
            raise BadRequest(f"File {name} has purpose {file.purpose!r}; a base model needs 'model'.", param="model")
        folder = settings.files_dir / file.id / "model"
        if not folder.is_dir():
            raise NotFound(f"The model archive {name!r} has not been extracted (status {file.status!r}).",
                           param="model", code="model_not_found")
        return ModelSource("file", str(folder))

    found = get_checkpoint(session, tenant_id=tenant_id, name=name)
    if found is not None:
        checkpoint, source_job = found
        if not Path(checkpoint.path).is_dir():
            raise NotFound(f"The files of checkpoint {name!r} are gone (a job keeps its last checkpoints and "
                           "its best one).", param="model", code="model_not_found")
        base = resolve_model(session, settings, tenant_id=tenant_id, name=source_job.model)
        return ModelSource("checkpoint", base.base, checkpoint.path)

    if settings.models_dir is not None and _safe_relative(name):
        root = settings.models_dir.expanduser().resolve()
        folder = (root / name).resolve()
        if folder.is_relative_to(root) and (folder / "config.json").is_file():
            return ModelSource("local", str(folder))

    model = get_model(session, tenant_id=tenant_id, model_id=name)
    if model is not None:
        if not Path(model.path).is_dir():
            raise NotFound(f"The files of fine-tuned model {name!r} are gone.", param="model", code="model_not_found")
        return ModelSource("fine_tuned", model.path)

    if settings.allow_hub_models and HUB_ID.match(name) and ".." not in name:
        if not settings.hub_model_allowed(name):
            raise BadRequest(f"Hub model {name!r} is not in this server's allow-list (LATHE_HUB_MODEL_ALLOWLIST).",
                             param="model", code="model_not_allowed")
        return ModelSource("hub", name)
    where = f" in the models directory ({settings.models_dir})" if settings.models_dir else ""
    raise NotFound(f"Model {name!r} not found{where}: name an uploaded model file, a server model, one of your "
                   "fine-tuned models or checkpoints" + (" or a Hugging Face hub id." if settings.allow_hub_models else "."),
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
