"""Reproducible balanced subsets: a fixed number of samples per class."""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def balanced_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Pick up to `limit` samples of every class at random, reproducibly.

    Args:
        labels: Label of each sample `[N]`.
        limit: Samples per class; a class with fewer keeps all of them (logged at
            debug level, because `extract_features` warns after skipped images are known).
        seed: Seed of the random choice; the same seed gives the same subset.

    Returns:
        Sorted indices into `labels` `[M]` int64, so the subset keeps the dataset order.

    Raises:
        ValueError: `limit` is not a positive integer.
    """
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")

    rng = np.random.default_rng(seed)
    chosen = []
    short = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < limit:
            short.append(f"{int(label)} ({len(members)})")
        chosen.append(rng.permutation(members)[:limit])
    if short:
        logger.debug(
            "%d class(es) have fewer than %d samples and keep all they have: %s",
            len(short),
            limit,
            ", ".join(short),
        )
    return np.sort(np.concatenate(chosen)).astype(np.int64)
