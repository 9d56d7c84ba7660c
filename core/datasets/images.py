"""Image-classification datasets: a .zip of label folders, or Parquet with image bytes and labels.

A zip holds one folder per label with the images inside (`cat/001.png`), optionally all under a
single top folder (`pets/cat/001.png`); `__MACOSX/` and dotfiles are skipped. A Parquet file has
config.image_column with the encoded image (raw bytes, or the Hugging Face datasets struct
{"bytes", "path"}) and config.label_column with the label.

The zip is user input, so it is judged from its index before a byte is decompressed (core.archives'
checks, shared with model archives: member count, total size, compression ratio, names that could
escape a folder, links, encryption; the size of one image is checked here) and never extracted to
disk: members are read into memory one at a time, each no larger than the index promised. Every image must open with Pillow, restricted to a few plain formats (no
Ghostscript-backed EPS and the like), stay under MAX_IMAGE_PIXELS (decompression bombs), and pass
`Image.verify`; errors name the member (or Parquet row). This module imports no torch.
"""

from __future__ import annotations

import io
import lzma
import math
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import archives, formats
from core.datasets import DatasetSummary, ParsedFile, weighted
from core.errors import DataError
from core.spec import Task, TrainingConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# The only Pillow decoders that touch user bytes (JPEG covers cameras' multi-picture MPO files too).
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")

# Caps on a zip, checked from its index before anything is read (module constants so tests can lower
# them); the compression ratio's is core.archives'.
MAX_MEMBERS = 1_000_000
MAX_TOTAL_BYTES = 32 * 1024**3  # uncompressed, all members together
MAX_MEMBER_BYTES = 256 * 1024**2  # one image
MAX_IMAGE_PIXELS = 50_000_000  # width x height of one image (e.g. 8000 x 6250)

PARQUET_BATCH_ROWS = 256


@dataclass(frozen=True)
class ImageRow:
    """One example as read from the file: the encoded image, its label and where it came from."""

    data: bytes  # the encoded image (PNG, JPEG, ...), as stored
    label: str
    where: str  # the zip member's path or "row N", for error messages
    weight: float | None = None  # the training file's config.weight_column (Parquet)


def inspect(path: Path, *, param: str, config: TrainingConfig) -> DatasetSummary:
    """Check every image (opens, verifies, size within MAX_IMAGE_PIXELS) and count the labels.

    Args:
        path: a .zip of label folders, or a .parquet file.
        param: the request field to blame in errors ("training_file", ...).
        config: image_column and label_column (Parquet).

    Returns:
        A DatasetSummary; labels sorted with core.formats.sort_labels; details hold the format, the
        smallest and largest image ("WxH" by area) and, for a zip, the top folder that was skipped.

    Raises:
        DataError: an unsafe or unreadable zip, a bad image (naming the member or row), a missing
            column or label, or no images at all.
    """
    return _summarize(path, _format(path, param=param), param=param, config=config)


def parse(path: Path, *, param: str, config: TrainingConfig) -> ParsedFile:
    """One pass over the file: its rows (see `read`) and their summary (see `inspect`).

    Raises:
        DataError: as `inspect`.
    """
    rows: list[ImageRow] = []
    summary = _summarize(path, _format(path, param=param), param=param, config=config, keep=rows)
    weights = [row.weight for row in rows] if weighted(param, config) else None
    return ParsedFile(rows=rows, summary=summary, weights=weights)


def _summarize(path: Path, fmt: str, *, param: str, config: TrainingConfig,
               keep: list[ImageRow] | None = None) -> DatasetSummary:
    """Every image checked and counted; appended to `keep` when given (else only the summary stays)."""
    counts: Counter[str] = Counter()
    sizes: list[tuple[int, int]] = []
    details: dict[str, Any] = {"format": fmt}
    weights: list[float] = []
    for row in _rows(path, fmt, param=param, config=config, details=details):
        sizes.append(check_image(row.data, where=row.where, param=param))
        counts[row.label] += 1
        weights.append(row.weight or 0.0)
        if keep is not None:
            keep.append(row)
    if not sizes:
        raise DataError(f"{path.name} has no images.", param=param)
    if weighted(param, config):
        formats.check_weights(weights, name=path.name, column=str(config.weight_column))
    smallest = min(sizes, key=lambda s: s[0] * s[1])
    largest = max(sizes, key=lambda s: s[0] * s[1])
    details |= {"smallest": f"{smallest[0]}x{smallest[1]}", "largest": f"{largest[0]}x{largest[1]}"}
    labels = formats.sort_labels(counts)
    return DatasetSummary(
        task=Task.IMAGE_CLASSIFICATION, rows=len(sizes), labels=labels,
        label_counts={label: counts[label] for label in labels}, details=details,
    )


