"""Metrics on real logistic-regression scores of Fashion-MNIST pixels and on hand-built cases."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from spela_transfer.evaluation.metrics import classification_metrics, top_k_accuracy, top_k_note


@pytest.fixture(scope="module")
def pixel_scores() -> tuple[np.ndarray, np.ndarray]:
    """Probabilities [500, 10] of a probe trained on 1000 sample images, and the labels [500].

    Every second pixel of each row and column (14 × 14) keeps the probe fast.
    """
    path = resources.files("spela_transfer") / "_data" / "fashion_mnist_sample.npz"
    with resources.as_file(path) as file, np.load(file) as data:
        images = data["images"][:1500, ::2, ::2].reshape(1500, -1) / 255.0
        labels = data["labels"][:1500]
    with threadpool_limits(1):
        probe = LogisticRegression(max_iter=1000).fit(images[:1000], labels[:1000])
    return probe.predict_proba(images[1000:]), labels[1000:]


def test_metrics_on_real_scores(pixel_scores):
    scores, labels = pixel_scores

    metrics = classification_metrics(scores, labels)

    assert metrics.top1 == pytest.approx(np.mean(scores.argmax(axis=1) == labels))
    assert 0.6 < metrics.top1 < metrics.top5 <= 1.0
    assert metrics.top5_note == ""
    assert metrics.confusion.shape == (10, 10)
    assert metrics.confusion.sum() == len(labels)
    assert np.trace(metrics.confusion) == round(metrics.top1 * len(labels))
    assert metrics.balanced_accuracy == pytest.approx(np.nanmean(metrics.per_class_accuracy))


def test_top5_by_hand():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    labels = np.array([5, 2])

    assert top_k_accuracy(scores, labels, 1) == 0.0
    assert top_k_accuracy(scores, labels, 5) == 0.5


@pytest.mark.parametrize("num_classes", [2, 5])
def test_top5_empty_when_few_classes(num_classes):
    generator = np.random.default_rng(0)
    scores = generator.random((20, num_classes))
    labels = generator.integers(0, num_classes, 20)

    metrics = classification_metrics(scores, labels)

    assert metrics.top5 is None
    assert metrics.top5_note == (
        f"top-5 accuracy needs more than 5 classes, but the data has {num_classes}"
    )
    assert top_k_note(5, 6) == ""


def test_per_class_nan_for_absent_class():
    scores = np.eye(3)[[0, 0, 1]]
    labels = np.array([0, 1, 1])

    metrics = classification_metrics(scores, labels)

    assert metrics.per_class_accuracy[0] == 1.0
    assert metrics.per_class_accuracy[1] == 0.5
    assert np.isnan(metrics.per_class_accuracy[2])
    assert metrics.balanced_accuracy == pytest.approx(0.75)


def test_metrics_reject_shape_mismatch():
    with pytest.raises(ValueError, match=r"one row per label; got shape \(3, 4\) for 2 labels"):
        classification_metrics(np.zeros((3, 4)), np.array([0, 1]))


def test_metrics_reject_nan_scores():
    scores = np.array([[np.nan, 1.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="NaN or infinite values; the head diverged"):
        classification_metrics(scores, np.array([0, 1]))
