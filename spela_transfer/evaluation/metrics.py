"""Classification metrics of one head's scores on one test split."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    top_k_accuracy_score,
)


@dataclass(frozen=True)
class Metrics:
    """Scores of one run at one exit layer, as fractions in [0, 1].

    Attributes:
        top1: Top-1 accuracy.
        top5: Top-5 accuracy, or None when it is undefined (see `top5_note`).
        top5_note: Why `top5` is None; empty when it is defined.
        balanced_accuracy: Mean of the per-class recalls over the classes in the test split.
        per_class_accuracy: [C] recall of each class; NaN for a class absent from the test split.
        confusion: [C, C] counts, rows true labels, columns predictions.
    """

    top1: float
    top5: float | None
    top5_note: str
    balanced_accuracy: float
    per_class_accuracy: np.ndarray
    confusion: np.ndarray


def top_k_note(k: int, num_classes: int) -> str:
    """Return why top-k is undefined for `num_classes`, or "" when it is defined."""
    if k < num_classes:
        return ""
    return f"top-{k} accuracy needs more than {k} classes, but the data has {num_classes}"


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float | None:
    """Compute the fraction of samples whose label is among the k highest scores.

    Args:
        scores: [N, C] scores, higher means more likely.
        labels: [N] int labels in 0..C-1.
        k: Number of top guesses that count.

    Returns:
        The accuracy, or None when `k >= C`, where every sample would count as a hit.
    """
    scores = np.asarray(scores)
    num_classes = scores.shape[1]
    if k >= num_classes:
        return None
    if k == 1:
        return float(accuracy_score(labels, scores.argmax(axis=1)))
    return float(top_k_accuracy_score(labels, scores, k=k, labels=np.arange(num_classes)))


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> Metrics:
    """Compute top-1, top-5, balanced and per-class accuracy and the confusion matrix.

    Args:
        scores: [N, C] scores of a head on the test samples.
        labels: [N] int labels in 0..C-1.

    Returns:
        The metrics of these predictions.

    Raises:
        ValueError: `scores` is not [N, C] with one row per label, or contains NaN.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[0] != len(labels) or len(labels) == 0:
        raise ValueError(
            f"scores must be [N, C] with one row per label; got shape {scores.shape} "
            f"for {len(labels)} labels"
        )
    if not np.isfinite(scores).all():
        raise ValueError(
            "scores contain NaN or infinite values; the head diverged, so try a lower lr"
        )

    num_classes = scores.shape[1]
    predictions = scores.argmax(axis=1)
    confusion = confusion_matrix(labels, predictions, labels=np.arange(num_classes))
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)

    # Balanced accuracy warns when predictions contain classes absent from the
    # test labels, which is expected on small test splits.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(labels, predictions))

    return Metrics(
        top1=float(accuracy_score(labels, predictions)),
        top5=top_k_accuracy(scores, labels, 5),
        top5_note=top_k_note(5, num_classes),
        balanced_accuracy=balanced,
        per_class_accuracy=per_class,
        confusion=confusion,
    )
