"""OpenAI's `integrations` on a job: the experiment trackers its training process logs to.

`{"type": "wandb", "wandb": {project, entity, name, tags}}` is OpenAI's, in the shape the openai SDK
sends; `{"type": "mlflow", "mlflow": {experiment, run_name}}` is Lathe's. Where the runs go is the
server's business (lathe.settings: `wandb_mode`, `wandb_dir`, `mlflow_tracking_uri`); the request
only names the project/experiment and the run. The worker does the logging (worker.tracking).

A request is judged here item by item, so that a bad field is a 400 naming it as
`integrations[0].wandb.project`. W&B is always available (offline mode writes run folders that `wandb
sync` uploads later); MLflow only where the server has a tracking URI. The job stores the typed list
(`Job.integrations`), and a search's trials and an ensemble's members inherit their parent's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from lathe.errors import BadRequest
from lathe.settings import Settings

TYPES = ("wandb", "mlflow")
WandbTag = Annotated[str, StringConstraints(min_length=1, max_length=64)]  # W&B refuses others at init


class WandbOptions(BaseModel):
    """OpenAI's `IntegrationWandb`: the project the run goes to, its name, entity and tags."""

    model_config = ConfigDict(extra="forbid")
    project: str = Field(..., min_length=1, max_length=128, pattern=r"^[^/\\#?%:]+$", description=(
        "The W&B project the run is created under (at most 128 characters, none of / \\ # ? % :)."))
    entity: str | None = Field(None, max_length=128, description=(
        "The W&B team or user; default: the API key's default entity (online mode)."))
    name: str | None = Field(None, max_length=128, description=(
        "The run's display name; default: the job id (a search's trial or an ensemble's member: the name "
        "given with `-<child number>` appended, or the child's job id)."))
    tags: list[WandbTag] = Field(default_factory=list, max_length=32, description=(
        "Tags attached to the run, beside Lathe's own (`lathe/finetune`, `lathe/<job id>`, `lathe/<parent id>`)."))


class MlflowOptions(BaseModel):
    """Lathe's MLflow integration: the experiment (created if missing) and the run's name."""

    model_config = ConfigDict(extra="forbid")
    experiment: str = Field(..., min_length=1, max_length=256, description=(
        "The MLflow experiment's name; created on the server's tracking server if it does not exist."))
    run_name: str | None = Field(None, max_length=250, description=(
        "The run's name; default: the job id (children as for W&B's `name`)."))


class WandbIntegration(BaseModel):
    """OpenAI's `FineTuningJobWandbIntegrationObject`."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["wandb"] = Field(description="wandb: Weights & Biases.")
    wandb: WandbOptions


class MlflowIntegration(BaseModel):
    """Lathe's MLflow integration object."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["mlflow"] = Field(description="mlflow: the server's MLflow tracking server.")
    mlflow: MlflowOptions


Integration = Annotated[WandbIntegration | MlflowIntegration, Field(discriminator="type")]
_MODELS: dict[str, type[BaseModel]] = {"wandb": WandbIntegration, "mlflow": MlflowIntegration}


def _param(index: int, loc: tuple[Any, ...] = ()) -> str:
    """`integrations[0].wandb.tags[1]`: indices in brackets, as OpenAI names list items."""
    text = f"integrations[{index}]"
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def parse_integrations(value: Any) -> list[WandbIntegration | MlflowIntegration] | None:
    """The request's `integrations`, typed item by item.

    Raises:
        BadRequest: code invalid_value, param the item's field (`integrations[0].type` for an
            unknown type, `integrations[1].type` for a second of the same type).
    """
    if value is None:
        return None
    if not isinstance(value, list):
        raise BadRequest("integrations must be a list.", param="integrations", code="invalid_value")
    items: list[WandbIntegration | MlflowIntegration] = []
    for index, item in enumerate(value):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind not in _MODELS:
            raise BadRequest(f"{_param(index, ('type',))}: unknown integration type {kind!r}; this server logs to "
                             f"{' or '.join(map(repr, TYPES))}.", param=_param(index, ("type",)), code="invalid_value")
        if any(i.type == kind for i in items):  # one run per tracker per attempt (worker.tracking)
            raise BadRequest(f"{_param(index, ('type',))}: a second {kind} integration; give each type once.",
                             param=_param(index, ("type",)), code="invalid_value")
        try:
            items.append(_MODELS[kind].model_validate(item))
        except ValidationError as exc:
            err = exc.errors()[0]
            param = _param(index, tuple(err["loc"]))
            raise BadRequest(f"{param}: {err['msg']}", param=param, code="invalid_value") from None
    return items


def check_integrations(items: list[WandbIntegration | MlflowIntegration] | None,
                       settings: Settings) -> list[dict[str, Any]]:
    """What a job stores: the integrations, once the server can serve each.

    Raises:
        BadRequest: code integration_not_configured, param `integrations[i].type`, for mlflow on a
            server without `LATHE_MLFLOW_TRACKING_URI`.
    """
    for index, item in enumerate(items or []):
        if item.type == "mlflow" and not settings.mlflow_tracking_uri:
            raise BadRequest("This server has no MLflow tracking server (LATHE_MLFLOW_TRACKING_URI is not set); "
                             "remove the mlflow integration or ask the operator to set it.",
                             param=_param(index, ("type",)), code="integration_not_configured")
    return [item.model_dump(mode="json") for item in items or []]
