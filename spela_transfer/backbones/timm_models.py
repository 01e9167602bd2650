"""Backbones built from timm model names, with pretrained, local-file or random weights.

Pretrained weights load only from the local Hugging Face or torch hub cache unless the
caller allows downloads, so a machine with no network fails at once with a message
instead of waiting on a connection.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from spela_transfer.backbones._base import BackboneSpec, Preprocessing
from spela_transfer.errors import BackboneUnavailableError

logger = logging.getLogger(__name__)

# Bare names that mean a specific pretrained tag. timm's own default for `resnet50` is
# `a1_in1k`; the SPELA transfer experiments used torchvision's ImageNet-1k weights.
ALIASES = {"resnet50": "resnet50.tv_in1k"}
# Seed of the random init for `pretrained=False`, so random-weight features are reproducible.
RANDOM_INIT_SEED = 0
# File names timm looks for in a Hugging Face model repository, in order.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def resolve_model_name(name: str) -> str:
    """Return the timm model name with its pretrained tag (`resnet50` -> `resnet50.tv_in1k`).

    Raises:
        ValueError: timm has no model of that name.
    """
    resolved = ALIASES.get(name, name)
    if not timm.is_model(resolved):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5)
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ValueError(
            f"backbone {name!r} is not a timm model name, `efficientnet_lite0.offline` or "
            f"`pixels`{hint}"
        )
    pretrained_cfg = timm.models.get_pretrained_cfg(resolved)
    if pretrained_cfg is not None and "." not in resolved:
        resolved = f"{resolved}.{pretrained_cfg.tag}" if pretrained_cfg.tag else resolved
    return resolved


def timm_spec(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    image_size: int | None = None,
    download: bool = False,
) -> BackboneSpec:
    """Resolve a timm backbone: model name with tag, weights identity and preprocessing.

    Args:
        name: A timm model name, tags included.
        pretrained: Load pretrained weights; False gives a seeded random init.
        weights: Local `.pth` or `.safetensors` state dict used instead of pretrained weights.
        image_size: Input size that replaces the pretrained config's.
        download: Allow downloading pretrained weights that are not in the local cache.

    Raises:
        ValueError: Unknown model name.
        FileNotFoundError: `weights` does not exist.
        BackboneUnavailableError: Pretrained weights are neither cached nor downloadable.
    """
    model_name = resolve_model_name(name)
    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    cfg_dict = pretrained_cfg.to_dict() if pretrained_cfg is not None else {}
    preprocessing = _resolve_preprocessing(cfg_dict, image_size)

    if weights is not None:
        weights_file = Path(weights)
        if not weights_file.is_file():
            raise FileNotFoundError(
                f"weights file {str(weights)!r} not found; pass the path of a .pth or "
                ".safetensors state dict"
            )
        identity = {"source": "file", "file": weights_file.name, "sha256": _sha256(weights_file)}

        def builder(device: torch.device) -> nn.Module:
            return _build_with_state_dict(model_name, weights_file)

    elif pretrained:
        weights_file = _cached_pretrained_file(name, model_name, cfg_dict, download)
        identity = {"source": "timm", "model": model_name, "sha256": _sha256(weights_file)}

        def builder(device: torch.device) -> nn.Module:
            return timm.create_model(
                model_name,
                pretrained=True,
                num_classes=0,
                pretrained_cfg_overlay={"file": str(weights_file)},
            )

    else:
        identity = {"source": "random", "seed": RANDOM_INIT_SEED}

        def builder(device: torch.device) -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                return timm.create_model(model_name, pretrained=False, num_classes=0)

    return BackboneSpec(
        name=name,
        model_name=model_name,
        weights=identity,
        preprocessing=preprocessing,
        builder=builder,
    )


def _resolve_preprocessing(cfg_dict: dict[str, Any], image_size: int | None) -> Preprocessing:
    # timm's data config resolution fills the defaults that a pretrained config leaves out.
    data_config = timm.data.resolve_data_config(pretrained_cfg=cfg_dict)
    channels, height, width = data_config["input_size"]
    if image_size is not None:
        height = width = image_size
    return Preprocessing(
        input_size=(channels, height, width),
        interpolation=data_config["interpolation"],
        crop_pct=float(data_config["crop_pct"]),
        crop_mode="squash" if data_config.get("crop_mode") == "squash" else "center",
        mean=tuple(float(value) for value in data_config["mean"]),
        std=tuple(float(value) for value in data_config["std"]),
    )


def _cached_pretrained_file(
    name: str, model_name: str, cfg_dict: dict[str, Any], download: bool
) -> Path:
    """Find the pretrained weights in the local caches, downloading only when allowed."""
    hf_hub_id = cfg_dict.get("hf_hub_id")
    url = cfg_dict.get("url")
    if not hf_hub_id and not url:
        raise BackboneUnavailableError(
            f"backbone {name!r}: timm has no pretrained weights for {model_name!r}; "
            "pass --weights PATH or --no-pretrained"
        )

    looked_in = []
    if hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        filenames = [cfg_dict["hf_hub_filename"]] if cfg_dict.get("hf_hub_filename") else []
        for filename in filenames or HF_WEIGHT_FILES:
            cached = try_to_load_from_cache(hf_hub_id, filename)
            if isinstance(cached, str):
                return Path(cached)
        looked_in.append(
            str(Path(constants.HF_HUB_CACHE) / f"models--{hf_hub_id.replace('/', '--')}")
        )
    if url:
        checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if checkpoint.is_file():
            return checkpoint
        looked_in.append(str(checkpoint))

    if download:
        return _download_pretrained(name, hf_hub_id, url)
    # The timm model name is shown only when it adds to the requested name.
    described = repr(name) if name == model_name else f"{name!r} ({model_name})"
    raise BackboneUnavailableError(
        f"pretrained weights of backbone {described} are not in the local cache "
        f"(looked in {' and '.join(looked_in)}); rerun with --download-weights on a machine "
        "with network access, pass a local state dict with --weights PATH, or use the "
        "offline backbone efficientnet_lite0.offline"
    )


def _download_pretrained(name: str, hf_hub_id: str | None, url: str | None) -> Path:
    # Short timeouts so that a machine without network fails instead of hanging.
    # NOTE: huggingface_hub reads HF_HUB_ETAG_TIMEOUT/HF_HUB_DOWNLOAD_TIMEOUT at import,
    # so these defaults only apply when it was not imported before this call.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        if hf_hub_id:
            from huggingface_hub import hf_hub_download

            for filename in HF_WEIGHT_FILES:
                try:
                    return Path(hf_hub_download(hf_hub_id, filename))
                except Exception as error:  # noqa: BLE001 - try the next file name first
                    last_error = error
            raise last_error
        checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(checkpoint), progress=False)
        return checkpoint
    except Exception as error:
        raise BackboneUnavailableError(
            f"downloading pretrained weights of backbone {name!r} failed ({error}); pass a "
            "local state dict with --weights PATH or use the offline backbone "
            "efficientnet_lite0.offline"
        ) from error


def _first_line(error: Exception, limit: int = 120) -> str:
    line = next((text for text in str(error).splitlines() if text.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a `.pth`/`.pt`/`.bin` (with `weights_only=True`) or `.safetensors` state dict.

    Raises:
        ValueError: The file has another extension or does not contain a state dict.
    """
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state_dict = load_file(str(path), device="cpu")
        except Exception as error:
            raise ValueError(
                f"weights file {str(path)!r} is not a valid .safetensors file "
                f"({_first_line(error)}); save it with safetensors.torch.save_file"
            ) from error
    elif suffix in (".pth", ".pt", ".bin"):
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            # torch's own message spans many lines and suggests weights_only=False, which
            # would run any code pickled in the file, so it is replaced by its gist.
            reason = (
                "it contains pickled objects other than tensors, which are never run"
                if isinstance(error, pickle.UnpicklingError)
                else f"{type(error).__name__}: {_first_line(error)}"
            )
            raise ValueError(
                f"weights file {str(path)!r} could not be loaded as a state dict with "
                f"weights_only=True ({reason}); save it with torch.save(model.state_dict(), path)"
            ) from error
    else:
        raise ValueError(
            f"weights file {str(path)!r} has extension {suffix!r}; expected .pth, .pt, .bin "
            "or .safetensors"
        )

    # Checkpoints often wrap the state dict in a training record.
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    if not isinstance(state_dict, dict) or not all(
        isinstance(value, torch.Tensor) for value in state_dict.values()
    ):
        raise ValueError(
            f"weights file {str(path)!r} does not contain a state dict of tensors "
            f"(found {type(state_dict).__name__})"
        )
    return state_dict


