"""The vocabulary of a job spec: its tasks, text-classification's problem types, and the validation
metrics each task reports (and whether larger is better)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict

SPEC_VERSION = 1

AUTO = "auto"


class Task(StrEnum):
    TEXT_CLASSIFICATION = "text-classification"
    TOKEN_CLASSIFICATION = "token-classification"
    CAUSAL_LM = "causal-lm"
    IMAGE_CLASSIFICATION = "image-classification"


class ProblemType(StrEnum):
    """What a text-classification label is."""

    SINGLE_LABEL = "single_label"  # one class per example: softmax + cross-entropy
    MULTI_LABEL = "multi_label"  # any number of classes per example: sigmoid + BCE
    REGRESSION = "regression"  # a number per example: MSE


# Validation metrics of each task (and text-classification problem type), and whether larger is better.
LABEL_METRICS: dict[str, bool] = {
    "loss": False, "accuracy": True, "f1_macro": True, "f1_micro": True, "f1_weighted": True,
    "precision_macro": True, "recall_macro": True,
}
MULTI_LABEL_METRICS: dict[str, bool] = {
    "loss": False, "f1_micro": True, "f1_macro": True, "exact_match": True, "hamming_loss": False,
}
REGRESSION_METRICS: dict[str, bool] = {"loss": False, "mse": False, "rmse": False, "mae": False, "r2": True}
TOKEN_METRICS: dict[str, bool] = {"loss": False, "f1": True, "precision": True, "recall": True, "accuracy": True}
CAUSAL_LM_METRICS: dict[str, bool] = {"loss": False, "perplexity": False, "token_accuracy": True}
# A DPO job's (method.type "dpo"), named as TRL's DPOTrainer names them (core.dpo), plus
# preference_accuracy: how often the model itself gives the preferred answer the higher log-probability.
DPO_METRICS: dict[str, bool] = {
    "loss": False, "rewards/chosen": True, "rewards/rejected": False, "rewards/accuracies": True,
    "rewards/margins": True, "logps/chosen": True, "logps/rejected": False, "preference_accuracy": True,
}
ALL_METRICS: dict[str, bool] = (
    LABEL_METRICS | MULTI_LABEL_METRICS | REGRESSION_METRICS | TOKEN_METRICS | CAUSAL_LM_METRICS | DPO_METRICS
)

class Strict(BaseModel):
    """Every part of a spec: unknown fields refused, immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def known_metric(metric: str) -> str:
    """`metric` if some task reports it (which task's metric it must be is core.applicability's check)."""
    if metric not in ALL_METRICS:
        raise ValueError(f"must be one of {', '.join(sorted(ALL_METRICS))}, not {metric!r}")
    return metric
