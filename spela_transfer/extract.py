"""Feature extraction through the cache: `extract_features(config) -> FeatureSet`.

The request (backbone, weights, preprocessing, dataset, subset, dtype, versions) is
resolved without loading the backbone, so a cache hit costs a file listing and a
manifest read. Otherwise images are decoded in DataLoader workers, passed through the
frozen backbone batch by batch, and written to the cache chunk by chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import timm
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from spela_transfer import __version__
from spela_transfer.backbones import Backbone, BackboneSpec, Preprocessing, resolve_backbone
from spela_transfer.cache import (
    CHUNKS_DIR,
    MANIFEST_FILE,
    REQUEST_FILE,
    CacheWriter,
    Chunk,
    FeatureSet,
    cache_key,
    check_request,
    load_features,
)
from spela_transfer.config import ExtractConfig
from spela_transfer.data import (
    ArraySource,
    ImageSource,
    UnreadableImageError,
    balanced_subset,
    convert_mode,
    open_dataset,
    resize_and_crop,
)
from spela_transfer.errors import CacheMismatchError

logger = logging.getLogger(__name__)

# Rows per chunk: what an interrupted run loses at most, and the memory a chunk needs.
DEFAULT_CHUNK_SIZE = 2048
# Lock file inside a cache folder while extraction runs; deleted once the cache is complete.
LOCK_FILE = ".extract.lock"
# Version of the decode-and-resize code; part of the cache key because it changes pixels.
LOADER_VERSION = 1


def resolve_device(device: str) -> torch.device:
    """Turn `auto` into `cuda` when a GPU is usable, else `cpu`; check explicit CUDA devices.

    Raises:
        ValueError: A CUDA device is requested but CUDA is not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested, but CUDA is not available; use 'cpu'")
    return resolved


def build_request(config: ExtractConfig, spec: BackboneSpec, source: ImageSource) -> dict[str, Any]:
    """Build the identity of a request: everything the cache key covers."""
    # NOTE: the device is not part of the key, so features computed on a GPU and on the
    # CPU share a cache folder although their values differ in the last float digits.
    return {
        "backbone": spec.name,
        "model": spec.model_name,
        "weights": spec.weights,
        "preprocessing": {**spec.preprocessing.to_dict(), "loader_version": LOADER_VERSION},
        "dataset": source.identity,
        "class_names": source.class_names,
        "subset": {"limit": config.limit, "seed": config.subset_seed if config.limit else None},
        "dtype": config.dtype,
        "versions": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
        },
    }


def _cache_label(config: ExtractConfig, spec: BackboneSpec) -> str:
    dataset = Path(config.dataset).stem if config.dataset.endswith(".csv") else config.dataset
    dataset = Path(dataset.rstrip("/")).name or dataset
    split = "" if config.split == "all" else f"-{config.split}"
    return f"{dataset}{split}-{spec.name}"


def extract_features(
    config: ExtractConfig,
    *,
    progress: bool | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    min_classes: int = 1,
) -> FeatureSet:
    """Return the cached features of a request, extracting and caching them when missing.

    A complete cache is returned without loading the backbone. A partial one, left by
    an interrupted run, is resumed after its last complete chunk.

    Args:
        config: What to extract and how.
        progress: Show a tqdm progress bar; None shows one only when stderr is a terminal.
        chunk_size: Rows per cache chunk.
        min_classes: Fewest classes the request may contain; `spela-transfer fit`
            passes 2 because no head can learn from one class.

    Returns:
        The features, memory-mapped from the cache folder.

    Raises:
        CacheMismatchError: The cache folder, or a cache of another split of the same
            dataset, disagrees with this request (the message lists the differences).
        UnreadableImageError: An image cannot be decoded and `on_bad_image` is `fail`.
        BackboneUnavailableError: Pretrained weights cannot be had on this machine.
        ValueError: The dataset's file list has fewer than `min_classes` classes.
    """
    started = time.perf_counter()

    # Step 1: resolve the request without loading weights or decoding images.
    source = open_dataset(
        config.dataset, root=config.root, split=config.split, download=config.download
    )
    spec = resolve_backbone(
        config.backbone,
        pretrained=config.pretrained,
        weights=config.weights,
        image_size=config.image_size,
        channels=source.channels,
        download=config.download_weights,
    )
    if config.limit is not None:
        positions = balanced_subset(source.labels, config.limit, config.subset_seed)
    else:
        positions = np.arange(len(source), dtype=np.int64)
    _check_class_count(config, source, positions, min_classes)
    device = resolve_device(config.device)
    request = build_request(config, spec, source)
    key = cache_key(request, _cache_label(config, spec))
    folder = Path(config.cache_dir) / key

    # Step 2: a complete cache is a hit. Leftovers of a run killed after its manifest
    # was written are deleted below, under the lock.
    leftovers = (folder / CHUNKS_DIR).exists() or (folder / REQUEST_FILE).exists()
    if (folder / MANIFEST_FILE).is_file() and not leftovers:
        return _cache_hit(folder, request, config)

    _check_class_names_of_other_splits(Path(config.cache_dir), request, folder)

    # Step 3: under the lock, extract the chunks still missing, then merge them.
    with _extraction_lock(folder):
        if (folder / MANIFEST_FILE).is_file():
            # Another process finished this request while this one waited for the lock.
            shutil.rmtree(folder / CHUNKS_DIR, ignore_errors=True)
            (folder / REQUEST_FILE).unlink(missing_ok=True)
            return _cache_hit(folder, request, config)
        return _extract_into(
            folder, request, config, spec, source, positions, device, progress, chunk_size, started
        )


