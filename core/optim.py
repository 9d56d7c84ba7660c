"""The optimisation toolbox: parameter groups, optimizers, learning-rate schedules, L1, clipping.

Every part is a thin layer over a well-kept implementation: torch's AdamW/Adam/SGD, transformers'
Adafactor and `get_scheduler`, torch's StepLR/ExponentialLR/SequentialLR/ReduceLROnPlateau and
`clip_grad_*_`. What is ours is the wiring the JobSpec asks for: which parameters decay, which
learning rate each layer gets (layer-wise LR decay, a separate head LR), one schedule object the
loop steps once per optimizer step, and state that resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch.optim.lr_scheduler import (
    ExponentialLR,
    LambdaLR,
    LRScheduler,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)
from transformers import get_scheduler
from transformers.optimization import Adafactor

from core.layers import LayerMap, layer_map
from core.spec import OptimizerConfig, SchedulerConfig

# peft's wrapper names every parameter of the wrapped model with this prefix.
PEFT_PREFIX = "base_model.model."

# Our schedule names that are transformers' get_scheduler names under another name.
TRANSFORMERS_SCHEDULES = {
    "constant": "constant_with_warmup",
    "linear": "linear",
    "cosine": "cosine",
    "cosine_with_restarts": "cosine_with_restarts",
    "polynomial": "polynomial",
}


# --- Parameter groups ---------------------------------------------------------------------------


def build_param_groups(
    model: torch.nn.Module, config: OptimizerConfig, *, lr: float, layers: LayerMap | None = None
) -> list[dict[str, Any]]:
    """The trainable parameters in optimizer groups by layer (learning rate) and by weight decay.

    Matrices (ndim >= 2) get `config.weight_decay`; biases and norm weights get none. With layer-wise
    LR decay (`config.layerwise_lr_decay` < 1) the top block trains at `lr`, the block below at
    lr x decay, and so on down; the embeddings sit one step below the lowest block. The head trains
    at `config.head_learning_rate` when set, else at `lr`. Parameters the layer map does not know
    go with the top block.

    Args:
        model: the model to train, a transformers model or peft's wrapper of one. Only parameters
            with requires_grad now are included (frozen ones stay out of the optimizer).
        config: the job's optimizer settings.
        lr: the peak learning rate of the top block.
        layers: the model's layer map; default `core.layers.layer_map` of the (unwrapped) model.
            Names may be the wrapped or the unwrapped model's.

    Returns:
        Group dicts with "params", "lr", "weight_decay" and a "name" such as "block3/decay" (layer
        name/decay kind), in the order of named_parameters, none empty. Each trainable parameter is
        in exactly one group. Without layer-wise decay the layers below the head share one "body"
        learning rate, so they make one pair of groups rather than a pair per block (fewer groups,
        fewer kernel launches a step).
    """
    if layers is None:
        layers = layer_map(_unwrap_peft(model))
    depths = _layer_depths(layers)
    index = _prefix_index(layers)
    top = f"block{len(layers.blocks) - 1}" if layers.blocks else "embeddings"
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = index.get(_find_prefix(name, index)) or top
        key, layer_lr = _lr_group(layer, depths.get(layer, 0), config, lr=lr)
        kind, decay = ("decay", config.weight_decay) if param.ndim >= 2 else ("no_decay", 0.0)
        group_name = f"{key}/{kind}"
        group = groups.setdefault(group_name, {"params": [], "lr": layer_lr, "weight_decay": decay, "name": group_name})
        group["params"].append(param)
    return list(groups.values())


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside peft's PeftModel (its head is then found by layer_map)."""
    # Duck typing keeps peft out of the imports: PeftModel is the only wrapper with this method.
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _canonical(name: str) -> str:
    """A parameter name without peft's wrapper prefix."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _layer_names(layers: LayerMap) -> list[tuple[str, list[str]]]:
    """(layer name, parameter names) bottom to top: embeddings, block0..blockN-1, head."""
    named = [("embeddings", layers.embeddings)]
    named += [(f"block{i}", names) for i, names in enumerate(layers.blocks)]
    named.append(("head", layers.head))
    return [(layer, names) for layer, names in named if names]


def _layer_depths(layers: LayerMap) -> dict[str, int]:
    """Depth below the top block: block i of n at n-1-i, the embeddings at n (one under block 0)."""
    n = len(layers.blocks)
    return {"embeddings": n, **{f"block{i}": n - 1 - i for i in range(n)}}


def _lr_group(layer: str, depth: int, config: OptimizerConfig, *, lr: float) -> tuple[str, float]:
    """The name and learning rate of the lr group a layer's parameters join."""
    if layer == "head":
        if config.head_learning_rate is not None:
            return "head", config.head_learning_rate
        return ("head" if config.layerwise_lr_decay != 1.0 else "body"), lr
    if config.layerwise_lr_decay == 1.0:
        return "body", lr
    return layer, lr * config.layerwise_lr_decay**depth


