"""What a search varies: its space (dotted paths into the job body), the task's default space, and
a trial's spec (the parent's, without `search`, with the proposed values set).

A space is checked before anything is stored: every key must name a numeric, boolean or enumerated
field of `hyperparameters` or `config`, and each key's bounds (every choice; low and high) and the
all-low and all-high corners must each make a valid job, judged by the same checks a job request
gets. A space that could produce an invalid trial is a 400 naming its key.
"""

from __future__ import annotations

import copy
import enum
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from core.spec import ALL_METRICS, JobSpec, Task
from core.spec.search import SearchConfig, SearchParam
from lathe.errors import BadRequest, LatheError, dotted_param

SEARCHABLE_ROOTS = ("hyperparameters.", "config.")

# The default space, by task: the playbook's first knobs (learning rate, epochs, batch size, weight
# decay, warmup). The learning rate is searched as a multiple of the task's base rate (JobSpec.
# base_learning_rate), so one range serves encoders, LoRA and images alike.
_COMMON = {
    "hyperparameters.learning_rate_multiplier": SearchParam(type="float", low=0.2, high=10.0, log=True),
    "hyperparameters.n_epochs": SearchParam(type="int", low=1, high=6),
    "hyperparameters.batch_size": SearchParam(type="categorical", choices=[8, 16, 32]),
    "config.optimizer.weight_decay": SearchParam(type="float", low=0.0, high=0.1),
    "config.scheduler.warmup_ratio": SearchParam(type="float", low=0.0, high=0.2),
}
DEFAULT_SPACES: dict[Task, dict[str, SearchParam]] = {
    Task.TEXT_CLASSIFICATION: _COMMON,
    Task.TOKEN_CLASSIFICATION: _COMMON,
    # Causal LMs: fewer, smaller batches fit; a long run on a small set overfits quickly.
    Task.CAUSAL_LM: {**_COMMON, "hyperparameters.n_epochs": SearchParam(type="int", low=1, high=4),
                     "hyperparameters.batch_size": SearchParam(type="categorical", choices=[4, 8, 16])},
    Task.IMAGE_CLASSIFICATION: {**_COMMON, "hyperparameters.learning_rate_multiplier":
                                SearchParam(type="float", low=0.1, high=3.0, log=True)},
}


def space_of(search: SearchConfig, task: Task | None) -> dict[str, SearchParam]:
    """The search's space: its own, or the task's default (text-classification's when not known yet)."""
    return dict(search.space) if search.space else dict(DEFAULT_SPACES[task or Task.TEXT_CLASSIFICATION])


def objective_of(spec: JobSpec) -> tuple[str, bool]:
    """(the objective metric, whether larger is better)."""
    search = spec.config.search
    metric = (search.objective.metric if search and search.objective.metric else None) or spec.config.metric_for_best_model
    mode = search.objective.mode if search else "auto"
    return metric, ALL_METRICS[metric] if mode == "auto" else mode == "max"


def grid_size(space: dict[str, SearchParam]) -> int:
    """How many points the grid sampler has to visit."""
    size = 1
    for param in space.values():
        size *= len(param.grid())
    return size


def check_keys(space: dict[str, SearchParam]) -> None:
    """Every key names a searchable field of the job body.

    Raises:
        BadRequest: param `config.search.space.<key>`.
    """
    for key in space:
        why = not_searchable(key)
        if why:
            raise BadRequest(f"config.search.space: {key!r} {why}", param=f"config.search.space.{key}",
                             code="invalid_search_space")


def not_searchable(key: str) -> str | None:
    if not key.startswith(SEARCHABLE_ROOTS):
        return "is not a field of hyperparameters or config."
    if key == "config.search" or key.startswith("config.search."):
        return "is the search itself; a search can't search its own settings."
    model: type[BaseModel] = JobSpec
    parts = key.split(".")
    for i, name in enumerate(parts):
        field = model.model_fields.get(name)
        if field is None:
            return f"is not a field of the job body ({'.'.join(parts[:i]) or 'the job'} has no {name!r})."
        kinds = _leaf_types(field.annotation)
        models = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        if i < len(parts) - 1:
            if not models:
                return f"goes past {'.'.join(parts[:i + 1])}, which has no fields."
            model = models[0]
        elif models or not all(_scalar(k) for k in kinds):
            return "is not a numeric, boolean or enumerated field (only those can be searched)."
    return None


def _leaf_types(annotation: Any) -> list[Any]:
    """The types an annotation allows, Optional/Union/Annotated unwrapped; Literal values as is."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _leaf_types(arg)]
    if origin is Literal:
        return [Literal]
    return [annotation]


def _scalar(kind: Any) -> bool:
    return kind in (int, float, bool, Literal, type(None)) or (isinstance(kind, type) and issubclass(kind, enum.Enum))


def set_path(body: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` (dotted) in a nested dict, making the objects on the way (`config.lora.r` on a job
    without LoRA turns LoRA on with that rank)."""
    *parents, leaf = key.split(".")
    node = body
    for name in parents:
        if not isinstance(node.get(name), dict):
            node[name] = {}
        node = node[name]
    node[leaf] = value


def trial_spec(parent: dict[str, Any], params: dict[str, Any], *, objective: str) -> dict[str, Any]:
    """A trial's stored spec: the parent's without `search`, the params set, and the objective as the
    metric that picks the trial's best checkpoint (so its exported model is the one it is ranked by)."""
    body = copy.deepcopy(parent)
    body.get("config", {}).pop("search", None)
    for key, value in params.items():
        set_path(body, key, value)
    body.setdefault("config", {})["metric_for_best_model"] = objective
    return body


def check_space(parent: dict[str, Any], space: dict[str, SearchParam], *, objective: str,
                check: Callable[[JobSpec], None]) -> None:
    """Refuse a space that can produce an invalid job: each key at each of its bounds (the others as
    the job has them), then every key at its low and at its high at once.

    Args:
        parent: the job's spec as stored (the fields the request set).
        check: what a job request's spec must pass (raises BadRequest naming the field).

    Raises:
        BadRequest: code `invalid_search_space`, param `config.search.space.<key>`.
    """
    check_keys(space)
    cases = [(key, {key: value}) for key, param in space.items() for value in param.extremes()]
    for corner in (0, -1):
        cases.append((next(iter(space)), {k: p.extremes()[corner] for k, p in space.items()}))
    for key, params in cases:
        try:
            check(validated_trial(trial_spec(parent, params, objective=objective)))
        except LatheError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            culprit = e.param if e.param in params else key
            raise BadRequest(f"config.search.space.{culprit}: a trial with {shown} is not a valid job: {e.message}",
                             param=f"config.search.space.{culprit}", code="invalid_search_space") from None


def validated_trial(body: dict[str, Any]) -> JobSpec:
    """A trial's spec, typed (fields set stay marked set); a ValidationError becomes a BadRequest."""
    try:
        return JobSpec.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = dotted_param(err["loc"])
        raise BadRequest(f"{param}: {err['msg']}" if param else err["msg"], param=param) from None
