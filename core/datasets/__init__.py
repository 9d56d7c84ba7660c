"""Reading and checking datasets per task, without torch.

The Celery validation step and the API import this package, so nothing under it may import torch
or transformers. Each task's reader module has the same functions:

    inspect(path, *, param, config) -> DatasetSummary    one full pass, every row checked
    parse(path, *, param, config) -> ParsedFile          the same pass, keeping the checked rows
    read(path, *, param, config) -> rows                 parse(...).rows
    check_split(train, other, *, param) -> None           validation/test against the training file

and may have `check_trainable(train)` (raises when nothing can be learned from the training file).
They raise core.errors.DataError naming the request field (param) and the line or row.

`inspect_files` checks a job's files (the validation step: summaries only); `parse_files` does the
same checks and keeps the rows, so that a training run reads each file once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import DataError
from core.spec import Task, TrainingConfig


@dataclass
class DatasetSummary:
    """What a full pass over one dataset file found."""

    task: Task
    rows: int
    labels: list[str] | None = None  # class/tag names in id order; None for regression and causal-lm
    label_counts: dict[str, int] = field(default_factory=dict)  # the class balance report
    details: dict[str, Any] = field(default_factory=dict)  # task-specific facts (problem_type, row formats, ...)


@dataclass
class ParsedFile:
    """One dataset file read in full: its checked rows, as the task's reader gives them, and its summary."""

    rows: Any  # text: (texts, labels); tokens: [TaggedSentence]; chat: [Conversation]; images: [ImageRow]
    summary: DatasetSummary
    weights: list[float] | None = None  # the training file's config.weight_column, one per row


def weighted(param: str, config: TrainingConfig) -> bool:
    """Whether a file's rows carry a loss weight: the training file's, when config.weight_column
    names one (validation and test are scored unweighted, so their files need no such column)."""
    return param == "training_file" and config.weight_column is not None


def reader(task: Task):
    """The reader module of a task (inspect/parse/read/check_split)."""
    from core.datasets import chat, images, text, tokens

    return {
        Task.TEXT_CLASSIFICATION: text,
        Task.TOKEN_CLASSIFICATION: tokens,
        Task.CAUSAL_LM: chat,
        Task.IMAGE_CLASSIFICATION: images,
    }[task]


def infer_task(path: Path, config: TrainingConfig, *, param: str = "training_file") -> Task:
    """The task a training file is for, from its format and the keys of its first row.

    .zip (image folders) or a Parquet file with config.image_column: image-classification;
    rows with config.tokens_column and config.tags_column: token-classification;
    rows with "messages", "preferred_output" (DPO), "prompt"/"completion", "instruction"/"output",
    or with the text column alone: causal-lm; anything else: text-classification.
    """
    from core import formats

    if path.suffix.lower() == ".zip":
        return Task.IMAGE_CLASSIFICATION
    fmt = formats.dataset_format(path.name)
    first = next((record for _, record in formats.records(path, fmt, param=param)), None)
    if first is None:
        raise DataError(f"{path.name} has no data rows.", param=param)
    keys = set(first)
    if config.image_column in keys and fmt == "parquet":
        return Task.IMAGE_CLASSIFICATION
    if {config.tokens_column, config.tags_column} <= keys:
        return Task.TOKEN_CLASSIFICATION
    if "messages" in keys or "preferred_output" in keys or {"prompt", "completion"} <= keys or {"instruction", "output"} <= keys:
        return Task.CAUSAL_LM
    if keys == {config.text_column}:  # text alone; with other columns a missing label is an error to report
        return Task.CAUSAL_LM
    return Task.TEXT_CLASSIFICATION


FILE_PARAMS = ("training_file", "validation_file", "test_file")


def inspect_files(task: Task | None, files: dict[str, Path | None], config: TrainingConfig) -> tuple[Task, dict[str, DatasetSummary]]:
    """Check every file of a job in full: (the task, a summary per request field).

    Args:
        task: the job's task, or None to infer it from the training file.
        files: request field ("training_file", ...) -> local path (None when not given).
        config: the job's config (columns, problem type, ...).

    Raises:
        DataError: a bad file, labels of validation/test unknown to the training file, or a
            training file nothing can be learned from.
    """
    task, parsed = _check_files(task, files, config, keep_rows=False)
    return task, {param: file.summary for param, file in parsed.items()}


def parse_files(task: Task | None, files: dict[str, Path | None], config: TrainingConfig) -> tuple[Task, dict[str, ParsedFile]]:
    """As `inspect_files`, keeping every file's rows: each file is read once, checks and rows together.

    Returns:
        (the task, a ParsedFile per request field given, in FILE_PARAMS order).

    Raises:
        DataError: as `inspect_files`.
    """
    return _check_files(task, files, config, keep_rows=True)


def _check_files(task: Task | None, files: dict[str, Path | None], config: TrainingConfig, *,
                 keep_rows: bool) -> tuple[Task, dict[str, ParsedFile]]:
    train_path = files["training_file"]
    assert train_path is not None
    task = task or infer_task(train_path, config)
    module = reader(task)

    def check(path: Path, param: str, config: TrainingConfig) -> ParsedFile:
        if keep_rows:
            return module.parse(path, param=param, config=config)
        return ParsedFile(rows=None, summary=module.inspect(path, param=param, config=config))

    parsed = {"training_file": check(train_path, "training_file", config)}
    train = parsed["training_file"].summary
    if hasattr(module, "check_trainable"):
        module.check_trainable(train)
    resolved = train.details.get("problem_type")
    if resolved is not None:  # read validation/test labels the way the training file's were read
        config = config.model_copy(update={"problem_type": resolved})
    for param in FILE_PARAMS[1:]:
        path = files.get(param)
        if path is not None:
            parsed[param] = check(path, param, config)
            module.check_split(train, parsed[param].summary, param=param)
    return task, parsed
