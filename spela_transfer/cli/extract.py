"""`spela-transfer extract`: compute backbone features of a dataset into the feature cache."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from spela_transfer.cache import FeatureSet
from spela_transfer.cli._arguments import add_extraction_arguments
from spela_transfer.config import DEFAULT_BACKBONE, ExtractConfig, build_config

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
    add_extraction_arguments(
        parser, default_backbone=DEFAULT_BACKBONE, batch_size_flag="--batch-size"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument(
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
    file_values: dict[str, Any] = {}
    if args.config:
        file_values = _yaml_values(Path(args.config))
        # Checked alone first, so that a bad value in the file is reported with its name.
        build_config(ExtractConfig, args.config, **file_values)
    flag_values = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(ExtractConfig)
        if getattr(args, field.name, None) is not None
    }
    return build_config(ExtractConfig, "command-line flags", **{**file_values, **flag_values})


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
