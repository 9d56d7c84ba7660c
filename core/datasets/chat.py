"""causal-lm datasets: chat conversations, prompt/completion pairs, Alpaca rows and plain text.

Torch-free (see core.datasets). Each row of a JSONL, CSV or Parquet file is one of these shapes,
recognised by its keys (rows of different shapes may be mixed in one file):

    messages            {"messages": [{"role": "system"|"user"|"assistant", "content": str,
                                        "weight": 0|1 (assistant only, optional)}, ...]}
                        OpenAI's chat fine-tuning format; in a CSV cell, the list as JSON.
    prompt_completion   {"prompt": str, "completion": str}
    alpaca              {"instruction": str, "input": str (optional, may be empty), "output": str}
    text                {config.text_column: str}: plain text, every token learned
    preference          {"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}
                        OpenAI's DPO rows (core.datasets.preference), for method.type "dpo" only

Every row is checked, and a DataError names the request field and the line (row for Parquet).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import formats
from core.datasets import DatasetSummary, ParsedFile, preference
from core.errors import DataError
from core.spec import Task, TrainingConfig

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = {"role", "content", "weight", "name"}  # "name" is OpenAI's; templates ignore it
SHAPES = ("messages", "prompt_completion", "alpaca", "text", "preference")


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str
    weight: int = 1  # OpenAI's per-message weight: 0 keeps an assistant message out of the loss


@dataclass(frozen=True)
class Conversation:
    """One row, normalised: prompt/completion and Alpaca rows become a user/assistant exchange."""

    where: str  # "line 12" (JSONL/CSV) or "row 12" (Parquet): where errors point
    shape: str  # one of SHAPES: how the row was written
    messages: tuple[Message, ...] = ()  # empty for text rows
    text: str | None = None  # text rows only


def inspect(path: Path, *, param: str, config: TrainingConfig) -> DatasetSummary:
    """One full pass over a causal-lm file, every row checked.

    Args:
        path: the dataset file (.jsonl, .csv or .parquet).
        param: the request field to blame ("training_file", ...).
        config: the job's config (config.text_column names the text of plain-text rows).

    Returns:
        As `summarize`.

    Raises:
        DataError: an unreadable file, no rows, or a bad row (see `read`).
    """
    return summarize(_conversations(path, param=param, config=config))


def summarize(conversations: Iterable[Conversation]) -> DatasetSummary:
    """The summary of checked rows: labels None, details {"shapes": {shape: rows}, "messages": n,
    "assistant_messages": n} (prompt/completion and Alpaca rows count as two messages)."""
    shapes: Counter[str] = Counter()
    messages = assistant_messages = 0
    for conversation in conversations:
        shapes[conversation.shape] += 1
        messages += len(conversation.messages)
        assistant_messages += sum(m.role == "assistant" for m in conversation.messages)
    return DatasetSummary(
        task=Task.CAUSAL_LM,
        rows=sum(shapes.values()),
        labels=None,
        details={
            "shapes": {shape: shapes[shape] for shape in SHAPES if shapes[shape]},
            "messages": messages,
            "assistant_messages": assistant_messages,
        },
    )


def check_method(method: str, summaries: dict[str, DatasetSummary]) -> None:
    """Preference rows for a DPO job, and only for one: each file's row shapes against the method.

    Raises:
        DataError: naming the file (param) and what its rows are.
    """
    for param, summary in summaries.items():
        shapes = summary.details.get("shapes", {})
        if method == "dpo" and set(shapes) != {"preference"}:
            other = sorted(set(shapes) - {"preference"})
            raise DataError(
                f"A DPO job (method.type dpo) trains on preference rows (input, preferred_output, "
                f"non_preferred_output); this file has {sum(shapes[s] for s in other)} {' and '.join(other)} row(s).",
                param=param)
        if method != "dpo" and "preference" in shapes:
            raise DataError(
                f"This file has {shapes['preference']} preference row(s) (preferred_output / non_preferred_output): "
                "those train with method.type dpo; a supervised job needs chats, prompt/completion, Alpaca or text rows.",
                param=param)


def check_split(train: DatasetSummary, other: DatasetSummary, *, param: str) -> None:
    """Nothing to compare: a causal LM has no label set, and every row shape trains the same model.

    Kept for the reader contract of core.datasets; `inspect` has already checked `other` in full.
    """


def parse(path: Path, *, param: str, config: TrainingConfig) -> ParsedFile:
    """One pass over the file: its rows as Conversations (see `read`) and their summary (see `inspect`).

    Raises:
        DataError: as `read`.
    """
    conversations = list(_conversations(path, param=param, config=config))
    return ParsedFile(rows=conversations, summary=summarize(conversations))


def read(path: Path, *, param: str, config: TrainingConfig) -> list[Conversation]:
    """Every row of the file as a Conversation, checked as in `inspect`.

    Raises:
        DataError: an unreadable file, no rows, or a row with an unknown shape, an unknown role,
            empty or non-string content, no assistant message, a conversation that does not end
            with the assistant, or a weight other than 0/1 (naming the line).
    """
    return parse(path, param=param, config=config).rows


# ---------------------------------------------------------------------------------------------


def _conversations(path: Path, *, param: str, config: TrainingConfig) -> Iterator[Conversation]:
    try:
        fmt = formats.dataset_format(path.name)
    except DataError as e:  # it blames "file"; here the request field is known
        raise DataError(e.message, param=param, code=e.code) from None
    rows = 0
    for where, record in formats.located_records(path, fmt, param=param):
        rows += 1
        yield _conversation(record, where=where, param=param, config=config)
    if rows == 0:
        raise DataError(f"{path.name} has no data rows.", param=param)


def _conversation(record: dict[str, Any], *, where: str, param: str, config: TrainingConfig) -> Conversation:
    """The row's shape from its keys, then its fields checked (a preference row is a PreferencePair)."""
    if preference.is_preference(record):
        return preference.pair(record, where=where, param=param)  # type: ignore[return-value]
    if "messages" in record:
        messages = _messages(record["messages"], where=where, param=param)
        return Conversation(where=where, shape="messages", messages=messages)
    if "prompt" in record and "completion" in record:
        prompt = _string(record, "prompt", where=where, param=param)
        completion = _string(record, "completion", where=where, param=param)
        return Conversation(where=where, shape="prompt_completion", messages=_exchange(prompt, completion))
    if "instruction" in record and "output" in record:
        instruction = _string(record, "instruction", where=where, param=param)
        extra = _string(record, "input", where=where, param=param, required=False)
        output = _string(record, "output", where=where, param=param)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Conversation(where=where, shape="alpaca", messages=_exchange(prompt, output))
    if config.text_column in record:
        return Conversation(where=where, shape="text", text=_string(record, config.text_column, where=where, param=param))
    raise DataError(
        f"{where}: not a causal-lm row (keys: {', '.join(record) or 'none'}). Use \"messages\" (OpenAI chat), "
        f"\"prompt\" + \"completion\", \"instruction\" + \"output\" (Alpaca), or {config.text_column!r} "
        "(plain text, see config.text_column).",
        param=param,
    )


