"""`spela-transfer fit`: train and compare heads on cached features across protocols."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import re
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import yaml

from spela_transfer.cli._arguments import add_extraction_arguments
from spela_transfer.config import (
    OFFLINE_BACKBONE,
    ExperimentConfig,
    ExtractConfig,
    load_experiment_config,
    parse_seeds,
)
from spela_transfer.errors import CacheMismatchError

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fit",
        allow_abbrev=False,
        help="train SPELA, backprop and logistic-regression heads and report their accuracy",
        description="Train SPELA, backprop and logistic-regression heads on the same splits of "
        "cached features (extracting them first if needed), write runs.csv, summary.csv, "
        "run.json and plots, and print the summary as Markdown. Flags override the config file.",
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="experiment file, e.g. configs/demo.yaml; without it the offline demo settings "
        "apply. Unset flags keep the file's values",
    )
    source = parser.add_argument_group("features")
    source.add_argument(
        "--features", metavar="DIR", help="a feature cache folder to use instead of extracting"
    )
    add_extraction_arguments(
        parser, default_backbone=OFFLINE_BACKBONE, batch_size_flag="--extract-batch-size"
    )

    protocol = parser.add_argument_group("protocols")
    protocol.add_argument(
        "--heads", help="comma-separated heads: spela, backprop, logreg (default: all three)"
    )
    protocol.add_argument("--protocols", help="comma-separated protocols: test-size, k-shot")
    protocol.add_argument(
        "--test-sizes", metavar="R,...", help="fractions held out for testing, e.g. 0.1,0.5,0.9"
    )
    protocol.add_argument(
        "--k-shots", metavar="K,...", help="training samples per class, e.g. 1,5,10,20"
    )
    protocol.add_argument(
        "--k-shot-test-size",
        type=float,
        metavar="R",
        help="test fraction of the fixed split that k-shot runs evaluate on",
    )
    protocol.add_argument("--seeds", metavar="S,...", help="head seeds, e.g. 0,1,2")
    protocol.add_argument(
        "--split-seed", type=int, help="random_state of train_test_split (reference: 100)"
    )
    protocol.add_argument(
        "--stratify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stratify splits by label (the reference protocol does not)",
    )

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, help="epochs of the SPELA and backprop heads")
    training.add_argument("--batch-size", type=int, help="mini-batch size of the heads")
    training.add_argument("--lr", type=float, help="learning rate of the heads' optimizer")
    training.add_argument(
        "--hidden-widths",
        metavar="W,...",
        help="hidden layer widths, e.g. 512,64 (default: by class count)",
    )
    training.add_argument(
        "--spela",
        action="append",
        metavar="KEY=VALUE",
        help="further SPELA head setting, e.g. loss=log2cos or optimizer=sgd; repeat the flag "
        "for more settings",
    )
    training.add_argument(
        "--backprop",
        action="append",
        metavar="KEY=VALUE",
        help="further backprop head setting, e.g. optimizer=sgd; repeat the flag for more",
    )
    training.add_argument(
        "--logreg-max-iter",
        type=int,
        metavar="N",
        help="iteration limit of the logistic-regression probe (default: 1000)",
    )
    training.add_argument(
        "--device", help="torch device of the heads and backbone: cpu, cuda, cuda:N or auto"
    )
    training.add_argument(
        "--threads",
        type=int,
        help="CPU threads of torch and BLAS while heads train (the demo config uses 1)",
    )
    training.add_argument(
        "--parallel-fits",
        type=int,
        metavar="N",
        help="fits to run at once, each in its own process with --threads threads "
        "(default: 1; for long fits on an idle 2-core CPU, 2 with --threads 1 was fastest)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (default: results/<dataset>-<backbone>-<time>); "
        "pass the same folder with --resume to continue a sweep",
    )
    mode = output.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume", action="store_true", help="keep the finished runs in --out, run the rest"
    )
    mode.add_argument("--force", action="store_true", help="overwrite earlier results in --out")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config_path = resolve_config_path(args)
    config = load_experiment_config(config_path, overrides_from_args(args))

    # Imported here so that `spela-transfer --help` does not wait for torch.
    from spela_transfer.evaluation.report import write_report
    from spela_transfer.evaluation.runner import check_resume_settings, run_experiment

    # A mismatch found now costs no extraction; the cache key is checked after it.
    if args.resume and config.out:
        check_resume_settings(config.out, config)

    with warnings_to_log():
        try:
            features, config = load_or_extract(config, backbone_requested(args, config_path))
        except KeyboardInterrupt:
            raise KeyboardInterrupt(
                "complete feature chunks are kept; rerun the same command to resume extracting"
            ) from None
        out_dir = Path(config.out) if config.out else default_out_dir(config)
        try:
            runs = run_experiment(
                features,
                config,
                out_dir,
                resume=args.resume,
                force=args.force,
                command=command_line(args),
            )
        except KeyboardInterrupt:
            raise KeyboardInterrupt(interrupted_sweep_hint(out_dir)) from None
        markdown = write_report(out_dir, runs)
    print(markdown, end="")
    logger.info("results in %s", out_dir)
    return 0


def interrupted_sweep_hint(out_dir: Path) -> str:
    """Say how many runs an interrupted sweep kept in `out_dir` and how to continue it."""
    from spela_transfer.evaluation.results import RUN_KEY, RUNS_FILE, read_runs

    # A run is one head at one point with one seed, and it has a row per exit layer.
    try:
        runs = read_runs(out_dir)
        finished, rows = len(runs.drop_duplicates(list(RUN_KEY))), len(runs)
    except ValueError:
        finished = rows = 0
    if finished == 0:
        summary = "no run had finished"
    else:
        runs_text = "1 finished run" if finished == 1 else f"{finished} finished runs"
        rows_text = "1 row" if rows == 1 else f"{rows} rows"
        verb = "is" if finished == 1 else "are"
        summary = f"{runs_text} ({rows_text}) {verb} kept in {out_dir / RUNS_FILE}"
    return f"{summary}; rerun with --resume --out {out_dir} to continue"


def resolve_config_path(args: argparse.Namespace) -> str | Path | None:
    """Return `--config`, or with `--resume` and no `--config`, the saved config of `--out`."""
    if args.config is not None or not args.resume or args.out is None:
        return args.config
    from spela_transfer.evaluation.results import CONFIG_FILE

    saved = Path(args.out) / CONFIG_FILE
    if not saved.is_file():
        return None
    logger.debug("resume: starting from the settings saved in %s; flags override them", saved)
    return saved


@contextlib.contextmanager
def warnings_to_log() -> Iterator[None]:
    """Log Python warnings as one readable line each instead of the raw warning text.

    Library callers still get the typed warnings (such as `FewSamplesWarning`); only
    the command line turns them into log lines. A warning that every fit of a sweep
    raises again, such as crowded class vectors, is logged once.
    """
    logged: set[str] = set()

    def log_warning(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        if text not in logged:
            logged.add(text)
            logger.warning("%s", text)

    with warnings.catch_warnings():
        warnings.showwarning = log_warning
        yield


def command_line(args: argparse.Namespace) -> list[str]:
    """Rebuild an equivalent `spela-transfer fit` command from the parsed flags."""
    command = ["spela-transfer", "fit"]
    for dest, value in vars(args).items():
        if dest == "pretrained" and value is False:
            command.append("--no-pretrained")
            continue
        if dest in ("run", "command", "debug", "quiet") or value is None or value is False:
            continue
        flag = "--" + dest.replace("_", "-")
        if dest == "stratify":
            command.append(flag if value else "--no-stratify")
        elif value is True:
            command.append(flag)
        elif isinstance(value, list):
            for item in value:
                command += [flag, str(item)]
        else:
            command += [flag, str(value)]
    return command


def _given(*pairs: tuple[str, object]) -> dict:
    """Return the (key, value) pairs whose value was given, that is, is not None."""
    return {key: value for key, value in pairs if value is not None}


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Collect the flags that were given as config overrides keyed like the YAML file."""
    extract = _given(
        ("dataset", args.dataset),
        ("root", args.root),
        ("backbone", args.backbone),
        ("weights", args.weights),
        ("download_weights", args.download_weights),
        ("split", args.split),
        ("download", args.download),
        ("subset_seed", args.subset_seed),
        ("on_bad_image", args.on_bad_image),
        ("pretrained", args.pretrained),
        ("limit", args.limit),
        ("image_size", args.image_size),
        ("cache_dir", args.cache_dir),
        ("batch_size", args.extract_batch_size),
        ("num_workers", args.num_workers),
        ("dtype", args.dtype),
        ("device", args.device),
    )
    protocol = _given(
        ("names", _split_list(args.protocols, str, "--protocols")),
        ("test_sizes", _split_list(args.test_sizes, float, "--test-sizes")),
        ("k_shots", _split_list(args.k_shots, int, "--k-shots")),
        ("k_shot_test_size", args.k_shot_test_size),
        ("split_seed", args.split_seed),
        ("stratify", args.stratify),
    )
    overrides = _given(
        ("features", args.features),
        ("heads", _split_list(args.heads, str, "--heads")),
        ("seeds", parse_seeds(args.seeds, "--seeds") if args.seeds is not None else None),
        ("epochs", args.epochs),
        ("batch_size", args.batch_size),
        ("lr", args.lr),
        ("logreg_max_iter", args.logreg_max_iter),
        ("spela", _parse_settings(args.spela, "--spela")),
        ("backprop", _parse_settings(args.backprop, "--backprop")),
        ("hidden_widths", _split_list(args.hidden_widths, int, "--hidden-widths")),
        ("device", args.device),
        ("threads", args.threads),
        ("parallel_fits", args.parallel_fits),
        ("out", args.out),
    )
    if extract:
        overrides["extract"] = extract
    if protocol:
        overrides["protocol"] = protocol
    return overrides


