"""An ensemble folder, and the loader that answers for it.

The folder an ensemble job exports (core.combine) holds each member as a Hugging Face folder
(safetensors) under `members/`, and `ensemble.json`, which says how their outputs combine — plain
JSON numbers, no pickle:

    {"format": "lathe-ensemble", "version": 1, "method": "bagging" | "stacking" | "selection",
     "task": "text-classification" | "image-classification", "problem_type": ..., "labels": [...],
     "vote": "soft" | "hard" | "mean",
     "members": [{"paths": ["members/m0"], "weight": 1.0, "job": "ftjob-..."}, ...],
     "meta_learner": null | {"type": "logistic_regression" | "ridge", "coef": [[...]], "intercept": [...]}}

A member with several paths (stacking: its fold models) outputs the mean of theirs. Outputs are
probabilities (rows x labels: softmax for single-label, sigmoid per label for multi-label) or, for
regression, values in the label's units (rows x 1). Then:

    bagging, selection   core.ensemble.combine(member outputs, vote, member weights)
    stacking             the meta-learner on the members' outputs side by side (member-major):
                         single-label softmax(X W^T + b) (binary: sigmoid of one row), multi-label
                         sigmoid per label over that label's member outputs, regression X w + b

Use: `EnsembleModel.load(folder).outputs(texts_or_base64_images)`; `predict()` answers as
core.predict does for one model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.ensemble import combine
from core.errors import ModelError

DESCRIPTION = "ensemble.json"
FORMAT = "lathe-ensemble"


def is_ensemble(folder: Path) -> bool:
    return (Path(folder) / DESCRIPTION).is_file()


def combined_outputs(description: dict[str, Any], member_outputs: list[np.ndarray]) -> np.ndarray:
    """The ensemble's outputs from each member's (rows x outputs), as ensemble.json says."""
    meta = description.get("meta_learner")
    if meta is None:
        weights = [m.get("weight", 1.0) for m in description["members"]]
        return combine(member_outputs, vote=description["vote"], weights=weights)
    return apply_meta(meta, member_outputs, problem_type=description["problem_type"])


def meta_features(member_outputs: list[np.ndarray], problem_type: str) -> np.ndarray | list[np.ndarray]:
    """The meta-learner's inputs: members' outputs side by side (multi-label: one matrix per label,
    that label's output of each member)."""
    stacked = [np.asarray(o, dtype=np.float64) for o in member_outputs]
    if problem_type == "multi_label":
        return [np.stack([o[:, label] for o in stacked], axis=1) for label in range(stacked[0].shape[1])]
    return np.concatenate(stacked, axis=1)


def apply_meta(meta: dict[str, Any], member_outputs: list[np.ndarray], *, problem_type: str) -> np.ndarray:
    coef, intercept = np.asarray(meta["coef"], dtype=np.float64), np.asarray(meta["intercept"], dtype=np.float64)
    features = meta_features(member_outputs, problem_type)
    if problem_type == "regression":
        return (features @ coef.reshape(-1) + intercept.reshape(-1)[0])[:, None]
    if problem_type == "multi_label":
        z = np.stack([x @ coef[label] + intercept[label] for label, x in enumerate(features)], axis=1)
        return 1 / (1 + np.exp(-z))
    z = features @ coef.T + intercept
    if z.shape[1] == 1:  # scikit-learn's binary form: one row for the second class
        p = 1 / (1 + np.exp(-z[:, 0]))
        return np.stack([1 - p, p], axis=1)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class EnsembleModel:
    folder: Path
    description: dict[str, Any]
    # Member folder -> (processor, model), kept when loaded with keep_members (a prediction process
    # answering many requests); otherwise each call loads its members one at a time.
    members: dict[Path, tuple[Any, Any]] | None = None

    @classmethod
    def load(cls, folder: Path, *, keep_members: bool = False) -> EnsembleModel:
        """Raises ModelError (invalid_model) when the folder is not a readable ensemble.

        Args:
            folder: the ensemble's exported folder.
            keep_members: keep every member model loaded after its first use (memory for speed).
        """
        folder = Path(folder)
        try:
            description = json.loads((folder / DESCRIPTION).read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"Cannot read {DESCRIPTION} in {str(folder)!r}: {e}", param="model",
                             code="invalid_model") from None
        if description.get("format") != FORMAT:
            raise ModelError(f"{DESCRIPTION} in {str(folder)!r} is not a Lathe ensemble description.",
                             param="model", code="invalid_model")
        return cls(folder, description, {} if keep_members else None)

    @property
    def labels(self) -> list[str]:
        return list(self.description.get("labels") or [])

    def outputs(self, inputs: list[str], *, max_length: int | None = None) -> np.ndarray:
        """The ensemble's probabilities (rows x labels, in `labels` order) or values (rows x 1)."""
        per_member = []
        for member in self.description["members"]:
            runs = [self._member_outputs(self.folder / path, inputs, max_length) for path in member["paths"]]
            per_member.append(np.mean(runs, axis=0))
        return combined_outputs(self.description, per_member)

    def predict(self, inputs: list[str], *, top_k: int = 1, max_length: int | None = None) -> list[list[dict[str, Any]]]:
        """As core.predict answers for one model: [{"label", "score"}] best first, or [{"value"}]."""
        out = self.outputs(inputs, max_length=max_length)
        if self.description["problem_type"] == "regression":
            return [[{"value": float(row[0])}] for row in out]
        k = min(top_k, len(self.labels))
        return [[{"label": self.labels[i], "score": float(row[i])} for i in np.argsort(-row, kind="stable")[:k]]
                for row in out]

    def _member_outputs(self, folder: Path, inputs: list[str], max_length: int | None) -> np.ndarray:
        from core.predict import _classify_images, _classify_texts, _job, load_for_inference

        task = self.description["task"]
        max_length = max_length or _job(folder).get("spec", {}).get("config", {}).get("max_length")
        if self.members is not None and folder in self.members:
            processor, model = self.members[folder]
        else:
            processor, model = load_for_inference(folder, task)
            if self.members is not None:
                self.members[folder] = processor, model
        if self.description["problem_type"] == "regression":
            rows = _classify_texts(model, processor, inputs, top_k=1, max_length=max_length)
            return np.array([[row[0]["value"]] for row in rows])
        n = len(self.labels)
        if task == "image-classification":
            rows = _classify_images(model, processor, inputs, top_k=n)
        else:
            rows = _classify_texts(model, processor, inputs, top_k=n, max_length=max_length)
        index = {label: i for i, label in enumerate(self.labels)}
        out = np.zeros((len(inputs), n))
        for r, row in enumerate(rows):
            for item in row:
                out[r, index[item["label"]]] = item["score"]
        return out
