"""Learning-rate schedules: one object the loop steps once per optimizer step, resuming exactly.

constant, linear, cosine, cosine_with_restarts and polynomial are transformers' `get_scheduler`
schedules; step and exponential torch's StepLR/ExponentialLR after a warmup (SequentialLR);
reduce_on_plateau a warmup, then torch's ReduceLROnPlateau driven by validation results. Each param
group follows the schedule relative to its own peak learning rate (core.optim sets the peaks).
"""

from __future__ import annotations

import math
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

from core.spec import SchedulerConfig

# Our schedule names that are transformers' get_scheduler names under another name.
TRANSFORMERS_SCHEDULES = {
    "constant": "constant_with_warmup",
    "linear": "linear",
    "cosine": "cosine",
    "cosine_with_restarts": "cosine_with_restarts",
    "polynomial": "polynomial",
}


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