def _check_class_count(
    config: ExtractConfig, source: ImageSource, positions: np.ndarray, min_classes: int
) -> None:
    # The labels come from the file list, so this costs no decoding.
    present = np.unique(source.labels[positions])
    if len(present) >= min_classes:
        return
    names = ", ".join(source.class_names[int(label)] for label in present) or "none"
    raise ValueError(
        f"dataset {config.dataset!r} contains {len(present)} class ({names}), but at least "
        f"{min_classes} are needed to train and compare heads; pass a dataset with more classes"
    )


def _warn_short_classes(feature_set: FeatureSet, limit: int | None) -> None:
    """Warn about classes with fewer than `limit` extracted images, skipped ones excluded."""
    if limit is None:
        return
    counts = np.bincount(
        np.asarray(feature_set.labels, dtype=np.int64), minlength=feature_set.num_classes
    )
    short = [
        f"{feature_set.class_names[label]} ({int(count)})"
        for label, count in enumerate(counts)
        if count < limit
    ]
    if short:
        logger.warning(
            "%d of %d classes have fewer than %d extracted images (--limit), so they keep all "
            "they have: %s",
            len(short),
            len(counts),
            limit,
            ", ".join(short),
        )


def _cache_hit(folder: Path, request: dict[str, Any], config: ExtractConfig) -> FeatureSet:
    feature_set = load_features(folder)
    check_request(feature_set, request)
    skipped = feature_set.manifest["skipped"]
    if skipped and config.on_bad_image == "fail":
        raise UnreadableImageError(
            f"the cached features in {str(folder)!r} skipped {len(skipped)} undecodable "
            f"image(s), first {skipped[0]['sample_id']}: {skipped[0]['reason']}; on_bad_image "
            "is 'fail', so fix or remove those images (the dataset then gets a new cache key)"
        )
    logger.info("cache hit: %s (%d x %d)", folder, len(feature_set), feature_set.num_features)
    return dataclasses.replace(feature_set, cache_hit=True)


