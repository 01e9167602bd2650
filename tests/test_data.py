"""Datasets and images: folders, CSV, named datasets, conversions, subsets."""

from __future__ import annotations

import gzip
import logging
import struct

import numpy as np
import pytest
from PIL import Image

from spela_transfer.backbones import Preprocessing
from spela_transfer.data import (
    UnreadableImageError,
    balanced_subset,
    convert_mode,
    open_csv,
    open_dataset,
    open_fashion_mnist_idx,
    open_image,
    open_image_folder,
    open_sample,
    open_torchvision,
    read_idx,
    resize_and_crop,
)
from spela_transfer.data.named import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES


def _save(path, mode="RGB", size=(12, 10), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


# Conversions


def test_grayscale_to_rgb_repeats_channel():
    image = convert_mode(Image.new("L", (4, 4), 77), channels=3)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (77, 77, 77)


def test_rgb_to_grayscale_for_one_channel():
    image = convert_mode(Image.new("RGB", (4, 4), (255, 255, 255)), channels=1)
    assert image.mode == "L"
    assert image.getpixel((0, 0)) == 255


def test_palette_to_rgb():
    image = Image.new("P", (4, 4))
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((1, 1), 1)
    converted = convert_mode(image, channels=3)
    assert converted.mode == "RGB"
    assert converted.getpixel((1, 1)) == (10, 200, 30)
    assert converted.getpixel((0, 0)) == (0, 0, 0)


def test_palette_transparency_composited_on_white(tmp_path):
    image = Image.new("P", (4, 4))
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((1, 1), 1)
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    converted = convert_mode(open_image(path), channels=3)
    assert converted.getpixel((0, 0)) == (255, 255, 255)
    assert converted.getpixel((1, 1)) == (10, 200, 30)


def test_rgba_composited_on_white():
    image = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 0, 128))
    converted = convert_mode(image, channels=3)
    assert converted.mode == "RGB"
    assert converted.getpixel((0, 0)) == (255, 255, 255)
    assert converted.getpixel((1, 0))[0] in (126, 127, 128)


def test_gray_alpha_composited_on_white():
    converted = convert_mode(Image.new("LA", (2, 2), (0, 0)), channels=1)
    assert converted.mode == "L"
    assert converted.getpixel((0, 0)) == 255


def test_cmyk_jpeg_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)
    converted = convert_mode(open_image(path), channels=3)
    assert converted.mode == "RGB"
    red, green, blue = converted.getpixel((8, 8))
    assert red > 200
    assert green < 60
    assert blue < 60


