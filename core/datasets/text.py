"""Text-classification datasets: a text column and a label column, three kinds of label.

single_label: one class per row ("spam", 3). multi_label: any number of classes per row, as a JSON
list (JSONL/Parquet) or a CSV cell split on config.label_separator ("sports|politics"); an empty
list is a row with no class. regression: a number per row. With problem_type "auto" the training
file decides: lists (or a separator) mean multi_label, numbers that are not all integers mean
regression, anything else single_label. Validation and test files are read the training file's way.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core import formats
from core.datasets import DatasetSummary, ParsedFile, weighted
from core.errors import DataError
from core.spec import ProblemType, Task, TrainingConfig


def inspect(path: Path, *, param: str, config: TrainingConfig) -> DatasetSummary:
    """Check every row and count the labels.

    Args:
        path: the dataset file (.csv, .jsonl, .parquet).
        param: the request field to blame in errors.
        config: columns, label_separator, and problem_type (detected from the rows when "auto";
            core.datasets.inspect_files reads validation/test with the training file's).

    Returns:
        A DatasetSummary; details["problem_type"] is the kind of label; labels and label_counts
        are None/empty for regression, where details has min, max and mean instead.

    Raises:
        DataError: a missing column, an empty text, a missing or malformed label (naming the line).
    """
    # The texts are not kept: the summary needs the labels (and weights) only.
    raw, weights = [], []
    for where, _, value, weight in _rows(path, param=param, config=config):
        raw.append((where, value))
        weights.append(weight)
    if weighted(param, config):
        formats.check_weights(weights, name=path.name, column=str(config.weight_column))
    return _summary(*_labels(path, raw, param=param, config=config))


def parse(path: Path, *, param: str, config: TrainingConfig) -> ParsedFile:
    """One pass over the file: rows (texts, labels) as `read` gives them, and `inspect`'s summary.

    Raises:
        DataError: as `inspect`.
    """
    rows = list(_rows(path, param=param, config=config))
    kind, values = _labels(path, [(where, value) for where, _, value, _ in rows], param=param, config=config)
    weights = [weight for *_, weight in rows] if weighted(param, config) else None
    if weights is not None:
        formats.check_weights(weights, name=path.name, column=str(config.weight_column))
    return ParsedFile(rows=([text for _, text, _, _ in rows], values), summary=_summary(kind, values), weights=weights)


def _labels(path: Path, raw: list[tuple[str, Any]], *, param: str, config: TrainingConfig) -> tuple[ProblemType, list[Any]]:
    """The kind of label (config.problem_type, or detected from all rows when "auto") and every
    (where, raw label) parsed as that kind."""
    if not raw:
        raise DataError(f"{path.name} has no data rows.", param=param)
    kind = _problem_type(config, [value for _, value in raw])
    return kind, [_parse(value, where, kind, config=config, param=param) for where, value in raw]


def _summary(kind: ProblemType, values: list[Any]) -> DatasetSummary:
    details: dict[str, Any] = {"problem_type": kind.value}
    if kind == ProblemType.REGRESSION:
        details |= {"min": min(values), "max": max(values), "mean": sum(values) / len(values)}
        return DatasetSummary(task=Task.TEXT_CLASSIFICATION, rows=len(values), details=details)
    counts: Counter[str] = Counter()
    for value in values:
        counts.update(value if kind == ProblemType.MULTI_LABEL else [value])
    labels = formats.sort_labels(counts)
    if kind == ProblemType.MULTI_LABEL:
        details["labels_per_row"] = sum(len(v) for v in values) / len(values)
    return DatasetSummary(
        task=Task.TEXT_CLASSIFICATION, rows=len(values), labels=labels,
        label_counts={label: counts[label] for label in labels}, details=details,
    )


def check_trainable(train: DatasetSummary, *, param: str = "training_file") -> None:
    """Something must be learnable: two classes (single_label), one class (multi_label), two
    distinct values (regression).

    Raises:
        DataError: naming what is missing.
    """
    kind = ProblemType(train.details["problem_type"])
    if kind == ProblemType.SINGLE_LABEL and len(train.labels or []) < 2:
        raise DataError(
            f"The training file has a single label ({(train.labels or ['?'])[0]!r}); classification needs at least two.",
            param=param,
        )
    if kind == ProblemType.MULTI_LABEL and not train.labels:
        raise DataError("No row of the training file has a label.", param=param)
    if kind == ProblemType.REGRESSION and train.details["min"] == train.details["max"]:
        raise DataError(f"Every label of the training file is {train.details['min']}; regression needs variation.",
                        param=param)


def check_split(train: DatasetSummary, other: DatasetSummary, *, param: str) -> None:
    """A validation/test file must have the training file's kind of label and no unknown class.

    Raises:
        DataError: code "unknown_label" for classes the training file lacks; a different kind of label.
    """
    train_kind, other_kind = train.details["problem_type"], other.details["problem_type"]
    if train_kind != other_kind:
        raise DataError(
            f"Labels are read as {other_kind} here but as {train_kind} in the training file.", param=param
        )
    if train.labels is not None:
        formats.check_labels(train, other, param=param)


def read(path: Path, *, param: str, config: TrainingConfig) -> tuple[list[str], list[Any]]:
    """All (text, label) pairs, labels parsed as config.problem_type (detected when "auto"): str,
    list[str] or float.

    Raises:
        DataError: as `inspect`.
    """
    return parse(path, param=param, config=config).rows


def problem_type_of(summary: DatasetSummary) -> ProblemType:
    return ProblemType(summary.details["problem_type"])


# ---------------------------------------------------------------------------------------------


def _rows(path: Path, *, param: str, config: TrainingConfig) -> Iterator[tuple[str, str, Any, float | None]]:
    """(where, text, raw label, weight or None) for every row, text, weight and presence of the
    columns checked."""
    text_column, label_column, weight_column = config.text_column, config.label_column, config.weight_column
    with_weights = weighted(param, config)
    fmt = formats.dataset_format(path.name)
    if fmt in ("csv", "parquet"):
        header = formats.header(path, fmt, param=param)
        for column in (text_column, label_column):
            formats.require_column(path, header, column, param=param)
        if with_weights:
            formats.require_column(path, header, weight_column, param="config.weight_column")
    required = (text_column, label_column, *((weight_column,) if with_weights else ()))
    for where, record in formats.located_records(path, fmt, param=param, required=required):
        text = record[text_column]
        if not isinstance(text, str):
            raise DataError(f"{where}: {text_column!r} must be a string, not {formats.value_kind(text)}.", param=param)
        if not text.strip():
            raise DataError(f"{where}: {text_column!r} is empty.", param=param)
        weight = (formats.example_weight(record[weight_column], where=where, column=weight_column, param=param)
                  if with_weights else None)
        yield where, text, record[label_column], weight


def _problem_type(config: TrainingConfig, raw: list[Any]) -> ProblemType:
    if config.problem_type != "auto":
        return ProblemType(config.problem_type)
    if config.label_separator is not None or any(isinstance(v, (list, tuple)) or _is_array(v) for v in raw):
        return ProblemType.MULTI_LABEL
    numbers = [_number(v) for v in raw]
    if all(n is not None for n in numbers) and any(not float(n).is_integer() for n in numbers):
        return ProblemType.REGRESSION
    return ProblemType.SINGLE_LABEL


def _is_array(value: Any) -> bool:
    return hasattr(value, "tolist") and not isinstance(value, (str, bytes))  # numpy arrays from parquet


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return None if isinstance(value, float) and math.isnan(value) else float(value)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _parse(value: Any, where: str, kind: ProblemType, *, config: TrainingConfig, param: str) -> Any:
    column = config.label_column
    if kind == ProblemType.REGRESSION:
        number = _number(value)
        if number is None:
            raise DataError(f"{where}: {column!r} must be a number for regression, not {value!r}.", param=param)
        return number
    if kind == ProblemType.MULTI_LABEL:
        if _is_array(value):
            value = value.tolist()
        if isinstance(value, str):
            separator = config.label_separator
            value = [part for part in (value.split(separator) if separator else [value]) if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise DataError(f"{where}: {column!r} must be a list of labels for multi_label, "
                            f"not {formats.value_kind(value)}.", param=param)
        labels = [_single(v, where=where, column=column, param=param) for v in value]
        return sorted(set(labels))
    return _single(value, where=where, column=column, param=param)


def _single(value: Any, *, where: str, column: str, param: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(f"{where}: {column!r} is missing.", param=param)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: {column!r} is missing.", param=param)
        return value.strip()
    raise DataError(
        f"{where}: {column!r} must be a single label (string or number), not {formats.value_kind(value)}.", param=param
    )
