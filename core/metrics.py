"""Classification metrics: the short summary for each evaluation and the full test report."""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(labels: Sequence[int], preds: Sequence[int], *, loss: float) -> dict[str, float]:
    """loss, accuracy and macro-averaged F1 (over the classes present in labels or preds).

    Args:
        labels: true class ids.
        preds: predicted class ids.
        loss: the mean cross-entropy over the same examples.
    """
    return {
        "loss": float(loss),
        "accuracy": float(accuracy_score(labels, preds)),
        "f1_macro": float(f1_score(labels, preds, average="macro", zero_division=0)),
    }


def classification_report(
    labels: Sequence[int], preds: Sequence[int], *, label_names: Sequence[str], loss: float
) -> dict:
    """The summary metrics plus per-class precision/recall/F1/support and the confusion matrix.

    Args:
        labels: true class ids.
        preds: predicted class ids.
        label_names: the name of each class id, in id order.
        loss: the mean cross-entropy over the same examples.

    Returns:
        {"loss", "accuracy", "f1_macro", "per_class": {name: {precision, recall, f1, support}},
        "confusion_matrix": {"labels": [...], "matrix": rows = true class, columns = predicted}}.
    """
    ids = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=ids, zero_division=0
    )
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(label_names)
    }
    matrix = confusion_matrix(labels, preds, labels=ids).tolist()
    return {
        **classification_metrics(labels, preds, loss=loss),
        "per_class": per_class,
        "confusion_matrix": {"labels": list(label_names), "matrix": matrix},
    }
