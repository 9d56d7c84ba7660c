"""text-classification: an encoder (or any AutoModelForSequenceClassification) with a head.

Three kinds of label (config.problem_type, detected by core.datasets.text): single_label
(softmax cross-entropy, with label smoothing and class weights), multi_label (sigmoid binary
cross-entropy per label; class weights become positive-class weights), and regression (one output,
squared error on targets standardised with the training file's mean and deviation, so that the
learning rate means the same whatever the label's scale; the exported head is rescaled to give
the label's own units). Training batches may be augmented at the token level (core.augment_text).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core import metrics as M
from core.adapters.base import Split, TaskAdapter, TaskData, class_weights, weighted_sum
from core.cache import Ragged, digest, processor_fingerprint
from core.datasets import ParsedFile
from core.datasets import text as reader
from core.errors import EngineError
from core.loading import load_classifier, load_tokenizer
from core.spec import LABEL_METRICS, MULTI_LABEL_METRICS, REGRESSION_METRICS, ProblemType, Task

HF_PROBLEM_TYPES = {
    ProblemType.SINGLE_LABEL: "single_label_classification",
    ProblemType.MULTI_LABEL: "multi_label_classification",
    ProblemType.REGRESSION: "regression",
}
REGRESSION_LABEL = "value"


class TextClassification(TaskAdapter):
    task = Task.TEXT_CLASSIFICATION

    def __init__(self, spec, **kwargs):
        super().__init__(spec, **kwargs)
        self.problem_type: ProblemType | None = None  # resolved from the training file by prepare()
        self.weights: torch.Tensor | None = None
        self.labels: list[str] = []
        self.pad_token_id = 0
        self.special_ids: set[int] = set()
        self.vocab_size = 0
        self.target_mean, self.target_std = 0.0, 1.0  # regression: the training labels' z-score

    @property
    def metrics(self) -> dict[str, bool]:
        if self.problem_type == ProblemType.MULTI_LABEL:
            return MULTI_LABEL_METRICS
        if self.problem_type == ProblemType.REGRESSION:
            return REGRESSION_METRICS
        return LABEL_METRICS

    def load_processor(self, source: str, *, local_files_only: bool = False) -> Any:
        tokenizer = load_tokenizer(source, local_files_only=local_files_only)
        self.pad_token_id = tokenizer.pad_token_id
        self.special_ids = set(tokenizer.all_special_ids)
        self.vocab_size = len(tokenizer)
        return tokenizer

    def prepare_parsed(self, parsed: dict[str, ParsedFile], processor: Any) -> TaskData:
        train = parsed["training_file"].summary
        self.problem_type = reader.problem_type_of(train)
        labels = train.labels if self.problem_type != ProblemType.REGRESSION else [REGRESSION_LABEL]
        if self.problem_type != ProblemType.REGRESSION:
            self.weights = class_weights(labels, train.label_counts, self.config.loss.class_weights)
        elif self.config.loss.class_weights is not None:
            raise EngineError("class_weights do not apply to regression.", param="config.loss.class_weights")
        else:
            # Weighted by the rows' weights when they have them: a weight of 2 is a row seen twice.
            values = np.asarray(parsed["training_file"].rows[1], dtype=np.float64)
            weights = parsed["training_file"].weights
            mean = float(np.average(values, weights=weights))
            std = float(np.sqrt(np.average((values - mean) ** 2, weights=weights)))
            self.target_mean, self.target_std = mean, std or 1.0
        self.labels = labels
        ids = {label: i for i, label in enumerate(labels)}

        def encode(param: str, rows: tuple[list[str], list[Any]]) -> Split:
            texts, values = rows
            return self._encode(processor, texts, [self._target(v, ids) for v in values])

        return TaskData.of(parsed, encode, labels=labels)

    def _target(self, value: Any, ids: dict[str, int]) -> Any:
        if self.problem_type == ProblemType.MULTI_LABEL:
            hot = [0.0] * len(ids)
            for label in value:
                hot[ids[label]] = 1.0
            return hot
        if self.problem_type == ProblemType.REGRESSION:
            return (float(value) - self.target_mean) / self.target_std
        return ids[value]

    def _encode(self, tokenizer, texts: list[str], targets: list[Any]) -> Split:
        tokenizer.truncation_side = self.config.truncation_side
        max_length = self.config.max_length

        def tokenize() -> dict[str, list[list[int]]]:
            batch = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
            return {k: list(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}

        key = {"tokenizer": processor_fingerprint(tokenizer), "max_length": max_length, "texts": digest(texts)}
        features = self.cached("tokenized texts", key, tokenize,
                               dump=lambda f: {k: Ragged(v) for k, v in f.items()}, restore=dict)
        return Split(features=features, targets=targets, lengths=[len(ids) for ids in features["input_ids"]])

    def build_model(self, source: str, data: TaskData, processor: Any) -> torch.nn.Module:
        from core.heads import replace_head

        model = load_classifier(
            source, labels=data.labels, pad_token_id=processor.pad_token_id,
            problem_type=HF_PROBLEM_TYPES[self.problem_type],
        )
        replace_head(model, self.config.head, num_outputs=len(data.labels),
                     classifier_dropout=self.config.dropout.classifier)
        return model

    def collate(self, split: Split, indices: list[int], *, rng: np.random.Generator | None = None,
                pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
        rows = {key: [values[i] for i in indices] for key, values in split.features.items()}
        augment = self.config.augmentation.text
        if rng is not None and augment is not None:
            rows = self._augment(rows, augment, rng)
        longest = max(len(ids) for ids in rows["input_ids"])
        if pad_to_multiple_of:
            longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        batch: dict[str, torch.Tensor] = {}
        for key, values in rows.items():
            pad = self.pad_token_id if key == "input_ids" else 0
            batch[key] = torch.tensor([v + [pad] * (longest - len(v)) for v in values], dtype=torch.long)
        targets = [split.targets[i] for i in indices]
        dtype = torch.long if self.problem_type == ProblemType.SINGLE_LABEL else torch.float32
        batch["labels"] = torch.tensor(targets, dtype=dtype)
        return batch | split.weight_tensor(indices)

    def _augment(self, rows: dict[str, list], config, rng: np.random.Generator) -> dict[str, list]:
        """Token edits on input_ids; the other features are rebuilt to match (mask 1, segment 0)."""
        from core.augment_text import augment_ids

        ids = [augment_ids(list(x), config, rng, vocab_size=self.vocab_size, special_ids=self.special_ids,
                           max_length=self.config.max_length)
               for x in rows["input_ids"]]
        out = {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
        if "token_type_ids" in rows:
            out["token_type_ids"] = [[0] * len(x) for x in ids]
        return out

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "weight")}
        logits = model(**inputs).logits.float()
        target = batch["labels"]
        weights = None if self.weights is None else self.weights.to(logits.device)
        if self.problem_type == ProblemType.REGRESSION:
            value = logits.squeeze(-1)
            return weighted_sum(F.mse_loss(value, target, reduction="none"), batch), value.detach().cpu()
        if self.problem_type == ProblemType.MULTI_LABEL:
            # Mean over labels per example, summed over examples; class weights weigh positives.
            loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weights, reduction="none")
            return weighted_sum(loss.mean(-1), batch), logits.sigmoid().detach().cpu()
        # With class weights each example's loss is scaled by its class's weight; the engine then
        # divides by the number of examples (torch's weighted "mean" would divide by the weights' sum),
        # or by the sum of the examples' own weights (config.weight_column) when they have them.
        loss = F.cross_entropy(logits, target, weight=weights, reduction="none",
                               label_smoothing=self.config.loss.label_smoothing)
        return weighted_sum(loss, batch), logits.softmax(-1).detach().cpu()

    def compute_metrics(self, predictions: list[Any], targets: list[Any], *, loss: float, report: bool) -> dict[str, Any]:
        predicted = torch.cat(predictions).numpy()
        target = torch.cat(targets).numpy()
        if self.problem_type == ProblemType.REGRESSION:
            # loss stays in standardised units (what is minimised); mse/mae/... in the label's units.
            scale = lambda x: x * self.target_std + self.target_mean  # noqa: E731
            return M.regression_metrics(scale(target), scale(predicted), loss=loss)
        if self.problem_type == ProblemType.MULTI_LABEL:
            hard = (predicted >= 0.5).astype(int)
            if report:
                return M.multilabel_report(target.astype(int), hard, label_names=self.labels, loss=loss)
            return M.multilabel_metrics(target.astype(int), hard, loss=loss)
        preds = predicted.argmax(-1)
        if report:
            return M.classification_report(target, preds, label_names=self.labels, loss=loss, probabilities=predicted)
        return M.classification_metrics(target, preds, loss=loss)

    def save(self, model: torch.nn.Module, processor: Any, out_dir) -> None:
        """Save; a regression head is first rescaled to output the label's units (y = std x z + mean)."""
        if self.problem_type != ProblemType.REGRESSION:
            return super().save(model, processor, out_dir)
        from core.heads import final_head_linear

        _, _, linear = final_head_linear(model)
        weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
        with torch.no_grad():
            linear.weight.mul_(self.target_std)
            linear.bias.mul_(self.target_std).add_(self.target_mean)
        try:
            super().save(model, processor, out_dir)
        finally:
            with torch.no_grad():
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)
