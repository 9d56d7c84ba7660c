"""The fine-tuning engine: one explicit training loop, top to bottom.

`run` validates the data, builds the parts (model, optimizer, scheduler, sampler, callbacks) with
small build_* functions, trains, and exports. Clipping, accumulation and scheduler steps are in the
loop; everything that is not the math (evaluation and checkpoint scheduling, early stopping,
reporting, cancellation) is a callback acting through the Control flags.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_scheduler

from core import formats
from core.callbacks import (
    Callback,
    CheckpointSchedule,
    Control,
    EarlyStopping,
    EvaluationSchedule,
    ProgressReporter,
    StopRequest,
    TrainState,
)
from core.checkpoint import checkpoint_name, load_checkpoint, load_model_weights, rotate_checkpoints, save_checkpoint
from core.data import BatchSampler, Encoded, collate, encode, eval_batches
from core.device import Precision, is_out_of_memory, resolve_device, resolve_precision
from core.errors import EngineError, OutOfMemoryError
from core.export import export_model, pack_archive
from core.metrics import classification_metrics, classification_report
from core.models import load_classifier, load_tokenizer
from core.sink import MetricsSink
from core.spec import CLASSIFICATION_METRICS, JobSpec, OptimizerConfig, SchedulerConfig, Task

KEEP_LAST_CHECKPOINTS = 2


@dataclass(frozen=True)
class RunPaths:
    model: str  # local HF folder path or hub id
    train_file: Path
    validation_file: Path | None
    test_file: Path | None
    work_dir: Path  # engine writes checkpoints/ and output/ under it
    resume_from: Path | None = None  # a checkpoint folder this engine wrote earlier


@dataclass
class RunResult:
    model_dir: Path | None  # exported HF folder (work_dir/output/model); None when cancelled
    archive_path: Path | None  # uncompressed .tar of model_dir's files at the root; None when cancelled
    trained_tokens: int
    hyperparameters: dict
    metrics: dict  # {"latest", "best", "test", "baseline_test"}
    stopped_early: bool
    cancelled: bool


@dataclass
class Splits:
    labels: list[str]
    train: Encoded
    validation: Encoded | None
    test: Encoded | None


def run(
    spec: JobSpec,
    paths: RunPaths,
    sink: MetricsSink,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Fine-tune `paths.model` on the job's data, reporting to `sink`, and export the result.

    Args:
        spec: the validated job description.
        paths: where the model, data, work folder and (optional) checkpoint to resume from are.
        sink: receives events, metrics and checkpoint announcements.
        should_stop: polled after each optimizer step; True saves a checkpoint and stops (cancelled).
        callbacks: extra callbacks, run after the built-in ones.

    Returns:
        A RunResult; when cancelled, nothing is exported (model_dir and archive_path are None).

    Raises:
        DataError: unreadable data, missing columns, unknown validation/test labels, < 2 labels.
        ModelError: model not found, or not loadable safely (no safetensors).
        OutOfMemoryError: the configuration does not fit the device's memory.
        EngineError: anything else wrong with the request (unsupported task, bad checkpoint, ...).
    """
    try:
        return _run(spec, paths, sink, should_stop, list(callbacks))
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


