"""Metrics: the summary of each validation evaluation and the full test report, per kind of label.

scikit-learn computes everything; these functions only choose the averages, name the results and
shape the report. Summaries hold floats only (they become metric rows); reports add nested detail.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    hamming_loss,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    precision_score,
    r2_score,
    recall_score,
)

CALIBRATION_BINS = 10


def classification_metrics(labels: Sequence[int], preds: Sequence[int], *, loss: float) -> dict[str, float]:
    """Single-label summary: loss, accuracy, F1 (macro, micro, weighted), macro precision/recall.

    Args:
        labels: true class ids.
        preds: predicted class ids.
        loss: the mean cross-entropy over the same examples.
    """
    return {
        "loss": float(loss),
        "accuracy": float(accuracy_score(labels, preds)),
        "f1_macro": float(f1_score(labels, preds, average="macro", zero_division=0)),
        "f1_micro": float(f1_score(labels, preds, average="micro", zero_division=0)),
        "f1_weighted": float(f1_score(labels, preds, average="weighted", zero_division=0)),
        "precision_macro": float(precision_score(labels, preds, average="macro", zero_division=0)),
        "recall_macro": float(recall_score(labels, preds, average="macro", zero_division=0)),
    }


def classification_report(
    labels: Sequence[int],
    preds: Sequence[int],
    *,
    label_names: Sequence[str],
    loss: float,
    probabilities: np.ndarray | None = None,
) -> dict:
    """The summary plus per-class precision/recall/F1/support, the confusion matrix and, given the
    predicted probabilities, calibration.

    Args:
        labels: true class ids.
        preds: predicted class ids.
        label_names: the name of each class id, in id order.
        loss: the mean cross-entropy over the same examples.
        probabilities: (n, classes) predicted probabilities, for the calibration section.

    Returns:
        The summary keys plus "per_class": {name: {precision, recall, f1, support}},
        "confusion_matrix": {"labels", "matrix" (rows = true class, columns = predicted)} and
        "calibration" (see `calibration`) when probabilities are given.
    """
    ids = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=ids, zero_division=0)
    report = {
        **classification_metrics(labels, preds, loss=loss),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": {"labels": list(label_names), "matrix": confusion_matrix(labels, preds, labels=ids).tolist()},
    }
    if probabilities is not None:
        confidence = np.asarray(probabilities, dtype=np.float64).max(axis=1)
        report["calibration"] = calibration(confidence, np.asarray(labels) == np.asarray(preds))
    return report


def calibration(confidence: np.ndarray, correct: np.ndarray, *, bins: int = CALIBRATION_BINS) -> dict:
    """Expected calibration error and the reliability diagram of top-1 predictions.

    Args:
        confidence: the probability of each predicted class.
        correct: whether each prediction was right.
        bins: equal-width confidence bins over [0, 1].

    Returns:
        {"ece": sum over bins of |accuracy - confidence| weighted by the bin's share,
         "bins": [{"lower", "upper", "count", "confidence", "accuracy"}, ...] (empty bins left out)}.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        if not count:
            continue
        mean_conf, accuracy = float(confidence[inside].mean()), float(correct[inside].mean())
        ece += count / len(confidence) * abs(accuracy - mean_conf)
        rows.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
                     "confidence": mean_conf, "accuracy": accuracy})
    return {"ece": float(ece), "bins": rows}


def multilabel_metrics(targets: np.ndarray, predicted: np.ndarray, *, loss: float) -> dict[str, float]:
    """Multi-label summary from (n, labels) 0/1 arrays: micro/macro F1, exact match, Hamming loss.

    Args:
        targets: true 0/1 label indicators.
        predicted: predicted 0/1 indicators (probability >= 0.5).
        loss: the mean binary cross-entropy per example.
    """
    return {
        "loss": float(loss),
        "f1_micro": float(f1_score(targets, predicted, average="micro", zero_division=0)),
        "f1_macro": float(f1_score(targets, predicted, average="macro", zero_division=0)),
        "exact_match": float(accuracy_score(targets, predicted)),
        "hamming_loss": float(hamming_loss(targets, predicted)),
    }


def multilabel_report(targets: np.ndarray, predicted: np.ndarray, *, label_names: Sequence[str], loss: float) -> dict:
    """The multi-label summary plus per-label precision/recall/F1/support."""
    precision, recall, f1, support = precision_recall_fscore_support(targets, predicted, zero_division=0)
    return {
        **multilabel_metrics(targets, predicted, loss=loss),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(label_names)
        },
    }


def regression_metrics(targets: Sequence[float], predicted: Sequence[float], *, loss: float) -> dict[str, float]:
    """loss (mean squared error of the training objective), mse, rmse, mae and R²."""
    mse = float(mean_squared_error(targets, predicted))
    return {
        "loss": float(loss),
        "mse": mse,
        "rmse": mse**0.5,
        "mae": float(mean_absolute_error(targets, predicted)),
        "r2": float(r2_score(targets, predicted)) if len(targets) > 1 else 0.0,
    }
