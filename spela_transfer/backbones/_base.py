"""The backbone types shared by every kind of backbone: preprocessing, spec and built model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Preprocessing:
    """Resolved image preprocessing of a backbone, stored with its features.

    Attributes:
        input_size: Channels, height and width of the model input `(C, H, W)`.
        interpolation: PIL resampling filter of the resize (`bilinear`, `bicubic`, ...).
        crop_pct: Fraction of the resized image kept by the center crop; 1.0 keeps all.
        crop_mode: `center` (resize the shorter side, then center-crop) or `squash`
            (resize both sides to the input size, ignoring the aspect ratio).
        mean: Per-channel mean subtracted after scaling pixels to [0, 1].
        std: Per-channel standard deviation divided by after the mean.
    """

    input_size: tuple[int, int, int]
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        channels = self.input_size[0]
        if channels not in (1, 3):
            raise ValueError(f"input_size must have 1 or 3 channels, got {self.input_size!r}")
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"mean and std need one value per channel ({channels}), "
                f"got mean={self.mean!r}, std={self.std!r}"
            )
        if self.crop_mode not in ("center", "squash"):
            raise ValueError(f"crop_mode must be 'center' or 'squash', got {self.crop_mode!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def resize_size(self) -> tuple[int, int]:
        """Width and height the image is resized to before the crop (shorter side for `center`)."""
        _, height, width = self.input_size
        if self.crop_mode == "squash":
            return width, height
        # Same rounding as timm's eval transform: floor(size / crop_pct).
        return int(width / self.crop_pct), int(height / self.crop_pct)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["input_size"] = list(self.input_size)
        values["mean"] = list(self.mean)
        values["std"] = list(self.std)
        return values


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone resolved from its name, without loading any weights.

    Everything the cache key needs is here, so a cache hit never builds the model.

    Attributes:
        name: The backbone name as requested (`resnet50`, `efficientnet_lite0.offline`).
        model_name: The timm model name with its pretrained tag, or `pixels`.
        weights: Identity of the weights: their source and a tag or file hash.
        preprocessing: Resolved image preprocessing.
        builder: Function that builds the frozen model on a device.
    """

    name: str
    model_name: str
    weights: dict[str, Any]
    preprocessing: Preprocessing
    builder: Callable[[torch.device], nn.Module] = field(repr=False, compare=False)

    def build(self, device: torch.device | str = "cpu") -> Backbone:
        """Build the frozen model in eval mode on `device`."""
        device = torch.device(device)
        model = self.builder(device)
        model.eval()
        model.requires_grad_(False)
        return Backbone(spec=self, model=model.to(device), device=device)


@dataclass
class Backbone:
    """A frozen feature extractor: images `[B, C, H, W]` to features `[B, D]`."""

    spec: BackboneSpec
    model: nn.Module
    device: torch.device

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def preprocessing(self) -> Preprocessing:
        return self.spec.preprocessing

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Compute features `[B, D]` float32 on the CPU of normalized images `[B, C, H, W]`."""
        features = self.model(images.to(self.device, non_blocking=True))
        if features.ndim != 2:
            raise RuntimeError(
                f"backbone {self.name!r} returned features of shape {tuple(features.shape)}, "
                "expected [B, D]; build timm models with num_classes=0"
            )
        return features.float().cpu()