def _run(spec: JobSpec, paths: RunPaths, sink: MetricsSink, should_stop, extra_callbacks) -> RunResult:
    cfg = spec.config
    device = resolve_device(cfg)
    precision = resolve_precision(cfg, device)
    seed_everything(spec.seed)
    tokenizer = load_tokenizer(paths.model)
    splits = build_splits(spec, paths, tokenizer)
    model = load_classifier(paths.model, labels=splits.labels, pad_token_id=tokenizer.pad_token_id).to(device)
    sink.event(
        f"Training {spec.model} on {len(splits.train)} examples, {len(splits.labels)} labels, "
        f"{device.type}, {precision.name}."
    )

    batch_size, n_epochs = spec.batch_size(len(splits.train)), spec.n_epochs()
    accum = cfg.gradient_accumulation_steps
    sampler = BatchSampler(splits.train.lengths, batch_size=batch_size, seed=spec.seed, group_by_length=cfg.group_by_length)
    steps_per_epoch = math.ceil(len(sampler) / accum)
    max_steps = n_epochs * steps_per_epoch
    optimizer = build_optimizer(model, cfg.optimizer, lr=spec.learning_rate())
    scheduler = build_scheduler(optimizer, cfg.scheduler, max_steps=max_steps)
    scaler = precision.grad_scaler(device)
    state = TrainState(max_steps=max_steps, steps_per_epoch=steps_per_epoch, batches_per_epoch=len(sampler))
    control = Control()
    callbacks = build_callbacks(spec, sink, should_stop, has_validation=splits.validation is not None)
    callbacks += extra_callbacks
    evaluate = _Evaluator(model, device, precision, batch_size=max(batch_size, 32), pad_token_id=tokenizer.pad_token_id)
    checkpoints = paths.work_dir / "checkpoints"
    facts = {"labels": splits.labels, "batch_size": batch_size, "accumulation": accum, "max_steps": max_steps}
    parts = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, state=state, callbacks=callbacks, extra=facts)

    if paths.resume_from is not None:
        load_checkpoint(Path(paths.resume_from), **parts)
        sink.event(f"Resumed from checkpoint at step {state.step}.")
    elif splits.test is not None:
        state.baseline_test = evaluate(splits.test)
        sink.metrics(0, state.baseline_test, split="baseline_test")
        sink.event("Test set before training (base model, fresh head): " + _fmt(state.baseline_test))

    metric = cfg.metric_for_best_model
    pad_id = tokenizer.pad_token_id
    pad_multiple = 8 if device.type == "cuda" else None  # tensor cores like multiples of 8
    for cb in callbacks:
        cb.on_train_begin(state, control)
    model.train()
    while state.epoch < n_epochs and not control.should_stop:
        batches = sampler.batches(state.epoch)
        groups = [batches[i : i + accum] for i in range(0, len(batches), accum)]
        for group in groups[state.batch_in_epoch // accum :]:
            started = time.perf_counter()
            n_examples = sum(len(indices) for indices in group)
            step_loss = 0.0
            for indices in group:
                batch = _to(collate(splits.train, indices, pad_token_id=pad_id, pad_to_multiple_of=pad_multiple), device)
                labels = batch.pop("labels")
                with precision.autocast(device):
                    logits = model(**batch).logits
                # Sum over the micro-batch / examples in the whole step: accumulation == one big batch.
                loss = F.cross_entropy(logits.float(), labels, reduction="sum") / n_examples
                (scaler.scale(loss) if scaler else loss).backward()
                step_loss += loss.item()
                state.trained_tokens += int(batch["attention_mask"].sum())
            if scaler:
                scaler.unscale_(optimizer)
            # With clipping off, an infinite threshold still measures the norm for reporting.
            state.grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf))
            state.lr = scheduler.get_last_lr()[0]
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state.step += 1
            state.loss = step_loss
            state.samples_seen += n_examples
            state.batch_in_epoch += len(group)
            if state.batch_in_epoch == len(batches):
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            state.train_seconds += time.perf_counter() - started
            control.reset()
            for cb in callbacks:
                cb.on_step_end(state, control)
            if control.should_evaluate and splits.validation is not None:
                metrics = evaluate(splits.validation)
                state.record_evaluation(metrics, metric=metric, greater_is_better=CLASSIFICATION_METRICS[metric])
                for cb in callbacks:
                    cb.on_evaluate(state, control, metrics)
            if control.should_save:
                if state.best_step == state.step:
                    state.best_checkpoint = checkpoint_name(state.step)
                path = save_checkpoint(checkpoints, **parts)
                rotate_checkpoints(checkpoints, keep_last=KEEP_LAST_CHECKPOINTS, keep={state.best_checkpoint or ""})
                evaluated = state.last_eval_step == state.step and state.latest_metrics
                sink.checkpoint(state.step, path, state.latest_metrics if evaluated else {"train_loss": state.loss})
            if control.should_stop:
                break

    for cb in callbacks:
        cb.on_train_end(state, control)
    hyperparameters = spec.resolved_hyperparameters(len(splits.train))
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
    if state.stopped_early:
        sink.event(f"Stopped early at step {state.step}: {metric} did not improve.")

    if cfg.load_best_model_at_end and state.best_checkpoint and state.best_step != state.step:
        # A best saved before a resume may lie next to the checkpoint resumed from.
        candidates = [checkpoints / state.best_checkpoint]
        if paths.resume_from is not None:
            candidates.append(Path(paths.resume_from).parent / state.best_checkpoint)
        best = next((c for c in candidates if c.is_dir()), None)
        if best is None:
            sink.event(f"The best checkpoint ({state.best_checkpoint}) is gone; exporting the last weights.", level="warning")
        else:
            load_model_weights(best, model)
            sink.event(f"Loaded the best weights (step {state.best_step}, {metric}={state.best_metric:.4f}).")
    if splits.test is not None:
        metrics["test"] = evaluate(splits.test, label_names=splits.labels)
        sink.metrics(state.step, _scalars(metrics["test"]), split="test")
        sink.event("Test set after training: " + _fmt(metrics["test"]), data=metrics["test"])

    model_dir = export_model(
        model,
        tokenizer,
        paths.work_dir / "output" / "model",
        spec=spec,
        files={"training_file": paths.train_file, "validation_file": paths.validation_file, "test_file": paths.test_file},
        hyperparameters=hyperparameters,
        device=device.type,
        precision=precision.name,
        report={k: metrics[k] for k in ("best", "latest", "test", "baseline_test")} | {"best_step": state.best_step},
    )
    archive = pack_archive(model_dir, paths.work_dir / "output" / "model.tar")
    sink.event(f"Exported the model ({state.trained_tokens} trained tokens).")
    return RunResult(model_dir, archive, state.trained_tokens, hyperparameters, metrics, state.stopped_early, False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices


def build_splits(spec: JobSpec, paths: RunPaths, tokenizer) -> Splits:
    """Validate all datasets (labels of validation/test must be in train) and tokenize them.

    Raises:
        DataError: as core.formats, or fewer than two labels in the training file.
        EngineError: a task other than text-classification.
    """
    cfg = spec.config
    columns = dict(text_column=cfg.text_column, label_column=cfg.label_column)
    info = formats.inspect_dataset(paths.train_file, param="training_file", **columns)
    task = spec.task or info.task
    if task != Task.TEXT_CLASSIFICATION:
        raise EngineError(f"Task {task!r} is not supported.", param="task", code="unsupported_task")
    formats.check_trainable(info)
    label_ids = {label: i for i, label in enumerate(info.labels)}

    def load(path: Path | None, param: str) -> Encoded | None:
        if path is None:
            return None
        if param != "training_file":
            formats.check_labels(info, formats.inspect_dataset(path, param=param, **columns), param=param)
        texts, labels = formats.read_examples(path, param=param, **columns)
        ids = [label_ids[label] for label in labels]
        return encode(tokenizer, texts, ids, max_length=cfg.max_length, truncation_side=cfg.truncation_side)

    return Splits(
        labels=info.labels,
        train=load(paths.train_file, "training_file"),
        validation=load(paths.validation_file, "validation_file"),
        test=load(paths.test_file, "test_file"),
    )


def build_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: decayed matrices; biases and norm weights (1-D) undecayed."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig, *, lr: float) -> torch.optim.Optimizer:
    """AdamW over `build_param_groups`, fused into one kernel on CPU and CUDA.

    torch's default AdamW on CPU loops over the tensors one by one: for MiniLM-L6 that is ~90 ms a
    step against ~16 ms fused, a quarter of a batch-32 bf16 step (bench/engine_vs_trainer.py).
    The fused kernel is the same algorithm; transformers' Trainer uses it by default as well.
    """
    groups = build_param_groups(model, config.weight_decay)
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, config: SchedulerConfig, *, max_steps: int):
    """transformers.get_scheduler with warmup from warmup_steps, else ceil(warmup_ratio x max_steps)."""
    warmup = config.warmup_steps if config.warmup_steps is not None else math.ceil(config.warmup_ratio * max_steps)
    name = "constant_with_warmup" if config.name == "constant" else config.name
    return get_scheduler(name, optimizer, num_warmup_steps=min(warmup, max_steps), num_training_steps=max_steps)