@contextlib.contextmanager
def _extraction_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder`, so one process at a time extracts into it.

    The kernel releases the lock of a process that dies, so a killed run never blocks
    the next one, which then resumes its chunks.
    """
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        # NOTE: without fcntl (Windows), two processes extracting the same request at
        # once are not serialized and may both write the same chunks.
        yield
        return
    with (folder / LOCK_FILE).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that is extracting into %s", folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
            # Deleting the lock while holding it is safe: a process that waits on the old
            # file, or locks a new one, finds the manifest and takes the cache hit path.
            if (folder / MANIFEST_FILE).is_file():
                (folder / LOCK_FILE).unlink(missing_ok=True)
        except Exception:
            # A run that failed before its first chunk (bad weights, say) leaves nothing to
            # resume, so the folder it created goes too.
            if created and not any((folder / CHUNKS_DIR).glob("chunk-*")):
                shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _extract_into(
    folder: Path,
    request: dict[str, Any],
    config: ExtractConfig,
    spec: BackboneSpec,
    source: ImageSource,
    positions: np.ndarray,
    device: torch.device,
    progress: bool | None,
    chunk_size: int,
    started: float,
) -> FeatureSet:
    """Extract the chunks of `folder` still missing, then merge them into the cache."""
    writer = CacheWriter(folder, request, total=len(positions), chunk_size=chunk_size)
    done = writer.completed_chunks()
    if done:
        logger.info(
            "resuming %s: %d of %d chunks already done", folder, len(done), writer.num_chunks
        )
    logger.info(
        "extracting %d images with %s on %s into %s", len(positions), spec.name, device, folder
    )
    backbone = spec.build(device)
    num_workers = _num_workers(config, source)
    extract_started = time.perf_counter()
    processed = _run_chunks(
        writer, done, backbone, source, positions, config, num_workers, progress
    )
    extract_seconds = time.perf_counter() - extract_started

    timing = {
        "seconds": round(time.perf_counter() - started, 3),
        "extract_seconds": round(extract_seconds, 3),
        "images_this_run": processed,
        "images_per_second": round(processed / extract_seconds, 2) if processed else None,
        "resumed_chunks": len(done),
        "device": str(device),
        "batch_size": config.batch_size,
        "num_workers": num_workers,
        "torch_threads": torch.get_num_threads(),
    }
    manifest = _manifest(config, spec, source, request, timing)
    sample_ids = [source.sample_ids[int(index)] for index in positions]
    feature_set = writer.finalize(source.labels[positions], sample_ids, manifest, config.dtype)
    skipped = feature_set.manifest["counts"]["skipped"]
    if skipped:
        logger.warning(
            "skipped %d undecodable image(s); their paths and reasons are in %s",
            skipped,
            folder / MANIFEST_FILE,
        )
    _warn_short_classes(feature_set, config.limit)
    return feature_set


def _manifest(
    config: ExtractConfig,
    spec: BackboneSpec,
    source: ImageSource,
    request: dict[str, Any],
    timing: dict[str, Any],
) -> dict[str, Any]:
    """Describe an extraction; the cache writer adds counts and skipped images."""
    return {
        "backbone": spec.name,
        "model": spec.model_name,
        "weights": spec.weights,
        "preprocessing": request["preprocessing"],
        "dataset": {**source.identity, "requested": config.dataset, **source.details},
        "class_names": source.class_names,
        "class_to_idx": source.class_to_idx,
        "subset": request["subset"],
        "versions": {**request["versions"], "spela_transfer": __version__},
        "request": request,
        "config": dataclasses.asdict(config),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timing": timing,
    }


def _check_class_names_of_other_splits(
    cache_dir: Path, request: dict[str, Any], folder: Path
) -> None:
    """Raise CacheMismatchError if a cached split of the same dataset has other classes."""
    dataset = request["dataset"]
    family = {name: value for name, value in dataset.items() if name in ("kind", "name", "root")}
    if "split" not in dataset or not cache_dir.is_dir():
        return
    for manifest_path in cache_dir.glob(f"*/{MANIFEST_FILE}"):
        if manifest_path.parent == folder:
            continue
        try:
            other = load_features(manifest_path.parent).manifest["request"]
        except (ValueError, KeyError, OSError):
            continue
        other_dataset = other.get("dataset", {})
        same_family = all(other_dataset.get(name) == value for name, value in family.items())
        if not same_family or other_dataset.get("split") == dataset["split"]:
            continue
        if other.get("class_names") != request["class_names"]:
            raise CacheMismatchError(
                f"split {dataset['split']!r} of {dataset.get('root') or dataset.get('name')} has "
                f"classes {request['class_names']!r}, but the cached split "
                f"{other_dataset.get('split')!r} in {str(manifest_path.parent)!r} has "
                f"{other.get('class_names')!r}; labels would not match between splits. "
                "Make both splits contain the same class folders"
            )


def _num_workers(config: ExtractConfig, source: ImageSource) -> int:
    if config.num_workers is not None:
        return config.num_workers
    # Array datasets decode in microseconds; worker processes would only add copying.
    cpus = os.cpu_count() or 1
    if isinstance(source, ArraySource) or cpus == 1:
        return 0
    # One core stays with the backbone's forward.
    # NOTE: the cap of 4 decoders is a guess; it was not measured on machines with more cores.
    return min(4, cpus - 1)


class _DecodeDataset(Dataset):
    """Decodes, converts and resizes one sample to uint8 `[H, W, C]`, or returns the error."""

    def __init__(self, source: ImageSource, positions: np.ndarray, preprocessing: Preprocessing):
        self.source = source
        self.positions = positions
        self.preprocessing = preprocessing
        # JPEGs larger than twice this size decode at a reduced scale.
        self.target_size = preprocessing.resize_size

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, position: int) -> tuple[int, np.ndarray | None, str]:
        """Return the position, the preprocessed image or None, and why it is None.

        The reason leaves out the sample id, which the manifest records beside it.
        """
        index = int(self.positions[position])
        try:
            image = self.source.load(index, self.target_size)
            image = convert_mode(image, self.preprocessing.channels)
            return position, resize_and_crop(image, self.preprocessing), ""
        except UnreadableImageError as error:
            return position, None, str(error).removeprefix(f"{self.source.sample_ids[index]}: ")
        except (OSError, ValueError) as error:
            # Some damaged files decode lazily and fail only in convert or resize.
            return position, None, f"cannot decode ({error})"


def _collate(items: list[tuple[int, np.ndarray | None, str]]) -> list:
    return items


def _batches(writer: CacheWriter, todo: list[int], batch_size: int) -> Iterator[list[int]]:
    # Batches never straddle chunks, so a chunk is complete when its last batch is done.
    for index in todo:
        chunk = writer.chunk_range(index)
        for start in range(chunk.start, chunk.stop, batch_size):
            yield list(range(start, min(start + batch_size, chunk.stop)))


def _normalize(batch: np.ndarray, preprocessing: Preprocessing) -> torch.Tensor:
    """uint8 `[B, H, W, C]` to normalized float32 `[B, C, H, W]`."""
    if not batch.flags.writeable:
        batch = batch.copy()
    images = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(preprocessing.mean).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, -1, 1, 1)
    return images.sub_(mean).div_(std).contiguous()


def _run_chunks(
    writer: CacheWriter,
    done: set[int],
    backbone: Backbone,
    source: ImageSource,
    positions: np.ndarray,
    config: ExtractConfig,
    num_workers: int,
    progress: bool | None,
) -> int:
    """Extract every chunk not in `done`; return the number of images processed."""
    todo = [index for index in range(writer.num_chunks) if index not in done]
    if not todo:
        return 0
    batches = list(_batches(writer, todo, config.batch_size))
    total = sum(len(batch) for batch in batches)
    loader = DataLoader(
        _DecodeDataset(source, positions, backbone.preprocessing),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=backbone.device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )
    bar = _progress_bar(total, progress)
    processed = 0
    started = time.perf_counter()
    pending: dict[int, dict[str, list]] = {}

    for items in loader:
        chunk_index = items[0][0] // writer.chunk_size
        buffer = pending.setdefault(
            chunk_index, {"positions": [], "features": [], "skipped": [], "reasons": []}
        )
        good = [(position, array) for position, array, _ in items if array is not None]
        for position, array, reason in items:
            if array is None:
                sample_id = source.sample_ids[int(positions[position])]
                if config.on_bad_image == "fail":
                    raise UnreadableImageError(
                        f"{sample_id}: {reason}; set on_bad_image to 'skip' (--on-bad-image "
                        "skip) to skip undecodable images and record them in the manifest"
                    )
                logger.warning("skipping image: %s: %s", sample_id, reason)
                buffer["skipped"].append(position)
                buffer["reasons"].append(reason)
        if good:
            batch = _normalize(np.stack([array for _, array in good]), backbone.preprocessing)
            features = backbone(batch).numpy().astype(config.dtype)
            buffer["positions"].extend(position for position, _ in good)
            buffer["features"].append(features)

        covered = len(buffer["positions"]) + len(buffer["skipped"])
        if covered == len(writer.chunk_range(chunk_index)):
            _flush(writer, chunk_index, pending.pop(chunk_index), config.dtype)
        processed += len(items)
        if bar is not None:
            bar.update(len(items))
        elif processed % max(config.batch_size * 50, 1) < len(items):
            rate = processed / (time.perf_counter() - started)
            logger.info("extracted %d of %d images (%.1f images/s)", processed, total, rate)

    if bar is not None:
        bar.close()
    return processed


def _flush(writer: CacheWriter, index: int, buffer: dict[str, list], dtype: str) -> None:
    features = (
        np.concatenate(buffer["features"]) if buffer["features"] else np.zeros((0, 0), dtype=dtype)
    )
    writer.write_chunk(
        Chunk(
            index=index,
            positions=np.asarray(buffer["positions"], dtype=np.int64),
            features=features,
            skipped_positions=np.asarray(buffer["skipped"], dtype=np.int64),
            skipped_reasons=np.asarray(buffer["reasons"], dtype=str),
        )
    )


def _progress_bar(total: int, progress: bool | None):
    show = sys.stderr.isatty() if progress is None else progress
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="extract", file=sys.stderr)