def _prefix_index(layers: LayerMap) -> dict[str, str | None]:
    """Every dotted prefix of every mapped name -> its layer; None where two layers share it.

    A peft LoRA parameter ("...query.lora_A.default.weight"), a wrapped base weight
    ("...query.base_layer.weight") or a saved head copy ("classifier.modules_to_save.default.weight")
    is not in the map, but its longest prefix that belongs to one layer only ("...query",
    "classifier") tells where it sits.
    """
    index: dict[str, str | None] = {}
    for layer, names in _layer_names(layers):
        for name in names:
            parts = _canonical(name).split(".")
            for end in range(1, len(parts) + 1):
                prefix = ".".join(parts[:end])
                index[prefix] = layer if index.get(prefix, layer) == layer else None
    return index


def _find_prefix(name: str, index: dict[str, str | None]) -> str:
    """The longest dotted prefix of `name` (peft prefix removed) that is in the index, or ""."""
    parts = _canonical(name).split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in index:
            return prefix
    return ""


# --- Optimizers ---------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig, *, lr: float) -> torch.optim.Optimizer:
    """The optimizer `config.name` over `build_param_groups`.

    adamw and adam run fused into one kernel on CPU and CUDA: torch's default AdamW on CPU loops
    over the tensors one by one, for MiniLM-L6 ~90 ms a step against ~16 ms fused, a quarter of a
    batch-32 bf16 step (bench/engine_vs_trainer.py). The fused kernel is the same algorithm;
    transformers' Trainer uses it by default as well.

    Args:
        model: the model to train (only parameters with requires_grad now are optimized).
        config: the job's optimizer settings.
        lr: the peak learning rate (of the top block; see build_param_groups).

    Returns:
        adamw: torch AdamW (decoupled decay); adam: torch Adam (weight_decay x w added to the
        gradient); sgd: torch SGD with momentum/nesterov; adafactor: transformers' Adafactor with
        the external learning rate (no relative step, no parameter scaling).

    Raises:
        ValueError: an optimizer name this function does not know (the spec allows none such).
    """
    groups = build_param_groups(model, config, lr=lr)
    if config.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=_fused(groups)
        )
    if config.name == "adam":
        return torch.optim.Adam(
            groups, lr=lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=_fused(groups)
        )
    if config.name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay
        )
    if config.name == "adafactor":
        return Adafactor(
            groups,
            lr=lr,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            beta1=None if config.beta1 == 0 else config.beta1,
            weight_decay=config.weight_decay,
        )
    raise ValueError(f"unknown optimizer {config.name!r}")


def _fused(groups: list[dict[str, Any]]) -> bool | None:
    """True when the fused Adam kernel can take every parameter (floats on CPU or CUDA), else None.

    None, not False: torch then picks its default (foreach) implementation.
    """
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return True if fused else None


# --- Learning-rate schedules --------------------------------------------------------------------


