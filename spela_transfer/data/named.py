"""Datasets by name: torchvision datasets, Debian's Fashion-MNIST files, and the packaged sample."""

from __future__ import annotations

import gzip
import importlib.resources
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from spela_transfer.data.sources import (
    ArraySource,
    FileSource,
    ImageSource,
    file_list_digest,
    file_sha256,
)

logger = logging.getLogger(__name__)

SAMPLE_NAME = "fashion-mnist-sample"
SAMPLE_RESOURCE = "fashion_mnist_sample.npz"
# Install folder of the IDX files of Debian's package dataset-fashion-mnist.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _mnist_like(cls_name: str) -> Callable[[str, str, bool], list[tuple[str, Any]]]:
    def build(root: str, split: str, download: bool) -> list[tuple[str, Any]]:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, cls_name)
        splits = ["train", "test"] if split == "all" else [split]
        return [(name, cls(root, train=name == "train", download=download)) for name in splits]

    return build


def _split_arg(
    cls_name: str, splits: dict[str, list[str]], **kwargs: Any
) -> Callable[[str, str, bool], list[tuple[str, Any]]]:
    def build(root: str, split: str, download: bool) -> list[tuple[str, Any]]:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, cls_name)
        names = splits["train"] + splits["test"] if split == "all" else splits[split]
        return [(name, cls(root, split=name, download=download, **kwargs)) for name in names]

    return build


# Split names map onto each dataset's own splits. `train` includes a validation split
# where the dataset has one, so that train and test together are the whole dataset.
TORCHVISION_DATASETS: dict[str, Callable[[str, str, bool], list[tuple[str, Any]]]] = {
    "cifar10": _mnist_like("CIFAR10"),
    "cifar100": _mnist_like("CIFAR100"),
    "mnist": _mnist_like("MNIST"),
    "fashion-mnist": _mnist_like("FashionMNIST"),
    "kmnist": _mnist_like("KMNIST"),
    "flowers102": _split_arg("Flowers102", {"train": ["train", "val"], "test": ["test"]}),
    "oxford-iiit-pet": _split_arg("OxfordIIITPet", {"train": ["trainval"], "test": ["test"]}),
    "fgvc-aircraft": _split_arg(
        "FGVCAircraft", {"train": ["trainval"], "test": ["test"]}, annotation_level="variant"
    ),
    "food101": _split_arg("Food101", {"train": ["train"], "test": ["test"]}),
}
GRAYSCALE_DATASETS = {"mnist", "fashion-mnist", "kmnist", SAMPLE_NAME}


