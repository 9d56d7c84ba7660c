"""What a task contributes to the one training loop in core.engine.

The engine owns the loop (accumulation, clipping, precision, schedules, checkpoints, callbacks);
a TaskAdapter owns everything that differs between tasks: reading and encoding the data, building
the model and its head, collating batches (with augmentation for training batches), the loss, and
the metrics. One adapter per task, in core/adapters/<task>.py.

Loss contract: `loss_sum(model, batch)` returns the loss *summed* over the batch's units (examples,
or target tokens for causal-lm / token-classification) and `units(batch)` counts them without a
forward pass. The engine divides each micro-batch's sum by the units of the whole optimizer step,
so gradient accumulation computes exactly the gradient of one big batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.cache import InputCache
from core.datasets import DatasetSummary, ParsedFile, parse_files
from core.device import Precision
from core.spec import JobSpec, Task


@dataclass
class Split:
    """A prepared split: per-example model inputs and targets, unpadded."""

    features: dict[str, list[Any]]  # input name -> one entry per example (token id lists, image tensors, ...)
    targets: list[Any]  # one per example: class id, [0/1 per label], float, [tag id per token], ...
    lengths: list[int]  # tokens per example (1 for images): drives length grouping and padding
    # Per-example loss weights (config.weight_column), training only; keyword-only so subclasses can add fields.
    weights: list[float] | None = field(default=None, kw_only=True)

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, indices: Sequence[int]) -> Split:
        """The examples `indices` (repeats allowed: a bootstrap resample), as a split of the same kind."""
        picked = np.asarray(indices, dtype=np.int64)

        def pick(column: Any) -> Any:
            return [column[i] for i in picked] if isinstance(column, list) else column[picked]

        def per_example(value: Any) -> bool:  # a column with one entry per example (weights may be None)
            return isinstance(value, (list, np.ndarray, torch.Tensor)) and len(value) == len(self)

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values = {name: ({k: pick(v) for k, v in value.items()} if name == "features" else
                         pick(value) if per_example(value) else value) for name, value in values.items()}
        return dataclasses.replace(self, **values)

    def weight_tensor(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """{"weight": the examples' loss weights} for a batch, or {} when the split has none."""
        if self.weights is None:
            return {}
        return {"weight": torch.tensor([self.weights[i] for i in indices], dtype=torch.float32)}


@dataclass
class TaskData:
    """All splits of a job, ready to batch."""

    train: Split
    validation: Split | None
    test: Split | None
    labels: list[str] | None  # class/tag names in id order (the model's id2label); None when not a classifier
    summaries: dict[str, DatasetSummary] = field(default_factory=dict)  # per request field, for reports

    @classmethod
    def of(cls, parsed: dict[str, ParsedFile], encode: Callable[[str, Any], Split], *,
           labels: list[str] | None) -> TaskData:
        """The TaskData of parsed files (request field -> ParsedFile): each split `encode(param, rows)`."""
        splits = {param: encode(param, file.rows) for param, file in parsed.items()}
        for param, file in parsed.items():
            splits[param].weights = file.weights
        return cls(splits["training_file"], splits.get("validation_file"), splits.get("test_file"), labels=labels,
                   summaries={param: file.summary for param, file in parsed.items()})


@dataclass(frozen=True)
class DataFiles:
    train: Path
    validation: Path | None = None
    test: Path | None = None

    def by_param(self) -> dict[str, Path | None]:
        """Request field ("training_file", ...) -> path, as core.datasets takes them."""
        return {"training_file": self.train, "validation_file": self.validation, "test_file": self.test}


class TaskAdapter:
    """Base class; subclasses set `task` and implement the methods that raise NotImplementedError."""

    task: Task

    def __init__(self, spec: JobSpec, *, cache: InputCache | None = None):
        self.spec = spec
        self.config = spec.config
        self.cache = cache  # given: each split's encoding is computed once per content (core.cache)

    def cached(self, kind: str, key: dict[str, Any], compute: Callable[[], Any], *,
               dump: Callable[[Any], dict[str, Any]], restore: Callable[[dict[str, Any]], Any]) -> Any:
        """`compute()`, or its stored result for the same `key` (everything the result depends on:
        content hashes and options) when the adapter has a cache."""
        if self.cache is None:
            return compute()
        return self.cache.arrays({"kind": kind, "task": str(self.task), **key}, compute, dump=dump, restore=restore)

    # --- data ------------------------------------------------------------------------------

    @property
    def metrics(self) -> dict[str, bool]:
        """Validation metric name -> whether larger is better (config.metric_for_best_model must be one)."""
        raise NotImplementedError

    def load_processor(self, source: str, *, local_files_only: bool = False) -> Any:
        """The tokenizer or image processor of the base model (a local folder or hub id;
        `local_files_only`: a hub id from the local cache alone, without asking the hub).

        Raises:
            ModelError: not found / not loadable safely.
        """
        raise NotImplementedError

    def prepare(self, files: DataFiles, processor: Any) -> TaskData:
        """Read and check every file once (core.datasets.parse_files: validation/test labels against
        training), then encode every split (`prepare_parsed`).

        Raises:
            DataError: as the task's core.datasets reader, or as `prepare_parsed`.
        """
        _, parsed = parse_files(self.task, files.by_param(), self.config)
        data = self.prepare_parsed(parsed, processor)
        if self.config.train_rows is not None:
            data.train = data.train.take(self.drawn_rows(data.train))
        return data

    def drawn_rows(self, train: Split) -> np.ndarray:
        """The training rows config.train_rows keeps (core.ensemble.train_rows; folds stratified by
        class for single-label classification), in the full split's numbering."""
        from core.ensemble import train_rows

        rows = self.config.train_rows
        labels = train.targets if train.targets and all(isinstance(t, int) for t in train.targets) else None
        return train_rows(rows.method, len(train), seed=self.spec.seed if rows.seed is None else rows.seed,
                          stream=rows.stream, fraction=rows.fraction, folds_=rows.folds, holdout=rows.holdout,
                          labels=labels if rows.method == "folds" else None)

    def prepare_parsed(self, parsed: dict[str, ParsedFile], processor: Any) -> TaskData:
        """Encode every split from its checked rows (request field -> ParsedFile, training first).

        Raises:
            DataError, EngineError: what the task's encoding refuses.
        """
        raise NotImplementedError

    # --- model -----------------------------------------------------------------------------

    def build_model(self, source: str, data: TaskData, processor: Any) -> torch.nn.Module:
        """The model to train in fp32 on the CPU, with this task's head for data.labels; head
        surgery (config.head) and classifier dropout (config.dropout.classifier) applied.

        Raises:
            ModelError: not found, not safetensors, or the wrong architecture for the task.
        """
        raise NotImplementedError

    def on_model_ready(self, model: torch.nn.Module, data: TaskData, *, device: torch.device,
                       precision: Precision, batch_size: int) -> str | None:
        """Called once the model is prepared and on the device, before any step (and before a
        checkpoint is resumed): what the task computes once from the untrained model. Returns a
        line for the job's events, or None. Nothing by default."""
        return None

    def collate(
        self,
        split: Split,
        indices: list[int],
        *,
        rng: np.random.Generator | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The batch of examples `indices`, padded, as CPU tensors the model's forward takes, plus
        "labels". `rng` is given for training batches only: augmentation draws from it (and from
        nothing else), so that a resumed run sees the same augmented batches."""
        raise NotImplementedError

    def units(self, batch: dict[str, torch.Tensor]) -> float:
        """How many terms `loss_sum` adds up for this batch: examples by default, or the sum of
        their weights when the batch has per-example weights (so a step's loss is their weighted
        mean, and a weight of 2 is exactly a row seen twice)."""
        if "weight" in batch:
            return float(batch["weight"].sum())
        return int(batch["labels"].shape[0])

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """(fp32 loss summed over the batch's units, predictions for metrics as CPU tensors/lists).

        Called in the engine's autocast context; for evaluation under torch.no_grad.
        """
        raise NotImplementedError

    def compute_metrics(self, predictions: list[Any], targets: list[Any], *, loss: float, report: bool) -> dict[str, Any]:
        """Metrics of a whole split from the per-batch predictions and the batches' targets.

        Args:
            predictions: what loss_sum returned second, for each batch in order.
            targets: batch["labels"] of each batch, in the same order (CPU).
            loss: mean loss per unit over the split.
            report: the full test report (per class P/R/F1, confusion matrix, calibration ...)
                rather than the summary of `metrics`' keys.
        """
        raise NotImplementedError

    def eval_batch_size(self, train_batch_size: int) -> int:
        """Examples per evaluation batch: no gradients are kept, so larger than training's."""
        return max(train_batch_size, 32)

    def trained_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens that count as trained (OpenAI's trained_tokens): non-padding input tokens."""
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else 0

    # --- export ----------------------------------------------------------------------------

    def save(self, model: torch.nn.Module, processor: Any, out_dir: Path) -> None:
        """Write a folder `from_pretrained` loads: weights (safetensors), config, processor."""
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)

    # --- shared ----------------------------------------------------------------------------

    def eval_batches(self, split: Split, batch_size: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(example indices, collated CPU batch) of `split` as evaluation takes it: sorted by length,
        no augmentation. Anything computed in these batches matches evaluation bit for bit."""
        order = sorted(range(len(split)), key=lambda i: split.lengths[i])
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            yield indices, self.collate(split, indices)

    @torch.no_grad()
    def evaluate(
        self,
        model: torch.nn.Module,
        split: Split,
        *,
        device: torch.device,
        precision: Precision,
        batch_size: int,
        report: bool = False,
    ) -> dict[str, Any]:
        """Metrics of `model` on `split` (batches sorted by length, no augmentation)."""
        was_training = model.training
        model.eval()
        loss_sum, units = 0.0, 0
        predictions: list[Any] = []
        targets: list[Any] = []
        for _, batch in self.eval_batches(split, batch_size):
            units += self.units(batch)
            targets.append(batch["labels"])
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with precision.autocast(device):
                loss, preds = self.loss_sum(model, batch)
            loss_sum += float(loss)
            predictions.append(preds)
        model.train(was_training)
        return self.compute_metrics(predictions, targets, loss=loss_sum / max(1, units), report=report)


def weighted_sum(losses: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example losses summed, each scaled by its weight when the batch has weights."""
    if "weight" in batch:
        return (losses * batch["weight"].to(losses.device)).sum()
    return losses.sum()


def class_weights(labels: list[str], counts: dict[str, int], setting: str | dict[str, float] | None) -> torch.Tensor | None:
    """Per-class loss weights from config.loss.class_weights, in class-id order.

    Args:
        labels: class names in id order.
        counts: examples per class in the training file.
        setting: None (no weights), "balanced" (n / (k x count), scikit-learn's formula; a class
            without examples gets 1) or {label: weight} (labels left out get 1).

    Raises:
        EngineError: a label in the mapping that the training file does not have
            (param config.loss.class_weights).
    """
    from core.errors import EngineError

    if setting is None:
        return None
    if setting == "balanced":
        total, k = sum(counts.values()), len(labels)
        return torch.tensor([total / (k * counts[c]) if counts.get(c) else 1.0 for c in labels], dtype=torch.float32)
    unknown = sorted(set(setting) - set(labels))
    if unknown:
        raise EngineError(
            f"class_weights names label(s) not in the training file: {', '.join(map(repr, unknown[:10]))}.",
            param="config.loss.class_weights",
        )
    return torch.tensor([float(setting.get(c, 1.0)) for c in labels], dtype=torch.float32)
