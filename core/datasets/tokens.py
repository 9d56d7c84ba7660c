"""Token-classification datasets: one sentence per row, as a list of words and a tag per word.

JSONL or Parquet rows like {"tokens": ["Alice", "lives", "in", "Paris"], "tags": ["B-PER", "O",
"O", "B-LOC"]} (keys config.tokens_column / config.tags_column). CSV cannot hold lists and is refused.

Tags are usually IOB2 (B-X opens an entity of type X, I-X continues it, O is outside). IOB1 (I-X
may open an entity), IOBES (E- ends, S- is a single-word entity) and plain tags ("PER", "O": a run
of the same tag is one entity) are accepted too; the scheme found is reported in
details["scheme"] and the metrics read entities the conlleval way, which covers all of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import formats
from core.datasets import DatasetSummary, ParsedFile
from core.errors import DataError
from core.spec import Task, TrainingConfig

OUTSIDE = "O"
PREFIXES = frozenset("BIES")


@dataclass(frozen=True)
class TaggedSentence:
    """One row: the words and their tags, equally long and never empty."""

    words: list[str]
    tags: list[str]


def inspect(path: Path, *, param: str, config: TrainingConfig) -> DatasetSummary:
    """Check every row; count tags, entities per type, and find the tagging scheme.

    Args:
        path: the dataset file (.jsonl or .parquet).
        param: the request field to blame in errors.
        config: tokens_column and tags_column.

    Returns:
        A DatasetSummary: labels are the tags ("O" first, then sorted), label_counts the words per
        tag; details has "scheme" (IOB2, IOB1, IOBES, IO or mixed), "entity_counts" (entities per
        type), "words" (total) and "max_words" (longest row).

    Raises:
        DataError: a CSV file, a missing key, words/tags that are not lists of strings, an empty
            row, or a row with a different number of words and tags (naming the line or row).
    """
    return summarize(_sentences(path, param=param, config=config))


def summarize(sentences: Iterable[TaggedSentence]) -> DatasetSummary:
    """The summary of checked rows (see `inspect`)."""
    tag_counts: Counter[str] = Counter()
    entity_counts: Counter[str] = Counter()
    prefixes: set[str] = set()
    opens_with_inside = False
    rows = words = max_words = 0
    for sentence in sentences:
        rows += 1
        words += len(sentence.words)
        max_words = max(max_words, len(sentence.words))
        tag_counts.update(sentence.tags)
        previous = OUTSIDE
        for tag in sentence.tags:
            prefix, kind = split_tag(tag)
            prefixes.add(prefix)
            if kind is not None and starts_entity(previous, tag):
                entity_counts[kind] += 1
                opens_with_inside |= prefix == "I"
            previous = tag
    labels = sort_tags(tag_counts)
    details: dict[str, Any] = {
        "scheme": _scheme(prefixes, opens_with_inside),
        "entity_counts": dict(sorted(entity_counts.items())),
        "words": words,
        "max_words": max_words,
    }
    return DatasetSummary(
        task=Task.TOKEN_CLASSIFICATION,
        rows=rows,
        labels=labels,
        label_counts={tag: tag_counts[tag] for tag in labels},
        details=details,
    )


def check_trainable(train: DatasetSummary, *, param: str = "training_file") -> None:
    """A tagger needs at least two tags to learn from.

    Raises:
        DataError: the training file uses a single tag.
    """
    if len(train.labels or []) < 2:
        raise DataError(
            f"Every word of the training file is tagged {(train.labels or ['?'])[0]!r}; "
            "token classification needs at least two tags.",
            param=param,
        )


def check_split(train: DatasetSummary, other: DatasetSummary, *, param: str) -> None:
    """Every tag of a validation/test file must be one the model is trained on.

    Raises:
        DataError: code "unknown_label", naming the unknown tags.
    """
    formats.check_labels(train, other, param=param)


def parse(path: Path, *, param: str, config: TrainingConfig) -> ParsedFile:
    """One pass over the file: its rows (see `read`) and their summary (see `inspect`).

    Raises:
        DataError: as `inspect`.
    """
    sentences = list(_sentences(path, param=param, config=config))
    return ParsedFile(rows=sentences, summary=summarize(sentences))


def read(path: Path, *, param: str, config: TrainingConfig) -> list[TaggedSentence]:
    """All rows, checked as in `inspect`.

    Raises:
        DataError: as `inspect`.
    """
    return parse(path, param=param, config=config).rows


def split_tag(tag: str) -> tuple[str, str | None]:
    """(prefix, entity type) of a tag: "B-PER" -> ("B", "PER"), "O" -> ("O", None), "PER" -> ("", "PER")."""
    if tag == OUTSIDE:
        return OUTSIDE, None
    if len(tag) > 2 and tag[1] == "-" and tag[0] in PREFIXES:
        return tag[0], tag[2:]
    return "", tag


def starts_entity(previous: str, tag: str) -> bool:
    """Whether `tag` opens a new entity after `previous`, the conlleval way (any scheme).

    B- and S- always open one; I-, E- and plain tags open one unless the previous word belongs to
    an entity of the same type that is still open (not ended by E- or S-).
    """
    prefix, kind = split_tag(tag)
    if kind is None:
        return False
    if prefix in ("B", "S"):
        return True
    previous_prefix, previous_kind = split_tag(previous)
    return previous_kind != kind or previous_prefix in ("E", "S")


def sort_tags(tags: Counter[str] | set[str] | list[str]) -> list[str]:
    """Tags in id order: "O" first (when present), then the rest sorted."""
    unique = set(tags)
    return ([OUTSIDE] if OUTSIDE in unique else []) + sorted(unique - {OUTSIDE})


# ---------------------------------------------------------------------------------------------


def _scheme(prefixes: set[str], opens_with_inside: bool) -> str:
    """The tagging scheme that explains the prefixes seen."""
    prefixes = prefixes - {OUTSIDE}
    if "" in prefixes:
        return "IO" if prefixes == {""} else "mixed"
    if prefixes & {"E", "S"}:
        return "IOBES"
    return "IOB1" if opens_with_inside else "IOB2"


def _sentences(path: Path, *, param: str, config: TrainingConfig) -> Iterator[TaggedSentence]:
    fmt = formats.dataset_format(path.name)
    if fmt == "csv":
        raise DataError(
            f"{path.name}: token classification needs lists of words and tags per row; "
            "use JSON Lines (.jsonl) or Parquet, not CSV.",
            param=param,
            code="invalid_file_format",
        )
    tokens_column, tags_column = config.tokens_column, config.tags_column
    rows = 0
    for where, record in formats.located_records(path, fmt, param=param, required=(tokens_column, tags_column)):
        words = _strings(record[tokens_column], where=where, column=tokens_column, what="word", param=param)
        tags = [t.strip() for t in _strings(record[tags_column], where=where, column=tags_column, what="tag", param=param)]
        if not words:
            raise DataError(f"{where}: {tokens_column!r} is empty.", param=param)
        if len(words) != len(tags):
            raise DataError(
                f"{where}: {len(words)} words but {len(tags)} tags; {tags_column!r} needs one tag per word.",
                param=param,
            )
        rows += 1
        yield TaggedSentence(words=words, tags=tags)
    if rows == 0:
        raise DataError(f"{path.name} has no data rows.", param=param)


def _strings(value: Any, *, where: str, column: str, what: str, param: str) -> list[str]:
    """A list of non-blank strings, or a DataError naming the first bad item."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy arrays, should a Parquet reader hand them out
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: {column!r} must be a list of {what}s, not {formats.value_kind(value)}.", param=param)
    for index, item in enumerate(value, start=1):
        if not isinstance(item, str):
            raise DataError(
                f"{where}: {what} {index} of {column!r} must be a string, not {formats.value_kind(item)}.", param=param
            )
        # A blank word would vanish in tokenization and take its tag with it.
        if not item.strip():
            raise DataError(f"{where}: {what} {index} of {column!r} is blank.", param=param)
    return list(value)
