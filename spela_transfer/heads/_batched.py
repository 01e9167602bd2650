"""Shared machinery for training S heads together: input checks, seeded init, optimizers.

Parameters of S heads are stacked along a leading axis ([S, D_out, D_in]), and one
optimizer instance updates the stack. Adam and SGD act elementwise, so a stacked
optimizer performs exactly the S separate updates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .config import BackpropConfig, SpelaConfig


def check_training_inputs(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """Validate features [N, D], labels [N] and num_classes before any training.

    Raises:
        TypeError: features or labels are not tensors.
        ValueError: A shape, dtype, value or class count that training cannot use.
    """
    if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"features and labels must be torch tensors, got {type(features).__name__} and "
            f"{type(labels).__name__}; convert numpy arrays with torch.from_numpy"
        )
    if features.dim() != 2:
        raise ValueError(f"features must be a 2-D tensor [N, D], got shape {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError(
            "features are empty (0 samples); pass at least one sample per class to fit a head"
        )
    if features.shape[1] == 0:
        raise ValueError("features have 0 columns; pass features [N, D] with D >= 1")
    if not features.is_floating_point():
        raise ValueError(f"features must be a floating-point tensor, got dtype {features.dtype}")
    if labels.shape != (features.shape[0],):
        raise ValueError(
            f"labels must have shape [N] = ({features.shape[0]},) to match features, "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")

    finite = torch.isfinite(features)
    if not bool(finite.all()):
        bad_rows = (~finite).any(dim=1).nonzero().flatten()
        raise ValueError(
            f"features contain NaN or inf in {bad_rows.numel()} rows (first row "
            f"{int(bad_rows[0])}); drop or impute those samples before fitting"
        )

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1} for num_classes={num_classes}, "
            f"got values from {low} to {high}; encode labels as class indices"
        )
    if low == high:
        raise ValueError(
            f"labels contain only one class ({low}); a classifier needs samples of at least "
            "two classes"
        )


def check_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    """Return seeds as a tuple after checking they are distinct non-negative integers."""
    if isinstance(seeds, (int, np.integer)) or not isinstance(seeds, Sequence) or len(seeds) == 0:
        raise ValueError(
            f"seeds must be a non-empty sequence of integers such as [0, 1, 2], got {seeds!r}"
        )
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"each seed must be a non-negative integer, got {seed!r} in {seeds!r}")
    if len(set(seeds)) < len(seeds):
        # A repeated seed trains an identical head, which would shrink the spread over seeds.
        raise ValueError(f"seeds must not repeat a value, got {list(seeds)!r}; list each once")
    return tuple(int(seed) for seed in seeds)


def check_device(device: str | torch.device) -> torch.device:
    """Return `device` as a torch.device, or raise when it is unknown or absent here."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must name a torch device such as 'cpu' or 'cuda', got {device!r}"
        ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} requested but CUDA is not available here; use device='cpu'"
        )
    return resolved


def shuffle_generator(seeds: tuple[int, ...]) -> torch.Generator:
    """Return the generator of the batch order, derived from the first seed.

    Every head of one call gets the same batch order, because the first layer of
    all heads runs as one matrix product over one batch. A separate stream from the
    initialisation keeps init and batch order independent.
    """
    derived = np.random.SeedSequence([seeds[0], 1]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(derived))


def batch_indices(
    num_samples: int, batch_size: int, shuffle: bool, generator: torch.Generator
) -> list[torch.Tensor]:
    """Split 0..num_samples-1 into batches, in a fresh random order when `shuffle`.

    The last batch contains the remainder, so every sample is used once per epoch.
    """
    order = (
        torch.randperm(num_samples, generator=generator) if shuffle else torch.arange(num_samples)
    )
    return list(order.split(batch_size))


def kaiming_normal(out_width: int, in_width: int, generator: torch.Generator) -> torch.Tensor:
    """Draw weights [out, in] from N(0, 2 / in), torch's default Kaiming-normal init."""
    return torch.randn(out_width, in_width, generator=generator) * math.sqrt(2.0 / in_width)


def make_optimizer(
    parameters: list[torch.Tensor], config: SpelaConfig | BackpropConfig, device: torch.device
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR | None]:
    """Build the configured optimizer, fused where torch supports it, and its step schedule.

    Both heads get optimizers from here, so SPELA and backprop use the same
    implementation with the same settings.
    """
    fused = device.type in ("cpu", "cuda")
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(parameters, lr=config.lr, fused=fused)
    else:
        optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, fused=fused)

    schedule = None
    if config.lr_step_epochs is not None:
        schedule = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=config.lr_step_epochs, gamma=config.lr_gamma
        )
    return optimizer, schedule
