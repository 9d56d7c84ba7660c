"""Dataset files: recognising, checking and reading them, without torch.

The API process imports this module to check an upload, so it must never import torch or
transformers (a test guards it). Line numbers in messages are 1-based, counted the way a user sees
the file in an editor: a CSV header is line 1, and a record spanning several lines (a quoted
newline) is reported at the line where it starts. Parquet has no lines, so it reports rows.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.errors import DataError

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".zip": "zip"}

# csv's default cap (128 KiB) is too small for long documents in one cell.
csv.field_size_limit(64 * 1024 * 1024)


def dataset_format(filename: str) -> str:
    """The format of a dataset file from its name's extension.

    Args:
        filename: the file's name as uploaded (only the extension matters).

    Returns:
        "csv", "jsonl", "parquet" or "zip" (image folders, see core.datasets.images).

    Raises:
        DataError: code "invalid_file_format" for any other extension.
    """
    suffix = Path(filename).suffix.lower()
    if suffix not in FORMATS:
        raise DataError(
            f"Unsupported file type {suffix or '(none)'!r} for {filename!r}: "
            "use .csv, .jsonl (JSON Lines), .parquet, or .zip (image folders).",
            param="file",
            code="invalid_file_format",
        )
    return FORMATS[suffix]


def check_file(path: Path, fmt: str, *, param: str = "file") -> dict[str, Any]:
    """A cheap structural check of an uploaded file, streaming it once.

    Args:
        path: the file on disk.
        fmt: "csv", "jsonl", "parquet" or "zip" (see `dataset_format`).
        param: the request field to blame in errors.

    Returns:
        {"format", "rows", "columns"}; columns in file order (JSONL: union of keys, first seen first).
        A zip gets core.datasets.images.check_zip's {"format", "rows", "labels", "label_counts", ...}.

    Raises:
        DataError: invalid UTF-8, a CSV without header or with a ragged record, a JSONL line that is
            not a JSON object, an unreadable parquet file, no rows at all, or a malformed preference
            row (core.datasets.preference). Messages name the line.
            A zip: anything unsafe or unreadable, naming the member (see core.datasets.images).
    """
    if fmt == "zip":
        from core.datasets import images  # Pillow is only imported for image uploads

        return images.check_zip(path, param=param)
    from core.datasets import preference  # not at the top: core.datasets imports this module

    rows = 0
    columns: dict[str, None] = {}
    for where, record in located_records(path, fmt, param=param):
        rows += 1
        for key in record:
            columns.setdefault(key, None)
        if preference.is_preference(record):  # OpenAI's DPO rows are checked in full at upload, as OpenAI does
            preference.pair(record, where=where, param=param)
    if fmt in ("csv", "parquet"):
        columns = dict.fromkeys(header(path, fmt, param=param))
    if rows == 0:
        raise DataError(f"{path.name} has no data rows.", param=param)
    return {"format": fmt, "rows": rows, "columns": list(columns)}


def check_labels(train: Any, other: Any, *, param: str) -> None:
    """Every label of a validation/test set must be one the model is trained on.

    Args:
        train, other: dataset summaries (anything with a `.labels` list).

    Raises:
        DataError: code "unknown_label", naming (up to 10 of) the unknown labels.
    """
    unknown = sorted(set(other.labels) - set(train.labels))
    if unknown:
        shown = ", ".join(repr(x) for x in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise DataError(
            f"{len(unknown)} label(s) not in the training file: {shown}. "
            f"Training labels: {', '.join(repr(x) for x in train.labels[:20])}.",
            param=param,
            code="unknown_label",
        )


def sort_labels(labels: Counter[str] | set[str] | list[str]) -> list[str]:
    """Labels in a stable order: numerically when all are integers ("2" < "10"), else as strings."""
    unique = set(labels)
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


# ---------------------------------------------------------------------------------------------
# Reading


def value_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", type(None): "null"}.get(type(value), type(value).__name__)


def require_column(path: Path, header: list[str], column: str, *, param: str) -> None:
    """Raise a DataError (blaming `param`) when the file's `header` lacks `column`."""
    if column not in header:
        raise DataError(f"{path.name} has no column {column!r} (columns: {', '.join(header)}).", param=param)


