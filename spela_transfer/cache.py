"""The on-disk feature cache: one folder per extraction request, written in atomic chunks.

A cache folder contains, once complete:

- `features.npy`: features `[N, D]`, float32 or float16, memory-mappable;
- `labels.npy`: labels `[N]` int64;
- `sample_ids.json`: the path or `<dataset>:<split>:<index>` of each row;
- `manifest.json`: how the features were made, counts, skipped images and timing.
  It is written last, so a folder without it is never a valid cache;
- `.extract.lock`: an empty file that `extract_features` locks while it writes, so
  that a second process with the same request waits and then finds a cache hit.

While an extraction runs, the folder contains `request.json` and `chunks/chunk-<i>.npz`
instead. Each chunk is written to a temporary name, synced, and renamed, so a rerun
resumes after the last complete chunk. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spela_transfer.errors import CacheCorruptError, CacheMismatchError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
REQUEST_FILE = "request.json"
FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"
SAMPLE_IDS_FILE = "sample_ids.json"
CHUNKS_DIR = "chunks"
_CHUNK_NAME = re.compile(r"chunk-(\d{6})\.npz")


@dataclass(frozen=True)
class FeatureSet:
    """Cached features of one extraction, with labels and the manifest.

    Attributes:
        path: The cache folder.
        key: The cache key, which is the folder name.
        features: Features `[N, D]`, memory-mapped, float32 or float16 as stored.
        labels: Labels `[N]` int64 in `0 .. num_classes - 1`.
        class_names: Class names; the index is the label.
        sample_ids: Path or `<dataset>:<split>:<index>` of each row.
        manifest: The JSON manifest: backbone, weights, preprocessing, dataset, counts,
            skipped images, versions and timing.
        cache_hit: True when `extract_features` found the features already cached.
    """

    path: Path
    key: str
    features: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    sample_ids: list[str]
    manifest: dict[str, Any]
    cache_hit: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def load_features(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Return a float32 copy of the features `[N, D]`, or of the given rows `[len(rows), D]`."""
        selected = self.features if rows is None else self.features[np.asarray(rows)]
        return np.array(selected, dtype=np.float32, copy=True)


def load_features(path: str | Path) -> FeatureSet:
    """Open a complete cache folder; the features stay memory-mapped.

    Raises:
        FileNotFoundError: `path` does not exist.
        NotADirectoryError: `path` is a file.
        CacheCorruptError: The folder is not a complete cache, or its files disagree.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        # A file inside a cache folder, such as its manifest, is most likely meant as the folder.
        if (folder.parent / MANIFEST_FILE).is_file():
            hint = f"pass the cache folder that holds it, {str(folder.parent)!r}"
        else:
            hint = "pass a folder written by spela-transfer extract"
        raise NotADirectoryError(f"feature cache {str(folder)!r} is a file, not a folder; {hint}")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"feature cache {str(folder)!r} not found; pass a folder written by "
            "spela-transfer extract"
        )
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        hint = (
            "its extraction was interrupted; rerun the same extract command to resume it"
            if (folder / REQUEST_FILE).is_file()
            else "it is not a spela-transfer feature cache; pass a folder written by "
            "spela-transfer extract"
        )
        raise CacheCorruptError(f"feature cache {str(folder)!r} has no {MANIFEST_FILE}: {hint}")

    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CacheCorruptError(
            f"feature cache {str(folder)!r}: {MANIFEST_FILE} is not valid JSON ({error}); "
            "delete the folder and extract again"
        ) from error
    if not isinstance(manifest, dict):
        raise CacheCorruptError(
            f"feature cache {str(folder)!r}: {MANIFEST_FILE} contains a JSON "
            f"{type(manifest).__name__}, not an object; delete the folder and extract again"
        )
    if manifest.get("format") != FORMAT_VERSION or not manifest.get("complete"):
        raise CacheCorruptError(
            f"feature cache {str(folder)!r} has format {manifest.get('format')!r} and "
            f"complete={manifest.get('complete')!r}; this version reads complete caches of "
            f"format {FORMAT_VERSION}. Delete the folder and extract again"
        )

    try:
        features = np.load(folder / FEATURES_FILE, mmap_mode="r", allow_pickle=False)
        labels = np.load(folder / LABELS_FILE, allow_pickle=False)
        sample_ids = json.loads((folder / SAMPLE_IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CacheCorruptError(
            f"feature cache {str(folder)!r} is damaged ({error}); delete the folder and "
            "extract again"
        ) from error

    try:
        class_names = list(manifest["class_names"])
        counts = manifest["counts"]
        expected_shape = (int(counts["extracted"]), int(counts["num_features"]))
        stored_dtype = np.dtype(manifest["dtype"])
    except (KeyError, TypeError, ValueError) as error:
        raise CacheCorruptError(
            f"feature cache {str(folder)!r}: {MANIFEST_FILE} has a missing or invalid field "
            f"({type(error).__name__}: {error}); delete the folder and extract again"
        ) from error
    problems = []
    if features.ndim != 2 or features.shape != expected_shape:
        problems.append(f"features have shape {features.shape}, manifest says {expected_shape}")
    if features.dtype != stored_dtype:
        problems.append(f"features are {features.dtype}, manifest says {manifest['dtype']}")
    if labels.shape != (expected_shape[0],) or labels.dtype != np.int64:
        problems.append(
            f"labels have shape {labels.shape} and dtype {labels.dtype}, expected "
            f"({expected_shape[0]},) and int64"
        )
    elif len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        problems.append(f"labels fall outside 0..{len(class_names) - 1}")
    if len(sample_ids) != expected_shape[0]:
        problems.append(f"{len(sample_ids)} sample ids for {expected_shape[0]} rows")
    request = manifest.get("request")
    for name in ("backbone", "class_names"):
        # These fields are stored twice, so a hand edit of one copy shows as a difference.
        if isinstance(request, dict) and name in request and request[name] != manifest.get(name):
            problems.append(
                f"{name} {_short(manifest.get(name))} differs from the request's "
                f"{_short(request[name])}"
            )
    if problems:
        raise CacheCorruptError(
            f"feature cache {str(folder)!r} is inconsistent: {'; '.join(problems)}; delete "
            "the folder and extract again"
        )

    return FeatureSet(
        path=folder,
        key=folder.name,
        features=features,
        labels=labels,
        class_names=class_names,
        sample_ids=list(sample_ids),
        manifest=manifest,
    )


def cache_key(request: dict[str, Any], label: str = "") -> str:
    """Folder name of a request: a readable label plus 16 hex digits of the request's sha256."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._-")[:60]
    return f"{slug}-{digest}" if slug else digest


