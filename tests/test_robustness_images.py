"""`spela-transfer extract` on image folders and CSV files full of awkward and broken files.

Every good image is extracted. Every bad one is skipped, with its path and reason in
the manifest and a count in the summary line. A dataset that cannot be used at all
stops the command with one line on stderr that names the file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import _bad_inputs as bad
import numpy as np
import pytest
from _bad_inputs import error_line, run_cli

from spela_transfer.cache import load_features

# Files that must be skipped, with a phrase their recorded reason must contain.
BAD_FILES = {
    "truncated.jpg": "image file is truncated",
    "truncated.png": "image file is truncated",
    "zero-bytes.png": "not a recognized image format",
    "text.jpg": "not a recognized image format",
    "bomb.png": "could be decompression bomb",
    "dangling.png": "file not found",
    "loop.png": "Too many levels of symbolic links",
}
# Files that must be extracted although they are unusual.
GOOD_FILES = (
    "UPPER.PNG",
    "upper.JPG",
    "png-named.jpg",
    "cmyk.jpg",
    "deep-16bit.png",
    "palette-transparent.png",
    "animated.gif",
    "pages.tif",
    "exif-rotated.jpg",
    "one-pixel.png",
    "wide.png",
    "with space.png",
    "link-to-good.png",
    "good-0.png",
    "good-1.png",
    "good-2.png",
)


def extract_args(dataset: Path, cache_dir: Path, *extra: str, image_size: int = 8) -> list[str]:
    return [
        "extract",
        "--dataset",
        str(dataset),
        "--backbone",
        "pixels",
        "--image-size",
        str(image_size),
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--cache-dir",
        str(cache_dir),
        *extra,
    ]


def build_messy_folder(root: Path) -> Path:
    """Classes `ant` (every awkward file), `bee` (good), `solo` (one image), `empty` (none)."""
    bad.make_good_folder(root, ("ant", "bee"), per_class=3)
    ant = root / "ant"

    bad.write_truncated_jpeg(ant / "truncated.jpg")
    bad.write_truncated_png(ant / "truncated.png")
    bad.write_zero_bytes(ant / "zero-bytes.png")
    bad.write_text_as_image(ant / "text.jpg")
    bad.write_decompression_bomb_png(ant / "bomb.png")
    os.symlink(ant / "missing.png", ant / "dangling.png")
    os.symlink(ant / "loop.png", ant / "loop.png")

    bad.save_good_image(ant / "UPPER.PNG", seed=1)
    bad.save_good_image(ant / "upper.JPG", seed=2)
    bad.write_png_named_jpg(ant / "png-named.jpg")
    bad.write_cmyk_jpeg(ant / "cmyk.jpg")
    bad.write_16bit_png(ant / "deep-16bit.png")
    bad.write_palette_png_with_transparency(ant / "palette-transparent.png")
    bad.write_animated_gif(ant / "animated.gif")
    bad.write_multipage_tiff(ant / "pages.tif")
    bad.write_exif_rotated_jpeg(ant / "exif-rotated.jpg")
    bad.write_one_pixel(ant / "one-pixel.png")
    bad.write_very_wide(ant / "wide.png")
    bad.save_good_image(ant / "with space.png", seed=3)
    bad.write_non_utf8_name(ant, seed=4)
    os.symlink(ant / "good-0.png", ant / "link-to-good.png")
    os.symlink(ant, ant / "folder-loop")  # a folder symlink that points at its parent

    # Not images, or hidden: never listed.
    (ant / "notes.txt").write_text("a note")
    bad.save_good_image(ant / ".hidden.png", seed=5)
    bad.save_good_image(ant / ".thumbnails" / "thumb.png", seed=6)
    bad.save_good_image(root / ".ipynb_checkpoints" / "checkpoint.png", seed=7)

    bad.save_good_image(root / "solo" / "only.png", seed=8)
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """The messy folder extracted once: (root, exit code, stdout, stderr, FeatureSet)."""
    base = tmp_path_factory.mktemp("messy")
    root = build_messy_folder(base / "images")
    code, stdout, stderr = run_cli(extract_args(root, base / "cache", image_size=16))
    features = load_features(next((base / "cache").iterdir())) if code == 0 else None
    return root, code, stdout, stderr, features


def test_messy_folder_extracts_without_error(messy):
    _, code, stdout, stderr, _ = messy
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "skipped=7" in stdout
    assert f"N={len(GOOD_FILES) + 1 + 3 + 1}" in stdout


def test_messy_folder_records_each_skip(messy):
    root, _, _, _, features = messy
    records = features.manifest["skipped"]
    skipped = {Path(record["sample_id"]).name: record["reason"] for record in records}
    assert sorted(skipped) == sorted(BAD_FILES)
    for name, phrase in BAD_FILES.items():
        assert phrase in skipped[name]
    # The path is the sample id beside the reason; the reason does not start with it again.
    assert not any(record["reason"].startswith(record["sample_id"]) for record in records)
    assert features.manifest["counts"]["skipped"] == len(BAD_FILES)


def test_messy_folder_keeps_good_images(messy):
    root, _, _, _, features = messy
    ant_files = sorted(Path(sample).name for sample in features.sample_ids if "/ant/" in sample)
    non_utf8 = [name for name in ant_files if name.startswith("caf")]

    assert set(GOOD_FILES) <= set(ant_files)
    assert non_utf8 == ["caf\udce9-4.png"]
    assert len(ant_files) == len(GOOD_FILES) + 1
    assert len(set(features.sample_ids)) == len(features.sample_ids)
    assert np.isfinite(features.load_features()).all()


def test_messy_folder_classes(messy, caplog):
    root, _, _, stderr, features = messy
    assert features.class_names == ["ant", "bee", "solo"]
    assert features.manifest["counts"]["per_class"] == [len(GOOD_FILES) + 1, 3, 1]
    assert features.manifest["dataset"]["empty_class_folders"] == ["empty"]
    assert "left out 1 empty class folder(s)" in stderr
    for hidden in (".hidden.png", "thumb.png", "checkpoint.png", "notes.txt"):
        assert not any(sample.endswith(hidden) for sample in features.sample_ids)


def test_messy_folder_rerun_is_cache_hit(messy, tmp_path):
    root = messy[0]
    cache_dir = Path(messy[4].path).parent
    code, stdout, stderr = run_cli(extract_args(root, cache_dir, image_size=16))
    assert code == 0, stderr
    assert "cache hit" in stdout


def _pixels_of(features, name: str, side: int = 16) -> np.ndarray:
    row = next(i for i, sample in enumerate(features.sample_ids) if sample.endswith("/" + name))
    # The pixels backbone flattens [C, H, W]; return [H, W, C] for readable indexing.
    return features.load_features([row])[0].reshape(3, side, side).transpose(1, 2, 0)


def test_transparent_palette_on_white(messy):
    pixels = _pixels_of(messy[4], "palette-transparent.png")
    # Index 0 is transparent and becomes the white background; index 1 is opaque red.
    np.testing.assert_array_equal(pixels[0, 0], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(pixels[8, 8], [1.0, 0.0, 0.0])


def test_16bit_png_keeps_its_range(messy):
    pixels = _pixels_of(messy[4], "deep-16bit.png")
    # Clipping 16-bit values to 8 bits would make nearly every pixel white.
    assert pixels.min() == 0.0
    assert pixels.max() > 0.95
    assert 0.3 < pixels.mean() < 0.7


def test_exif_orientation_not_applied(messy):
    # The loader decodes the stored pixels, as timm's and torchvision's PIL loaders do:
    # the white half stays on the left, where the file stores it.
    pixels = _pixels_of(messy[4], "exif-rotated.jpg")
    assert pixels[:, :6].mean() > 0.9
    assert pixels[:, 10:].mean() < 0.1


def test_multipage_tiff_uses_first_page(messy):
    tiff = _pixels_of(messy[4], "pages.tif")
    # Page 0 is black; later pages are red.
    assert tiff.max() == 0.0


def test_wide_and_tiny_images_through_real_backbone(tmp_path):
    root = tmp_path / "shapes"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    bad.write_very_wide(root / "a" / "wide.png", width=6000, height=2)
    bad.write_very_wide(root / "a" / "tall.png", width=1, height=3000)
    bad.write_one_pixel(root / "b" / "one.png")
    bad.write_cmyk_jpeg(root / "b" / "cmyk.jpg")
    args = extract_args(root, tmp_path / "cache", image_size=32)
    args[args.index("pixels")] = "efficientnet_lite0.offline"

    code, stdout, stderr = run_cli(args)

    assert code == 0, stderr
    assert "N=4 D=1280" in stdout
    assert "skipped=0" in stdout
    features = load_features(next((tmp_path / "cache").iterdir()))
    assert np.isfinite(features.load_features()).all()


def test_bad_image_fails_when_asked(tmp_path):
    root = bad.make_good_folder(tmp_path / "images")
    bad.write_truncated_jpeg(root / "bee" / "truncated.jpg")
    code, stdout, stderr = run_cli(
        ["-q", *extract_args(root, tmp_path / "cache", "--on-bad-image", "fail")]
    )
    assert code == 2
    assert stdout == ""
    line = error_line(stderr)
    assert "truncated.jpg: cannot decode (image file is truncated" in line
    assert "--on-bad-image skip" in line


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("only-empty-classes", r"contains no image files in class sub-folders"),
        ("only-hidden-images", r"contains no image files in class sub-folders"),
        ("every-image-bad", r"no image of the 2 requested could be decoded \(2 skipped"),
        ("no-folder", r"is neither an existing folder, a \.csv file"),
        ("split-missing", r"split 'train' needs sub-folders"),
    ],
)
def test_unusable_dataset_is_one_line_error(layout, message, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    extra: list[str] = []
    if layout == "only-empty-classes":
        (root / "a").mkdir()
        (root / "b").mkdir()
    elif layout == "only-hidden-images":
        bad.save_good_image(root / "a" / ".hidden.png", seed=0)
        bad.save_good_image(root / ".b" / "visible.png", seed=1)
    elif layout == "every-image-bad":
        (root / "a").mkdir()
        (root / "b").mkdir()
        bad.write_zero_bytes(root / "a" / "x.png")
        bad.write_text_as_image(root / "b" / "y.jpg")
    elif layout == "no-folder":
        root = tmp_path / "does-not-exist"
    elif layout == "split-missing":
        bad.make_good_folder(root)
        extra = ["--split", "train"]

    code, stdout, stderr = run_cli(extract_args(root, tmp_path / "cache", *extra))

    assert code == 2
    assert stdout == ""
    line = error_line(stderr)
    assert str(root) in line or layout == "every-image-bad"
    assert re.search(message, line), line


# ---------------------------------------------------------------------------
# CSV datasets
# ---------------------------------------------------------------------------


@pytest.fixture
def csv_images(tmp_path) -> Path:
    folder = tmp_path / "csv"
    for index in range(4):
        bad.save_good_image(folder / f"img {index}.png", seed=index)
    return folder


def _write_csv(folder: Path, text: str, name: str = "data.csv") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_missing_file_skipped(csv_images, tmp_path):
    csv_path = _write_csv(
        csv_images, "path,label\nimg 0.png,cat\nimg 1.png,dog\nmissing.png,cat\nimg 2.png,dog\n"
    )
    code, stdout, stderr = run_cli(extract_args(csv_path, tmp_path / "cache"))

    assert code == 0, stderr
    assert "N=3" in stdout
    assert "skipped=1" in stdout
    manifest = json.loads(next((tmp_path / "cache").glob("*/manifest.json")).read_text())
    missing = csv_images / "missing.png"
    assert manifest["skipped"] == [{"sample_id": str(missing), "reason": "file not found"}]


def test_csv_duplicate_rows_dropped(csv_images, tmp_path):
    csv_path = _write_csv(
        csv_images, "path,label\nimg 0.png,cat\nimg 0.png,cat\nimg 1.png,dog\nimg 1.png,dog\n"
    )
    code, stdout, stderr = run_cli(extract_args(csv_path, tmp_path / "cache"))

    assert code == 0, stderr
    assert "N=2" in stdout
    assert "dropped 2 duplicate row(s)" in stderr
    features = load_features(next((tmp_path / "cache").iterdir()))
    assert features.manifest["dataset"]["duplicate_rows_dropped"] == 2
    assert len(set(features.sample_ids)) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path,lable\nimg 0.png,cat\n", r"has columns \['path', 'lable'\]; expected a header"),
        ("file,label\nimg 0.png,cat\n", r"has columns \['file', 'label'\]"),
        ("img 0.png,cat\nimg 1.png,dog\n", r"has columns \['img 0\.png', 'cat'\]"),
        ("path,label\nimg 0.png,cat\nimg 1.png,\n", r"line 3: empty path or label"),
        ("path,label\n,cat\n", r"line 2: empty path or label"),
        ("path,label\n", r"has a header but no rows"),
        ("", r"has columns \[\]"),
        (
            "path,label\nimg 0.png,cat\nimg 0.png,dog\n",
            r"lists 'img 0\.png' with labels 'cat' and 'dog'; give each image one label",
        ),
    ],
)
def test_csv_invalid_is_one_line_error(text, message, csv_images, tmp_path):
    csv_path = _write_csv(csv_images, text)
    code, stdout, stderr = run_cli(extract_args(csv_path, tmp_path / "cache"))

    assert code == 2
    assert stdout == ""
    line = error_line(stderr)
    assert str(csv_path) in line
    assert re.search(message, line), line


def test_csv_not_utf8(csv_images, tmp_path):
    csv_path = csv_images / "latin1.csv"
    csv_path.write_bytes("path,label\nimg 0.png,caf\u00e9\n".encode("latin-1"))
    code, _, stderr = run_cli(extract_args(csv_path, tmp_path / "cache"))
    assert code == 2
    line = error_line(stderr)
    assert f"dataset CSV {str(csv_path)!r} is not valid UTF-8" in line
    assert "save it as UTF-8" in line


def test_csv_with_byte_order_mark(csv_images, tmp_path):
    # Spreadsheet programs often start a UTF-8 CSV with a byte order mark.
    csv_path = csv_images / "bom.csv"
    csv_path.write_bytes("path,label\nimg 0.png,caf\u00e9\nimg 1.png,tea\n".encode("utf-8-sig"))
    code, stdout, stderr = run_cli(extract_args(csv_path, tmp_path / "cache"))
    assert code == 0, stderr
    features = load_features(next((tmp_path / "cache").iterdir()))
    assert features.class_names == ["caf\u00e9", "tea"]


def test_csv_numeric_labels_sort_numerically(csv_images, tmp_path):
    csv_path = _write_csv(
        csv_images, "path,label\nimg 0.png,10\nimg 1.png,2\nimg 2.png,-1\nimg 3.png, 2 \n"
    )
    code, _, stderr = run_cli(extract_args(csv_path, tmp_path / "cache"))
    assert code == 0, stderr
    features = load_features(next((tmp_path / "cache").iterdir()))
    assert features.class_names == ["-1", "2", "10"]
    assert features.labels.tolist() == [2, 1, 0, 1]


def test_csv_symlink_loop_skipped(csv_images, tmp_path):
    os.symlink(csv_images / "loop.png", csv_images / "loop.png")
    csv_path = _write_csv(csv_images, "path,label\nimg 0.png,a\nimg 1.png,b\nloop.png,a\n")
    code, stdout, stderr = run_cli(extract_args(csv_path, tmp_path / "cache"))
    assert code == 0, stderr
    assert "skipped=1" in stdout
    assert "Too many levels of symbolic links" in stderr


def test_non_utf8_class_folder_through_fit(tmp_path):
    root = tmp_path / "images"
    for class_name in (b"caf\xe9", b"tea"):
        folder = Path(os.fsdecode(os.fsencode(root) + b"/" + class_name))
        for index in range(6):
            bad.save_good_image(folder / f"{index}.png", seed=index + 10 * len(class_name))
    cache_dir = tmp_path / "cache"

    code, _, stderr = run_cli(extract_args(root, cache_dir, image_size=4))
    assert code == 0, stderr
    features = load_features(next(cache_dir.iterdir()))
    assert features.class_names == ["caf\udce9", "tea"]

    fit_flags = ["--epochs", "1", "--seeds", "0", "--test-sizes", "0.5", "--protocols", "test-size"]
    fit_flags += ["--hidden-widths", "4,2", "--device", "cpu"]
    out = tmp_path / "results"
    code, stdout, stderr = run_cli(
        ["fit", "--features", str(features.path), "--out", str(out), *fit_flags]
    )
    assert code == 0, stderr
    assert "SPELA top-1" in stdout
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["class_names"] == ["caf\udce9", "tea"]
