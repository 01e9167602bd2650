"""Frozen configuration dataclasses shared by the extraction and evaluation stages.

Each field has one command-line flag; YAML files in `configs/` supply defaults
that flags override. Validation happens once, in `__post_init__`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_BACKBONE = "resnet50.tv_in1k"
OFFLINE_BACKBONE = "efficientnet_lite0.offline"
SAMPLE_DATASET = "fashion-mnist-sample"


@dataclass(frozen=True)
class ExtractConfig:
    """What to extract and how: one request to the feature cache.

    Attributes:
        dataset: An image folder, a CSV of `path,label`, a torchvision dataset name
            (`cifar10`, `fashion-mnist`, ...), or `fashion-mnist-sample`, the sample
            shipped in the package.
        root: Folder of a torchvision dataset; for `fashion-mnist`, defaults to the
            files of Debian's `dataset-fashion-mnist` package.
        split: Split of a torchvision dataset: `train`, `test` or `all` (both).
        download: Let torchvision download the dataset into `root`.
        backbone: A timm model name (tags included), `efficientnet_lite0.offline`,
            or `pixels`.
        weights: Local `.pth` or `.safetensors` state dict that replaces the
            pretrained weights.
        pretrained: Load pretrained weights; False gives random init.
        image_size: Input size in pixels that overrides the backbone's pretrained
            config (for `pixels`, the side the image is resized to).
        batch_size: Images per backbone forward pass.
        num_workers: Image-decoding worker processes; None picks from the CPU count.
        dtype: Storage type of the cached features; both load as float32.
        limit: Images per class, drawn with `subset_seed`; None keeps every image.
        subset_seed: Seed of the per-class subset.
        on_bad_image: `skip` records undecodable images in the manifest; `fail` stops.
        cache_dir: Root folder of the feature cache.
        device: Torch device for the backbone (`cpu`, `cuda`, `cuda:1`, or `auto`).
    """

    dataset: str = SAMPLE_DATASET
    root: str | None = None
    split: Literal["train", "test", "all"] = "all"
    download: bool = False
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    pretrained: bool = True
    image_size: int | None = None
    batch_size: int = 64
    num_workers: int | None = None
    dtype: Literal["float32", "float16"] = "float32"
    limit: int | None = None
    subset_seed: int = 0
    on_bad_image: Literal["skip", "fail"] = "skip"
    cache_dir: str = "features"
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {self.split!r}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {self.dtype!r}")
        if self.on_bad_image not in ("skip", "fail"):
            raise ValueError(
                f"on_bad_image must be 'skip' or 'fail', got {self.on_bad_image!r}"
            )
        for name in ("batch_size", "image_size", "limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, got {self.num_workers!r}")
