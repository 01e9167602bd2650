"""extract_features and `spela-transfer extract`: cache hits, keys, resume, bad images, CLI."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from spela_transfer.backbones import BackboneSpec
from spela_transfer.cache import MANIFEST_FILE, CacheWriter, load_features
from spela_transfer.cli import main
from spela_transfer.config import ExtractConfig
from spela_transfer.data import UnreadableImageError
from spela_transfer.errors import CacheCorruptError, CacheMismatchError
from spela_transfer.extract import extract_features, resolve_device

CLASSES = ("cat", "dog", "owl")


def _make_folder(root, per_class=4, size=(40, 30)):
    rng = np.random.default_rng(0)
    for class_index, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            pixels[..., class_index] = 255
            suffix = "jpg" if index % 2 else "png"
            Image.fromarray(pixels).save(folder / f"{index}.{suffix}")
    return root


@pytest.fixture
def folder(tmp_path):
    return _make_folder(tmp_path / "images")


def _config(folder, cache_dir, **overrides):
    values = {
        "dataset": str(folder),
        "backbone": "resnet18",
        "pretrained": False,
        "image_size": 32,
        "batch_size": 5,
        "num_workers": 0,
        "cache_dir": str(cache_dir),
        "device": "cpu",
    }
    return ExtractConfig(**{**values, **overrides})


def test_extract_image_folder(folder, tmp_path):
    features = extract_features(_config(folder, tmp_path / "cache"), progress=False)
    assert features.features.shape == (12, 512)
    assert features.features.dtype == np.float32
    assert features.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert features.class_names == list(CLASSES)
    assert features.sample_ids[0].endswith("cat/0.png")
    manifest = features.manifest
    assert manifest["backbone"] == "resnet18"
    assert manifest["model"].startswith("resnet18.")
    assert manifest["weights"] == {"source": "random", "seed": 0}
    assert manifest["preprocessing"]["input_size"] == [3, 32, 32]
    assert manifest["class_to_idx"] == {"cat": 0, "dog": 1, "owl": 2}
    assert manifest["counts"]["per_class"] == [4, 4, 4]
    assert manifest["skipped"] == []
    assert manifest["timing"]["images_this_run"] == 12
    assert manifest["timing"]["images_per_second"] > 0
    assert "torch" in manifest["versions"]


def test_extract_matches_direct_forward(folder, tmp_path):
    """Cached rows equal the backbone applied to each image on its own."""
    from spela_transfer.backbones import create_backbone
    from spela_transfer.data import convert_mode, open_image, resize_and_crop
    from spela_transfer.extract import _normalize

    features = extract_features(_config(folder, tmp_path / "cache"), progress=False)
    backbone = create_backbone("resnet18", pretrained=False, image_size=32)
    path = features.sample_ids[5]
    image = convert_mode(open_image(path), 3)
    expected = backbone(
        _normalize(resize_and_crop(image, backbone.preprocessing)[None], backbone.preprocessing)
    )
    np.testing.assert_allclose(features.load_features([5]), expected.numpy(), atol=1e-4)


def test_cache_hit_builds_no_backbone(folder, tmp_path, monkeypatch):
    config = _config(folder, tmp_path / "cache")
    first = extract_features(config, progress=False)

    def fail_build(self, device="cpu"):
        raise AssertionError("a cache hit must not build the backbone")

    monkeypatch.setattr(BackboneSpec, "build", fail_build)
    second = extract_features(config, progress=False)
    assert second.key == first.key
    assert second.cache_hit
    assert not first.cache_hit
    np.testing.assert_array_equal(second.features, first.features)


@pytest.mark.parametrize(
    "change",
    [
        {"image_size": 40},
        {"dtype": "float16"},
        {"limit": 2},
        {"backbone": "resnet10t"},
        {"backbone": "resnet18.tv_in1k"},
    ],
)
def test_cache_key_changes_with_request(folder, tmp_path, change):
    from spela_transfer.backbones import resolve_backbone
    from spela_transfer.cache import cache_key
    from spela_transfer.data import open_dataset
    from spela_transfer.extract import build_request

    def key_of(config):
        source = open_dataset(config.dataset, split=config.split)
        spec = resolve_backbone(config.backbone, pretrained=False, image_size=config.image_size)
        return cache_key(build_request(config, spec, source))

    base = _config(folder, tmp_path)
    assert key_of(base) == key_of(_config(folder, tmp_path))
    assert key_of(dataclasses.replace(base, **change)) != key_of(base)


def test_cache_key_changes_with_subset_seed_and_files(folder, tmp_path):
    cache = tmp_path / "cache"
    base = extract_features(_config(folder, cache, limit=2), progress=False)
    reseeded = extract_features(_config(folder, cache, limit=2, subset_seed=5), progress=False)
    assert reseeded.key != base.key

    touched = folder / "cat" / "0.png"
    os.utime(touched, ns=(1, 1))
    retouched = extract_features(_config(folder, cache, limit=2), progress=False)
    assert retouched.key != base.key

    # Batch size and workers do not change the features, so they share the cache.
    again = extract_features(_config(folder, cache, limit=2, batch_size=3), progress=False)
    assert again.key == retouched.key


def test_weights_file_changes_key(folder, tmp_path):
    import timm

    weights = tmp_path / "w.pth"
    torch.manual_seed(3)
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), weights)
    random_init = extract_features(_config(folder, tmp_path / "c"), progress=False)
    from_file = extract_features(
        _config(folder, tmp_path / "c", weights=str(weights)), progress=False
    )
    assert from_file.key != random_init.key
    assert from_file.manifest["weights"]["source"] == "file"
    assert not np.allclose(from_file.features, random_init.features)


def test_resume_after_interruption_equals_uninterrupted(folder, tmp_path, monkeypatch):
    reference = extract_features(_config(folder, tmp_path / "whole"), chunk_size=4, progress=False)

    config = _config(folder, tmp_path / "resumed")
    original_write = CacheWriter.write_chunk
    written = []

    def interrupt_after_two(self, chunk):
        if len(written) == 2:
            raise KeyboardInterrupt
        original_write(self, chunk)
        written.append(chunk.index)

    monkeypatch.setattr(CacheWriter, "write_chunk", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract_features(config, chunk_size=4, progress=False)
    monkeypatch.setattr(CacheWriter, "write_chunk", original_write)

    partial = tmp_path / "resumed" / reference.key
    assert written == [0, 1]
    assert not (partial / MANIFEST_FILE).exists()
    with pytest.raises(CacheCorruptError, match=r"interrupted; rerun the same extract command"):
        load_features(partial)

    # The rerun requests another chunk size, but the partial cache keeps its own.
    resumed = extract_features(config, chunk_size=5, progress=False)
    assert resumed.key == reference.key
    assert resumed.manifest["timing"]["resumed_chunks"] == 2
    assert resumed.manifest["timing"]["images_this_run"] == 4
    np.testing.assert_array_equal(resumed.features, reference.features)
    np.testing.assert_array_equal(resumed.labels, reference.labels)
    assert resumed.sample_ids == reference.sample_ids
    assert not (partial / "chunks").exists()


def test_float16_storage_loads_as_float32(folder, tmp_path):
    full = extract_features(_config(folder, tmp_path / "c"), progress=False)
    half = extract_features(_config(folder, tmp_path / "c", dtype="float16"), progress=False)
    assert half.features.dtype == np.float16
    loaded = half.load_features()
    assert loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, full.load_features(), rtol=1e-2, atol=1e-2)
    size = (half.path / "features.npy").stat().st_size
    assert size < 0.6 * (full.path / "features.npy").stat().st_size


def test_bad_images_skipped_and_recorded(folder, tmp_path):
    broken = folder / "dog" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    features = extract_features(_config(folder, tmp_path / "c"), progress=False)
    assert len(features) == 12
    assert features.manifest["counts"]["skipped"] == 1
    record = features.manifest["skipped"][0]
    assert record["sample_id"] == str(broken)
    assert record["reason"].startswith(("cannot decode", "not a recognized image format"))
    assert str(broken) not in features.sample_ids


def test_cached_skips_fatal_when_asked(folder, tmp_path):
    (folder / "dog" / "broken.png").write_bytes(b"garbage")
    extract_features(_config(folder, tmp_path / "c"), progress=False)
    with pytest.raises(
        UnreadableImageError, match=r"skipped 1 undecodable image\(s\), first .*broken"
    ):
        extract_features(_config(folder, tmp_path / "c", on_bad_image="fail"), progress=False)


def test_bad_image_fatal_when_asked(folder, tmp_path):
    (folder / "owl" / "zz.png").write_text("not a png")
    with pytest.raises(
        UnreadableImageError, match=r"zz\.png: not a recognized image format; set on_bad"
    ):
        extract_features(_config(folder, tmp_path / "c", on_bad_image="fail"), progress=False)


def test_all_images_unreadable(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "x.png").write_text("text")
    with pytest.raises(ValueError, match=r"no image of the 2 requested could be decoded"):
        extract_features(_config(tmp_path / "data", tmp_path / "c"), progress=False)


def test_every_image_mode_is_extracted(tmp_path):
    root = tmp_path / "modes"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("RGBA", (20, 20), (10, 20, 30, 100)).save(root / "a" / "rgba.png")
    Image.new("P", (20, 20), 3).save(root / "a" / "palette.gif")
    Image.new("CMYK", (20, 20), (0, 50, 100, 0)).save(root / "a" / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(root / "b" / "deep.png")
    Image.new("L", (20, 20), 90).save(root / "b" / "gray.png")
    Image.new("LA", (20, 20), (90, 128)).save(root / "b" / "gray-alpha.png")
    Image.new("1", (20, 20), 1).save(root / "b" / "bits.bmp")
    features = extract_features(_config(root, tmp_path / "c"), progress=False)
    assert len(features) == 7
    assert features.manifest["counts"]["skipped"] == 0
    assert np.isfinite(features.load_features()).all()


def test_pixels_backbone_on_sample(tmp_path):
    from spela_transfer.data import open_sample

    config = ExtractConfig(backbone="pixels", limit=2, cache_dir=str(tmp_path), device="cpu")
    features = extract_features(config, progress=False)
    assert features.features.shape == (20, 784)
    sample = open_sample()
    index = int(features.sample_ids[0].rsplit(":", 1)[1])
    row = list(map(lambda s: int(s.rsplit(":", 1)[1]), sample.sample_ids)).index(index)
    np.testing.assert_allclose(
        features.load_features([0])[0], sample.images[row].reshape(-1) / 255.0, atol=1e-6
    )


def test_offline_features_fixture(offline_features):
    assert offline_features.features.shape == (1000, 1280)
    assert offline_features.manifest["backbone"] == "efficientnet_lite0.offline"
    assert np.bincount(offline_features.labels).tolist() == [100] * 10
    assert offline_features.class_names[0] == "T-shirt/top"
    assert offline_features.num_classes == 10
    # Real features: classes separate well, so the nearest class mean is mostly right.
    features = offline_features.load_features()
    means = np.stack([features[offline_features.labels == c].mean(0) for c in range(10)])
    distances = ((features[:, None, :] - means[None]) ** 2).sum(-1)
    assert (distances.argmin(1) == offline_features.labels).mean() > 0.6


def test_class_names_enforced_across_splits(tmp_path):
    root = tmp_path / "split"
    for split in ("train", "test"):
        _make_folder(root / split, per_class=1)
    cache = tmp_path / "cache"
    extract_features(_config(root, cache, split="train"), progress=False)
    extract_features(_config(root, cache, split="test"), progress=False)

    (root / "test" / "emu").mkdir()
    Image.new("RGB", (20, 20)).save(root / "test" / "emu" / "e.png")
    with pytest.raises(
        CacheMismatchError, match=r"split 'train' in .* has \['cat', 'dog', 'owl'\]"
    ):
        extract_features(_config(root, cache, split="test"), progress=False)


def test_tampered_cache_is_a_mismatch(folder, tmp_path):
    features = extract_features(_config(folder, tmp_path / "c"), progress=False)
    manifest_path = features.path / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["request"]["dtype"] = "float16"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match=r'dtype: cached "float16", requested "float32"'):
        extract_features(_config(folder, tmp_path / "c"), progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda():
    with pytest.raises(ValueError, match=r"device 'cuda' requested, but CUDA is not available"):
        resolve_device("cuda")


def test_auto_device():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_extract_with_decode_workers(folder, tmp_path):
    serial = extract_features(_config(folder, tmp_path / "a"), progress=False)
    parallel = extract_features(_config(folder, tmp_path / "b", num_workers=2), progress=False)
    np.testing.assert_allclose(parallel.features, serial.features, atol=1e-5)
    assert parallel.manifest["timing"]["num_workers"] == 2


# Command line


def _cli_args(folder, cache):
    return [
        "extract",
        "--dataset",
        str(folder),
        "--backbone",
        "resnet18",
        "--no-pretrained",
        "--image-size",
        "32",
        "--num-workers",
        "0",
        "--cache-dir",
        str(cache),
        "--device",
        "cpu",
    ]


def test_cli_summary_and_cache_hit(folder, tmp_path, capsys):
    assert main(_cli_args(folder, tmp_path / "c")) == 0
    first = capsys.readouterr().out.strip()
    assert "N=12 D=512 classes=3 skipped=0" in first
    assert first.endswith("images/s")
    assert main(_cli_args(folder, tmp_path / "c")) == 0
    second = capsys.readouterr().out.strip()
    assert "cache hit in" in second
    assert second.split(":")[0] == first.split(":")[0]


def test_cli_error_is_one_line(tmp_path, capsys):
    code = main(["extract", "--dataset", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path)])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("spela-transfer extract: error: dataset ")
    assert "\n" not in error


def test_cli_yaml_config(folder, tmp_path, capsys):
    config = tmp_path / "extract.yaml"
    config.write_text(
        "extract:\n  backbone: resnet18\n  pretrained: false\n  image_size: 32\n"
        f"  num_workers: 0\n  limit: 1\n  cache_dir: {tmp_path / 'c'}\n"
    )
    assert main(["extract", "--config", str(config), "--dataset", str(folder)]) == 0
    assert "N=3 D=512 classes=3" in capsys.readouterr().out


def test_cli_yaml_unknown_key(tmp_path, capsys):
    config = tmp_path / "extract.yaml"
    config.write_text("extract:\n  backbones: resnet18\n")
    assert main(["extract", "--config", str(config)]) == 2
    assert "unknown keys ['backbones'] under 'extract'" in capsys.readouterr().err


def test_cli_yaml_not_a_mapping(tmp_path, capsys):
    config = tmp_path / "extract.yaml"
    config.write_text("- a\n- b\n")
    assert main(["extract", "--config", str(config)]) == 2
    assert "must contain a mapping" in capsys.readouterr().err


def test_cli_yaml_missing(tmp_path, capsys):
    assert main(["extract", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file" in capsys.readouterr().err


def test_second_process_waits_for_lock(folder, tmp_path, caplog):
    import logging
    import threading

    fcntl = pytest.importorskip("fcntl")
    from spela_transfer.backbones import resolve_backbone
    from spela_transfer.cache import cache_key
    from spela_transfer.data import open_dataset
    from spela_transfer.extract import LOCK_FILE, _cache_label, build_request

    config = _config(folder, tmp_path / "c")
    source = open_dataset(config.dataset)
    spec = resolve_backbone("resnet18", pretrained=False, image_size=32)
    key = cache_key(build_request(config, spec, source), _cache_label(config, spec))
    lock_path = tmp_path / "c" / key / LOCK_FILE
    lock_path.parent.mkdir(parents=True)

    results = []
    with lock_path.open("a") as holder, caplog.at_level(logging.INFO):
        fcntl.flock(holder, fcntl.LOCK_EX)
        worker = threading.Thread(
            target=lambda: results.append(extract_features(config, progress=False))
        )
        worker.start()
        for _ in range(200):
            if "waiting for another process" in caplog.text:
                break
            worker.join(0.05)
        assert "waiting for another process that is extracting into" in caplog.text
        assert not results
        fcntl.flock(holder, fcntl.LOCK_UN)
    worker.join(60)
    assert len(results[0]) == 12


def test_lock_file_removed_when_complete(folder, tmp_path):
    from spela_transfer.extract import LOCK_FILE

    features = extract_features(_config(folder, tmp_path / "c"), progress=False)

    assert (features.path / MANIFEST_FILE).is_file()
    assert not (features.path / LOCK_FILE).exists()


def test_extraction_start_is_logged(folder, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="spela_transfer.extract"):
        extract_features(_config(folder, tmp_path / "c"), progress=False)

    assert "extracting 12 images with resnet18" in caplog.text


def test_short_classes_named_after_skips(folder, tmp_path, caplog):
    import logging

    (folder / "dog" / "0.png").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="spela_transfer.extract"):
        features = extract_features(_config(folder, tmp_path / "c", limit=4), progress=False)

    assert len(features) == 11
    assert "1 of 3 classes have fewer than 4 extracted images" in caplog.text
    assert "keep all they have: dog (3)" in caplog.text


def test_one_class_rejected_before_extraction(tmp_path):
    _make_folder(tmp_path / "images")
    for name in ("dog", "owl"):
        for path in (tmp_path / "images" / name).iterdir():
            path.unlink()
        (tmp_path / "images" / name).rmdir()
    config = _config(tmp_path / "images", tmp_path / "c")

    with pytest.raises(ValueError, match=r"contains 1 class \(cat\), but at least 2 are needed"):
        extract_features(config, progress=False, min_classes=2)
    assert not (tmp_path / "c").exists()


def test_extract_flags_need_full_names(folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", "--dataset", str(folder), "--batch", "5"])

    assert exit_info.value.code == 2
    assert "unrecognized arguments: --batch" in capsys.readouterr().err


def test_failed_backbone_leaves_no_folder(folder, tmp_path):
    weights = tmp_path / "unrelated.pth"
    torch.save({"unrelated.weight": torch.zeros(2)}, weights)
    cache_dir = tmp_path / "cache"
    config = _config(folder, cache_dir, backbone="resnet18", weights=str(weights))

    with pytest.raises(ValueError, match="unexpected keys"):
        extract_features(config, progress=False)

    assert list(cache_dir.iterdir()) == []
