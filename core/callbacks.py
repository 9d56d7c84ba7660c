"""What is not the math of training: scheduling evaluations and checkpoints, early stopping,
reporting, cancellation.

As with transformers' TrainerCallback and Lightning's callbacks, a callback reads the TrainState,
sets flags on the Control, and carries `state_dict()` so that a resumed run continues exactly.
The engine acts on the flags; callbacks never touch the model or optimizer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.errors import EngineError
from core.sink import MetricsSink
from core.spec import JobSpec, TrainingConfig

if TYPE_CHECKING:
    from core.adapters.base import TaskAdapter


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # completed epochs
    batch_in_epoch: int = 0  # micro-batches of the current epoch done (the sampler position)
    max_steps: int = 0
    steps_per_epoch: int = 0
    batches_per_epoch: int = 0
    trained_tokens: int = 0  # non-padding tokens seen in training
    samples_seen: int = 0
    train_seconds: float = 0.0  # time in training steps only (not evaluation or checkpoints)
    loss: float | None = None  # of the last optimizer step
    grad_norm: float | None = None  # global norm before clipping, of the last step
    lr: float | None = None  # used by the last step
    latest_metrics: dict[str, float] | None = None
    last_eval_step: int | None = None
    best_metric: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None
    best_checkpoint: str | None = None  # folder name under checkpoints/
    baseline_test: dict[str, Any] | None = None
    stopped_early: bool = False
    cancelled: bool = False
    pruned: bool = False  # a search's pruner stopped the run (core.callbacks.Pruning)

    @property
    def fractional_epoch(self) -> float:
        return self.epoch + self.batch_in_epoch / max(1, self.batches_per_epoch)

    def record_evaluation(self, metrics: dict[str, float], *, metric: str, greater_is_better: bool) -> bool:
        """Remember an evaluation; returns whether it is the best so far by `metric`."""
        self.latest_metrics = dict(metrics)
        self.last_eval_step = self.step
        value = metrics[metric]
        if self.best_metric is None or (value > self.best_metric if greater_is_better else value < self.best_metric):
            self.best_metric, self.best_step, self.best_metrics = value, self.step, dict(metrics)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        # Whether this run was asked to stop belongs to the run, not to the checkpoint: a job
        # paused (checkpoint saved on the request) must train on when it is resumed.
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _RUN_ONLY}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key not in _RUN_ONLY:
                setattr(self, key, value)


_RUN_ONLY = ("cancelled", "pruned")


@dataclass
class Control:
    """Flags callbacks set for the engine after a step; reset before each step's callbacks."""

    should_evaluate: bool = False
    should_save: bool = False
    should_stop: bool = False

    def reset(self) -> None:
        self.should_evaluate = self.should_save = self.should_stop = False


class Callback:
    """Base class: every hook is a no-op; state_dict() is empty."""

    def on_train_begin(self, state: TrainState, control: Control) -> None: ...

    def on_step_end(self, state: TrainState, control: Control) -> None: ...

    def on_evaluate(self, state: TrainState, control: Control, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, state: TrainState, control: Control) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class EvaluationSchedule(Callback):
    """Evaluate every N optimizer steps, or `per_epoch` times per epoch (evenly spaced, the last at
    the epoch's end) when N is None, and at the last step."""

    def __init__(self, every_steps: int | None, per_epoch: int | None = None):
        self.every_steps = every_steps
        self.per_epoch = per_epoch or 1

    def on_step_end(self, state: TrainState, control: Control) -> None:
        if self.every_steps:
            due = state.step % self.every_steps == 0
        else:
            per_epoch = state.steps_per_epoch
            marks = {max(1, round(per_epoch * k / self.per_epoch)) for k in range(1, self.per_epoch + 1)}
            due = (state.step % per_epoch or per_epoch) in marks
        if due or state.step == state.max_steps:
            control.should_evaluate = True


class CheckpointSchedule(Callback):
    """Save every N steps, or after each evaluation when N is None; and whenever a new best
    evaluation must be kept for load_best_model_at_end."""

    def __init__(self, every_steps: int | None, *, keep_best: bool):
        self.every_steps = every_steps
        self.keep_best = keep_best

    def on_step_end(self, state: TrainState, control: Control) -> None:
        if self.every_steps and state.step % self.every_steps == 0:
            control.should_save = True

    def on_evaluate(self, state: TrainState, control: Control, metrics: dict[str, float]) -> None:
        if self.every_steps is None or (self.keep_best and state.best_step == state.step):
            control.should_save = True


