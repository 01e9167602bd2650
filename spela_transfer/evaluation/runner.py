"""Run every head × protocol point × seed on cached features and record the results.

Each finished run is appended to `runs.csv` at once (one row per exit layer),
so an interrupted sweep keeps every finished run and `resume=True` skips them.
The seeds of one head at one protocol point train together in one call of
`fit_spela` or `fit_backprop`, so they are written, and lost, together.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from spela_transfer import LOG_FORMAT
from spela_transfer.config import (
    ExperimentConfig,
    experiment_config_to_dict,
    save_experiment_config,
)
from spela_transfer.errors import SpelaTransferError
from spela_transfer.evaluation.metrics import Metrics, classification_metrics
from spela_transfer.evaluation.protocols import Split, split_by_test_size, split_k_shot
from spela_transfer.evaluation.results import (
    CONFIG_FILE,
    DETAILS_FILE,
    RESULT_FILES,
    RUN_JSON,
    RUNS_COLUMNS,
    RUNS_FILE,
    read_runs,
)
from spela_transfer.heads import fit_backprop, fit_spela

if TYPE_CHECKING:
    from spela_transfer.cache import FeatureSet

logger = logging.getLogger(__name__)

# Settings that change the numbers: a resumed sweep must match them. The first six act only
# through the SPELA and backprop head settings, which run.json also records after merging.
_HEAD_INPUT_KEYS = ("epochs", "batch_size", "lr", "hidden_widths", "spela", "backprop")
_FINGERPRINT_KEYS = (*_HEAD_INPUT_KEYS, "logreg_max_iter")
_FINGERPRINT_PROTOCOL_KEYS = ("split_seed", "stratify", "k_shot_test_size")
# Extraction settings that change the cache key, compared before extraction on resume.
_FINGERPRINT_EXTRACT_KEYS = (
    "dataset",
    "root",
    "split",
    "backbone",
    "weights",
    "pretrained",
    "image_size",
    "limit",
    "subset_seed",
    "dtype",
)


@dataclass(frozen=True)
class HeadFit:
    """Test scores of one head trained on one split, for all its seeds.

    Attributes:
        seeds: Seeds trained together.
        exit_layers: Names of the exits; the last is the head's output.
        scores: [S, L, N_test, C] scores on the test samples.
        fit_seconds: Wall time of training all seeds together, without scoring the
            test samples (for logreg, which is fast to score, with it).
        peak_rss_mb: Peak resident memory of the process during the fit, in MiB.
        peak_cuda_mb: Peak CUDA memory allocated during the fit, in MiB; None on CPU.
    """

    seeds: tuple[int, ...]
    exit_layers: tuple[str, ...]
    scores: np.ndarray
    fit_seconds: float
    peak_rss_mb: float
    peak_cuda_mb: float | None


def resolve_device(device: str) -> str:
    """Resolve `auto` to `cuda` when a GPU is usable, else `cpu`; check other names."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(
            f"device {device!r} is not a torch device; use cpu, cuda, cuda:N or auto"
        ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return device


def protocol_splits(
    labels: np.ndarray, config: ExperimentConfig, class_names: Sequence[str] | None = None
) -> Iterator[Split]:
    """Yield the split of every protocol point, test sizes first, then k-shots.

    Raises:
        ValueError: A point cannot be split (see `plan_splits` to skip such points).
    """
    for _, _, make_split in _point_makers(labels, config, class_names):
        yield make_split()


def plan_splits(
    labels: np.ndarray, config: ExperimentConfig, class_names: Sequence[str] | None = None
) -> tuple[list[Split], list[dict]]:
    """Split every protocol point before any training, setting aside points that cannot run.

    Returns:
        The splits that can run, and one `{"protocol", "point", "reason"}` mapping per
        point that cannot, such as a test size that leaves no training sample.

    Raises:
        ValueError: No protocol point can run, so the sweep would produce nothing.
    """
    splits: list[Split] = []
    skipped: list[dict] = []
    for protocol, point, make_split in _point_makers(labels, config, class_names):
        try:
            splits.append(make_split())
        except ValueError as error:
            skipped.append({"protocol": protocol, "point": point, "reason": str(error)})
            logger.warning("%s %s: skipped because %s", protocol, point, error)
    if not splits:
        reasons = "; ".join(
            f"{item['protocol']} {item['point']}: {item['reason']}" for item in skipped
        )
        raise ValueError(
            f"no protocol point can run on {len(labels)} samples ({reasons}); "
            "pick other --test-sizes or --k-shots, or use a larger dataset"
        )
    return splits, skipped


