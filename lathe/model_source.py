"""Which folder (or hub id) a job's `model` names, and the name its fine-tuned model gets.

One resolution for the API (at create) and the worker (before it starts the training child, so a
model that went away fails the job at once with a clear error instead of a crashed child). Torch-free.

A hub id is only accepted when the hub can deliver it: it is in the local Hugging Face cache, or the
hub answers a short probe (LATHE_HUB_PROBE_SECONDS; the answer kept LATHE_HUB_PROBE_CACHE_SECONDS
per process). Otherwise the request fails in about a second with model_not_found, rather than a
training child spending a minute in download retries before it fails the job.
"""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.error
import urllib.request
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
            LATHE_HUB_MODEL_ALLOWLIST; code "model_not_found" for a hub id the hub cannot deliver
            (see `check_hub`).
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
        if (Path(model.path) / "ensemble.json").is_file():
            raise BadRequest(f"{name} is an ensemble of several models, not one to fine-tune further: start from "
                             f"one of its members (GET /v1/fine_tuning/jobs?parent_job={model.job_id}).",
                             param="model", code="model_not_allowed")
        return ModelSource("fine_tuned", model.path)

    if settings.allow_hub_models and HUB_ID.match(name) and ".." not in name:
        if not settings.hub_model_allowed(name):
            raise BadRequest(f"Hub model {name!r} is not in this server's allow-list (LATHE_HUB_MODEL_ALLOWLIST).",
                             param="model", code="model_not_allowed")
        check_hub(settings, name)
        return ModelSource("hub", name)
    where = f" in the models directory ({settings.models_dir})" if settings.models_dir else ""
    raise NotFound(f"Model {name!r} not found{where}: name an uploaded model file, a server model, one of your "
                   "fine-tuned models or checkpoints" + (" or a Hugging Face hub id." if settings.allow_hub_models else "."),
                   param="model", code="model_not_found")


# --- can the hub deliver it? -------------------------------------------------------------------

DEFAULT_HUB = "https://huggingface.co"
_answers: dict[str, tuple[bool, float]] = {}  # endpoint -> (reachable, when; time.monotonic)
_answers_lock = threading.Lock()


def hub_endpoint() -> str:
    """The hub the training child downloads from: HF_ENDPOINT (huggingface_hub's variable) or the default."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_HUB).rstrip("/")


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set (huggingface_hub's truthy values): no hub request is ever made."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, from the same variables it reads."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def in_hub_cache(name: str) -> bool:
    """Whether the model's main revision is in the local cache (its config.json is there), so it
    loads without the hub."""
    folder = hub_cache_dir() / f"models--{name.replace('/', '--')}"
    try:
        commit = (folder / "refs" / "main").read_text().strip()
    except OSError:
        return False
    return bool(commit) and "/" not in commit and (folder / "snapshots" / commit / "config.json").is_file()


def forget_hub_answers() -> None:
    """Drop the kept probe answers (the next check probes again)."""
    with _answers_lock:
        _answers.clear()


def _probe(endpoint: str, timeout: float) -> bool:
    """Whether anything answers HTTP at `endpoint` within `timeout` seconds; any status counts (a
    401 or 404 came from a server). A thread bounds the wait: a socket timeout does not cover DNS."""
    answered: list[bool] = []

    def ask() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(endpoint + "/", method="HEAD"), timeout=timeout):
                pass
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)
        except Exception:  # noqa: BLE001 - refused, unresolvable, timed out, a bad URL: not reachable
            answered.append(False)

    thread = threading.Thread(target=ask, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered) and answered[0]


def hub_reachable(settings: Settings) -> bool:
    """Whether the hub answers within `settings.hub_probe_seconds` (True when that is 0: no probe).
    The answer is kept `settings.hub_probe_cache_seconds` per process and endpoint; concurrent
    callers wait for one probe rather than each making their own."""
    if settings.hub_probe_seconds <= 0:
        return True
    endpoint = hub_endpoint()
    with _answers_lock:
        kept = _answers.get(endpoint)
        if kept is not None and time.monotonic() - kept[1] < settings.hub_probe_cache_seconds:
            return kept[0]
        reachable = _probe(endpoint, settings.hub_probe_seconds)
        _answers[endpoint] = (reachable, time.monotonic())
        return reachable


def check_hub(settings: Settings, name: str) -> None:
    """Refuse a hub id the hub cannot deliver: not in the local cache, and HF_HUB_OFFLINE is set (no
    probe) or the hub does not answer the probe.

    Raises:
        BadRequest: code "model_not_found", param "model", saying how to provide the model instead.
    """
    if in_hub_cache(name):
        return
    if hub_offline():
        why = "this server runs with HF_HUB_OFFLINE=1"
    elif not hub_reachable(settings):
        why = (f"the Hugging Face hub ({hub_endpoint()}) can't be reached from this server "
               f"(no answer within {settings.hub_probe_seconds:g}s)")
    else:
        return
    raise BadRequest(f"Model {name!r} is a Hugging Face hub id, but {why} and the model is not in its local cache. "
                     "Provide the model another way: upload it as a .tar/.tar.gz/.zip of its folder with "
                     "purpose=model and name that file's id, or ask the operator to put its folder in the "
                     "server's models directory (LATHE_MODELS_DIR) and name the folder.",
                     param="model", code="model_not_found")


def cache_only(settings: Settings, source: ModelSource) -> bool:
    """Whether a hub model must be loaded from the local cache alone: it is cached and the hub is
    not there (HF_HUB_OFFLINE, or no answer to the probe). Loading it normally would spend ~10 s
    per file waiting on the hub before falling back to the same cached files."""
    if source.kind != "hub" or not in_hub_cache(source.base):
        return False
    return hub_offline() or not hub_reachable(settings)


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