def describe_differences(cached: Any, requested: Any, prefix: str = "") -> list[str]:
    """List the fields that differ between two JSON-like values: `field: cached X, requested Y`."""
    if isinstance(cached, dict) and isinstance(requested, dict):
        differences = []
        for name in sorted(set(cached) | set(requested)):
            field = f"{prefix}.{name}" if prefix else str(name)
            differences += describe_differences(cached.get(name), requested.get(name), field)
        return differences
    if _jsonable(cached) == _jsonable(requested):
        return []
    return [f"{prefix or 'value'}: cached {_short(cached)}, requested {_short(requested)}"]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_request(feature_set: FeatureSet, request: dict[str, Any]) -> None:
    """Raise CacheMismatchError, listing what differs, unless the cache was made for `request`."""
    differences = describe_differences(feature_set.manifest.get("request", {}), request)
    if differences:
        raise CacheMismatchError(
            f"feature cache {str(feature_set.path)!r} was made for another request: "
            f"{'; '.join(differences[:6])}"
            + (f" and {len(differences) - 6} more" if len(differences) > 6 else "")
            + "; delete the folder or choose another --cache-dir"
        )


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file, sync it, and rename it to `path`."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # A directory sync makes the rename itself durable on POSIX file systems.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@dataclass
class Chunk:
    """Rows of one chunk: extracted positions with their features, and skipped positions."""

    index: int
    positions: np.ndarray
    features: np.ndarray
    skipped_positions: np.ndarray
    skipped_reasons: np.ndarray


