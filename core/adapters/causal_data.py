"""causal-lm examples as the model sees them: rendered text, token ids, labels, packed rows.

Rendering. A chat row is rendered with the tokenizer's own chat template; prompt/completion and
Alpaca rows become a user/assistant exchange (or prompt + completion + eos for a tokenizer without
a template); a text row is text + eos. Only what the assistant says (its content and end-of-turn
token) is learned unless config.train_on_inputs: every other label is IGNORE. The assistant's
character spans come from rendering the conversation prefix by prefix (the text before the
assistant's turn is the rendering of the earlier messages with the generation prompt); the tokens
of the full rendering that overlap a span are the targets. The first token of every example has
label IGNORE: nothing precedes it, and in a packed row it must not be predicted from the previous
example's last token.

Packing fills training rows of at most max_length tokens with whole examples (best-fit
decreasing) and restarts the position ids at 0 for each (see core.adapters.causal_lm for how the
model is then kept from attending across examples).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from core.adapters.base import Split
from core.datasets import chat
from core.errors import DataError, ModelError

IGNORE = -100  # the label cross-entropy skips


@dataclass
class Rendered:
    """A row as one string, with the character spans of what the assistant says."""

    text: str
    spans: list[tuple[int, int, bool]]  # (start, end, learned): weight-1 turns True, weight-0 False
    special_tokens: bool  # let the tokenizer add its own (BOS); a chat template writes its own
    eos: bool  # append eos as a target (plain renderings: it teaches where a completion ends)


def render(tokenizer, conversation: chat.Conversation, *, param: str) -> Rendered:
    """The text the model sees for one row, and which characters are targets.

    Raises:
        ModelError: a chat row for a tokenizer without a chat template.
        DataError: a conversation the chat template rejects, or renders differently prefix by prefix.
    """
    if conversation.text is not None:
        return Rendered(conversation.text, [(0, len(conversation.text), True)], special_tokens=True, eos=True)
    if tokenizer.chat_template:
        return _render_chat(tokenizer, conversation, param=param)
    if conversation.shape == "messages":
        raise ModelError(
            "The model's tokenizer has no chat template, so chat (messages) rows cannot be rendered; use "
            "prompt/completion rows or a model with a chat template.",
            param="model",
            code="invalid_model",
        )
    prompt, answer = conversation.messages
    # OpenAI's legacy prompt/completion format is plain concatenation; Alpaca needs a separator.
    prompt_text = prompt.content + ("\n\n" if conversation.shape == "alpaca" else "")
    text = prompt_text + answer.content
    return Rendered(text, [(len(prompt_text), len(text), True)], special_tokens=True, eos=True)


def _render_chat(tokenizer, conversation: chat.Conversation, *, param: str) -> Rendered:
    messages = [{"role": m.role, "content": m.content} for m in conversation.messages]
    full = _apply_template(tokenizer, messages, conversation, param=param)
    spans = []
    for i, message in enumerate(conversation.messages):
        if message.role != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:i], conversation, param=param, generation_prompt=True)
        through = _apply_template(tokenizer, messages[: i + 1], conversation, param=param)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise DataError(
                f"{conversation.where}: the model's chat template renders this conversation differently "
                f"message by message, so the assistant's message {i + 1} cannot be located.",
                param=param,
            )
        # Whitespace after the end-of-turn token (ChatML's newline) belongs to no one.
        spans.append((len(before), len(through.rstrip()), message.weight == 1))
    return Rendered(full, spans, special_tokens=False, eos=False)


def _apply_template(tokenizer, messages, conversation, *, param: str, generation_prompt: bool = False) -> str:
    from jinja2 import TemplateError  # what templates' raise_exception() raises, too

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as e:
        raise DataError(
            f"{conversation.where}: the model's chat template rejects this conversation: {e}", param=param
        ) from None


@dataclass
class Encoded:
    """A split's examples as token ids and labels (IGNORE where nothing is learned)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    dropped: int  # rows with no target token left after truncation
    kept: list[int]  # the row number of each example kept, in the rows given