def build_callbacks(spec: JobSpec, sink: MetricsSink, should_stop, *, has_validation: bool) -> list[Callback]:
    """The built-in callbacks for the spec: schedules, early stopping, reporting, stop requests."""
    cfg = spec.config
    callbacks: list[Callback] = [
        EvaluationSchedule(cfg.eval_every_steps),
        CheckpointSchedule(cfg.checkpoint_every_steps, keep_best=cfg.load_best_model_at_end and has_validation),
    ]
    if cfg.early_stopping is not None and not has_validation:
        sink.event("early_stopping needs a validation file; it is off for this job.", level="warning")
    if cfg.early_stopping is not None and has_validation:
        callbacks.append(
            EarlyStopping(
                cfg.metric_for_best_model,
                greater_is_better=CLASSIFICATION_METRICS[cfg.metric_for_best_model],
                patience=cfg.early_stopping.patience,
                min_delta=cfg.early_stopping.min_delta,
            )
        )
    callbacks += [ProgressReporter(sink, every_steps=10), StopRequest(should_stop)]
    return callbacks


class _Evaluator:
    """Loss/accuracy/F1 of the model on a split (the full report when label names are given)."""

    def __init__(self, model, device: torch.device, precision: Precision, *, batch_size: int, pad_token_id: int):
        self.model, self.device, self.precision = model, device, precision
        self.batch_size, self.pad_token_id = batch_size, pad_token_id

    @torch.no_grad()
    def __call__(self, data: Encoded, *, label_names: list[str] | None = None) -> dict[str, Any]:
        was_training = self.model.training
        self.model.eval()
        loss_sum, labels, preds = 0.0, [], []
        for indices in eval_batches(data.lengths, self.batch_size):
            batch = _to(collate(data, indices, pad_token_id=self.pad_token_id), self.device)
            target = batch.pop("labels")
            with self.precision.autocast(self.device):
                logits = self.model(**batch).logits.float()
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            labels += target.tolist()
            preds += logits.argmax(-1).tolist()
        self.model.train(was_training)
        loss = loss_sum / len(data)
        if label_names is None:
            return classification_metrics(labels, preds, loss=loss)
        return classification_report(labels, preds, label_names=label_names, loss=loss)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _scalars(report: dict[str, Any]) -> dict[str, float]:
    values = {k: v for k, v in report.items() if isinstance(v, float)}
    for name, per in report.get("per_class", {}).items():
        values |= {f"{m}[{name}]": float(per[m]) for m in ("precision", "recall", "f1")}
    return values


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