class EarlyStopping(Callback):
    """Stop after `patience` evaluations without an improvement larger than `min_delta`."""

    def __init__(self, metric: str, *, greater_is_better: bool, patience: int, min_delta: float = 0.0):
        self.metric = metric
        self.greater_is_better = greater_is_better
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.wait = 0

    def on_evaluate(self, state: TrainState, control: Control, metrics: dict[str, float]) -> None:
        value = metrics[self.metric]
        gain = None if self.best is None else (value - self.best if self.greater_is_better else self.best - value)
        if gain is None or gain > self.min_delta:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            state.stopped_early = True
            control.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = state["best"], state["wait"]


@dataclass
class _Window:
    loss_sum: float = 0.0
    grad_norm_sum: float = 0.0
    steps: int = 0


def seconds_left(state: TrainState, *, run_start_step: int, run_start_seconds: float,
                 eval_seconds: float = 0.0) -> float | None:
    """How long the rest of training should take, at the step rate measured in this run:

        seconds_left = (max_steps - step) * (train_seconds - run_start_seconds + eval_seconds)
                                           / (step - run_start_step)

    Training time counts the optimizer steps only (TrainState.train_seconds); evaluations enter
    at their measured cost per step so far, which is 0 until the first one and then spreads each
    over the steps between evaluations. Checkpoints, the final test evaluation and the export are
    not counted. A resumed run measures its own rate (the marks are where it started).

    Args:
        state: where training stands.
        run_start_step: state.step when this run began (0, or the step resumed from).
        run_start_seconds: state.train_seconds when this run began.
        eval_seconds: time this run spent in evaluations.

    Returns:
        Seconds, or None before this run's first optimizer step.
    """
    steps = state.step - run_start_step
    if steps <= 0:
        return None
    per_step = (state.train_seconds - run_start_seconds + eval_seconds) / steps
    return max(0, state.max_steps - state.step) * per_step


class ProgressReporter(Callback):
    """Train loss/lr/grad norm/samples per second every `every_steps`, validation metrics at each
    evaluation, and a log line for each, to the sink; with each train report, the time left
    (`seconds_left`) for the job's estimated finish."""

    def __init__(self, sink: MetricsSink, *, every_steps: int):
        self.sink = sink
        self.every_steps = max(1, every_steps)
        self.window = _Window()
        self._samples_mark = 0
        self._seconds_mark = 0.0
        # This run's marks for the estimate (not saved: a resumed run measures its own rate).
        self._run_start = (0, 0.0)
        self._eval_seconds = 0.0
        self._step_done: float | None = None  # perf_counter at the end of this hook for the last step

    def on_train_begin(self, state: TrainState, control: Control) -> None:
        self._samples_mark, self._seconds_mark = state.samples_seen, state.train_seconds
        self._run_start, self._eval_seconds = (state.step, state.train_seconds), 0.0
        verb = "Resuming" if state.step else "Starting"
        self.sink.event(f"{verb} training at step {state.step}/{state.max_steps}.")

    def on_step_end(self, state: TrainState, control: Control) -> None:
        self._report_step(state)
        # The engine evaluates (when due) between this hook and on_evaluate: time it from here.
        self._step_done = time.perf_counter()

    def _report_step(self, state: TrainState) -> None:
        w = self.window
        w.loss_sum += state.loss or 0.0
        w.grad_norm_sum += state.grad_norm or 0.0
        w.steps += 1
        if state.step % self.every_steps and state.step != state.max_steps:
            return
        left = seconds_left(state, run_start_step=self._run_start[0], run_start_seconds=self._run_start[1],
                            eval_seconds=self._eval_seconds)
        if left is not None:  # before the metrics: their write carries it to the database
            self.sink.progress(state.step, seconds_left=left)
        seconds = state.train_seconds - self._seconds_mark
        samples = state.samples_seen - self._samples_mark
        values = {
            "loss": w.loss_sum / w.steps,
            "learning_rate": state.lr or 0.0,
            "grad_norm": w.grad_norm_sum / w.steps,
            "samples_per_second": samples / seconds if seconds > 0 else 0.0,
            "epoch": state.fractional_epoch,
        }
        self.sink.metrics(state.step, values, split="train")
        self.sink.event(
            f"Step {state.step}/{state.max_steps}: training loss={values['loss']:.4f}, "
            f"lr={values['learning_rate']:.3g}, {values['samples_per_second']:.1f} samples/s",
            data={"step": state.step, **values},
        )
        self.window = _Window()
        self._samples_mark, self._seconds_mark = state.samples_seen, state.train_seconds

    def on_evaluate(self, state: TrainState, control: Control, metrics: dict[str, float]) -> None:
        if self._step_done is not None:
            self._eval_seconds += time.perf_counter() - self._step_done
        self.sink.metrics(state.step, metrics, split="valid")
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        self.sink.event(f"Step {state.step}/{state.max_steps}: validation {shown}", data={"step": state.step, **metrics})

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.window)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = _Window(**state)