def backbone_requested(args: argparse.Namespace, config_path: str | Path | None) -> bool:
    """Tell whether the flags or the config file name a backbone explicitly."""
    if args.backbone is not None:
        return True
    if config_path is None:
        return False
    data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    extract = data.get("extract") if isinstance(data, dict) else None
    return isinstance(extract, dict) and "backbone" in extract


def load_or_extract(config: ExperimentConfig, backbone_explicit: bool):
    """Load the `--features` cache or extract the config's features through the cache.

    Returns:
        The feature set and the config. With `--features`, the config's extraction
        settings are those the cache records, so the results describe how their
        features were made.

    Raises:
        FileNotFoundError: The `--features` folder does not exist.
        NotADirectoryError: `--features` names a file.
        CacheCorruptError: The `--features` folder is not a complete, consistent cache.
        CacheMismatchError: The cache was made by another backbone than requested.
    """
    if config.features is None:
        from spela_transfer.extract import extract_features

        return extract_features(config.extract, min_classes=2), config

    from spela_transfer.cache import load_features

    path = Path(config.features)
    features = load_features(path)
    cached_backbone = features.manifest.get("backbone")
    if backbone_explicit and cached_backbone != config.extract.backbone:
        raise CacheMismatchError(
            f"features in {str(path)!r} come from backbone {cached_backbone!r}, but the config "
            f"requests {config.extract.backbone!r}; pass --backbone {cached_backbone} or "
            "extract the requested backbone's features"
        )
    try:
        extract = ExtractConfig(**features.manifest["config"])
    except (KeyError, TypeError, ValueError):
        # A cache without a readable record of its settings still names its backbone.
        extract = dataclasses.replace(config.extract, backbone=cached_backbone)
    return features, dataclasses.replace(config, extract=extract)


def default_out_dir(config: ExperimentConfig) -> Path:
    """Build `results/<dataset>-<backbone>-<UTC time>` with file-safe characters."""
    dataset = Path(config.extract.dataset).name or config.extract.dataset
    name = f"{dataset}-{config.extract.backbone}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    return Path("results") / re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _parse_settings(items: list[str] | None, flag: str) -> dict | None:
    """Parse repeated `KEY=VALUE` flags into a mapping; each value is read as YAML."""
    if items is None:
        return None
    settings = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"{flag} expects KEY=VALUE, such as loss=log2cos; got {item!r}")
        settings[key.strip()] = yaml.safe_load(text)
    return settings


def _split_list(text: str | None, kind: type, flag: str) -> tuple | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return tuple(kind(item) for item in items)
    except ValueError:
        raise ValueError(
            f"{flag} expects comma-separated {kind.__name__} values, got {text!r}"
        ) from None
