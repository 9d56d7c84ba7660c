"""The fine-tuning engine: one explicit training loop, top to bottom, for every task.

`run` asks the task's adapter (core.adapters) for the data, the model and the loss, applies the model
surgery of the spec (core.surgery: dropout, freezing, LoRA, gradient checkpointing), builds the
optimizer (core.optim) and schedule (core.schedules), trains, and exports. Accumulation, the L1
term, clipping and scheduler steps are in the loop; everything that is not the math (evaluation
and checkpoint scheduling, early stopping, gradual unfreezing, reporting, cancellation) is a
callback acting through the Control flags.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from core.adapters import DataFiles, Split, TaskAdapter, TaskData, adapter_for
from core.cache import InputCache
from core.callbacks import Callback, Control, TrainState, build_callbacks, check_metrics
from core.checkpoint import (
    TrainingParts,
    checkpoint_name,
    load_checkpoint,
    load_model_weights,
    rotate_checkpoints,
    save_checkpoint,
    start_from_checkpoint,
)
from core.datasets import infer_task
from core.device import Precision, is_out_of_memory, resolve_device, resolve_precision
from core.errors import EngineError, OutOfMemoryError
from core.export import export_model, pack_archive, reproducibility_record
from core.freezing import GradualUnfreezing
from core.layers import LayerMap
from core.loading import cached_source
from core.optim import build_optimizer, clip_gradients, decayed_parameters, l1_penalty
from core.sampling import BatchSampler, batch_rng, seed_everything
from core.schedules import build_scheduler
from core.sink import MetricsSink
from core.spec import JobSpec, Task
from core.surgery import prepare_model

KEEP_LAST_CHECKPOINTS = 2


@dataclass(frozen=True)
class RunPaths:
    model: str  # local HF folder path or hub id
    train_file: Path
    validation_file: Path | None
    test_file: Path | None
    work_dir: Path  # engine writes checkpoints/ and output/ under it
    resume_from: Path | None = None  # a checkpoint folder of this job's own run to continue
    init_from: Path | None = None  # a checkpoint folder of an earlier job whose weights this one starts from
    row_weights: tuple[float, ...] | None = None  # each training row's loss weight (a boosting member's, core.combine)

    def data_files(self) -> DataFiles:
        return DataFiles(self.train_file, self.validation_file, self.test_file)


@dataclass
class RunResult:
    model_dir: Path | None  # exported HF folder (work_dir/output/model); None when cancelled
    archive_path: Path | None  # uncompressed .tar of model_dir's files at the root; None when cancelled or not asked
    trained_tokens: int
    hyperparameters: dict
    metrics: dict  # {"latest", "best", "test", "baseline_test"}
    stopped_early: bool
    cancelled: bool
    pruned: bool = False  # stopped by a search's pruner: nothing exported


@dataclass
class Job:
    """What one run trains, on what and where: built by `build_job` before the loop."""

    task: Task
    adapter: TaskAdapter
    processor: Any
    data: TaskData
    model: torch.nn.Module  # prepared (core.surgery) and on the device
    layers: LayerMap  # of the model before LoRA
    frozen: set[str]  # names frozen by config.freeze
    device: torch.device
    precision: Precision
    metric: str  # config.metric_for_best_model
    greater_is_better: bool
    timings: dict[str, float]  # unix seconds at which each part of the setup was done


def run(
    spec: JobSpec,
    paths: RunPaths,
    sink: MetricsSink,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    callbacks: Sequence[Callback] = (),
    archive: bool = True,
    cache: InputCache | None = None,
) -> RunResult:
    """Fine-tune `paths.model` on the job's data, reporting to `sink`, and export the result.

    Args:
        spec: the validated job description.
        paths: where the model, data, work folder and (optional) checkpoint to resume from are.
        sink: receives events, metrics and checkpoint announcements.
        should_stop: polled after each optimizer step; True saves a checkpoint and stops (cancelled).
        callbacks: extra callbacks, run after the built-in ones.
        archive: pack the exported folder into a tar (`archive_path`); the service packs it
            itself once the job is recorded (core.export.ensure_archive).
        cache: where prepared inputs are kept for later runs on the same ones (core.cache).

    Returns:
        A RunResult; when cancelled, nothing is exported (model_dir and archive_path are None).

    Raises:
        DataError: unreadable data, missing columns, unknown validation/test labels, < 2 labels.
        ModelError: model not found, or not loadable safely (no safetensors).
        OutOfMemoryError: the configuration does not fit the device's memory.
        EngineError: anything else wrong with the request (unsupported task, bad checkpoint, ...).
    """
    try:
        return _run(spec, paths, sink, should_stop, list(callbacks), archive, cache)
    except EngineError:
        raise
    except BaseException as e:
        if is_out_of_memory(e):
            raise OutOfMemoryError(
                "Out of memory: lower hyperparameters.batch_size or config.max_length, "
                "or raise config.gradient_accumulation_steps with a smaller batch.",
                param="hyperparameters.batch_size",
            ) from e
        raise


def _run(spec: JobSpec, paths: RunPaths, sink: MetricsSink, should_stop, extra_callbacks, archive, cache) -> RunResult:
    # Setup: what is trained (the job), then the loop's parts, then where it starts from.
    cfg = spec.config
    started = time.time()
    job = build_job(spec, paths, sink, cache)
    model, data, adapter, device, precision = job.model, job.data, job.adapter, job.device, job.precision
    batch_size, n_epochs, accum = spec.batch_size(len(data.train)), spec.n_epochs(len(data.train)), cfg.gradient_accumulation_steps
    n_params = _n_params(model)  # the learning rate "auto" picks for an encoder depends on it
    sampler = BatchSampler(data.train.lengths, batch_size=batch_size, seed=spec.seed, group_by_length=cfg.group_by_length)
    steps_per_epoch = math.ceil(len(sampler) / accum)
    max_steps = n_epochs * steps_per_epoch
    optimizer = build_optimizer(model, cfg.optimizer, lr=spec.learning_rate(job.task, n_params))
    scheduler = build_scheduler(optimizer, cfg.scheduler, max_steps=max_steps, steps_per_epoch=steps_per_epoch)
    scaler = precision.grad_scaler(device)
    state = TrainState(max_steps=max_steps, steps_per_epoch=steps_per_epoch, batches_per_epoch=len(sampler))
    callbacks = build_callbacks(spec, sink, should_stop, task_metrics=adapter.metrics,
                                has_validation=data.validation is not None)
    if cfg.freeze.gradual_unfreezing is not None:
        callbacks.insert(0, GradualUnfreezing(model, job.layers, cfg.freeze.gradual_unfreezing, job.frozen))
    callbacks += extra_callbacks
    evaluate = partial(adapter.evaluate, model, device=device, precision=precision,
                       batch_size=adapter.eval_batch_size(batch_size))
    facts = {"task": str(job.task), "labels": data.labels, "batch_size": batch_size, "accumulation": accum,
             "max_steps": max_steps}
    record = reproducibility_record(spec, task=job.task, device=device.type, precision=precision.name,
                                    files=paths.data_files().by_param())
    parts = TrainingParts(model, optimizer, scheduler, scaler, state, callbacks, facts, record)
    resume_or_test_baseline(parts, paths.resume_from, sink, evaluate, data.test)
    timings = {"engine_started": started, **job.timings, "setup_done": time.time()}

    # The loop: one optimizer step per `accum` micro-batches; callbacks act through `control`.
    checkpoints = paths.work_dir / "checkpoints"
    decayed = decayed_parameters(optimizer) if cfg.optimizer.l1_penalty > 0 else []
    trainable = [p for p in model.parameters() if p.requires_grad or p in _all_params(optimizer)]
    pad_multiple = 8 if device.type == "cuda" else None  # tensor cores like multiples of 8
    control = Control()
    for cb in callbacks:
        cb.on_train_begin(state, control)
    model.train()
    while state.epoch < n_epochs and not control.should_stop:
        batches = sampler.batches(state.epoch)
        first = state.batch_in_epoch
        for start in range(first - first % accum, len(batches), accum):
            started = time.perf_counter()
            end = min(start + accum, len(batches))
            group = [_collate(adapter, data.train, batches[b], spec.seed, state.epoch, b, pad_multiple)
                     for b in range(start, end)]
            # Each micro-batch's summed loss over the units (examples, tokens or weights) of the whole step.
            units = sum(adapter.units(batch) for batch in group) or 1  # accumulation == one big batch
            step_loss = 0.0
            for batch in group:
                state.trained_tokens += adapter.trained_tokens(batch)
                with precision.autocast(device):
                    loss_sum, _ = adapter.loss_sum(model, _to(batch, device))
                step_loss += _backward(loss_sum / units, scaler)
            if decayed:
                step_loss += _backward(l1_penalty(decayed, cfg.optimizer.l1_penalty), scaler)
            if scaler:
                scaler.unscale_(optimizer)
            state.grad_norm = clip_gradients(trainable, max_norm=cfg.max_grad_norm, max_value=cfg.max_grad_value)
            state.lr = max(scheduler.get_last_lr())
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state.step += 1
            state.loss = step_loss
            state.samples_seen += sum(len(batches[b]) for b in range(start, end))
            state.batch_in_epoch = end
            if state.batch_in_epoch == len(batches):
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            state.train_seconds += time.perf_counter() - started
            if timings is not None:  # this run's first step: how long the way to it took
                _first_step_event(sink, state.step, timings | {"first_step": time.time()})
                timings = None
            control.reset()
            for cb in callbacks:
                cb.on_step_end(state, control)
            if control.should_evaluate and data.validation is not None:
                metrics = evaluate(data.validation)
                state.record_evaluation(metrics, metric=job.metric, greater_is_better=job.greater_is_better)
                scheduler.on_evaluate(metrics[job.metric], greater_is_better=job.greater_is_better)
                for cb in callbacks:
                    cb.on_evaluate(state, control, metrics)
            if control.should_save:
                save_and_announce(parts, checkpoints, sink)
            if control.should_stop:
                break
    for cb in callbacks:
        cb.on_train_end(state, control)
    return finish(spec, paths, sink, job, state, evaluate, record, archive=archive)


def build_job(spec: JobSpec, paths: RunPaths, sink: MetricsSink, cache: InputCache | None = None) -> Job:
    """Seed, device and precision; the task's adapter, processor and data; the model, prepared as
    the spec asks (core.surgery), started from `paths.init_from`'s weights if given, on the device.
    With a `cache`, what the same inputs made before is reused (core.cache): a GGUF model's
    dequantized weights, each split's encoding.

    Raises:
        DataError, ModelError, EngineError: as `run`.
    """
    cfg = spec.config
    device = resolve_device(cfg)
    precision = resolve_precision(cfg, device)
    seed_everything(spec.seed)
    task = spec.task or infer_task(paths.train_file, cfg)
    adapter = adapter_for(task, spec, cache=cache)
    seen = (len(cache.hits), len(cache.misses)) if cache is not None else (0, 0)
    with cached_source(paths.model, cache) as source:
        processor = adapter.load_processor(source)
        timings = {"processor_loaded": time.time()}
        data = adapter.prepare(paths.data_files(), processor)
        if paths.row_weights is not None:
            data.train.weights = list(paths.row_weights)
        timings["data_ready"] = time.time()
        metric, greater_is_better = check_metrics(adapter, cfg)
        model = adapter.build_model(source, data, processor)
    model, layers, frozen = prepare_model(model, cfg, task=task)
    if paths.init_from is not None and paths.resume_from is None:
        start_from_checkpoint(Path(paths.init_from), model, task=task, labels=data.labels)
        sink.event(f"Starting from the weights of checkpoint {Path(paths.init_from).name}.")
    model.to(device)
    if note := adapter.on_model_ready(model, data, device=device, precision=precision,
                                      batch_size=adapter.eval_batch_size(spec.batch_size(len(data.train)))):
        sink.event(note)
    timings["model_ready"] = time.time()
    if cache is not None and (len(cache.hits), len(cache.misses)) != seen:
        hits, misses = cache.hits[seen[0]:], cache.misses[seen[1]:]
        sink.event(f"Input cache: {len(hits)} of {len(hits) + len(misses)} prepared inputs reused"
                   + "".join(f"; {k} made" for k in misses) + ".", data={"cache": {"hits": hits, "misses": misses}})
    sink.event(_describe(spec, task, data, model, device, precision), data=_balance(data))
    return Job(task, adapter, processor, data, model, layers, frozen, device, precision, metric, greater_is_better,
               timings)


def resume_or_test_baseline(parts: TrainingParts, resume_from: Path | None, sink: MetricsSink,
                            evaluate: Callable[..., dict[str, Any]], test: Split | None) -> None:
    """Before the first step: restore the checkpoint resumed from, or else measure the test set
    with the untrained model (the baseline the exported report compares against)."""
    state = parts.state
    if resume_from is not None:
        load_checkpoint(Path(resume_from), parts)
        sink.event(f"Resumed from checkpoint at step {state.step}.")
    elif test is not None:
        state.baseline_test = evaluate(test)
        sink.metrics(0, state.baseline_test, split="baseline_test")
        sink.event("Test set before training (the model before its first step): " + _fmt(state.baseline_test))


def save_and_announce(parts: TrainingParts, checkpoints: Path, sink: MetricsSink) -> None:
    """Save a checkpoint of this step, drop old ones (never the best), and tell the sink."""
    state = parts.state
    if state.best_step == state.step:
        state.best_checkpoint = checkpoint_name(state.step)
    path = save_checkpoint(checkpoints, parts)
    rotate_checkpoints(checkpoints, keep_last=KEEP_LAST_CHECKPOINTS, keep={state.best_checkpoint or ""})
    evaluated = state.last_eval_step == state.step and state.latest_metrics
    sink.checkpoint(state.step, path, state.latest_metrics if evaluated else {"train_loss": state.loss})


def finish(spec: JobSpec, paths: RunPaths, sink: MetricsSink, job: Job, state: TrainState,
           evaluate: Callable[..., dict[str, Any]], record: dict[str, Any], *, archive: bool = True) -> RunResult:
    """After the loop: nothing more when cancelled; else the best weights back (when asked), the
    test set measured, and the model exported (and packed, if `archive`)."""
    ended = time.time()
    data, model = job.data, job.model
    hyperparameters = spec.resolved_hyperparameters(len(data.train), job.task, _n_params(model))
    metrics: dict[str, Any] = {
        "latest": state.latest_metrics,
        "best": state.best_metrics,
        "test": None,
        "baseline_test": state.baseline_test,
        "train_samples_per_second": state.samples_seen / state.train_seconds if state.train_seconds else None,
    }
    if state.cancelled:
        sink.event(f"Stopped at step {state.step} on request; checkpoint saved, nothing exported.")
        return RunResult(None, None, state.trained_tokens, hyperparameters, metrics, state.stopped_early, True)
    if state.pruned:
        sink.event(f"Pruned at step {state.step}: the search's pruner stopped this trial; nothing exported.")
        return RunResult(None, None, state.trained_tokens, hyperparameters, metrics, False, False, pruned=True)
    if state.stopped_early:
        sink.event(f"Stopped early at step {state.step}: the validation metric did not improve.")

    if spec.config.load_best_model_at_end and state.best_checkpoint and state.best_step != state.step:
        # A best saved before a resume may lie next to the checkpoint resumed from.
        candidates = [paths.work_dir / "checkpoints" / state.best_checkpoint]
        if paths.resume_from is not None:
            candidates.append(Path(paths.resume_from).parent / state.best_checkpoint)
        best = next((c for c in candidates if c.is_dir()), None)
        if best is None:
            sink.event(f"The best checkpoint ({state.best_checkpoint}) is gone; exporting the last weights.", level="warning")
        else:
            load_model_weights(best, model)
            sink.event(f"Loaded the best weights (step {state.best_step}, {job.metric}={state.best_metric:.4f}).")
    if data.test is not None:
        metrics["test"] = evaluate(data.test, report=True)
        sink.metrics(state.step, _scalars(metrics["test"]), split="test")
        sink.event("Test set after training: " + _fmt(metrics["test"]), data=metrics["test"])

    exporting = time.time()
    model_dir = export_model(
        lambda m, out: job.adapter.save(m, job.processor, out),
        model,
        paths.work_dir / "output" / "model",
        lora=spec.config.lora,
        spec=spec,
        hyperparameters=hyperparameters,
        record=record,
        report={k: metrics[k] for k in ("best", "latest", "test", "baseline_test")} | {"best_step": state.best_step},
    )
    timings = {"train_ended": ended, "export_started": exporting, "exported": time.time()}
    sink.event(f"Exported the model ({state.trained_tokens} trained tokens) in "
               f"{timings['exported'] - exporting:.1f} s.", data={"timings": timings})
    packed = pack_archive(model_dir) if archive else None
    return RunResult(model_dir, packed, state.trained_tokens, hyperparameters, metrics, state.stopped_early, False)


SETUP_TIMES = ("engine_started", "processor_loaded", "data_ready", "model_ready", "setup_done", "first_step")


def _first_step_event(sink: MetricsSink, step: int, t: dict[str, float]) -> None:
    """Where the time to this run's first optimizer step went (unix seconds in `data.timings`)."""
    parts = ", ".join(f"{name} {t[b] - t[a]:.1f} s" for name, a, b in zip(
        ("processor", "data", "model", "before the loop", "step"), SETUP_TIMES, SETUP_TIMES[1:]))
    sink.event(f"First optimizer step (step {step}) {t['first_step'] - t['engine_started']:.1f} s after the "
               f"engine started: {parts}.", data={"timings": t})


