"""Image sources: the list of samples of a dataset, their labels, and how to load one.

File datasets are decoded one image at a time, when a sample is loaded. Array datasets
(MNIST family, CIFAR, the packaged sample) keep their uint8 arrays in memory, as
torchvision does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spela_transfer.data.images import UnreadableImageError, open_image


@dataclass
class ImageSource:
    """Samples of one dataset split with their labels.

    Attributes:
        name: Dataset name or path as requested.
        class_names: Class names; the index is the label.
        labels: Label of each sample `[N]` int64.
        sample_ids: File path, or `<dataset>:<split>:<index>` for array datasets.
        identity: What the cache key records about the data (file list digest, name
            and split, ...).
        channels: 1 when every image is grayscale by nature (MNIST family), else 3.
        details: Facts for the manifest, such as empty class folders.
    """

    name: str
    class_names: list[str]
    labels: np.ndarray
    sample_ids: list[str]
    identity: dict[str, Any]
    channels: int = 3
    details: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.class_names)}

    def load(self, index: int, target_size: tuple[int, int] | None = None) -> Image.Image:
        """Decode sample `index`; raises `UnreadableImageError` when it cannot."""
        raise NotImplementedError


@dataclass
class FileSource(ImageSource):
    """Samples stored as image files; `sample_ids` are their paths."""

    def load(self, index: int, target_size: tuple[int, int] | None = None) -> Image.Image:
        return open_image(self.sample_ids[index], target_size)


@dataclass
class ArraySource(ImageSource):
    """Samples held as a uint8 array `[N, H, W]` (grayscale) or `[N, H, W, 3]` (RGB)."""

    images: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1), np.uint8))

    def load(self, index: int, target_size: tuple[int, int] | None = None) -> Image.Image:
        array = self.images[index]
        if array.dtype != np.uint8:
            raise UnreadableImageError(
                f"{self.sample_ids[index]}: expected uint8 pixels, got {array.dtype}"
            )
        return Image.fromarray(np.ascontiguousarray(array))


def file_list_digest(paths: list[Path], base: Path) -> tuple[str, int]:
    """Digest of relative paths, sizes and modification times of the files.

    Returns:
        The sha256 hex digest and the total size in bytes. Missing and unreadable
        files (a symlink loop, no permission) count with size -1, so that restoring
        them changes the digest. Extraction records their decode error.
    """
    digest = hashlib.sha256()
    total = 0
    for path in paths:
        try:
            stat = path.stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime = -1, 0
        total += max(size, 0)
        relative = path.relative_to(base) if path.is_relative_to(base) else path
        # surrogateescape turns a file name that is not valid UTF-8 back into its raw bytes.
        line = f"{relative.as_posix()}\0{size}\0{mtime}\n"
        digest.update(line.encode("utf-8", "surrogateescape"))
    return digest.hexdigest(), total


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