def test_16bit_png_scaled_to_8bit(tmp_path):
    path = tmp_path / "deep.png"
    values = np.array([[0, 256 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    converted = convert_mode(open_image(path), channels=1)
    assert converted.mode == "L"
    assert np.asarray(converted).tolist() == [[0, 100, 255]]


def test_one_bit_to_rgb():
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    converted = convert_mode(image, channels=3)
    assert converted.getpixel((0, 0)) == (0, 0, 0)
    assert converted.getpixel((1, 0)) == (255, 255, 255)


def test_float_image_clipped():
    image = Image.fromarray(np.array([[-5.0, 40.5, 300.0]], dtype=np.float32), mode="F")
    assert np.asarray(convert_mode(image, channels=1)).tolist() == [[0, 40, 255]]


# Decoding


def test_truncated_jpeg_is_unreadable(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UnreadableImageError, match=r"cut\.jpg: cannot decode"):
        open_image(path)


def test_text_file_is_unreadable(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(UnreadableImageError, match=r"notes\.png: not a recognized image format"):
        open_image(path)


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(UnreadableImageError, match=r"gone\.png: file not found"):
        open_image(tmp_path / "gone.png")


def test_large_jpeg_decodes_at_reduced_scale(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (1000, 800), (9, 9, 9)).save(path)
    assert open_image(path, target_size=(256, 256)).size == (500, 400)
    assert open_image(path).size == (1000, 800)
    # A target larger than half the image keeps the full size.
    assert open_image(path, target_size=(600, 600)).size == (1000, 800)


PREPROCESSING = Preprocessing((3, 8, 8), "bilinear", 0.5, "center", (0.5,) * 3, (0.5,) * 3)


def test_resize_and_crop_center():
    array = resize_and_crop(Image.new("RGB", (40, 20), (5, 6, 7)), PREPROCESSING)
    assert array.shape == (8, 8, 3)
    assert array.dtype == np.uint8
    assert array[0, 0].tolist() == [5, 6, 7]


def test_resize_and_crop_squash_grayscale():
    preprocessing = Preprocessing((1, 6, 6), "bilinear", 1.0, "squash", (0.0,), (1.0,))
    array = resize_and_crop(Image.new("L", (30, 10), 9), preprocessing)
    assert array.shape == (6, 6, 1)


# Image folders


def test_image_folder_classes_and_labels(tmp_path):
    for name in ("b.png", "a.png"):
        _save(tmp_path / "dog" / name)
    _save(tmp_path / "cat" / "x.jpg")
    source = open_image_folder(tmp_path)
    assert source.class_names == ["cat", "dog"]
    assert source.labels.tolist() == [0, 1, 1]
    assert [p.rsplit("/", 1)[1] for p in source.sample_ids] == ["x.jpg", "a.png", "b.png"]
    assert source.identity["files"] == 3


def test_image_folder_ignores_dot_folders_and_other_files(tmp_path):
    _save(tmp_path / "cat" / "x.png")
    _save(tmp_path / ".ipynb_checkpoints" / "y.png")
    _save(tmp_path / "cat" / ".hidden" / "z.png")
    (tmp_path / "cat" / "readme.txt").write_text("hello")
    source = open_image_folder(tmp_path)
    assert source.class_names == ["cat"]
    assert len(source) == 1


def test_image_folder_reports_empty_class(tmp_path, caplog):
    _save(tmp_path / "cat" / "x.png")
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING):
        source = open_image_folder(tmp_path)
    assert source.class_names == ["cat"]
    assert source.details["empty_class_folders"] == ["empty"]
    assert "left out 1 empty class folder(s)" in caplog.text
    assert "empty" in caplog.text


def test_image_folder_digest_changes_with_files(tmp_path):
    _save(tmp_path / "cat" / "x.png")
    before = open_image_folder(tmp_path).identity["file_list_sha256"]
    _save(tmp_path / "cat" / "y.png")
    assert open_image_folder(tmp_path).identity["file_list_sha256"] != before


def test_image_folder_split_layout_shares_classes(tmp_path):
    _save(tmp_path / "train" / "cat" / "a.png")
    _save(tmp_path / "train" / "dog" / "b.png")
    _save(tmp_path / "test" / "dog" / "c.png")
    train = open_image_folder(tmp_path, "train")
    test = open_image_folder(tmp_path, "test")
    both = open_image_folder(tmp_path, "all")
    assert train.class_names == test.class_names == ["cat", "dog"]
    assert test.labels.tolist() == [1]
    assert len(both) == 3
    assert train.identity["split"] == "train"


def test_image_folder_split_without_layout(tmp_path):
    _save(tmp_path / "cat" / "a.png")
    with pytest.raises(ValueError, match=r"split 'train' needs sub-folders .*train"):
        open_image_folder(tmp_path, "train")


def test_image_folder_without_images(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(ValueError, match=r"contains no image files in class sub-folders"):
        open_image_folder(tmp_path)


def test_image_folder_split_without_images(tmp_path):
    _save(tmp_path / "train" / "cat" / "a.png")
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"split 'test': no image files found"):
        open_image_folder(tmp_path, "test")


def test_image_folder_not_a_directory(tmp_path):
    with pytest.raises(NotADirectoryError, match=r"is not a directory"):
        open_image_folder(tmp_path / "missing")


# CSV


def test_csv_relative_and_absolute_paths(tmp_path):
    first = _save(tmp_path / "img" / "a.png")
    second = _save(tmp_path / "elsewhere" / "b.png")
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(f"path,label\nimg/a.png,10\n{second},2\n")
    source = open_csv(csv_path)
    assert source.class_names == ["2", "10"]
    assert source.labels.tolist() == [1, 0]
    assert source.sample_ids == [str(first), str(second)]


def test_csv_string_labels_sorted(tmp_path):
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("label,path\nzebra,a.png\nant,b.png\n")
    assert open_csv(csv_path).class_names == ["ant", "zebra"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,class\na.png,1\n", r"has columns \['file', 'class'\]; expected a header"),
        ("path,label\na.png,\n", r"line 2: empty path or label"),
        ("path,label\n", r"has a header but no rows"),
    ],
)
def test_csv_errors(tmp_path, text, message):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text(text)
    with pytest.raises(ValueError, match=message):
        open_csv(csv_path)


def test_csv_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset CSV .*none\.csv' not found"):
        open_csv(tmp_path / "none.csv")


# open_dataset


def test_open_dataset_unknown_name():
    with pytest.raises(
        FileNotFoundError, match=r"'imagenet' is neither an existing folder.*cifar10"
    ):
        open_dataset("imagenet")


def test_open_dataset_csv_rejects_split(tmp_path):
    with pytest.raises(ValueError, match=r"split 'test' does not apply to a CSV dataset"):
        open_dataset(str(tmp_path / "x.csv"), split="test")


def test_open_dataset_bad_split():
    with pytest.raises(ValueError, match=r"split must be 'train', 'test' or 'all', got 'val'"):
        open_dataset("fashion-mnist-sample", split="val")


# Named datasets


def test_sample_dataset():
    source = open_sample()
    assert len(source) == 5000
    assert source.channels == 1
    assert np.bincount(source.labels).tolist() == [500] * 10
    assert source.class_names == FASHION_MNIST_CLASSES
    assert source.load(0).mode == "L"
    assert source.sample_ids[0].startswith("fashion-mnist-sample:test:")


def test_sample_dataset_has_no_train_split():
    with pytest.raises(ValueError, match=r"contains only test-split images"):
        open_sample("train")


def _write_idx(path, array, compress=True):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(
        struct.pack(">I", size) for size in array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)


def _write_fashion_idx(root, count=6):
    rng = np.random.default_rng(0)
    for images, labels in (
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ):
        _write_idx(root / f"{images}.gz", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(root / f"{labels}.gz", np.arange(count) % 10)


def test_fashion_mnist_idx_files(tmp_path):
    _write_fashion_idx(tmp_path)
    source = open_fashion_mnist_idx(tmp_path, "all")
    assert len(source) == 12
    assert source.images.shape == (12, 28, 28)
    assert source.labels[:6].tolist() == [0, 1, 2, 3, 4, 5]
    assert source.sample_ids[6] == "fashion-mnist:test:0"
    assert open_fashion_mnist_idx(tmp_path, "test").identity["split"] == "test"


def test_fashion_mnist_idx_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"install the Debian package dataset-fash"):
        open_fashion_mnist_idx(tmp_path, "train")


def test_idx_bad_header(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")
    with pytest.raises(ValueError, match=r"is not an IDX file of unsigned bytes"):
        read_idx(path)


def test_idx_short_data(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 5) + b"abc")
    with pytest.raises(ValueError, match=r"header promises 5 bytes of shape \(5,\), file has 3"):
        read_idx(path)


@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_from_debian_matches_sample():
    full = open_dataset("fashion-mnist", split="test")
    sample = open_sample()
    indices = [int(sample_id.rsplit(":", 1)[1]) for sample_id in sample.sample_ids]
    assert len(full) == 10000
    assert np.array_equal(full.images[indices], sample.images)
    assert np.array_equal(full.labels[indices], sample.labels)


def test_torchvision_mnist_from_root(tmp_path):
    raw = tmp_path / "KMNIST" / "raw"
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (4, 28, 28)), False)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.array([3, 1, 3, 0]), False)
    source = open_torchvision("kmnist", str(tmp_path), "test")
    assert len(source) == 4
    assert source.channels == 1
    assert source.class_names[:2] == ["o", "ki"]
    assert source.labels.tolist() == [3, 1, 3, 0]
    assert source.sample_ids[1] == "kmnist:test:1"
    assert source.load(0).size == (28, 28)


