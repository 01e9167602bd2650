"""Train/test splits of the evaluation protocols.

Two protocols share one rule: train and test indices never overlap, and each
split carries a hash of its indices so results can be traced back to it.

- test-size: `train_test_split(test_size=r, random_state=split_seed)` over the
  whole feature set, unstratified unless asked, the same split for every seed.
- k-shot: a fixed test split, then k training samples per class drawn from the
  rest only, so no test sample can leak into training.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

logger = logging.getLogger(__name__)


class FewSamplesWarning(UserWarning):
    """Warning that a class has fewer samples than the protocol requests."""


@dataclass(frozen=True)
class Split:
    """One protocol point: disjoint train and test indices into the feature set.

    Attributes:
        protocol: `test-size` or `k-shot`.
        value: The test size (a fraction) or k (samples per class).
        test_size: Fraction of all samples in the test part.
        train_indices: [N_train] int64, sorted.
        test_indices: [N_test] int64, sorted.
        split_hash: First 16 hex digits of the SHA-256 of both index arrays.
        missing_train_classes: Classes present in the data but absent from training.
    """

    protocol: str
    value: float | int
    test_size: float
    train_indices: np.ndarray
    test_indices: np.ndarray
    split_hash: str
    missing_train_classes: tuple[int, ...]


def hash_split(train_indices: np.ndarray, test_indices: np.ndarray) -> str:
    """Hash the sorted train and test indices [N] into 16 hex digits."""
    digest = hashlib.sha256()
    digest.update(np.sort(np.asarray(train_indices, dtype=np.int64)).tobytes())
    digest.update(b"|")
    digest.update(np.sort(np.asarray(test_indices, dtype=np.int64)).tobytes())
    return digest.hexdigest()[:16]


def split_by_test_size(
    labels: np.ndarray,
    test_size: float,
    split_seed: int,
    stratify: bool = False,
    class_names: Sequence[str] | None = None,
    log_missing: bool = True,
) -> Split:
    """Split every sample into train and test at one test size.

    Args:
        labels: [N] int64 class labels.
        test_size: Fraction of the samples held out for testing, in (0, 1).
        split_seed: `random_state` of scikit-learn's `train_test_split`.
        stratify: Keep the class proportions in both parts.
        class_names: Name of each label, used in the log; None logs the labels.
        log_missing: Log the classes left without a training sample.

    Returns:
        The split. A class that ends up with no training sample is listed in
        `missing_train_classes` and logged, not raised, so very large test sizes
        still produce a result.

    Raises:
        ValueError: `test_size` is outside (0, 1), either part would be empty or the
            training part of one class, or `stratify` is set and a class has too few
            samples to appear in both parts.
    """
    labels = np.asarray(labels)
    if isinstance(test_size, bool) or not 0 < test_size < 1:
        raise ValueError(f"test size must be strictly between 0 and 1, got {test_size!r}")
    num_samples = len(labels)
    num_test = int(np.ceil(test_size * num_samples))
    if num_test >= num_samples or num_test < 1:
        raise ValueError(
            f"test size {test_size!r} of {num_samples} samples leaves "
            f"{num_samples - num_test} for training and {num_test} for testing; "
            "pick a test size that keeps at least one sample in each part"
        )
    if stratify:
        _check_stratifiable(labels, test_size)

    indices = np.arange(num_samples, dtype=np.int64)
    train, test = train_test_split(
        indices,
        test_size=test_size,
        random_state=split_seed,
        stratify=labels if stratify else None,
    )
    return _make_split(
        "test-size", test_size, test_size, labels, train, test, class_names, log_missing
    )


def split_k_shot(
    labels: np.ndarray,
    k: int,
    test_size: float,
    split_seed: int,
    stratify: bool = False,
    class_names: Sequence[str] | None = None,
) -> Split:
    """Draw k training samples per class from the train part of a fixed split.

    The test part is the same for every k (`split_by_test_size` with the same seed),
    and the k samples come from the train part only.

    Args:
        labels: [N] int64 class labels.
        k: Training samples per class.
        test_size: Test fraction of the fixed split.
        split_seed: Seed of the fixed split and of the per-class draw, so every
            head seed trains on the same k samples.
        stratify: Stratify the fixed split.
        class_names: Name of each label, used in the warning; None prints the labels.

    Returns:
        The split. A class with fewer than k training samples keeps all it has,
        with a `FewSamplesWarning`.

    Raises:
        ValueError: `k` is not a positive integer, or the fixed split is invalid.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k-shot must be a positive integer, got {k!r}")
    labels = np.asarray(labels)
    # The classes this base split leaves out show up in the k-shot warning and split below.
    base = split_by_test_size(labels, test_size, split_seed, stratify=stratify, log_missing=False)

    # NOTE: the draw does not change with the head seed, so the std over seeds
    # leaves out the variance between different draws of k samples.
    generator = np.random.default_rng(split_seed)
    chosen = []
    short = []
    for label in np.unique(labels):
        pool = base.train_indices[labels[base.train_indices] == label]
        if len(pool) < k:
            name = class_names[int(label)] if class_names is not None else str(int(label))
            short.append(f"{name} ({len(pool)})")
            chosen.append(pool)
        else:
            chosen.append(generator.choice(pool, size=k, replace=False))
    if short:
        need = "no training sample" if k == 1 else f"fewer than {k} training samples"
        warnings.warn(
            f"{k}-shot: classes with {need} keep all they have: " + ", ".join(short),
            FewSamplesWarning,
            stacklevel=2,
        )

    train = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
    return _make_split(
        "k-shot", int(k), test_size, labels, train, base.test_indices, class_names, True
    )


def _check_stratifiable(labels: np.ndarray, test_size: float) -> None:
    classes, counts = np.unique(labels, return_counts=True)
    too_small = [f"{int(c)} ({int(n)})" for c, n in zip(classes, counts, strict=False) if n < 2]
    if too_small:
        raise ValueError(
            "cannot stratify: these classes have fewer than 2 samples (label (count)): "
            + ", ".join(too_small)
            + "; drop them or run without --stratify"
        )
    num_test = int(np.ceil(test_size * len(labels)))
    num_train = len(labels) - num_test
    if min(num_test, num_train) < len(classes):
        raise ValueError(
            f"cannot stratify at test size {test_size!r}: {num_train} training and "
            f"{num_test} test samples cannot hold all {len(classes)} classes; "
            "pick a less extreme test size or run without --stratify"
        )


def _make_split(
    protocol: str,
    value: float | int,
    test_size: float,
    labels: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    class_names: Sequence[str] | None,
    log_missing: bool,
) -> Split:
    train = np.sort(np.asarray(train, dtype=np.int64))
    test = np.sort(np.asarray(test, dtype=np.int64))
    train_classes = np.unique(labels[train])
    if len(train_classes) < 2:
        only = class_names[train_classes[0]] if class_names is not None else train_classes[0]
        raise ValueError(
            f"every training sample is of one class ({only}), and a head needs two; "
            "pick a smaller test size or use --stratify"
        )
    missing = tuple(int(c) for c in np.setdiff1d(np.unique(labels), train_classes))
    if missing and log_missing:
        names = [class_names[c] if class_names is not None else str(c) for c in missing]
        logger.warning(
            "%s %s: classes with no training sample (%d): %s",
            protocol,
            value,
            len(missing),
            ", ".join(names),
        )
    return Split(protocol, value, test_size, train, test, hash_split(train, test), missing)
