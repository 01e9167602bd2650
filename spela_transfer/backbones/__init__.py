"""Frozen backbones that turn images into features `[N, D]`.

`resolve_backbone` returns a `BackboneSpec` (name, weights identity, preprocessing)
without loading any weights, so the feature cache can be looked up first.
`create_backbone` builds the frozen model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from spela_transfer.backbones._base import Backbone, BackboneSpec, Preprocessing
from spela_transfer.backbones.offline import OFFLINE_NAME, offline_spec
from spela_transfer.backbones.pixels import PIXELS_NAME, pixels_spec
from spela_transfer.backbones.timm_models import ALIASES, resolve_model_name, timm_spec

__all__ = [
    "ALIASES",
    "OFFLINE_NAME",
    "PIXELS_NAME",
    "Backbone",
    "BackboneSpec",
    "Preprocessing",
    "create_backbone",
    "resolve_backbone",
    "resolve_model_name",
]


def resolve_backbone(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    image_size: int | None = None,
    channels: int = 3,
    download: bool = False,
) -> BackboneSpec:
    """Resolve a backbone name to its weights identity and preprocessing, loading no weights.

    Args:
        name: A timm model name (tags included), `efficientnet_lite0.offline`, or `pixels`.
        pretrained: Load pretrained weights; False gives a seeded random init.
        weights: Local `.pth`/`.safetensors` state dict used instead of pretrained weights.
        image_size: Input size that replaces the backbone's pretrained config.
        channels: Image channels of the dataset; only `pixels` keeps 1 (grayscale).
        download: Allow downloading pretrained weights missing from the local cache.

    Raises:
        ValueError: Unknown name, or an option the backbone does not take.
        FileNotFoundError: `weights` does not exist.
        BackboneUnavailableError: Pretrained weights cannot be had on this machine.
    """
    if name == OFFLINE_NAME:
        if weights is not None or not pretrained:
            raise ValueError(
                f"backbone {name!r} always uses its packaged weights; for other weights use "
                f"--backbone tf_efficientnet_lite0 with --weights or --no-pretrained"
            )
        return offline_spec(image_size)
    if name == PIXELS_NAME:
        if weights is not None:
            raise ValueError(f"backbone {name!r} has no weights, got weights={str(weights)!r}")
        return pixels_spec(image_size, channels=channels)
    return timm_spec(
        name, pretrained=pretrained, weights=weights, image_size=image_size, download=download
    )


def create_backbone(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    image_size: int | None = None,
    channels: int = 3,
    download: bool = False,
    device: torch.device | str = "cpu",
) -> Backbone:
    """Build a frozen backbone in eval mode; see `resolve_backbone` for the arguments."""
    spec = resolve_backbone(
        name,
        pretrained=pretrained,
        weights=weights,
        image_size=image_size,
        channels=channels,
        download=download,
    )
    return spec.build(device)