def _exchange(prompt: str, completion: str) -> tuple[Message, ...]:
    return (Message("user", prompt), Message("assistant", completion))


def message_list(value: Any, *, key: str, where: str, param: str) -> tuple[Message, ...]:
    """A non-empty list of checked messages (a CSV cell holds it as JSON), `key` naming it in errors."""
    if isinstance(value, str):  # a CSV cell holds the list as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: \"{key}\" is not valid JSON ({e.msg}).", param=param) from None
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: \"{key}\" must be a non-empty list of messages.", param=param)
    label = "message" if key == "messages" else f"{key} message"
    return tuple(_message(item, where=f"{where}, {label} {i + 1}", param=param) for i, item in enumerate(value))


def _messages(value: Any, *, where: str, param: str) -> tuple[Message, ...]:
    messages = message_list(value, key="messages", where=where, param=param)
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message; there is nothing to learn from this conversation.", param=param)
    if messages[-1].role != "assistant":
        raise DataError(
            f"{where}: the last message is the {messages[-1].role}'s; a conversation must end with the "
            "assistant (nothing after the last assistant message is learned).",
            param=param,
        )
    return messages


def _message(item: Any, *, where: str, param: str) -> Message:
    if not isinstance(item, dict):
        raise DataError(f"{where}: a message must be an object with \"role\" and \"content\".", param=param)
    unknown = sorted(set(item) - MESSAGE_KEYS)
    if unknown:
        raise DataError(
            f"{where}: unsupported key(s) {', '.join(repr(k) for k in unknown)}; a message has role, content "
            "and optionally weight (tool calls are not supported).",
            param=param,
        )
    role = item.get("role")
    if role not in ROLES:
        raise DataError(f"{where}: unknown role {role!r}; use one of {', '.join(ROLES)}.", param=param)
    content = _string(item, "content", where=where, param=param)
    weight = item.get("weight")  # null: absent (Parquet structs give every message every field)
    if weight is None:
        return Message(role, content)
    if role != "assistant":
        raise DataError(f"{where}: \"weight\" applies to assistant messages only.", param=param)
    if isinstance(weight, bool) or weight not in (0, 1):
        raise DataError(f"{where}: \"weight\" must be 0 or 1, not {weight!r}.", param=param)
    return Message(role, content, int(weight))


def _string(record: dict[str, Any], key: str, *, where: str, param: str, required: bool = True) -> str:
    """A string field; an optional one (Alpaca's input) may be absent, null or empty."""
    value = record.get(key)
    if not required and (value is None or (isinstance(value, float) and math.isnan(value))):
        return ""
    if not isinstance(value, str):
        kind = {dict: "an object", list: "a list", type(None): "null"}.get(type(value), type(value).__name__)
        raise DataError(f"{where}: {key!r} must be a string, not {kind}.", param=param)
    if required and not value.strip():
        raise DataError(f"{where}: {key!r} is empty.", param=param)
    return value