def check_trainable(train: DatasetSummary, *, param: str = "training_file") -> None:
    """A classifier needs at least two labels to learn from.

    Raises:
        DataError: the training file has a single label.
    """
    if len(train.labels or []) < 2:
        raise DataError(
            f"The training file has a single label ({(train.labels or ['?'])[0]!r}); "
            "classification needs at least two (one folder per label).",
            param=param,
        )


def check_split(train: DatasetSummary, other: DatasetSummary, *, param: str) -> None:
    """Every label of a validation/test file must be one the model is trained on.

    Raises:
        DataError: code "unknown_label", naming the unknown labels.
    """
    formats.check_labels(train, other, param=param)


def read(path: Path, *, param: str, config: TrainingConfig) -> list[ImageRow]:
    """All images with their labels, in file order, each checked as in `inspect`.

    Raises:
        DataError: as `inspect`.
    """
    return parse(path, param=param, config=config).rows


def check_zip(path: Path, *, param: str = "file") -> dict[str, Any]:
    """The upload-time check of a zip dataset (core.formats.check_file): the full `inspect`.

    Args:
        path: the zip, whatever its file name (uploads are checked before they are renamed).
        param: the request field to blame in errors.

    Returns:
        {"format": "zip", "rows", "labels", "label_counts", "smallest", "largest"}.

    Raises:
        DataError: as `inspect`.
    """
    summary = _summarize(path, "zip", param=param, config=TrainingConfig())
    return {
        "format": "zip", "rows": summary.rows, "labels": summary.labels, "label_counts": summary.label_counts,
        "smallest": summary.details["smallest"], "largest": summary.details["largest"],
    }


def check_image(data: bytes, *, where: str, param: str) -> tuple[int, int]:
    """Whether `data` is an image Pillow can read safely; cheap (`verify` decodes no pixels).

    Returns:
        (width, height).

    Raises:
        DataError: not one of PIL_FORMATS, over MAX_IMAGE_PIXELS, or failing `Image.verify`.
    """
    with _open_image(data, where=where, param=param) as image:
        size = image.size
        try:
            image.verify()
        except Exception as e:  # Pillow raises many types (SyntaxError, OSError, struct.error ...) for bad data
            raise DataError(f"{where}: not a readable image ({e}).", param=param) from None
    return size


def load_rgb(row: ImageRow, *, param: str):
    """The image of `row`, fully decoded, as an RGB PIL image (alpha dropped, grayscale expanded).

    Raises:
        DataError: as `check_image`, or pixel data that fails to decode (a truncated file).
    """
    with _open_image(row.data, where=row.where, param=param) as image:
        try:
            return image.convert("RGB")
        except Exception as e:  # decoding errors surface only here for JPEG and friends
            raise DataError(f"{row.where}: not a readable image ({e}).", param=param) from None


# ---------------------------------------------------------------------------------------------
# Rows


def _format(path: Path, *, param: str) -> str:
    if path.suffix.lower() == ".zip":
        return "zip"
    if path.suffix.lower() == ".parquet":
        return "parquet"
    raise DataError(
        f"Image datasets are a .zip of label folders or a .parquet file with image bytes, not {path.name!r}.",
        param=param, code="invalid_file_format",
    )


def _rows(path: Path, fmt: str, *, param: str, config: TrainingConfig,
          details: dict[str, Any] | None = None) -> Iterator[ImageRow]:
    """Every row of a "zip" or "parquet" file; for a zip, `details` gets the top folder skipped (if any)."""
    if fmt == "zip":
        if weighted(param, config):
            raise DataError(f"{path.name} is a zip of label folders, which has no column for weights: "
                            "give the images as Parquet to weigh them.", param="config.weight_column")
        yield from _zip_rows(path, param=param, details={} if details is None else details)
    else:
        yield from _parquet_rows(path, param=param, config=config, weighted=weighted(param, config))


