"""The feature cache on disk: loading, validation, keys, chunk writing and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spela_transfer.cache import (
    CHUNKS_DIR,
    FEATURES_FILE,
    LABELS_FILE,
    MANIFEST_FILE,
    SAMPLE_IDS_FILE,
    CacheWriter,
    Chunk,
    cache_key,
    check_request,
    describe_differences,
    load_features,
    write_atomic,
)
from spela_transfer.errors import CacheCorruptError, CacheMismatchError

REQUEST = {"backbone": "pixels", "dataset": {"name": "toy"}, "dtype": "float32"}


def _chunk(index, positions, skipped=(), width=3, dtype=np.float32):
    positions = np.asarray(positions, dtype=np.int64)
    return Chunk(
        index=index,
        positions=positions,
        features=np.tile(positions[:, None], (1, width)).astype(dtype),
        skipped_positions=np.asarray(skipped, dtype=np.int64),
        skipped_reasons=np.asarray([f"bad {p}" for p in skipped], dtype=str),
    )


def _write_cache(folder, total=5, chunk_size=2, skipped=(3,), dtype="float32"):
    writer = CacheWriter(folder, REQUEST, total=total, chunk_size=chunk_size)
    for index in range(writer.num_chunks):
        chunk_positions = list(writer.chunk_range(index))
        kept = [p for p in chunk_positions if p not in skipped]
        bad = [p for p in chunk_positions if p in skipped]
        writer.write_chunk(_chunk(index, kept, bad, dtype=dtype))
    labels = np.arange(total) % 2
    sample_ids = [f"toy:all:{i}" for i in range(total)]
    manifest = {"backbone": "pixels", "class_names": ["even", "odd"], "request": REQUEST}
    return writer.finalize(labels, sample_ids, manifest, dtype)


def test_finalize_and_load(tmp_path):
    written = _write_cache(tmp_path / "toy-key")
    loaded = load_features(tmp_path / "toy-key")
    assert loaded.key == "toy-key"
    assert len(loaded) == 4
    assert loaded.num_features == 3
    assert loaded.num_classes == 2
    assert isinstance(loaded.features, np.memmap)
    assert loaded.features[:, 0].tolist() == [0, 1, 2, 4]
    assert loaded.labels.tolist() == [0, 1, 0, 0]
    assert loaded.sample_ids == ["toy:all:0", "toy:all:1", "toy:all:2", "toy:all:4"]
    assert loaded.manifest["counts"]["skipped"] == 1
    assert loaded.manifest["skipped"] == [{"sample_id": "toy:all:3", "reason": "bad 3"}]
    assert loaded.manifest["counts"]["per_class"] == [3, 1]
    assert written.manifest == loaded.manifest
    assert not (tmp_path / "toy-key" / CHUNKS_DIR).exists()


def test_load_rows_as_float32(tmp_path):
    loaded = _write_cache(tmp_path / "k", dtype="float16")
    assert loaded.features.dtype == np.float16
    rows = loaded.load_features([2, 0])
    assert rows.dtype == np.float32
    assert rows[:, 0].tolist() == [2.0, 0.0]
    assert loaded.load_features().shape == (4, 3)


def test_no_pickles_in_cache(tmp_path):
    folder = _write_cache(tmp_path / "k").path
    np.load(folder / FEATURES_FILE, allow_pickle=False)
    np.load(folder / LABELS_FILE, allow_pickle=False)
    assert sorted(p.name for p in folder.iterdir()) == [
        FEATURES_FILE,
        LABELS_FILE,
        MANIFEST_FILE,
        SAMPLE_IDS_FILE,
    ]


def test_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"feature cache .*nothing' not found"):
        load_features(tmp_path / "nothing")


def test_load_folder_without_manifest(tmp_path):
    with pytest.raises(CacheCorruptError, match=r"it is not a spela-transfer feature cache"):
        load_features(tmp_path)


def test_load_interrupted_folder(tmp_path):
    CacheWriter(tmp_path / "k", REQUEST, total=4, chunk_size=2)
    with pytest.raises(CacheCorruptError, match=r"interrupted; rerun the same extract command"):
        load_features(tmp_path / "k")


def test_load_invalid_manifest_json(tmp_path):
    folder = _write_cache(tmp_path / "k").path
    (folder / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CacheCorruptError, match=r"manifest\.json is not valid JSON"):
        load_features(folder)


def test_load_other_format_version(tmp_path):
    folder = _write_cache(tmp_path / "k").path
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["format"] = 99
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptError, match=r"has format 99 and complete=True"):
        load_features(folder)


def test_load_missing_features_file(tmp_path):
    folder = _write_cache(tmp_path / "k").path
    (folder / FEATURES_FILE).unlink()
    with pytest.raises(CacheCorruptError, match=r"is damaged .*delete the folder"):
        load_features(folder)


def test_load_inconsistent_shapes(tmp_path):
    folder = _write_cache(tmp_path / "k").path
    np.save(folder / LABELS_FILE, np.zeros(2, dtype=np.int64))
    (folder / SAMPLE_IDS_FILE).write_text("[]")
    with pytest.raises(CacheCorruptError, match=r"inconsistent: labels have shape \(2,\)"):
        load_features(folder)


def test_load_labels_out_of_range(tmp_path):
    folder = _write_cache(tmp_path / "k").path
    np.save(folder / LABELS_FILE, np.array([0, 1, 2, 0], dtype=np.int64))
    with pytest.raises(CacheCorruptError, match=r"labels fall outside 0\.\.1"):
        load_features(folder)


def test_load_wrong_dtype(tmp_path):
    folder = _write_cache(tmp_path / "k").path
    np.save(folder / FEATURES_FILE, np.zeros((4, 3), dtype=np.float64))
    with pytest.raises(CacheCorruptError, match=r"features are float64, manifest says float32"):
        load_features(folder)


def test_cache_key_stable_and_readable():
    key = cache_key(REQUEST, "toy/set-pixels")
    assert key == cache_key(dict(reversed(list(REQUEST.items()))), "toy/set-pixels")
    assert key.startswith("toy_set-pixels-")
    assert len(key.rsplit("-", 1)[1]) == 16
    assert cache_key({**REQUEST, "dtype": "float16"}, "toy/set-pixels") != key


def test_describe_differences_nested():
    cached = {"a": 1, "b": {"c": [3, 224, 224], "d": "x"}}
    requested = {"a": 1, "b": {"c": [3, 160, 160], "d": "x"}, "e": True}
    assert describe_differences(cached, requested) == [
        "b.c: cached [3, 224, 224], requested [3, 160, 160]",
        "e: cached null, requested true",
    ]
    assert describe_differences(cached, cached) == []


def test_check_request_names_difference(tmp_path):
    loaded = _write_cache(tmp_path / "k")
    check_request(loaded, REQUEST)
    with pytest.raises(
        CacheMismatchError, match=r'backbone: cached "pixels", requested "resnet50"'
    ):
        check_request(loaded, {**REQUEST, "backbone": "resnet50"})


def test_partial_cache_of_other_request(tmp_path):
    CacheWriter(tmp_path / "k", REQUEST, total=4, chunk_size=2)
    with pytest.raises(CacheMismatchError, match=r"partial feature cache .* another request"):
        CacheWriter(tmp_path / "k", {**REQUEST, "dtype": "float16"}, total=4, chunk_size=2)


def test_writer_resumes_with_stored_chunk_size(tmp_path):
    first = CacheWriter(tmp_path / "k", REQUEST, total=5, chunk_size=2)
    first.write_chunk(_chunk(0, [0, 1]))
    second = CacheWriter(tmp_path / "k", REQUEST, total=5, chunk_size=4)
    assert second.chunk_size == 2
    assert second.completed_chunks() == {0}


def test_writer_deletes_damaged_and_temporary_chunks(tmp_path, caplog):
    writer = CacheWriter(tmp_path / "k", REQUEST, total=4, chunk_size=2)
    writer.write_chunk(_chunk(0, [0, 1]))
    writer.write_chunk(_chunk(1, [2, 3]))
    damaged = writer.chunks_dir / "chunk-000001.npz"
    damaged.write_bytes(damaged.read_bytes()[:50])
    leftover = writer.chunks_dir / ".chunk-000002.npz.tmp"
    leftover.write_bytes(b"partial")
    assert writer.completed_chunks() == {0}
    assert not damaged.exists()
    assert not leftover.exists()
    assert "deleting damaged chunk" in caplog.text


def test_writer_rejects_chunk_outside_range(tmp_path):
    writer = CacheWriter(tmp_path / "k", REQUEST, total=4, chunk_size=2)
    with pytest.raises(
        ValueError, match=r"chunk 1 covers positions \[0 1\]\.\.\., expected 2\.\.3"
    ):
        writer.write_chunk(_chunk(1, [0, 1]))


def test_writer_rejects_bad_chunk_size(tmp_path):
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer, got 0"):
        CacheWriter(tmp_path / "k", REQUEST, total=4, chunk_size=0)


def test_chunk_with_wrong_coverage_on_disk_is_dropped(tmp_path):
    writer = CacheWriter(tmp_path / "k", REQUEST, total=4, chunk_size=2)
    with (writer.chunks_dir / "chunk-000000.npz").open("wb") as file:
        np.savez(
            file,
            positions=np.array([0], dtype=np.int64),
            features=np.zeros((1, 3), np.float32),
            skipped_positions=np.zeros(0, np.int64),
            skipped_reasons=np.zeros(0, dtype=str),
        )
    assert writer.completed_chunks() == set()


def test_finalize_with_every_image_skipped(tmp_path):
    writer = CacheWriter(tmp_path / "k", REQUEST, total=2, chunk_size=2)
    writer.write_chunk(_chunk(0, [], skipped=[0, 1]))
    with pytest.raises(
        ValueError, match=r"no image of the 2 requested could be decoded \(2 skipped"
    ):
        writer.finalize(np.zeros(2), ["a", "b"], {"class_names": ["x"]}, "float32")


def test_write_atomic_leaves_no_temporary(tmp_path):
    target = tmp_path / "file.json"
    write_atomic(target, b"{}")
    write_atomic(target, b"[1]")
    assert target.read_bytes() == b"[1]"
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_plain_npy_chunk_is_dropped(tmp_path):
    writer = CacheWriter(tmp_path / "k", REQUEST, total=4, chunk_size=2)
    np.save(writer.chunks_dir / "chunk-000000.npy", np.zeros(2))
    (writer.chunks_dir / "chunk-000000.npy").rename(writer.chunks_dir / "chunk-000000.npz")
    assert writer.completed_chunks() == set()
    assert not (writer.chunks_dir / "chunk-000000.npz").exists()
