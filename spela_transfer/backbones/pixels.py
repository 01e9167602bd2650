"""The `pixels` backbone: no model, the resized image itself flattened into features."""

from __future__ import annotations

from torch import nn

from spela_transfer.backbones._base import BackboneSpec, Preprocessing

PIXELS_NAME = "pixels"
# Side length when no image size is given: the native size of MNIST-style datasets,
# which gives the 784 inputs of raw-pixel MLP experiments.
DEFAULT_SIDE = 28


def pixels_spec(image_size: int | None = None, channels: int = 1) -> BackboneSpec:
    """Resolve the `pixels` backbone: features are pixel values in [0, 1], `[N, C * S * S]`.

    Args:
        image_size: Side `S` the whole image is resized to (aspect ratio not kept).
        channels: 1 for grayscale datasets, 3 for color ones.
    """
    side = image_size or DEFAULT_SIDE
    preprocessing = Preprocessing(
        input_size=(channels, side, side),
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="squash",
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
    )
    return BackboneSpec(
        name=PIXELS_NAME,
        model_name=PIXELS_NAME,
        weights={"source": "none"},
        preprocessing=preprocessing,
        builder=lambda device: nn.Flatten(),
    )
