"""Preference rows for DPO (method.type "dpo"), as OpenAI writes them.

Torch-free (see core.datasets). One row of a JSONL, CSV or Parquet file:

    {"input": {"messages": [...], "tools": [], "parallel_tool_calls": true},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

`input.messages` is the prompt: chat messages as in core.datasets.chat, ending with the user's (or
the system's) turn. Each output is exactly one assistant message, as OpenAI requires. Tools are not
supported: `tools` must be absent or empty, and `parallel_tool_calls` (which only concerns tools)
is then allowed and has nothing to act on. In a CSV, each of the three cells holds its JSON.
The causal-lm reader (core.datasets.chat) reads these rows as the shape "preference".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from core.errors import DataError

KEYS = {"input", "preferred_output", "non_preferred_output"}
INPUT_KEYS = {"messages", "tools", "parallel_tool_calls"}


@dataclass(frozen=True)
class PreferencePair:
    """One checked preference row: the prompt, and the preferred and non-preferred answers."""

    where: str  # "line 12" / "row 12"
    prompt: tuple[Any, ...]  # core.datasets.chat.Message, the user's turn last
    preferred: Any  # the assistant's Message
    rejected: Any

    shape = "preference"

    @property
    def messages(self) -> tuple[Any, ...]:
        """The prompt's messages and the preferred answer (what a summary counts)."""
        return (*self.prompt, self.preferred)

    def conversations(self) -> tuple[Any, Any]:
        """(prompt + preferred, prompt + non-preferred) as chat Conversations whose only learned
        message is the answer: earlier assistant turns in the prompt get weight 0."""
        from core.datasets.chat import Conversation, Message

        prompt = tuple(Message(m.role, m.content, 0) if m.role == "assistant" else m for m in self.prompt)
        return tuple(Conversation(where=self.where, shape="messages", messages=(*prompt, answer))
                     for answer in (self.preferred, self.rejected))  # type: ignore[return-value]


def is_preference(record: dict[str, Any]) -> bool:
    return "preferred_output" in record or "non_preferred_output" in record


def pair(record: dict[str, Any], *, where: str, param: str) -> PreferencePair:
    """The row checked as a preference pair.

    Raises:
        DataError: naming the line and the field: a missing or unknown key, a prompt that is not a
            list of messages or ends with the assistant, tools, or an output that is not exactly
            one assistant message with text content.
    """
    from core.datasets.chat import message_list

    missing = sorted(KEYS - set(record))
    if missing:
        raise DataError(f"{where}: a preference row needs {', '.join(map(repr, missing))} "
                        "(input, preferred_output and non_preferred_output).", param=param)
    unknown = sorted(set(record) - KEYS)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} in a preference row.", param=param)
    given = _json(record["input"], "input", where=where, param=param)
    if not isinstance(given, dict):
        raise DataError(f"{where}: \"input\" must be an object with \"messages\".", param=param)
    if sorted(set(given) - INPUT_KEYS):
        raise DataError(f"{where}: unknown key(s) {', '.join(map(repr, sorted(set(given) - INPUT_KEYS)))} in "
                        "\"input\"; it holds messages (and an empty tools list).", param=param)
    if given.get("tools"):
        raise DataError(f"{where}: \"input.tools\": tools are not supported; leave the list empty.", param=param)
    prompt = message_list(given.get("messages"), key="input.messages", where=where, param=param)
    if prompt[-1].role == "assistant":
        raise DataError(f"{where}: \"input.messages\" ends with the assistant's message; the prompt must end with "
                        "the user's turn, and the answers come in preferred_output and non_preferred_output.",
                        param=param)
    preferred, rejected = (_answer(record[key], key, where=where, param=param)
                           for key in ("preferred_output", "non_preferred_output"))
    return PreferencePair(where=where, prompt=prompt, preferred=preferred, rejected=rejected)


def _answer(value: Any, key: str, *, where: str, param: str) -> Any:
    from core.datasets.chat import message_list

    messages = message_list(value, key=key, where=where, param=param)  # a CSV cell's JSON is read there
    if len(messages) != 1 or messages[0].role != "assistant":
        raise DataError(f"{where}: \"{key}\" must be exactly one assistant message.", param=param)
    if messages[0].weight != 1:
        raise DataError(f"{where}: \"{key}\": an answer takes no \"weight\".", param=param)
    return messages[0]


def _json(value: Any, key: str, *, where: str, param: str) -> Any:
    """A field as given, or a CSV cell's JSON."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: \"{key}\" is not valid JSON ({e.msg}).", param=param) from None
