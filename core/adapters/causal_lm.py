"""causal-lm: supervised fine-tuning of a decoder on chats, prompt/completion pairs, Alpaca rows and text.

The rows (core.datasets.chat) are rendered, tokenized and labelled by core.adapters.causal_data:
only what the assistant says is learned unless config.train_on_inputs; the model and tokenizer load
from safetensors or GGUF (core.loading).

Packing (config.packing) fills training rows of at most max_length tokens with whole examples
(best-fit decreasing) and restarts the position ids at 0 for each. Such a batch goes to the model
with position_ids and no attention_mask: transformers then finds the examples from the position
ids (masking_utils.find_packed_sequence_indices) and builds a block-diagonal causal mask, so
attention never crosses examples and every example's logits are those it has alone. Validation and
test examples are never packed, so their metrics do not depend on the setting.

Loss: the cross-entropy summed over target tokens; units() counts them, so accumulation is exact.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.adapters.base import Split, TaskAdapter, TaskData
from core.adapters.causal_data import IGNORE, Encoded, encode, packed_split, padded
from core.cache import Ragged, digest, processor_fingerprint
from core.datasets import ParsedFile, chat
from core.errors import DataError, ModelError
from core.loading import load_causal_model, load_causal_tokenizer
from core.spec import CAUSAL_LM_METRICS, Task


class CausalLM(TaskAdapter):
    """Supervised fine-tuning of AutoModelForCausalLM models (see the module docstring)."""

    task = Task.CAUSAL_LM

    def __init__(self, spec, **kwargs):
        super().__init__(spec, **kwargs)
        # The id padding gets in `collate`; `prepare` sets the tokenizer's. Padding is never attended
        # to nor learned, so any valid id would do.
        self.pad_token_id = 0

    @property
    def metrics(self) -> dict[str, bool]:
        return CAUSAL_LM_METRICS

    def load_processor(self, source: str, *, local_files_only: bool = False) -> Any:
        return load_causal_tokenizer(source, local_files_only=local_files_only)

    def prepare_parsed(self, parsed: dict[str, ParsedFile], processor: Any) -> TaskData:
        """Encode every split; pack the training split when config.packing.

        Raises:
            DataError: a split with no target token left within max_length, or as `encode`.
            ModelError: chat rows for a tokenizer without a chat template.
        """
        cfg = self.config
        self.pad_token_id = processor.pad_token_id if processor.pad_token_id is not None else 0

        chat.check_method("supervised", {param: file.summary for param, file in parsed.items()})

        def encode_split(param: str, conversations: list[chat.Conversation]) -> Split:
            encoded = self.encoded(processor, conversations, param=param)
            if not encoded.input_ids:
                raise DataError(
                    f"No row of the {param.replace('_', ' ')} has a target token left within config.max_length="
                    f"{cfg.max_length} (truncation_side={cfg.truncation_side}); raise max_length.",
                    param="config.max_length",
                )
            details = parsed[param].summary.details
            details |= {
                "dropped_after_truncation": encoded.dropped,
                "tokens": sum(len(ids) for ids in encoded.input_ids),
                "target_tokens": sum(t != IGNORE for labels in encoded.labels for t in labels),
            }
            if param == "training_file" and cfg.packing:
                split = packed_split(encoded, max_length=cfg.max_length)
                details["packed_rows"] = len(split)
                return split
            return Split({"input_ids": encoded.input_ids}, encoded.labels, [len(ids) for ids in encoded.input_ids])

        return TaskData.of(parsed, encode_split, labels=None)

    def encoded(self, processor: Any, conversations: list[chat.Conversation], *, param: str) -> Encoded:
        """`causal_data.encode` of the rows with this job's options, through the input cache."""
        cfg = self.config
        options = {"max_length": cfg.max_length, "truncation_side": cfg.truncation_side,
                   "train_on_inputs": cfg.train_on_inputs}
        key = {"tokenizer": processor_fingerprint(processor), **options, "layout": 2,  # 2: with "kept"
               "rows": digest(json.dumps([c.shape, c.text, [dataclasses.astuple(m) for m in c.messages]])
                              for c in conversations)}
        return self.cached(
            "tokenized conversations", key, lambda: encode(processor, conversations, **options, param=param),
            dump=lambda e: {"input_ids": Ragged(e.input_ids), "labels": Ragged(e.labels), "dropped": e.dropped,
                            "kept": np.asarray(e.kept, dtype=np.int64)},
            restore=lambda parts: Encoded(parts["input_ids"], parts["labels"], parts["dropped"],
                                          [int(i) for i in parts["kept"]]))

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
        batch = padded(rows, [split.targets[i] for i in indices], pad_token_id=self.pad_token_id,
                       multiple=pad_to_multiple_of)
        if "position_ids" in split.features:
            gaps = [batch["input_ids"].shape[1] - len(r) for r in rows]
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