def _zip_rows(path: Path, *, param: str, details: dict[str, Any]) -> Iterator[ImageRow]:
    """The images of a zip dataset, the index checked in full before the first member is read."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path.name} is not a readable zip file ({e}).", param=param) from None
    with archive:
        images = _zip_images(archive.infolist(), param=param)
        strip = _layout_depth(images, param=param) - 2
        if strip:
            details["top_folder"] = images[0][1][0]
        for info, parts in images:
            yield ImageRow(data=_read_member(archive, info, param=param), label=parts[strip], where=info.filename)


def _zip_images(infos: list[zipfile.ZipInfo], *, param: str) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """The image members with their checked path parts; raises on anything unsafe or unexpected."""
    archives.check_size(len(infos), sum(info.file_size for info in infos), max_members=MAX_MEMBERS,
                        max_bytes=MAX_TOTAL_BYTES, param=param, code=None)
    images: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
    for info in infos:
        name = info.filename
        parts = archives.safe_parts(name, param=param, code=None)
        if parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts) or name.endswith("/"):
            continue
        archives.check_zip_member(info, param=param, code=None)
        if info.file_size > MAX_MEMBER_BYTES:
            raise DataError(f"{name}: {info.file_size} bytes; at most {MAX_MEMBER_BYTES} per image.", param=param)
        if not parts[-1].lower().endswith(IMAGE_SUFFIXES):
            raise DataError(
                f"{name}: not an image file; a zip dataset holds only {', '.join(IMAGE_SUFFIXES)} files "
                "in one folder per label.", param=param,
            )
        images.append((info, parts))
    archives.check_unique(((info.filename, parts) for info, parts in images), param=param, code=None)
    return images


def _layout_depth(images: list[tuple[zipfile.ZipInfo, tuple[str, ...]]], *, param: str) -> int:
    """2 for label/image, 3 for top/label/image (whichever most members have); raises naming the
    first member that does not fit, or the top folders when there are several."""
    depths = Counter(len(parts) for _, parts in images)
    depth = 3 if depths[3] > depths[2] else 2
    tops = sorted({parts[0] for _, parts in images if len(parts) == 3})
    if depth == 3 and len(tops) > 1:
        raise DataError(
            f"The zip has several top folders ({', '.join(tops[:5])}); put the label folders at its top, "
            "or all inside one folder.", param=param,
        )
    for info, parts in images:
        if len(parts) != depth:
            raise DataError(
                f"{info.filename}: expected label/image paths (e.g. cat/001.png), optionally all inside "
                "one top folder (e.g. pets/cat/001.png).", param=param,
            )
    return depth


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, *, param: str) -> bytes:
    """A member's bytes; zipfile stops at the size the index gave and checks the CRC."""
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, NotImplementedError, RuntimeError) as e:
        raise DataError(f"{info.filename}: corrupt zip member ({e}).", param=param) from None


def _parquet_rows(path: Path, *, param: str, config: TrainingConfig, weighted: bool) -> Iterator[ImageRow]:
    import pyarrow.parquet as pq  # heavy; only Parquet datasets pay for it

    image_column, label_column, weight_column = config.image_column, config.label_column, config.weight_column
    header = formats.header(path, "parquet", param=param)
    for column in (image_column, label_column):
        formats.require_column(path, header, column, param=param)
    if weighted:
        formats.require_column(path, header, weight_column, param="config.weight_column")
    columns = [image_column, label_column, *([weight_column] if weighted else [])]
    row = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
        for batch in batches:
            weights = batch.column(2).to_pylist() if weighted else [None] * batch.num_rows
            for image, label, weight in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), weights):
                row += 1
                where = f"row {row}"
                yield ImageRow(
                    data=_image_bytes(image, where=where, column=image_column, param=param),
                    label=_label(label, where=where, column=label_column, param=param),
                    where=where,
                    weight=(formats.example_weight(weight, where=where, column=str(weight_column), param=param)
                            if weighted else None),
                )
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt data
        raise DataError(f"row {row + 1}: unreadable parquet data ({e}).", param=param) from None


def _image_bytes(value: Any, *, where: str, column: str, param: str) -> bytes:
    """The encoded image of a Parquet cell: bytes, or datasets' {"bytes", "path"} with bytes set.

    A path alone is refused: it names a file on the uploader's machine, and reading paths taken from
    user data would let a dataset read files on ours.
    """
    if isinstance(value, dict):
        if value.get("bytes") is None:
            raise DataError(
                f"{where}: {column!r} has no image bytes (a path alone, {value.get('path')!r}, is not read); "
                "embed the images, e.g. with datasets' cast_column(Image()) before to_parquet.", param=param,
            )
        value = value["bytes"]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise DataError(
        f"{where}: {column!r} must hold encoded image bytes (or {{'bytes', 'path'}}), not {formats.value_kind(value)}.",
        param=param,
    )


def _label(value: Any, *, where: str, column: str, param: str) -> str:
    """A class label as text: strings stripped, integral numbers without ".0"."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    if isinstance(value, float) and not math.isnan(value):
        return str(value)
    if value is None or isinstance(value, (str, float)):
        raise DataError(f"{where}: {column!r} is missing.", param=param)
    raise DataError(f"{where}: {column!r} must be a single label (string or number), not {formats.value_kind(value)}.",
                    param=param)


@contextmanager
def _open_image(data: bytes, *, where: str, param: str) -> Iterator[Any]:
    """`Image.open` of encoded bytes with the safety checks; the image is closed on exit."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; make it an error as well.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DataError(f"{where}: image too large ({e}).", param=param) from None
        except UnidentifiedImageError:
            raise DataError(
                f"{where}: not a readable image (PNG, JPEG, WebP or BMP expected).", param=param
            ) from None
        except Exception as e:  # a recognised format with a broken header
            raise DataError(f"{where}: not a readable image ({e}).", param=param) from None
    try:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise DataError(f"{where}: {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} per image.", param=param)
        yield image
    finally:
        image.close()