def test_torchvision_not_found_suggests_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'cifar10' not found in root .*add --download"):
        open_torchvision("cifar10", str(tmp_path), "test")


def test_torchvision_needs_root():
    with pytest.raises(ValueError, match=r"dataset 'cifar10' needs --root"):
        open_torchvision("cifar10", None)


def test_torchvision_unknown_name():
    with pytest.raises(ValueError, match=r"unknown dataset name 'svhn'.*food101"):
        open_torchvision("svhn", "/tmp")


# Subsets


def test_balanced_subset_counts_and_seed():
    labels = np.repeat(np.arange(3), [10, 20, 5])
    chosen = balanced_subset(labels, 4, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [4, 4, 4]
    assert np.all(np.diff(chosen) > 0)
    assert np.array_equal(chosen, balanced_subset(labels, 4, seed=0))
    assert not np.array_equal(chosen, balanced_subset(labels, 4, seed=1))


def test_balanced_subset_short_class_keeps_all(caplog):
    labels = np.repeat(np.arange(2), [10, 2])
    with caplog.at_level(logging.DEBUG, logger="spela_transfer.data.subset"):
        chosen = balanced_subset(labels, 5, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [5, 2]
    assert "fewer than 5 samples" in caplog.text
    assert "1 (2)" in caplog.text


def test_balanced_subset_rejects_bad_limit():
    with pytest.raises(ValueError, match=r"limit must be a positive integer, got 0"):
        balanced_subset(np.zeros(3, dtype=np.int64), 0, seed=0)


def test_torchvision_download_failure_is_reported(tmp_path):
    # The network guard in conftest makes the download fail at once, without any traffic.
    with pytest.raises(FileNotFoundError, match=r"downloading dataset 'kmnist' into .* failed"):
        open_torchvision("kmnist", str(tmp_path), "test", download=True)


def test_array_source_rejects_wide_pixels():
    from spela_transfer.data import ArraySource

    source = ArraySource(
        name="toy",
        class_names=["a"],
        labels=np.zeros(1, dtype=np.int64),
        sample_ids=["toy:all:0"],
        identity={},
        images=np.zeros((1, 4, 4), dtype=np.float32),
    )
    with pytest.raises(
        UnreadableImageError, match=r"toy:all:0: expected uint8 pixels, got float32"
    ):
        source.load(0)
