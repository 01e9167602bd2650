"""Datasets as image sources: image folders, CSV files, torchvision names, the packaged sample."""

from __future__ import annotations

from pathlib import Path

from spela_transfer.data.folder import IMAGE_EXTENSIONS, open_csv, open_image_folder
from spela_transfer.data.images import (
    UnreadableImageError,
    convert_mode,
    open_image,
    resize_and_crop,
)
from spela_transfer.data.named import (
    SAMPLE_NAME,
    TORCHVISION_DATASETS,
    open_fashion_mnist_idx,
    open_sample,
    open_torchvision,
    read_idx,
)
from spela_transfer.data.sources import ArraySource, FileSource, ImageSource
from spela_transfer.data.subset import balanced_subset

__all__ = [
    "IMAGE_EXTENSIONS",
    "SAMPLE_NAME",
    "TORCHVISION_DATASETS",
    "ArraySource",
    "FileSource",
    "ImageSource",
    "UnreadableImageError",
    "balanced_subset",
    "convert_mode",
    "open_csv",
    "open_dataset",
    "open_fashion_mnist_idx",
    "open_image",
    "open_image_folder",
    "open_sample",
    "open_torchvision",
    "read_idx",
    "resize_and_crop",
]


def open_dataset(
    dataset: str, *, root: str | None = None, split: str = "all", download: bool = False
) -> ImageSource:
    """Open a dataset by name or path.

    Args:
        dataset: `fashion-mnist-sample`, a torchvision name (`cifar10`, ...), a folder of
            class folders, or a `.csv` file of `path,label`.
        root: Folder of a torchvision dataset.
        split: `train`, `test` or `all`.
        download: Let torchvision download the dataset into `root`.

    Raises:
        ValueError: Unknown name, or an option the dataset does not take.
        FileNotFoundError: A path or dataset file does not exist.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if dataset == SAMPLE_NAME:
        return open_sample(split)
    if dataset in TORCHVISION_DATASETS:
        return open_torchvision(dataset, root, split, download)

    path = Path(dataset)
    if path.suffix.lower() == ".csv":
        if split != "all":
            raise ValueError(
                f"split {split!r} does not apply to a CSV dataset; make one CSV per split"
            )
        return open_csv(path)
    if path.is_dir():
        return open_image_folder(path, split)
    raise FileNotFoundError(
        f"dataset {dataset!r} is neither an existing folder, a .csv file, "
        f"{SAMPLE_NAME!r}, nor one of {', '.join(sorted(TORCHVISION_DATASETS))}"
    )
