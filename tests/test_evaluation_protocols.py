"""Splits of the test-size and k-shot protocols on the labels of the shipped sample."""

from __future__ import annotations

import logging
from importlib import resources

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from spela_transfer.evaluation.protocols import (
    FewSamplesWarning,
    hash_split,
    split_by_test_size,
    split_k_shot,
)


@pytest.fixture(scope="module")
def sample_labels() -> np.ndarray:
    """Labels [5000] of the Fashion-MNIST sample shipped in the package."""
    path = resources.files("spela_transfer") / "_data" / "fashion_mnist_sample.npz"
    with resources.as_file(path) as file, np.load(file) as data:
        return data["labels"].astype(np.int64)


@pytest.mark.parametrize("test_size", [0.1, 0.5, 0.9, 0.95, 0.99])
def test_split_disjoint_and_complete(sample_labels, test_size):
    split = split_by_test_size(sample_labels, test_size, split_seed=100)

    assert np.intersect1d(split.train_indices, split.test_indices).size == 0
    assert len(split.train_indices) + len(split.test_indices) == len(sample_labels)
    assert len(split.test_indices) == int(np.ceil(test_size * len(sample_labels)))
    assert split.test_size == test_size


def test_split_matches_sklearn_reference(sample_labels):
    indices = np.arange(len(sample_labels))
    train, test = train_test_split(indices, test_size=0.3, random_state=100)

    split = split_by_test_size(sample_labels, 0.3, split_seed=100)

    assert np.array_equal(split.train_indices, np.sort(train))
    assert np.array_equal(split.test_indices, np.sort(test))


def test_split_same_seed_same_hash(sample_labels):
    first = split_by_test_size(sample_labels, 0.5, split_seed=100)
    second = split_by_test_size(sample_labels, 0.5, split_seed=100)
    other = split_by_test_size(sample_labels, 0.5, split_seed=101)

    assert first.split_hash == second.split_hash
    assert first.split_hash != other.split_hash
    assert first.split_hash == hash_split(first.train_indices, first.test_indices)
    assert len(first.split_hash) == 16


def test_split_stratified_keeps_proportions(sample_labels):
    split = split_by_test_size(sample_labels, 0.9, split_seed=100, stratify=True)

    train_counts = np.bincount(sample_labels[split.train_indices], minlength=10)
    assert train_counts.tolist() == [50] * 10


@pytest.mark.parametrize("test_size", [0.0, 1.0, -0.1, 1.5, True])
def test_split_rejects_test_size_outside_unit_interval(sample_labels, test_size):
    with pytest.raises(ValueError, match="test size must be strictly between 0 and 1"):
        split_by_test_size(sample_labels, test_size, split_seed=100)


def test_split_rejects_empty_training_part():
    labels = np.array([0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="leaves 0 for training and 5 for testing"):
        split_by_test_size(labels, 0.9, split_seed=0)


def test_stratify_lists_too_small_classes():
    labels = np.array([0, 0, 0, 0, 1, 2, 2, 2, 3])
    with pytest.raises(
        ValueError, match=r"fewer than 2 samples \(label \(count\)\): 1 \(1\), 3 \(1\)"
    ):
        split_by_test_size(labels, 0.5, split_seed=0, stratify=True)


def test_stratify_rejects_too_few_test_samples(sample_labels):
    with pytest.raises(ValueError, match="cannot hold all 10 classes"):
        split_by_test_size(sample_labels[:100], 0.05, split_seed=0, stratify=True)


def test_missing_train_classes_reported(caplog):
    labels = np.repeat(np.arange(10), 10)
    with caplog.at_level(logging.WARNING):
        split = split_by_test_size(labels, 0.98, split_seed=100)

    assert len(split.train_indices) == 2
    assert len(split.missing_train_classes) == 8
    assert "classes with no training sample (8)" in caplog.text


def test_split_rejects_one_training_class():
    # 18 samples at test size 0.9 leave 1 for training: no head can learn from one class.
    labels = np.repeat(np.arange(3), 6)
    names = ["cat", "dog", "bird"]
    split = split_by_test_size(labels, 0.8, split_seed=0, class_names=names)
    assert len(np.unique(labels[split.train_indices])) >= 2

    with pytest.raises(
        ValueError, match=r"every training sample is of one class \((cat|dog|bird)\)"
    ):
        split_by_test_size(labels, 0.9, split_seed=0, class_names=names)


def test_missing_classes_logged_by_name(caplog):
    labels = np.repeat(np.arange(3), 4)
    names = ["cat", "dog", "fox"]
    with caplog.at_level(logging.WARNING):
        split = split_by_test_size(labels, 0.8, split_seed=0, class_names=names)

    missing = [names[c] for c in split.missing_train_classes]
    assert missing
    assert f"classes with no training sample ({len(missing)}): {', '.join(missing)}" in caplog.text


def test_k_shot_base_split_not_logged(caplog):
    # The base split's missing classes show up in the k-shot split's own log line, so
    # logging them for the base split too would repeat them once per k.
    labels = np.repeat(np.arange(10), 10)
    with caplog.at_level(logging.WARNING), pytest.warns(FewSamplesWarning):
        split_k_shot(labels, 1, 0.98, split_seed=100)

    assert caplog.text.count("classes with no training sample") == 1
    assert "k-shot 1: classes with no training sample (8)" in caplog.text


@pytest.mark.parametrize("k", [1, 5, 20])
def test_k_shot_draws_from_train_only(sample_labels, k):
    base = split_by_test_size(sample_labels, 0.5, split_seed=100)

    split = split_k_shot(sample_labels, k, test_size=0.5, split_seed=100)

    assert np.isin(split.train_indices, base.train_indices).all()
    assert np.array_equal(split.test_indices, base.test_indices)
    assert np.intersect1d(split.train_indices, split.test_indices).size == 0
    assert np.bincount(sample_labels[split.train_indices], minlength=10).tolist() == [k] * 10
    assert split.value == k
    assert split.protocol == "k-shot"


def test_k_shot_same_test_split_for_every_k(sample_labels):
    hashes_of_test = {
        hash_split(np.empty(0), split_k_shot(sample_labels, k, 0.5, 100).test_indices)
        for k in (1, 5, 10, 20)
    }
    assert len(hashes_of_test) == 1


def test_k_shot_deterministic(sample_labels):
    first = split_k_shot(sample_labels, 5, 0.5, split_seed=7)
    second = split_k_shot(sample_labels, 5, 0.5, split_seed=7)

    assert np.array_equal(first.train_indices, second.train_indices)
    assert first.split_hash == second.split_hash


def test_k_shot_small_class_warns_and_keeps_all():
    labels = np.array([0] * 40 + [1] * 40 + [2] * 4)
    with pytest.warns(
        FewSamplesWarning, match=r"fewer than 10 training samples keep all they have: 2 \("
    ):
        split = split_k_shot(labels, 10, test_size=0.5, split_seed=0)

    counts = np.bincount(labels[split.train_indices], minlength=3)
    assert counts[0] == 10
    assert counts[1] == 10
    assert 0 < counts[2] < 10


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_k_shot_rejects_invalid_k(sample_labels, k):
    with pytest.raises(ValueError, match="k-shot must be a positive integer"):
        split_k_shot(sample_labels, k, test_size=0.5, split_seed=0)


def test_k_shot_warning_names_classes():
    labels = np.array([0] * 40 + [1] * 40 + [2] * 4)

    with pytest.warns(FewSamplesWarning, match=r"keep all they have: triangle \(\d\)$"):
        split_k_shot(
            labels, 10, test_size=0.5, split_seed=0, class_names=["circle", "square", "triangle"]
        )