class LRSchedule:
    """The learning rates of one optimizer over training, stepped once per optimizer step.

    Wraps one per-step torch scheduler. For reduce_on_plateau that scheduler is only the warmup:
    once `plateau_after` steps are done it stops, and validation results (`on_evaluate`) drive
    torch's ReduceLROnPlateau instead. Each param group follows the schedule relative to its own
    peak learning rate (torch schedulers keep one base LR per group).

    Args:
        optimizer: the optimizer whose param groups' "lr" this sets.
        per_step: the torch scheduler stepped with every optimizer step.
        plateau_after: reduce_on_plateau only: the warmup steps, after which `per_step` stops.
        plateau_factor: ReduceLROnPlateau's factor.
        plateau_patience: ReduceLROnPlateau's patience.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        per_step: LRScheduler,
        *,
        plateau_after: int | None = None,
        plateau_factor: float = 0.5,
        plateau_patience: int = 1,
    ):
        self.optimizer = optimizer
        self.per_step = per_step
        self.plateau_after = plateau_after
        self.plateau_factor = plateau_factor
        self.plateau_patience = plateau_patience
        self.steps = 0
        # Built at the first evaluation it takes: only then is the direction (min/max) known.
        self.plateau: ReduceLROnPlateau | None = None

    def step(self) -> None:
        """Advance one optimizer step."""
        self.steps += 1
        if self.plateau_after is None or self.steps <= self.plateau_after:
            self.per_step.step()

    def get_last_lr(self) -> list[float]:
        """The current learning rate of each param group."""
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def on_evaluate(self, value: float, *, greater_is_better: bool) -> None:
        """Take a validation result of the watched metric (only reduce_on_plateau uses it).

        Results during warmup are ignored: the LR is still rising, and a reduction would be
        overwritten by the next warmup step anyway.

        Raises:
            ValueError: `greater_is_better` differs from the earlier evaluations'.
        """
        if self.plateau_after is None or self.steps < self.plateau_after:
            return
        mode = "max" if greater_is_better else "min"
        if self.plateau is None:
            self.plateau = self._new_plateau(mode)
        if self.plateau.mode != mode:
            raise ValueError(f"evaluations switched from mode {self.plateau.mode} to {mode}")
        self.plateau.step(value)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue the same schedule (torch.save-able, weights_only)."""
        return {
            "steps": self.steps,
            "per_step": self.per_step.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
            "lrs": self.get_last_lr(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s result, the param groups' current LRs included.

        Setting the LRs here keeps resume exact even where the optimizer's own state was not loaded:
        step and exponential decay multiply the current LR (torch's chainable form).
        """
        self.steps = state["steps"]
        self.per_step.load_state_dict(state["per_step"])
        self.plateau = None
        if state["plateau"] is not None:
            self.plateau = self._new_plateau(state["plateau"]["mode"])
            self.plateau.load_state_dict(state["plateau"])
        for group, lr in zip(self.optimizer.param_groups, state["lrs"], strict=True):
            group["lr"] = lr

    def _new_plateau(self, mode: str) -> ReduceLROnPlateau:
        return ReduceLROnPlateau(
            self.optimizer, mode=mode, factor=self.plateau_factor, patience=self.plateau_patience
        )


def warmup_steps(config: SchedulerConfig, *, max_steps: int) -> int:
    """`config.warmup_steps` if set, else ceil(warmup_ratio x max_steps); never more than max_steps."""
    steps = config.warmup_steps if config.warmup_steps is not None else math.ceil(config.warmup_ratio * max_steps)
    return min(steps, max_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: SchedulerConfig, *, max_steps: int, steps_per_epoch: int
) -> LRSchedule:
    """The schedule `config.name`, with a linear warmup from 0 for every schedule.

    constant, linear, cosine, cosine_with_restarts and polynomial are transformers' schedules of
    those names (constant: constant_with_warmup). step and exponential are torch's StepLR and
    ExponentialLR after the warmup, chained by SequentialLR. reduce_on_plateau warms up, then
    lets ReduceLROnPlateau lower the LR from the validation results (LRSchedule.on_evaluate).

    Args:
        optimizer: the optimizer; each param group's current "lr" is its peak.
        config: the job's scheduler settings.
        max_steps: the optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch (step's default step size, exponential's unit).

    Returns:
        The LRSchedule, already at step 0 (the warmup's LR 0 unless there is no warmup).

    Raises:
        ValueError: max_steps or steps_per_epoch below 1.
    """
    if max_steps < 1 or steps_per_epoch < 1:
        raise ValueError(f"max_steps ({max_steps}) and steps_per_epoch ({steps_per_epoch}) must be >= 1")
    warmup = warmup_steps(config, max_steps=max_steps)
    if config.name in TRANSFORMERS_SCHEDULES:
        return LRSchedule(optimizer, _transformers_schedule(optimizer, config, warmup=warmup, max_steps=max_steps))
    if config.name == "step":
        decay = StepLR(optimizer, step_size=config.step_size or steps_per_epoch, gamma=config.gamma)
        return LRSchedule(optimizer, _after_warmup(optimizer, decay, warmup=warmup))
    if config.name == "exponential":
        decay = ExponentialLR(optimizer, gamma=config.gamma ** (1 / steps_per_epoch))
        return LRSchedule(optimizer, _after_warmup(optimizer, decay, warmup=warmup))
    if config.name == "reduce_on_plateau":
        return LRSchedule(
            optimizer,
            _warmup(optimizer, warmup),
            plateau_after=warmup,
            plateau_factor=config.plateau_factor,
            plateau_patience=config.plateau_patience,
        )
    raise ValueError(f"unknown scheduler {config.name!r}")


def _transformers_schedule(
    optimizer: torch.optim.Optimizer, config: SchedulerConfig, *, warmup: int, max_steps: int
) -> LRScheduler:
    extra: dict[str, Any] = {}
    if config.name == "cosine_with_restarts":
        extra = {"num_cycles": config.num_cycles}
    if config.name == "polynomial":
        # transformers takes an absolute end LR and divides by optimizer.defaults["lr"]; as a fraction
        # of that LR it becomes the same fraction of every group's own peak.
        extra = {"lr_end": config.min_lr_ratio * optimizer.defaults["lr"], "power": 1.0}
    return get_scheduler(
        TRANSFORMERS_SCHEDULES[config.name],
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=max_steps,
        scheduler_specific_kwargs=extra,
    )


def _warmup_factor(step: int, *, warmup: int) -> float:
    """step / warmup, then 1 (transformers' warmup: LR 0 at step 0)."""
    return min(1.0, step / warmup) if warmup > 0 else 1.0


def _warmup(optimizer: torch.optim.Optimizer, warmup: int) -> LambdaLR:
    # partial, not a lambda: LambdaLR's state_dict keeps callable objects, and a lambda can't be saved.
    return LambdaLR(optimizer, partial(_warmup_factor, warmup=warmup))


def _after_warmup(optimizer: torch.optim.Optimizer, decay: LRScheduler, *, warmup: int) -> LRScheduler:
    """`decay` from step `warmup` on, after a linear warmup from 0.

    The warmup is a LambdaLR, not torch's LinearLR: LinearLR's start_factor must be > 0, so it
    cannot start from LR 0 as transformers' schedules (and our other ones) do.
    """
    if warmup == 0:
        return decay
    return SequentialLR(optimizer, [_warmup(optimizer, warmup), decay], milestones=[warmup])


# --- Penalties and clipping ---------------------------------------------------------------------


def decayed_parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The optimizer's weight matrices (ndim >= 2): those L1 and weight decay apply to."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.ndim >= 2]


def l1_penalty(params: Iterable[torch.nn.Parameter], coefficient: float) -> torch.Tensor:
    """coefficient x sum(|w|) over `params`, a differentiable fp32 scalar to add to the loss.

    Args:
        params: the weights penalised (usually `decayed_parameters(optimizer)`).
        coefficient: the job's `config.optimizer.l1_penalty`.

    Returns:
        A 0-dim float32 tensor on the parameters' device (CPU zero when there are none).
    """
    # Summing in fp32 keeps a bf16 model's penalty from rounding away small weights.
    sums = [p.abs().sum(dtype=torch.float32) for p in params]
    if not sums:
        return torch.zeros((), dtype=torch.float32)
    return coefficient * torch.stack(sums).sum()


def clip_gradients(
    parameters: Iterable[torch.nn.Parameter], *, max_norm: float | None, max_value: float | None
) -> float:
    """Clip gradients by value, then by global norm; return the norm before norm clipping.

    Call it after unscaling (GradScaler.unscale_) so the limits apply to the true gradients.

    Args:
        parameters: the parameters whose .grad to clip (those without a gradient are skipped).
        max_norm: the largest global L2 norm; None: no norm clipping (the norm is still measured).
        max_value: the largest absolute gradient element; None: no value clipping.

    Returns:
        The global gradient norm after value clipping and before norm clipping.
    """
    parameters = list(parameters)
    if max_value is not None:
        torch.nn.utils.clip_grad_value_(parameters, max_value)
    # With norm clipping off an infinite threshold still measures the norm for reporting.
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm is not None else math.inf)
    return float(norm)