def _describe(spec: JobSpec, task: Task, data: TaskData, model: torch.nn.Module, device, precision: Precision) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    labels = f", {len(data.labels)} labels" if data.labels and task != Task.CAUSAL_LM else ""
    return (f"Training {spec.model} for {task} on {len(data.train)} examples{labels}; "
            f"{trainable:,} of {total:,} parameters trainable; {device.type}, {precision.name}.")


def _balance(data: TaskData) -> dict[str, Any]:
    """The class balance report: label counts and rows of every split."""
    return {param: {"rows": s.rows, "label_counts": s.label_counts, **s.details} for param, s in data.summaries.items()}


def _collate(adapter: TaskAdapter, split: Split, indices: list[int], seed: int, epoch: int, batch: int,
             pad_multiple: int | None) -> dict[str, torch.Tensor]:
    """Training batch `batch` of the epoch, augmented from its own random source (`batch_rng`)."""
    return adapter.collate(split, indices, rng=batch_rng(seed, epoch, batch), pad_to_multiple_of=pad_multiple)


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> float:
    """Backpropagate `loss` (scaled for fp16) and return its value."""
    (scaler.scale(loss) if scaler else loss).backward()
    return loss.item()


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _all_params(optimizer: torch.optim.Optimizer) -> set[torch.nn.Parameter]:
    return {p for group in optimizer.param_groups for p in group["params"]}


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _scalars(report: dict[str, Any]) -> dict[str, float]:
    values = {k: v for k, v in report.items() if isinstance(v, float)}
    for name, per in report.get("per_class", {}).items():
        values |= {f"{m}[{name}]": float(per[m]) for m in ("precision", "recall", "f1")}
    return values


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