def open_sample(split: str = "all") -> ArraySource:
    """Open the Fashion-MNIST sample shipped in the package: 500 test images per class.

    Raises:
        ValueError: `split` is `train`; the sample comes from the test split only.
    """
    if split == "train":
        raise ValueError(
            f"dataset {SAMPLE_NAME!r} contains only test-split images; use split 'test' or "
            "'all', or dataset 'fashion-mnist' for the full training split"
        )
    resource = importlib.resources.files("spela_transfer") / "_data" / SAMPLE_RESOURCE
    with importlib.resources.as_file(resource) as path:
        with np.load(path, allow_pickle=False) as arrays:
            images = arrays["images"]
            labels = arrays["labels"].astype(np.int64)
            source_index = arrays["source_index"]
        digest = file_sha256(Path(path))
    return ArraySource(
        name=SAMPLE_NAME,
        class_names=list(FASHION_MNIST_CLASSES),
        labels=labels,
        sample_ids=[f"{SAMPLE_NAME}:test:{index}" for index in source_index],
        identity={"kind": "sample", "name": SAMPLE_NAME, "split": "test", "sha256": digest},
        channels=1,
        images=images,
    )


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes, as MNIST and Fashion-MNIST ship.

    Raises:
        ValueError: The header is not that of a uint8 IDX array, or the data is short.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{str(path)!r} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise ValueError(
            f"{str(path)!r}: header promises {expected} bytes of shape {shape}, file has "
            f"{len(data) - offset}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def open_fashion_mnist_idx(root: Path, split: str = "all") -> ArraySource:
    """Open Fashion-MNIST from its four IDX files (`train-*` and `t10k-*`) in `root`.

    Raises:
        FileNotFoundError: An IDX file of the requested split is missing.
    """
    splits = ["train", "test"] if split == "all" else [split]
    images, labels, sample_ids, files = [], [], [], []
    for name in splits:
        image_file, label_file = (root / file_name for file_name in IDX_FILES[name])
        for file in (image_file, label_file):
            if not file.is_file():
                raise FileNotFoundError(
                    f"Fashion-MNIST file {str(file)!r} not found; install the Debian package "
                    "dataset-fashion-mnist, or pass --root with --download to fetch the "
                    "dataset with torchvision"
                )
        split_images, split_labels = read_idx(image_file), read_idx(label_file)
        images.append(split_images)
        labels.append(split_labels.astype(np.int64))
        sample_ids.extend(f"fashion-mnist:{name}:{index}" for index in range(len(split_labels)))
        files.extend([image_file, label_file])

    digest, _ = file_list_digest(files, root)
    return ArraySource(
        name="fashion-mnist",
        class_names=list(FASHION_MNIST_CLASSES),
        labels=np.concatenate(labels),
        sample_ids=sample_ids,
        identity={
            "kind": "torchvision",
            "name": "fashion-mnist",
            "split": split,
            "count": len(sample_ids),
            "idx_files_sha256": digest,
        },
        channels=1,
        images=np.concatenate(images) if len(images) > 1 else images[0],
    )


def open_torchvision(
    name: str, root: str | None, split: str = "all", download: bool = False
) -> ImageSource:
    """Open a torchvision dataset by name.

    `fashion-mnist` without `root` reads Debian's IDX files from
    /usr/share/datasets/fashion-mnist. Other datasets need `root`, and download only
    when `download` is true.

    Raises:
        ValueError: Unknown name, or no `root` for a dataset that needs one.
        FileNotFoundError: The dataset is not in `root` and `download` is false.
    """
    if name not in TORCHVISION_DATASETS:
        raise ValueError(
            f"unknown dataset name {name!r}; expected an image folder, a CSV file, "
            f"{SAMPLE_NAME!r}, or one of {', '.join(sorted(TORCHVISION_DATASETS))}"
        )
    if root is None and name == "fashion-mnist" and not download:
        return open_fashion_mnist_idx(DEBIAN_FASHION_MNIST, split)
    if root is None:
        raise ValueError(
            f"dataset {name!r} needs --root, the folder where torchvision keeps it "
            "(add --download to fetch it there)"
        )

    try:
        parts = TORCHVISION_DATASETS[name](root, split, download)
    except RuntimeError as error:
        if not download:
            raise FileNotFoundError(
                f"dataset {name!r} not found in root {root!r} ({error}); add --download to "
                "let torchvision fetch it"
            ) from error
        raise FileNotFoundError(
            f"downloading dataset {name!r} into {root!r} failed ({error}); check the network "
            "connection, or place the dataset files in the root yourself"
        ) from error
    except OSError as error:
        # Network failures (DNS, refused or timed-out connections) surface as OSError.
        raise FileNotFoundError(
            f"downloading dataset {name!r} into {root!r} failed ({error}); check the network "
            "connection, or place the dataset files in the root yourself"
        ) from error

    return _source_from_torchvision(name, split, parts)


def _source_from_torchvision(name: str, split: str, parts: list[tuple[str, Any]]) -> ImageSource:
    first = parts[0][1]
    classes = getattr(first, "classes", None)
    labels, sample_ids, images, paths = [], [], [], []
    for part_name, dataset in parts:
        if hasattr(dataset, "data"):
            data = np.asarray(dataset.data)
            images.append(data)
            labels.append(np.asarray(dataset.targets, dtype=np.int64))
            sample_ids.extend(f"{name}:{part_name}:{index}" for index in range(len(data)))
        else:
            files = list(getattr(dataset, "_image_files", None) or dataset._images)
            paths.extend(Path(file) for file in files)
            labels.append(np.asarray(dataset._labels, dtype=np.int64))
    labels_array = np.concatenate(labels)
    if classes is None:
        # Flowers-102 has no class names in torchvision; its labels are numbered from 1.
        classes = [str(index + 1) for index in range(int(labels_array.max()) + 1)]

    identity = {"kind": "torchvision", "name": name, "split": split, "count": len(labels_array)}
    channels = 1 if name in GRAYSCALE_DATASETS else 3
    if images:
        return ArraySource(
            name=name,
            class_names=list(classes),
            labels=labels_array,
            sample_ids=sample_ids,
            identity=identity,
            channels=channels,
            images=np.concatenate(images) if len(images) > 1 else images[0],
        )
    digest, _ = file_list_digest(sorted(paths), Path("/"))
    identity["file_list_sha256"] = digest
    return FileSource(
        name=name,
        class_names=list(classes),
        labels=labels_array,
        sample_ids=[str(path) for path in paths],
        identity=identity,
        channels=channels,
    )