def _point_makers(
    labels: np.ndarray, config: ExperimentConfig, class_names: Sequence[str] | None
) -> Iterator[tuple[str, str, Callable[[], Split]]]:
    protocol = config.protocol
    if "test-size" in protocol.names:
        for test_size in protocol.test_sizes:
            yield (
                "test-size",
                f"{test_size:g}",
                partial(
                    split_by_test_size,
                    labels,
                    test_size,
                    protocol.split_seed,
                    protocol.stratify,
                    class_names,
                ),
            )
    if "k-shot" in protocol.names:
        for k in protocol.k_shots:
            yield (
                "k-shot",
                str(k),
                partial(
                    split_k_shot,
                    labels,
                    k,
                    protocol.k_shot_test_size,
                    protocol.split_seed,
                    protocol.stratify,
                    class_names,
                ),
            )


def point_label(split: Split) -> str:
    """Return the `point` column value: the test size (`0.1`) or k (`5`)."""
    return f"{split.value:g}" if split.protocol == "test-size" else str(split.value)


def check_output_folder(out_dir: Path, *, resume: bool, force: bool) -> list[str]:
    """Return the result files already in `out_dir`, changing nothing.

    Raises:
        ValueError: `resume` and `force` are both set.
        NotADirectoryError: `out_dir` is a file.
        SpelaTransferError: The folder contains results and neither flag is set.
    """
    if resume and force:
        raise ValueError("--resume and --force contradict each other; pass one of them")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output folder {str(out_dir)!r} is a file; pick another --out")

    existing = [name for name in RESULT_FILES if (out_dir / name).exists()]
    if existing and not (resume or force):
        raise SpelaTransferError(
            f"output folder {str(out_dir)!r} already contains results ({', '.join(existing)}); "
            "pass --resume to continue them, --force to overwrite them, or another --out"
        )
    return existing


def prepare_output_folder(out_dir: Path, *, resume: bool, force: bool) -> None:
    """Create `out_dir`, or clear or keep the results already in it.

    Raises:
        ValueError: `resume` and `force` are both set.
        SpelaTransferError: The folder contains results and neither flag is set.
    """
    existing = check_output_folder(out_dir, resume=resume, force=force)
    if force:
        for name in existing:
            (out_dir / name).unlink()
        plots = out_dir / "plots"
        if plots.is_dir():
            shutil.rmtree(plots)
    out_dir.mkdir(parents=True, exist_ok=True)