class StopRequest(Callback):
    """Polls `should_stop()` after each step; on a request, saves a checkpoint and stops.

    The poll runs once per optimizer step, so `should_stop` should be cheap (read a flag that
    another thread keeps fresh rather than query a database).
    """

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def on_step_end(self, state: TrainState, control: Control) -> None:
        if self.should_stop():
            state.cancelled = True
            control.should_save = True
            control.should_stop = True


class Pruning(Callback):
    """A search's trial: after each evaluation, `should_prune(evaluation, step, metrics)` (evaluation:
    how many this run has made, the resource a pruner compares trials at) says whether to stop.
    A pruned run stops there, saves nothing more and exports nothing."""

    def __init__(self, should_prune: Callable[[int, int, dict[str, float]], bool]):
        self.should_prune = should_prune
        self.evaluations = 0

    def on_evaluate(self, state: TrainState, control: Control, metrics: dict[str, float]) -> None:
        self.evaluations += 1
        if self.should_prune(self.evaluations, state.step, metrics):
            state.pruned = True
            control.should_save = False
            control.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evaluations = state["evaluations"]


__all__ = [
    "Callback",
    "CheckpointSchedule",
    "Control",
    "EarlyStopping",
    "EvaluationSchedule",
    "ProgressReporter",
    "Pruning",
    "StopRequest",
    "TrainState",
    "seconds_left",
]


def build_callbacks(
    spec: JobSpec, sink: MetricsSink, should_stop: Callable[[], bool], *, task_metrics: dict[str, bool],
    has_validation: bool,
) -> list[Callback]:
    """The built-in callbacks for the spec: schedules, early stopping, reporting, stop requests.

    Args:
        task_metrics: the task's validation metrics and whether larger is better (adapter.metrics).
    """
    cfg = spec.config
    callbacks: list[Callback] = [
        EvaluationSchedule(cfg.eval_every_steps, cfg.evaluations_per_epoch),
        CheckpointSchedule(cfg.checkpoint_every_steps, keep_best=cfg.load_best_model_at_end and has_validation),
    ]
    stopping = cfg.early_stopping
    if stopping is not None and not has_validation:
        sink.event("early_stopping needs a validation file; it is off for this job.", level="warning")
    if stopping is not None and has_validation:
        metric = stopping.metric or cfg.metric_for_best_model
        greater = task_metrics[metric] if stopping.mode == "auto" else stopping.mode == "max"
        callbacks.append(
            EarlyStopping(metric, greater_is_better=greater, patience=stopping.patience, min_delta=stopping.min_delta)
        )
    callbacks += [ProgressReporter(sink, every_steps=10), StopRequest(should_stop)]
    return callbacks


def check_metrics(adapter: TaskAdapter, cfg: TrainingConfig) -> tuple[str, bool]:
    """(metric_for_best_model, whether larger is better), checked against what the task reports.

    Raises:
        EngineError: metric_for_best_model or early_stopping.metric is not one of the task's metrics.
    """
    checks = [("config.metric_for_best_model", cfg.metric_for_best_model)]
    if cfg.early_stopping is not None and cfg.early_stopping.metric is not None:
        checks.append(("config.early_stopping.metric", cfg.early_stopping.metric))
    for param, name in checks:
        if name not in adapter.metrics:
            raise EngineError(
                f"{name!r} is not a metric of this {adapter.task} job; choose one of {', '.join(adapter.metrics)}.",
                param=param,
            )
    return cfg.metric_for_best_model, adapter.metrics[cfg.metric_for_best_model]