class CacheWriter:
    """Writes one extraction into its cache folder, chunk by chunk, resumably.

    Positions `0 .. total - 1` index the samples of the request in order; chunk `i`
    covers positions `[i * chunk_size, (i + 1) * chunk_size)`.
    """

    def __init__(self, folder: Path, request: dict[str, Any], total: int, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.folder = folder
        self.request = request
        self.total = total
        self.chunks_dir = folder / CHUNKS_DIR
        self.chunks_dir.mkdir(parents=True, exist_ok=True)

        request_path = folder / REQUEST_FILE
        if request_path.is_file():
            stored = json.loads(request_path.read_text(encoding="utf-8"))
            differences = describe_differences(stored["request"], request)
            if differences:
                raise CacheMismatchError(
                    f"partial feature cache {str(folder)!r} belongs to another request: "
                    f"{'; '.join(differences[:6])}; delete the folder and extract again"
                )
            # Resume with the chunk size the interrupted run used, so chunk ranges line up.
            chunk_size = stored["chunk_size"]
        else:
            payload = {"request": request, "chunk_size": chunk_size, "total": total}
            write_atomic(request_path, json.dumps(payload, indent=2).encode())
        self.chunk_size = chunk_size

    @property
    def num_chunks(self) -> int:
        return -(-self.total // self.chunk_size)

    def chunk_range(self, index: int) -> range:
        return range(index * self.chunk_size, min((index + 1) * self.chunk_size, self.total))

    def completed_chunks(self) -> set[int]:
        """Indices of the chunks already on disk and intact; damaged ones are deleted."""
        completed = set()
        for path in self.chunks_dir.iterdir():
            match = _CHUNK_NAME.fullmatch(path.name)
            if match is None:
                if path.name.endswith(".tmp"):
                    path.unlink()  # left by an interrupted write
                continue
            index = int(match[1])
            try:
                self._read_chunk(index)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
                logger.warning("deleting damaged chunk %s: %s", path, error)
                path.unlink()
                continue
            completed.add(index)
        return completed

    def write_chunk(self, chunk: Chunk) -> None:
        """Write one chunk atomically; its rows must cover exactly the chunk's position range."""
        covered = np.sort(np.concatenate([chunk.positions, chunk.skipped_positions]))
        expected = np.asarray(self.chunk_range(chunk.index), dtype=np.int64)
        if not np.array_equal(covered, expected):
            raise ValueError(
                f"chunk {chunk.index} covers positions {covered[:3]}..., expected "
                f"{expected[0]}..{expected[-1]}"
            )
        path = self.chunks_dir / f"chunk-{chunk.index:06d}.npz"
        temporary = path.with_name(f".{path.name}.tmp")
        with temporary.open("wb") as file:
            np.savez(
                file,
                positions=chunk.positions.astype(np.int64),
                features=chunk.features,
                skipped_positions=chunk.skipped_positions.astype(np.int64),
                skipped_reasons=chunk.skipped_reasons.astype(str),
            )
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        _fsync_dir(self.chunks_dir)

    def _read_chunk(self, index: int) -> Chunk:
        path = self.chunks_dir / f"chunk-{index:06d}.npz"
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise CacheCorruptError(f"chunk {index} is a single array, not an .npz archive")
        with loaded as arrays:
            chunk = Chunk(
                index=index,
                positions=arrays["positions"],
                features=arrays["features"],
                skipped_positions=arrays["skipped_positions"],
                skipped_reasons=arrays["skipped_reasons"],
            )
        covered = np.sort(np.concatenate([chunk.positions, chunk.skipped_positions]))
        if not np.array_equal(covered, np.asarray(self.chunk_range(index), dtype=np.int64)):
            raise CacheCorruptError(f"chunk {index} does not cover its position range")
        return chunk

    def iter_chunks(self) -> Iterable[Chunk]:
        for index in range(self.num_chunks):
            yield self._read_chunk(index)

    def finalize(
        self,
        labels: np.ndarray,
        sample_ids: Sequence[str],
        manifest: dict[str, Any],
        dtype: str,
    ) -> FeatureSet:
        """Merge the chunks into `features.npy`, write labels, ids and manifest, delete the chunks.

        Args:
            labels: Label of every position `[total]`.
            sample_ids: Sample id of every position.
            manifest: Manifest fields; counts and skipped images are added here.
            dtype: Storage dtype of the features.

        Raises:
            ValueError: No image could be extracted.
        """
        kept_positions = []
        skipped = []
        num_features = None
        for chunk in self.iter_chunks():
            kept_positions.append(chunk.positions)
            skipped += [
                {"sample_id": sample_ids[int(position)], "reason": str(reason)}
                for position, reason in zip(
                    chunk.skipped_positions, chunk.skipped_reasons, strict=True
                )
            ]
            if len(chunk.positions):
                num_features = chunk.features.shape[1]
        positions = np.concatenate(kept_positions) if kept_positions else np.zeros(0, np.int64)
        if num_features is None:
            raise ValueError(
                f"no image of the {self.total} requested could be decoded ({len(skipped)} "
                f"skipped, first: {skipped[0]['reason'] if skipped else 'none'})"
            )

        # Append the chunks one by one to a plain .npy file, so memory stays at one chunk.
        # Writing through a memory map instead would count every written page as resident.
        temporary = self.folder / f".{FEATURES_FILE}.tmp"
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": (len(positions), int(num_features)),
        }
        with temporary.open("wb") as file:
            np.lib.format.write_array_header_1_0(file, header)
            for chunk in self.iter_chunks():
                if len(chunk.positions):
                    file.write(np.ascontiguousarray(chunk.features, dtype=dtype).tobytes())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.folder / FEATURES_FILE)

        kept_labels = np.asarray(labels, dtype=np.int64)[positions]
        buffer = _npy_bytes(kept_labels)
        write_atomic(self.folder / LABELS_FILE, buffer)
        kept_ids = [sample_ids[int(position)] for position in positions]
        write_atomic(self.folder / SAMPLE_IDS_FILE, json.dumps(kept_ids).encode())

        class_names = manifest["class_names"]
        manifest = {
            **manifest,
            "format": FORMAT_VERSION,
            "complete": True,
            "key": self.folder.name,
            "dtype": dtype,
            "counts": {
                "requested": self.total,
                "extracted": len(positions),
                "skipped": len(skipped),
                "num_features": int(num_features),
                "num_classes": len(class_names),
                "per_class": np.bincount(kept_labels, minlength=len(class_names)).tolist(),
            },
            "skipped": skipped,
        }
        # The manifest is the completion mark, so it is written after everything else.
        write_atomic(self.folder / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
        shutil.rmtree(self.chunks_dir, ignore_errors=True)
        (self.folder / REQUEST_FILE).unlink(missing_ok=True)
        return load_features(self.folder)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