def run_experiment(
    features: FeatureSet,
    config: ExperimentConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    command: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Train and evaluate every head × protocol point × seed, appending to `runs.csv`.

    Args:
        features: Cached features and labels.
        config: The experiment.
        out_dir: Output folder for `runs.csv`, `details.jsonl`, `run.json` and `config.yaml`.
        resume: Keep the runs already in `runs.csv` and train only the missing ones.
        force: Delete earlier results in `out_dir` first.
        command: The command line, stored in `run.json`.

    Returns:
        All rows of `runs.csv`, earlier runs included.

    Raises:
        SpelaTransferError: `out_dir` contains results without `resume` or `force`, or
            the results there were made with other settings or features.
    """
    out_dir = Path(out_dir)
    device = resolve_device(config.device)
    check_features(features)
    for head in config.heads:
        if head != "logreg":
            _head_trainer(head, config)  # Invalid head settings fail before any file is written.
    check_output_folder(out_dir, resume=resume, force=force)
    labels = np.asarray(features.labels, dtype=np.int64)
    splits, skipped_points = plan_splits(labels, config, features.class_names)
    prepare_output_folder(out_dir, resume=resume, force=force)

    run_info = describe_run(features, config, device, command)
    run_info["skipped_points"] = skipped_points
    previous = _read_run_json(out_dir) if resume else None
    done = _load_done_runs(out_dir, run_info, previous) if resume else set()
    recorded = config
    if done and previous is not None:
        recorded = grown_sweep(config, previous)
        run_info["config"] = experiment_config_to_dict(recorded)
        # A head that only earlier runs trained keeps the settings it trained with.
        run_info["head_settings"] = {**previous.get("head_settings", {}), **head_settings(config)}
        run_info["seeds"] = list(recorded.seeds)
        run_info["skipped_points"] = list(
            _union(skipped_points, previous.get("skipped_points", []))
        )
    _write_json(out_dir / RUN_JSON, run_info)
    save_experiment_config(recorded, out_dir / CONFIG_FILE)

    # NOTE: every feature is loaded into memory as float32 once, so the cache must fit in RAM.
    all_features = features.load_features()
    num_classes = features.num_classes
    logger.info(
        "fit: %d samples × %d features, %d classes, heads %s, seeds %s, device %s, output %s",
        len(labels),
        all_features.shape[1],
        num_classes,
        ", ".join(config.heads),
        ", ".join(map(str, config.seeds)),
        device,
        out_dir,
    )

    context = {
        "backbone": features.manifest.get("backbone", ""),
        "dataset": dataset_name(features.manifest),
        "cache_key": features.key,
        "num_classes": num_classes,
        "epochs": config.epochs,
    }
    # Thread counts are global in torch and in the BLAS under scikit-learn, so both
    # are restored for the caller.
    previous_threads = torch.get_num_threads()
    blas_limit = threadpool_limits(config.threads) if config.threads else contextlib.nullcontext()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        with blas_limit:
            _run_points(all_features, labels, splits, config, done, device, out_dir, context)
    finally:
        torch.set_num_threads(previous_threads)

    return read_runs(out_dir)


@dataclass(frozen=True)
class FitTask:
    """One head trained on one split, all its seeds together."""

    head: str
    split: Split
    seeds: tuple[int, ...]


def _run_points(
    all_features: np.ndarray,
    labels: np.ndarray,
    splits: list[Split],
    config: ExperimentConfig,
    done: set[tuple],
    device: str,
    out_dir: Path,
    context: dict,
) -> None:
    tasks = []
    for split in splits:
        point = point_label(split)
        for head in config.heads:
            seeds = _seeds_for(head, config.seeds)
            todo = [seed for seed in seeds if (head, split.protocol, point, seed) not in done]
            if todo:
                tasks.append(FitTask(head, split, tuple(todo)))

    fit_settings = {"num_classes": context["num_classes"], "config": config, "device": device}
    if config.parallel_fits > 1 and len(tasks) > 1:
        finished = _fit_in_processes(tasks, all_features, labels, fit_settings)
    else:
        finished = ((task, _fit_head(task, all_features, labels, **fit_settings)) for task in tasks)

    # Each fit's rows are written as soon as it finishes, so an interruption loses only the
    # fits still running.
    for index, (task, fit) in enumerate(finished, start=1):
        logger.info(
            "%s %s %s, seeds %s: %d train / %d test, %.1f s (fit %d of %d)",
            task.head,
            task.split.protocol,
            point_label(task.split),
            ",".join(map(str, task.seeds)),
            len(task.split.train_indices),
            len(task.split.test_indices),
            fit.fit_seconds,
            index,
            len(tasks),
        )
        _append_runs(out_dir, task.head, task.split, fit, labels, context)


# Features, labels and BLAS thread limit of a fit process, set by `_start_fit_process`.
_PROCESS_DATA: dict = {}


def _fit_in_processes(
    tasks: list[FitTask], all_features: np.ndarray, labels: np.ndarray, fit_settings: dict
) -> Iterator[tuple[FitTask, HeadFit]]:
    """Run the fits in `parallel_fits` processes and yield each one as it finishes.

    The processes are started fresh (`spawn`), because PyTorch's issue tracker
    reports hangs in forked children of a process that has run OpenMP or MKL
    threads. They read the features from shared memory instead of a copy each.
    Leaving the loop early, by an error or an interrupt, terminates them.
    """
    config = fit_settings["config"]
    processes = min(config.parallel_fits, len(tasks))
    threads = config.threads or max(1, (os.cpu_count() or 1) // processes)
    # NOTE: this copies the features into shared memory (/dev/shm on Linux). A container
    # whose /dev/shm is smaller than the features needs parallel_fits 1 or a larger one.
    shared_features = torch.from_numpy(all_features).share_memory_()
    level = logging.getLogger("spela_transfer").getEffectiveLevel()
    with multiprocessing.get_context("spawn").Pool(
        processes,
        initializer=_start_fit_process,
        initargs=(shared_features, labels, threads, level),
    ) as pool:
        yield from pool.imap_unordered(partial(_fit_in_process, **fit_settings), tasks)


def _start_fit_process(
    features: torch.Tensor, labels: np.ndarray, threads: int, log_level: int
) -> None:
    # Ctrl-C reaches every process of the terminal. Only the parent handles it, by
    # terminating the pool, so the fit processes print no tracebacks of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    _PROCESS_DATA.update(
        features=features.numpy(), labels=labels, blas_limit=threadpool_limits(threads)
    )
    package_logger = logging.getLogger("spela_transfer")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(log_level)
    package_logger.propagate = False


def _fit_in_process(task: FitTask, **fit_settings) -> tuple[FitTask, HeadFit]:
    return task, _fit_head(task, _PROCESS_DATA["features"], _PROCESS_DATA["labels"], **fit_settings)


def check_features(features: FeatureSet, block_rows: int = 65536) -> None:
    """Reject features no head can train on; warn when every sample has the same features.

    Reads the features block by block, so the check needs memory for one block only.

    Raises:
        ValueError: Fewer than 2 classes among the labels, or NaN or inf in the features.
    """
    present = np.unique(np.asarray(features.labels))
    if len(present) < 2:
        names = [features.class_names[int(label)] for label in present]
        raise ValueError(
            f"features in {str(features.path)!r} contain {len(present)} class ({names}); the "
            "heads need at least 2 classes, so extract a dataset with more classes"
        )

    bad_rows: list[np.ndarray] = []
    first_row = np.asarray(features.features[:1], dtype=np.float32)
    all_equal = True
    for start in range(0, len(features), block_rows):
        block = np.asarray(features.features[start : start + block_rows], dtype=np.float32)
        bad_rows.append(start + np.flatnonzero(~np.isfinite(block).all(axis=1)))
        all_equal = all_equal and bool((block == first_row).all())
    bad = np.concatenate(bad_rows)
    if len(bad):
        if features.features.dtype == np.float16:
            fix = "float16 storage overflows above 65504, so extract again with --dtype float32"
        else:
            fix = "check those images and the backbone, and extract again without them"
        raise ValueError(
            f"features in {str(features.path)!r} contain NaN or inf in {len(bad)} of "
            f"{len(features)} rows (first: {features.sample_ids[int(bad[0])]!r}); {fix}"
        )
    if all_equal and len(features) > 1:
        logger.warning(
            "features in %s are the same for every sample, so every head will score at "
            "chance level; check the backbone and the images",
            features.path,
        )


def dataset_name(manifest: dict) -> str:
    """Return the dataset as requested at extraction (the manifest stores a mapping)."""
    dataset = manifest.get("dataset", "")
    if isinstance(dataset, dict):
        return str(dataset.get("requested") or dataset.get("name") or "")
    return str(dataset)


def describe_run(
    features: FeatureSet, config: ExperimentConfig, device: str, command: Sequence[str] | None
) -> dict:
    """Collect the resolved config, cache, package versions and machine for `run.json`."""
    # torch and torchvision report their build tag (2.14.1+cu130) only in __version__;
    # the manifest records that string, so run.json records the same one.
    import torchvision

    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__}
    for package in ("timm", "scikit-learn", "numpy", "spela-transfer"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": config.threads or torch.get_num_threads(),
        "device": device,
        "cuda_device": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
    }
    return {
        "config": experiment_config_to_dict(config),
        "head_settings": head_settings(config),
        "seeds": list(config.seeds),
        "cache_key": features.key,
        "cache_path": str(features.path),
        "backbone": features.manifest.get("backbone"),
        "dataset": dataset_name(features.manifest),
        "num_samples": len(features),
        "num_features": features.num_features,
        "num_classes": features.num_classes,
        "class_names": list(features.class_names),
        "versions": versions,
        "machine": machine,
        "command": list(command) if command is not None else None,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def head_settings(config: ExperimentConfig) -> dict[str, dict]:
    """Return the resolved `SpelaConfig` and `BackpropConfig` fields of the heads in use.

    They are plain JSON types, so they compare equal to the copy read back from run.json.
    """
    return {
        head: json.loads(json.dumps(asdict(config.head_config(head))))
        for head in ("spela", "backprop")
        if head in config.heads
    }


def grown_sweep(config: ExperimentConfig, previous: dict) -> ExperimentConfig:
    """Return `config` with the heads, seeds, protocols and points of `previous` added.

    A resume may request fewer of them than earlier runs used. The grown config is what
    run.json and config.yaml record, so they describe every run in the folder and a later
    resume without flags finishes all of them.
    """
    earlier = previous.get("config", {})
    earlier_protocol = earlier.get("protocol", {})
    protocol = replace(
        config.protocol,
        names=_union(config.protocol.names, earlier_protocol.get("names", ())),
        test_sizes=_union(config.protocol.test_sizes, earlier_protocol.get("test_sizes", ())),
        k_shots=_union(config.protocol.k_shots, earlier_protocol.get("k_shots", ())),
    )
    return replace(
        config,
        heads=_union(config.heads, earlier.get("heads", ())),
        seeds=_union(config.seeds, earlier.get("seeds", ())),
        protocol=protocol,
    )


def _union(current: Sequence, earlier: Sequence) -> tuple:
    """Return `current` followed by the values of `earlier` that it lacks."""
    return (*current, *(value for value in earlier if value not in current))


def _seeds_for(head: str, seeds: tuple[int, ...]) -> tuple[int, ...]:
    # lbfgs logistic regression is deterministic, so more seeds would repeat one number.
    return seeds[:1] if head == "logreg" else seeds


def _fit_head(
    task: FitTask,
    all_features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    config: ExperimentConfig,
    device: str,
) -> HeadFit:
    head, split, seeds = task.head, task.split, task.seeds
    train_features = all_features[split.train_indices]
    train_labels = labels[split.train_indices]
    test_features = all_features[split.test_indices]

    _reset_peak_memory(device)
    start = time.perf_counter()
    if head == "logreg":
        scores = _fit_logreg(
            train_features, train_labels, test_features, num_classes, config, seeds
        )
        exit_layers: tuple[str, ...] = ("output",)
    else:
        fit_function, head_config = _head_trainer(head, config)
        fitted = fit_function(
            torch.from_numpy(train_features),
            torch.from_numpy(train_labels),
            num_classes,
            head_config,
            seeds=list(seeds),
            device=device,
        )
        fit_seconds = time.perf_counter() - start
        scores = fitted.exit_scores(torch.from_numpy(test_features)).numpy()
        exit_layers = tuple(fitted.exit_layers)
    if head == "logreg":
        fit_seconds = time.perf_counter() - start
    peak_rss, peak_cuda = _peak_memory_mb(device)
    return HeadFit(tuple(seeds), exit_layers, scores, fit_seconds, peak_rss, peak_cuda)


def _head_trainer(head: str, config: ExperimentConfig):
    return (fit_spela if head == "spela" else fit_backprop), config.head_config(head)


def _fit_logreg(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    num_classes: int,
    config: ExperimentConfig,
    seeds: list[int],
) -> np.ndarray:
    per_seed = []
    for seed in seeds:
        probe = make_pipeline(
            StandardScaler(),
            LogisticRegression(max_iter=config.logreg_max_iter, random_state=seed),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            probe.fit(train_features, train_labels)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            logger.warning(
                "logreg did not converge in %d iterations; raise logreg_max_iter",
                config.logreg_max_iter,
            )

        # Classes absent from training get probability 0, so they rank last.
        scores = np.zeros((len(test_features), num_classes), dtype=np.float32)
        scores[:, probe.classes_] = probe.predict_proba(test_features)
        per_seed.append(scores[None])
    return np.stack(per_seed)


def _append_runs(
    out_dir: Path, head: str, split: Split, fit: HeadFit, labels: np.ndarray, context: dict
) -> None:
    test_labels = labels[split.test_indices]
    finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    details = []
    for seed_index, seed in enumerate(fit.seeds):
        for exit_index, exit_layer in enumerate(fit.exit_layers):
            metrics = classification_metrics(fit.scores[seed_index, exit_index], test_labels)
            is_output = exit_index == len(fit.exit_layers) - 1
            rows.append(
                _run_row(
                    head, split, seed, exit_layer, exit_index, is_output, metrics, fit, context
                )
                | {"finished_at": finished_at}
            )
            if is_output:
                details.append(
                    {
                        "head": head,
                        "protocol": split.protocol,
                        "point": point_label(split),
                        "seed": seed,
                        "split_hash": split.split_hash,
                        "per_class_accuracy": [
                            None if np.isnan(v) else float(v) for v in metrics.per_class_accuracy
                        ],
                        "confusion_matrix": metrics.confusion.tolist(),
                    }
                )

    # One write per fit, flushed and synced, so an interruption cannot leave half a run.
    # runs.csv is written last because it marks the fit as finished: a kill between the
    # two writes leaves detail records that a resume drops and writes again.
    with (out_dir / DETAILS_FILE).open("a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(item) + "\n" for item in details)
        handle.flush()
        os.fsync(handle.fileno())
    runs_path = out_dir / RUNS_FILE
    new_file = not runs_path.exists() or runs_path.stat().st_size == 0
    with runs_path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=RUNS_COLUMNS, lineterminator="\n")
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())


def _run_row(
    head: str,
    split: Split,
    seed: int,
    exit_layer: str,
    exit_index: int,
    is_output: bool,
    metrics: Metrics,
    fit: HeadFit,
    context: dict,
) -> dict:
    return {
        **context,
        "head": head,
        "protocol": split.protocol,
        "point": point_label(split),
        "test_size": f"{split.test_size:g}",
        "k_shot": split.value if split.protocol == "k-shot" else "",
        "seed": seed,
        "exit_layer": exit_layer,
        "exit_index": exit_index,
        "is_output": is_output,
        "top1": f"{metrics.top1:.6f}",
        "top5": "" if metrics.top5 is None else f"{metrics.top5:.6f}",
        "top5_note": metrics.top5_note,
        "balanced_accuracy": f"{metrics.balanced_accuracy:.6f}",
        "train_count": len(split.train_indices),
        "test_count": len(split.test_indices),
        "missing_train_classes": " ".join(map(str, split.missing_train_classes)),
        "split_hash": split.split_hash,
        "fit_seconds": f"{fit.fit_seconds / len(fit.seeds):.3f}",
        "seeds_trained_together": len(fit.seeds),
        "peak_rss_mb": f"{fit.peak_rss_mb:.1f}",
        "peak_cuda_mb": "" if fit.peak_cuda_mb is None else f"{fit.peak_cuda_mb:.1f}",
    }


def _read_run_json(out_dir: Path) -> dict | None:
    """Return the run.json of earlier results in `out_dir`, or None when there is none."""
    path = out_dir / RUN_JSON
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _load_done_runs(out_dir: Path, run_info: dict, previous: dict | None) -> set[tuple]:
    runs_path = out_dir / RUNS_FILE
    if not runs_path.exists():
        return set()

    if previous is not None:
        differences = _fingerprint_differences(previous, run_info)
        if differences:
            raise SpelaTransferError(_resume_mismatch_message(out_dir, differences))

    _drop_partial_line(runs_path)
    runs = read_runs(out_dir)
    outputs = runs[runs["is_output"].astype(str) == "True"]
    done = {(row.head, row.protocol, str(row.point), int(row.seed)) for row in outputs.itertuples()}
    logger.info("resume: %d finished runs in %s are kept", len(done), runs_path)
    _keep_details_of(out_dir / DETAILS_FILE, done)
    return done


def _keep_details_of(details_path: Path, done: set[tuple]) -> None:
    """Rewrite `details.jsonl` with only the records of finished runs."""
    if not details_path.exists():
        return
    kept = []
    for line in details_path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
            key = (item["head"], item["protocol"], str(item["point"]), int(item["seed"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a kill
        if key in done:
            kept.append(line + "\n")
    temporary = details_path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(kept), encoding="utf-8")
    temporary.replace(details_path)


def check_resume_settings(out_dir: str | Path, config: ExperimentConfig) -> None:
    """Reject a resume whose settings differ from those of the results in `out_dir`.

    Runs before extraction, so a mismatch costs no extraction. The cache key is
    compared later, once the features are known. Until then, the extraction settings
    that change the key stand in for it when neither run used `--features`. A
    `--features` path is not compared, because a copy of the same cache has the same key.

    Raises:
        SpelaTransferError: The results in `out_dir` were made with other settings.
    """
    out_dir = Path(out_dir)
    previous = _read_run_json(out_dir)
    if not (out_dir / RUNS_FILE).exists() or previous is None:
        return
    current_config = experiment_config_to_dict(config)
    current = {
        "cache_key": previous.get("cache_key"),
        "config": current_config,
        "head_settings": head_settings(config),
    }
    differences = _fingerprint_differences(previous, current)

    old_config = previous.get("config", {})
    if old_config.get("features") is None and current_config["features"] is None:
        old_extract = old_config.get("extract", {})
        for key in _FINGERPRINT_EXTRACT_KEYS:
            if old_extract.get(key) != current_config["extract"][key]:
                differences.append(
                    f"extract {key} {old_extract.get(key)!r} != {current_config['extract'][key]!r}"
                )
    if differences:
        raise SpelaTransferError(_resume_mismatch_message(out_dir, differences))


def _resume_mismatch_message(out_dir: Path, differences: list[str]) -> str:
    return (
        f"cannot resume {str(out_dir)!r}: its results were made with other settings "
        f"({'; '.join(differences)}); pass --force to overwrite them or pick another --out"
    )


def _fingerprint_differences(previous: dict, current: dict) -> list[str]:
    differences = []
    if previous.get("cache_key") != current.get("cache_key"):
        differences.append(
            f"cache key {previous.get('cache_key')!r} != {current.get('cache_key')!r}"
        )
    old_config, new_config = previous.get("config", {}), current["config"]
    keys = _FINGERPRINT_KEYS
    if "head_settings" in previous:
        # Compare what each head trains with, not how the flags spelled it.
        keys = tuple(key for key in keys if key not in _HEAD_INPUT_KEYS)
        differences += _head_differences(previous["head_settings"], current["head_settings"])
    for key in keys:
        if old_config.get(key) != new_config.get(key):
            differences.append(f"{key} {old_config.get(key)!r} != {new_config.get(key)!r}")
    old_protocol = old_config.get("protocol", {})
    for key in _FINGERPRINT_PROTOCOL_KEYS:
        if old_protocol.get(key) != new_config["protocol"].get(key):
            differences.append(
                f"{key} {old_protocol.get(key)!r} != {new_config['protocol'].get(key)!r}"
            )
    return differences


def _head_differences(previous: dict, current: dict) -> list[str]:
    """List the resolved head settings that differ, naming the head only where one differs."""
    compared = [head for head in current if head in previous]
    heads_by_change: dict[str, list[str]] = {}
    for head in compared:
        for name, value in current[head].items():
            if previous[head].get(name) != value:
                change = f"{name} {previous[head].get(name)!r} != {value!r}"
                heads_by_change.setdefault(change, []).append(head)
    return [
        change if len(heads) == len(compared) else f"{heads[0]} {change}"
        for change, heads in heads_by_change.items()
    ]


def _drop_partial_line(path: Path) -> None:
    # A process killed mid-write can leave a line without its newline; drop it.
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        kept = data[: data.rfind(b"\n") + 1]
        logger.warning(
            "runs.csv: dropping an unfinished last line of %d bytes", len(data) - len(kept)
        )
        path.write_bytes(kept)


def _reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    # Writing 5 to clear_refs resets the kernel's peak-RSS counter (VmHWM) on Linux.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_memory_mb(device: str) -> tuple[float, float | None]:
    peak_cuda = None
    if device.startswith("cuda"):
        peak_cuda = torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, peak_cuda
    except OSError:
        pass
    # NOTE: without /proc the peak is the process's lifetime maximum, not this run's.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, peak_cuda


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
