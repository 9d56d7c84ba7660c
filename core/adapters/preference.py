"""causal-lm with method.type "dpo": direct preference optimization on preference pairs (core.dpo).

Rows are OpenAI's DPO rows (core.datasets.preference). Each answer is rendered after its prompt
exactly as a supervised chat (core.adapters.causal_data: the model's chat template, prompt
masking): only the answer's tokens and its end-of-turn token are scored; assistant turns inside
the prompt are not. A pair whose answer has no token left within config.max_length is dropped
(counted in the validation report).

One batch holds B pairs as 2B rows, the B preferred answers then the B non-preferred, in one
forward pass (TRL's concatenated forward). The loss is summed over pairs and `units` counts pairs,
so accumulation is exact.

The reference model is the base model, frozen, and it is never run during training: before the
first step (`on_model_ready`) the reference log-probabilities of every pair of every split are
computed once and kept beside the pairs. With config.lora they come from the same weights with the
adapters disabled (peft's `disable_adapter`), so there is never a second copy of the model in
memory, whatever the adapters' initialisation; without LoRA, from the model before any step. A
resumed run computes them again from the base model before loading its checkpoint. Each step then
costs one forward and one backward pass, as a supervised step does, instead of two forwards.

Dropout is turned off in the model (TRL's default, disable_dropout=True): the policy then equals
the reference at step 0 and the first loss is exactly log 2. config.dropout can turn it back on.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from typing import Any

import numpy as np
import torch

from core import dpo
from core.adapters.base import Split, TaskData
from core.adapters.causal_data import IGNORE, padded
from core.adapters.causal_lm import CausalLM
from core.datasets import ParsedFile, chat
from core.device import Precision
from core.errors import DataError
from core.spec import DPO_METRICS


class DirectPreference(CausalLM):
    """DPO on a causal LM (see the module docstring)."""

    @property
    def metrics(self) -> dict[str, bool]:
        return DPO_METRICS

    def prepare_parsed(self, parsed: dict[str, ParsedFile], processor: Any) -> TaskData:
        """Encode both answers of every pair (see the module docstring).

        Raises:
            DataError: rows that are not preference rows, or a split with no pair left within
                config.max_length.
        """
        chat.check_method("dpo", {param: file.summary for param, file in parsed.items()})
        self.pad_token_id = processor.pad_token_id if processor.pad_token_id is not None else 0

        def encode_split(param: str, pairs: list) -> Split:
            answers = [pair.conversations() for pair in pairs]
            chosen = self.encoded(processor, [c for c, _ in answers], param=param)
            rejected = self.encoded(processor, [r for _, r in answers], param=param)
            at_c, at_r = ({row: i for i, row in enumerate(e.kept)} for e in (chosen, rejected))
            kept = [row for row in range(len(pairs)) if row in at_c and row in at_r]
            if not kept:
                raise DataError(
                    f"No pair of the {param.replace('_', ' ')} has answer tokens left within config.max_length="
                    f"{self.config.max_length} (truncation_side={self.config.truncation_side}); raise max_length.",
                    param="config.max_length")
            c_ids, r_ids = [chosen.input_ids[at_c[k]] for k in kept], [rejected.input_ids[at_r[k]] for k in kept]
            details = parsed[param].summary.details
            details |= {"pairs": len(kept), "dropped_after_truncation": len(pairs) - len(kept),
                        "tokens": sum(map(len, c_ids)) + sum(map(len, r_ids))}
            return Split({"chosen": c_ids, "rejected": r_ids},
                         [(chosen.labels[at_c[k]], rejected.labels[at_r[k]]) for k in kept],
                         [max(len(c), len(r)) for c, r in zip(c_ids, r_ids)])

        return TaskData.of(parsed, encode_split, labels=None)

    def build_model(self, source: str, data: TaskData, processor: Any) -> torch.nn.Module:
        """As CausalLM's, with dropout off (see the module docstring)."""
        model = super().build_model(source, data, processor)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = 0.0
        return model

    def on_model_ready(self, model: torch.nn.Module, data: TaskData, *, device: torch.device,
                       precision: Precision, batch_size: int) -> str | None:
        """Every pair's reference log-probabilities (see the module docstring), kept as the
        features "ref_chosen" / "ref_rejected" of each split."""
        started, pairs = time.time(), 0
        was_training = model.training
        model.eval()
        base = model.disable_adapter() if self.config.lora is not None else contextlib.nullcontext()
        with torch.no_grad(), base:
            for split in (data.train, data.validation, data.test):
                if split is None:
                    continue
                columns = np.zeros((len(split), 2))
                # In evaluation's batches: the same padding gives bit for bit the same
                # log-probabilities, so before any step every reward is exactly 0.
                for indices, batch in self.eval_batches(split, batch_size):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    with precision.autocast(device):
                        logps, _ = self.logps(model, batch)
                    columns[indices] = logps.view(2, -1).T.double().cpu().numpy()
                split.features["ref_chosen"], split.features["ref_rejected"] = list(columns[:, 0]), list(columns[:, 1])
                pairs += len(split)
        model.train(was_training)
        return (f"Reference log-probabilities of {pairs} pairs computed by the base model"
                f"{' (adapters disabled)' if self.config.lora is not None else ''} in {time.time() - started:.1f} s.")

    def collate(self, split: Split, indices: list[int], *, rng: np.random.Generator | None = None,
                pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
        """2B right-padded rows (the B preferred answers, then the B non-preferred): input_ids,
        attention_mask, labels; "ref" (B x 2), the pairs' reference log-probabilities, once computed."""
        rows = [split.features[side][i] for side in ("chosen", "rejected") for i in indices]
        labels = [split.targets[i][side] for side in (0, 1) for i in indices]
        batch = padded(rows, labels, pad_token_id=self.pad_token_id, multiple=pad_to_multiple_of)
        if "ref_chosen" in split.features:
            batch["ref"] = torch.tensor([[split.features["ref_chosen"][i], split.features["ref_rejected"][i]]
                                         for i in indices], dtype=torch.float64)
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs: half the rows."""
        return int(batch["input_ids"].shape[0]) // 2

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """(DPO loss summed over the batch's pairs, each pair's row for core.dpo.metrics)."""
        logps, tokens = self.logps(model, batch)
        reference = batch["ref"].to(logps.dtype).T.reshape(-1)
        pairs = torch.stack([*logps.view(2, -1), *reference.detach().view(2, -1), *tokens.view(2, -1)], dim=1)
        loss = dpo.losses(pairs, beta=self.spec.beta, loss_type=self.loss_type).sum()
        return loss, pairs.detach().cpu()

    @property
    def loss_type(self) -> str:
        return self.config.dpo.loss_type if self.config.dpo is not None else "sigmoid"

    def logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(each row's summed answer log-probability, its answer tokens): the B preferred rows, then the B others.

        Only the positions from the batch's first scored token on go through the output layer
        (transformers' `logits_to_keep`, where the model takes it): the prompts' logits, a
        vocabulary wide each, are never made.
        """
        labels = batch["labels"]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        if self._keeps_logits(model):
            first = int((labels != IGNORE).int().argmax(dim=1).min())  # every row scores at least one token
            keep = labels.shape[1] - first + 1  # the position before it predicts it
            inputs["logits_to_keep"] = keep
            labels = labels[:, labels.shape[1] - keep:]
        return dpo.sequence_logps(model(**inputs).logits, labels)

    @staticmethod
    def _keeps_logits(model: torch.nn.Module) -> bool:
        from core.lora import unwrap_peft

        return "logits_to_keep" in inspect.signature(unwrap_peft(model).forward).parameters

    def compute_metrics(self, predictions: list[Any], targets: list[Any], *, loss: float, report: bool) -> dict[str, Any]:
        """loss and core.dpo.metrics over every pair; report adds "pairs"."""
        pairs = torch.cat(predictions)
        metrics: dict[str, Any] = {"loss": loss, **dpo.metrics(pairs, beta=self.spec.beta)}
        if report:
            metrics["pairs"] = len(pairs)
        return metrics