def _build_with_state_dict(model_name: str, path: Path) -> nn.Module:
    """Build `model_name` and load a local state dict strictly, naming any key mismatch."""
    state_dict = load_state_dict_file(path)
    # Build with the classifier the state dict has, load strictly, then drop the classifier.
    model = timm.create_model(model_name, pretrained=False)
    classifier = model.default_cfg.get("classifier")
    has_classifier = isinstance(classifier, str) and any(
        key.startswith(f"{classifier}.") for key in state_dict
    )
    if not has_classifier:
        model.reset_classifier(0)
    else:
        weight = state_dict.get(f"{classifier}.weight")
        if weight is not None and weight.ndim == 2 and weight.shape[0] != model.num_classes:
            model.reset_classifier(weight.shape[0])

    missing, unexpected = _key_mismatch(model.state_dict(), state_dict)
    if missing or unexpected:
        raise ValueError(
            f"weights file {str(path)!r} does not match timm model {model_name!r}: "
            f"missing keys {_preview(missing)}, unexpected keys {_preview(unexpected)}; "
            "pass the state dict of that architecture"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"weights file {str(path)!r} does not fit timm model {model_name!r}: {error}"
        ) from error
    model.reset_classifier(0)
    return model


def _key_mismatch(expected: dict, received: dict) -> tuple[list[str], list[str]]:
    missing = sorted(set(expected) - set(received))
    unexpected = sorted(set(received) - set(expected))
    return missing, unexpected


def _preview(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{shown}{more}]"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
