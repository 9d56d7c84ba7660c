"""causal-lm: supervised fine-tuning of a decoder on chats, prompt/completion pairs, Alpaca rows and text.

Encoding. A chat row is rendered with the tokenizer's own chat template; prompt/completion and
Alpaca rows become a user/assistant exchange (or prompt + completion + eos for a tokenizer without
a template); a text row is text + eos. Only what the assistant says (its content and end-of-turn
token) is learned unless config.train_on_inputs: every other label is -100. The assistant's
character spans come from rendering the conversation prefix by prefix (the text before the
assistant's turn is the rendering of the earlier messages with the generation prompt); the tokens
of the full rendering that overlap a span are the targets. The first token of every example has
label -100: nothing precedes it, and in a packed row it must not be predicted from the previous
example's last token.

Packing (config.packing) fills training rows of at most max_length tokens with whole examples
(best-fit decreasing) and restarts the position ids at 0 for each. Such a batch goes to the model
with position_ids and no attention_mask: transformers then finds the examples from the position
ids (masking_utils.find_packed_sequence_indices) and builds a block-diagonal causal mask, so
attention never crosses examples and every example's logits are those it has alone. Validation and
test examples are never packed, so their metrics do not depend on the setting.

Loss: the cross-entropy summed over target tokens; units() counts them, so accumulation is exact.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.datasets import DatasetSummary, chat
from core.errors import DataError, ModelError
from core.loading import check_model_source, load_tokenizer
from core.spec import CAUSAL_LM_METRICS, Task
from core.adapters.base import DataFiles, Split, TaskAdapter, TaskData

IGNORE = -100  # the label cross-entropy skips


# --- loading, safetensors or GGUF -----------------------------------------------------------


def gguf_source(model: str) -> tuple[Path, str] | None:
    """(folder, file name) when `model` is a .gguf file, or a folder holding one *.gguf and no
    *.safetensors; None for anything else (a safetensors folder or a hub id).

    GGUF, like safetensors, is a plain tensor format that cannot run code when loaded.

    Raises:
        ModelError: model_not_found for a missing .gguf file; invalid_model for a folder with
            several .gguf files and no safetensors (which one is meant is unknown).
    """
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"Model {model!r} not found.", param="model", code="model_not_found")
        return path.parent, path.name
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    found = sorted(p.name for p in path.glob("*.gguf"))
    if len(found) > 1:
        raise ModelError(
            f"The model folder {model!r} holds several GGUF files ({', '.join(found[:4])}); name one: "
            f"model={str(path / found[0])!r}.",
            param="model",
            code="invalid_model",
        )
    return (path, found[0]) if found else None


def load_causal_tokenizer(model: str):
    """The fast tokenizer of a causal LM: a safetensors folder, a hub id or a GGUF file/folder.

    Raises:
        ModelError: model_not_found / invalid_model (as core.loading.load_tokenizer).
    """
    gguf = gguf_source(model)
    if gguf is None:
        return load_tokenizer(model)
    from transformers import AutoTokenizer

    folder, name = gguf
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"Cannot load the tokenizer of {model!r}: {e}", param="model", code="invalid_model") from None
    if not getattr(tokenizer, "is_fast", False):  # encode() needs offset mappings
        raise ModelError(f"{model!r} has no fast tokenizer.", param="model", code="invalid_model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_causal_model(model: str) -> torch.nn.Module:
    """AutoModelForCausalLM in fp32 from safetensors (folder or hub id) or GGUF (dequantized).

    Raises:
        ModelError: model_not_found, or invalid_model for weights that are not a causal LM.
    """
    from transformers import AutoModelForCausalLM

    gguf = gguf_source(model)
    common = {"dtype": torch.float32, "trust_remote_code": False}
    try:
        if gguf is not None:
            return _load_gguf(*gguf, **common)
        source = check_model_source(model)
        return AutoModelForCausalLM.from_pretrained(str(source), use_safetensors=True, **common)
    except OSError as e:
        code = "invalid_model" if Path(model).expanduser().exists() else "model_not_found"
        raise ModelError(f"Cannot load {model!r}: {e}", param="model", code=code) from None
    except (ValueError, KeyError) as e:
        raise ModelError(f"{model!r} cannot be loaded as a causal LM: {e}", param="model", code="invalid_model") from None


def _load_gguf(folder: Path, name: str, **options) -> torch.nn.Module:
    """A GGUF file dequantized into a plain dense model: trainable (weights left in GGUF blocks are
    not) and saved as ordinary safetensors once the quantizer is detached."""
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=name, quantization_config=GgufConfig(gguf_file=name, dequantize=True), **options
    )
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model


# --- encoding --------------------------------------------------------------------------------


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
    encoded = Encoded([], [], 0)
    for r, (ids, offsets) in zip(rendered, tokens):
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


# --- the adapter ---------------------------------------------------------------------------


class CausalLM(TaskAdapter):
    """Supervised fine-tuning of AutoModelForCausalLM models (see the module docstring)."""

    task = Task.CAUSAL_LM

    def __init__(self, spec):
        super().__init__(spec)
        # The id padding gets in `collate`; `prepare` sets the tokenizer's. Padding is never attended
        # to nor learned, so any valid id would do.
        self.pad_token_id = 0

    @property
    def metrics(self) -> dict[str, bool]:
        return CAUSAL_LM_METRICS

    def load_processor(self, source: str) -> Any:
        return load_causal_tokenizer(source)

    def prepare(self, files: DataFiles, processor: Any) -> TaskData:
        """Read, check and encode every split; pack the training split when config.packing.

        Raises:
            DataError: as core.datasets.chat, or a split with no target token left within max_length.
            ModelError: chat rows for a tokenizer without a chat template.
        """
        cfg = self.config
        self.pad_token_id = processor.pad_token_id if processor.pad_token_id is not None else 0
        splits: dict[str, Split | None] = {}
        summaries: dict[str, DatasetSummary] = {}
        for param, path in (("training_file", files.train), ("validation_file", files.validation), ("test_file", files.test)):
            if path is None:
                splits[param] = None
                continue
            conversations = chat.read(path, param=param, config=cfg)
            encoded = encode(processor, conversations, max_length=cfg.max_length, truncation_side=cfg.truncation_side,
                             train_on_inputs=cfg.train_on_inputs, param=param)
            if not encoded.input_ids:
                raise DataError(
                    f"No row of the {param.replace('_', ' ')} has a target token left within config.max_length="
                    f"{cfg.max_length} (truncation_side={cfg.truncation_side}); raise max_length.",
                    param="config.max_length",
                )
            summary = chat.summarize(conversations)
            summary.details |= {
                "dropped_after_truncation": encoded.dropped,
                "tokens": sum(len(ids) for ids in encoded.input_ids),
                "target_tokens": sum(t != IGNORE for labels in encoded.labels for t in labels),
            }
            if param == "training_file" and cfg.packing:
                split = packed_split(encoded, max_length=cfg.max_length)
                summary.details["packed_rows"] = len(split)
            else:
                split = Split({"input_ids": encoded.input_ids}, encoded.labels, [len(ids) for ids in encoded.input_ids])
            splits[param], summaries[param] = split, summary
        return TaskData(splits["training_file"], splits["validation_file"], splits["test_file"], labels=None, summaries=summaries)

    def build_model(self, source: str, data: TaskData, processor: Any) -> torch.nn.Module:
        """The causal LM in fp32, without the generation cache (training never reuses it, and a
        cache would keep transformers from detecting packed rows).

        Raises:
            ModelError: not found, not safetensors/GGUF, not a causal LM, or a tokenizer larger than
                the embedding matrix.
        """
        model = load_causal_model(source)
        embeddings = model.get_input_embeddings().num_embeddings
        if len(processor) > embeddings:
            raise ModelError(
                f"The tokenizer of {source!r} has {len(processor)} tokens but the model only {embeddings} embeddings.",
                param="model",
                code="invalid_model",
            )
        model.config.use_cache = False
        if model.config.pad_token_id is None:
            model.config.pad_token_id = processor.pad_token_id
        return model

    def collate(self, split: Split, indices: list[int], *, rng: np.random.Generator | None = None,
                pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
        """Right-padded input_ids, attention_mask (1 on real tokens) and labels (IGNORE on padding);
        for packed rows also position_ids, the padding tail counting as one more example.

        Text augmentation does not apply to causal-lm: `rng` is unused.
        """
        rows = [split.features["input_ids"][i] for i in indices]
        longest = max(len(r) for r in rows)
        if pad_to_multiple_of:
            longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        gaps = [longest - len(r) for r in rows]
        batch = {
            "input_ids": torch.tensor([r + [self.pad_token_id] * g for r, g in zip(rows, gaps)], dtype=torch.long),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * g for r, g in zip(rows, gaps)], dtype=torch.long),
            "labels": torch.tensor([split.targets[i] + [IGNORE] * g for i, g in zip(indices, gaps)], dtype=torch.long),
        }
        if "position_ids" in split.features:
            positions = [split.features["position_ids"][i] + list(range(g)) for i, g in zip(indices, gaps)]
            batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
        return batch

    def eval_batch_size(self, train_batch_size: int) -> int:
        """The training batch size: a batch's fp32 logits are batch x length x vocabulary (49k for
        SmolLM2), far larger than an encoder's, so evaluation gets no bigger batches."""
        return train_batch_size

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Target tokens: labels that are not IGNORE, after the shift (the first position is never one)."""
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """(cross-entropy summed over target tokens, each position's predicted token aligned with labels)."""
        inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
        if "position_ids" in batch:
            # Packed rows: without an attention_mask transformers derives a block-diagonal causal
            # mask from the position ids; right padding is never attended to by real tokens.
            inputs["position_ids"] = batch["position_ids"]
        else:
            inputs["attention_mask"] = batch["attention_mask"]
        logits = model(**inputs).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
        # Position i's label is predicted at i - 1; the first position predicts nothing.
        first = torch.full_like(targets[:, :1], IGNORE)
        predictions = torch.cat([first, logits.detach().argmax(-1)], dim=1)
        return loss, predictions.cpu()

    def compute_metrics(self, predictions: list[Any], targets: list[Any], *, loss: float, report: bool) -> dict[str, Any]:
        """loss, perplexity (exp of the mean loss per target token) and token_accuracy (argmax
        predictions equal to the target, over target tokens only); report adds "tokens"."""
        correct = total = 0
        for predicted, labels in zip(predictions, targets):
            mask = labels != IGNORE
            correct += int((predicted[mask] == labels[mask]).sum())
            total += int(mask.sum())
        metrics: dict[str, Any] = {
            "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "token_accuracy": correct / total if total else 0.0,
        }
        if report:
            metrics["tokens"] = total
        return metrics

    def save(self, model: torch.nn.Module, processor: Any, out_dir: Path) -> None:
        """As TaskAdapter.save, with the generation cache back on for whoever generates with it."""
        model.config.use_cache = True
        super().save(model, processor, out_dir)
        model.config.use_cache = False


__all__ = ["CausalLM", "encode", "gguf_source", "load_causal_model", "load_causal_tokenizer", "pack", "render"]