def example_weight(value: Any, *, where: str, column: str, param: str) -> float:
    """A training row's loss weight (config.weight_column): a finite number, zero or more.

    Raises:
        DataError: a missing, non-numeric, negative or infinite weight, naming the row.
    """
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number < 0:
        shown = value_kind(value) if not isinstance(value, (str, int, float)) else repr(value)
        raise DataError(f"{where}: {column!r} must be a weight (a finite number >= 0), not {shown}.", param=param)
    return float(number)


def check_weights(weights: list[float], *, name: str, column: str) -> None:
    """Something must count: a training file whose every weight is 0 trains nothing.

    Raises:
        DataError: param config.weight_column.
    """
    if weights and not any(weights):
        raise DataError(f"Every {column!r} of {name} is 0: no row would count.", param="config.weight_column")


def records(path: Path, fmt: str, *, param: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number, record) for every record of the file."""
    if fmt == "csv":
        yield from _csv_records(path, param=param)
    elif fmt == "jsonl":
        yield from _jsonl_records(path, param=param)
    elif fmt == "parquet":
        yield from _parquet_records(path, param=param)
    else:
        raise DataError(f"Unknown dataset format {fmt!r}.", param=param, code="invalid_file_format")


def located_records(
    path: Path, fmt: str, *, param: str, required: tuple[str, ...] = ()
) -> Iterator[tuple[str, dict[str, Any]]]:
    """("line 3" or, for Parquet, "row 3", record) for every record, each holding the `required` keys.

    Raises:
        DataError: as `records`, or a record without a required key (naming its place and its keys).
    """
    unit = "row" if fmt == "parquet" else "line"
    for number, record in records(path, fmt, param=param):
        where = f"{unit} {number}"
        for key in required:
            if key not in record:
                raise DataError(f"{where}: no {key!r} field (keys: {', '.join(record)}).", param=param)
        yield where, record


def _lines(path: Path, *, param: str) -> Iterator[str]:
    """Decoded lines (newlines kept), failing on the first line that is not UTF-8."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"line {number}: not valid UTF-8 (byte {e.start + 1} of the line); save the file as UTF-8.",
                    param=param,
                ) from None


def _csv_reader(path: Path, *, param: str) -> Iterator[tuple[int, list[str]]]:
    """(starting line, fields) of each non-blank CSV record."""
    reader = csv.reader(_lines(path, param=param), strict=True)
    start = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"line {start}: malformed CSV ({e}).", param=param) from None
        if fields:  # csv yields [] for a blank line
            yield start, fields
        start = reader.line_num + 1


def _csv_records(path: Path, *, param: str) -> Iterator[tuple[int, dict[str, Any]]]:
    rows = _csv_reader(path, param=param)
    names = _csv_header(path, rows, param=param)
    for line, fields in rows:
        if len(fields) != len(names):
            raise DataError(
                f"line {line}: expected {len(names)} fields like the header, found {len(fields)}.", param=param
            )
        yield line, dict(zip(names, fields))


def _csv_header(path: Path, records: Iterator[tuple[int, list[str]]], *, param: str) -> list[str]:
    first = next(records, None)
    if first is None:
        raise DataError(f"{path.name} is empty.", param=param)
    line, header = first
    names = [h.strip() for h in header]
    if any(not h for h in names):
        raise DataError(f"line {line}: the CSV header has an empty column name.", param=param)
    duplicates = sorted({h for h in names if names.count(h) > 1})
    if duplicates:
        raise DataError(f"line {line}: duplicate column(s) in the CSV header: {', '.join(duplicates)}.", param=param)
    return names


def header(path: Path, fmt: str, *, param: str) -> list[str]:
    if fmt == "csv":
        return _csv_header(path, _csv_reader(path, param=param), param=param)
    return list(_parquet_file(path, param=param).schema_arrow.names)


def _jsonl_records(path: Path, *, param: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(_lines(path, param=param), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"line {number}: not valid JSON ({e.msg} at column {e.colno}).", param=param) from None
        if not isinstance(record, dict):
            raise DataError(
                f"line {number}: expected a JSON object per line (JSON Lines), found {value_kind(record)}.", param=param
            )
        yield number, record


def _parquet_file(path: Path, *, param: str):
    import pyarrow.parquet as pq  # pyarrow is heavy; only parquet uploads pay for it

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path.name} is not a readable parquet file ({e}).", param=param) from None


def _parquet_records(path: Path, *, param: str) -> Iterator[tuple[int, dict[str, Any]]]:
    file = _parquet_file(path, param=param)
    row = 0
    try:
        for batch in file.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"row {row + 1}: unreadable parquet data ({e}).", param=param) from None