def encode(tokenizer, conversations: list[chat.Conversation], *, max_length: int, truncation_side: str,
           train_on_inputs: bool, param: str) -> Encoded:
    """Token ids and labels of every row, truncated to max_length.

    Args:
        tokenizer: a fast tokenizer (offsets mappings are needed).
        conversations: checked rows (core.datasets.chat.read).
        max_length: tokens per example.
        truncation_side: "right" keeps the start of a long example, "left" its end.
        train_on_inputs: learn every token, not only the assistant's (weight-0 turns stay out).
        param: the request field of these rows, for errors.

    Returns:
        Encoded; rows left without a target token are dropped and counted.

    Raises:
        ModelError, DataError: as `render`.
    """
    rendered = [render(tokenizer, c, param=param) for c in conversations]
    tokens: list[tuple[list[int], list[tuple[int, int]]]] = [([], [])] * len(rendered)
    for special_tokens in (True, False):  # one batched call per setting; rows keep their order
        group = [i for i, r in enumerate(rendered) if r.special_tokens == special_tokens]
        if group:
            batch = tokenizer([rendered[i].text for i in group], add_special_tokens=special_tokens,
                              return_offsets_mapping=True)
            for i, ids, offsets in zip(group, batch["input_ids"], batch["offset_mapping"]):
                tokens[i] = (list(ids), offsets)
    encoded = Encoded([], [], 0, [])
    for row, (r, (ids, offsets)) in enumerate(zip(rendered, tokens)):
        labels = _labels(ids, offsets, r.spans, train_on_inputs=train_on_inputs)
        if r.eos and tokenizer.eos_token_id is not None:
            if not ids or ids[-1] != tokenizer.eos_token_id:  # some tokenizers add it themselves
                ids.append(tokenizer.eos_token_id)
                labels.append(IGNORE)
            labels[-1] = tokenizer.eos_token_id if r.spans[-1][2] or train_on_inputs else IGNORE
        if len(ids) > max_length:
            keep = slice(None, max_length) if truncation_side == "right" else slice(len(ids) - max_length, None)
            ids, labels = ids[keep], labels[keep]
        labels[0] = IGNORE  # nothing precedes the first token to predict it from
        if all(label == IGNORE for label in labels):
            encoded.dropped += 1
            continue
        encoded.input_ids.append(ids)
        encoded.labels.append(labels)
        encoded.kept.append(row)
    return encoded


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int, bool]], *,
            train_on_inputs: bool) -> list[int]:
    """Each token's id where it overlaps a learned span (everywhere with train_on_inputs, weight-0
    turns excepted), else IGNORE. Overlap, not containment: a byte-level token like " Hello" starts
    on the space before the assistant's first character and is still what the assistant says."""
    starts, ends = np.array(offsets, dtype=np.int64).reshape(-1, 2).T
    learned = np.full(len(ids), train_on_inputs)
    for start, end, learn in spans:
        inside = (starts < end) & (ends > start) & (ends > starts)  # special tokens added have (0, 0)
        learned[inside] = learn
    return [token if keep else IGNORE for token, keep in zip(ids, learned)]


def padded(rows: list[list[int]], labels: list[list[int]], *, pad_token_id: int,
           multiple: int | None = None) -> dict[str, torch.Tensor]:
    """Rows right-padded to the longest (rounded up to `multiple`): input_ids, attention_mask (1 on
    real tokens) and labels (IGNORE on padding)."""
    longest = max(len(r) for r in rows)
    if multiple:
        longest = -(-longest // multiple) * multiple
    gaps = [longest - len(r) for r in rows]
    return {
        "input_ids": torch.tensor([r + [pad_token_id] * g for r, g in zip(rows, gaps)], dtype=torch.long),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * g for r, g in zip(rows, gaps)], dtype=torch.long),
        "labels": torch.tensor([t + [IGNORE] * g for t, g in zip(labels, gaps)], dtype=torch.long),
    }


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices grouped into rows of at most `capacity` tokens, best-fit decreasing (as TRL's
    "bfd" packing): longest examples first, each into the fullest row it still fits in.

    Returns:
        Rows of example indices; every index appears exactly once.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row), sorted: bisect finds the tightest fit
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[index], -1))
        if at == len(free):
            rows.append([index])
            bisect.insort(free, (capacity - lengths[index], len(rows) - 1))
        else:
            space, row = free.pop(at)
            rows[row].append(index)
            bisect.insort(free, (space - lengths[index], row))
    return rows


def packed_split(encoded: Encoded, *, max_length: int) -> Split:
    """Rows of whole examples with position ids restarting at 0 for each example."""
    input_ids, position_ids, labels = [], [], []
    for row in pack([len(ids) for ids in encoded.input_ids], max_length):
        input_ids.append([t for i in row for t in encoded.input_ids[i]])
        position_ids.append([p for i in row for p in range(len(encoded.input_ids[i]))])
        labels.append([t for i in row for t in encoded.labels[i]])
    return Split({"input_ids": input_ids, "position_ids": position_ids}, labels, [len(ids) for ids in input_ids])
