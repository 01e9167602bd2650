"""Interrupted, concurrent and damaged feature caches: never accepted half-made, never lost.

The interruptions are real: `spela-transfer extract` runs in a child process that
stops at a chosen point (see the driver in `_bad_inputs.py`) and is killed there
with SIGKILL, so no Python cleanup code runs.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import _bad_inputs as bad
import numpy as np
import pytest
import torch

from spela_transfer import extract
from spela_transfer.cache import (
    CHUNKS_DIR,
    FEATURES_FILE,
    LABELS_FILE,
    MANIFEST_FILE,
    REQUEST_FILE,
    SAMPLE_IDS_FILE,
    CacheWriter,
    load_features,
)
from spela_transfer.cli import main
from spela_transfer.errors import CacheCorruptError

DRIVER = Path(bad.__file__)
CHUNK_SIZE = 4
# 15 files: 14 good images and one truncated JPEG, so chunks mix kept and skipped rows.
PER_CLASS = 7
CHILD_TIMEOUT_S = 300

# Points where the child is killed, in the order an extraction passes them. The
# first leaves two finished chunks and a complete temporary copy of the third.
KILL_POINTS = {
    "mid-chunk-rename": "replace:chunk-000002.npz",
    "features-written-no-manifest": "replace:labels.npy",
    "manifest-written-before-cleanup": "rmtree",
}


def _extract_args(dataset: Path, cache_dir: Path) -> list[str]:
    return [
        "extract",
        "--dataset",
        str(dataset),
        "--backbone",
        "efficientnet_lite0.offline",
        "--image-size",
        "32",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--cache-dir",
        str(cache_dir),
    ]


def _child_env() -> dict[str, str]:
    # One thread everywhere: float sums can round differently with another thread count,
    # and the resumed part runs in this process with one thread as well.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def start_driver(
    cli_args: list[str], log: Path, pause: str | None = None, marker: Path | None = None
) -> subprocess.Popen:
    """Start `spela-transfer` in a child process through the pausing driver."""
    command = [sys.executable, str(DRIVER), "--chunk-size", str(CHUNK_SIZE)]
    if pause is not None:
        command += ["--pause", pause, "--marker", str(marker)]
    with log.open("wb") as log_file:
        return subprocess.Popen(
            [*command, "--", *cli_args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=_child_env(),
        )


def wait_for(condition, process: subprocess.Popen, log: Path, what: str) -> None:
    """Poll `condition()` until it holds; fail with the child's output if the child exits."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"child exited with {process.returncode} before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()}")
        time.sleep(0.05)


def kill_all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(CHILD_TIMEOUT_S)


def cache_folder(cache_dir: Path) -> Path:
    folders = [path for path in cache_dir.iterdir() if path.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = bad.make_good_folder(tmp_path_factory.mktemp("kill") / "images", per_class=PER_CLASS)
    bad.write_truncated_jpeg(root / "ant" / "truncated.jpg")
    return root


@pytest.fixture(scope="module")
def killed_runs(dataset, tmp_path_factory):
    """Run one uninterrupted extraction and one killed at each point, all children at once.

    Returns:
        `{"reference": cache_dir, point: cache_dir, ...}`; every killed child is dead.
    """
    base = tmp_path_factory.mktemp("runs")
    children = {
        "reference": (
            start_driver(_extract_args(dataset, base / "reference"), base / "reference.log"),
            None,
        )
    }
    for name, point in KILL_POINTS.items():
        marker = base / f"{name}.paused"
        process = start_driver(
            _extract_args(dataset, base / name), base / f"{name}.log", point, marker
        )
        children[name] = (process, marker)

    try:
        for name, (process, marker) in children.items():
            log = base / f"{name}.log"
            if marker is None:
                assert process.wait(CHILD_TIMEOUT_S) == 0, log.read_text()
                continue
            wait_for(marker.exists, process, log, f"kill point {name}")
            process.send_signal(signal.SIGKILL)
            assert process.wait(CHILD_TIMEOUT_S) == -signal.SIGKILL
    finally:
        # A failed check above must not leave paused children behind.
        kill_all([process for process, _ in children.values()])
    return {name: base / name for name in children}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_extract_resumes_identically(point, killed_runs, dataset, capsys, one_thread):
    reference = load_features(cache_folder(killed_runs["reference"]))
    folder = cache_folder(killed_runs[point])

    # Before the resume, no reader accepts the partial cache (unless it was complete).
    if point == "manifest-written-before-cleanup":
        assert load_features(folder).key == reference.key
    else:
        with pytest.raises(CacheCorruptError, match=r"interrupted; rerun the same extract"):
            load_features(folder)
        assert main(["fit", "--features", str(folder), "--out", str(folder.parent / "o")]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1
        assert "rerun the same extract command to resume it" in error
    if point == "mid-chunk-rename":
        chunks = sorted(path.name for path in (folder / CHUNKS_DIR).iterdir())
        assert chunks == [".chunk-000002.npz.tmp", "chunk-000000.npz", "chunk-000001.npz"]

    assert main(_extract_args(dataset, killed_runs[point])) == 0
    resumed = load_features(folder)

    assert resumed.key == reference.key
    assert resumed.features.dtype == reference.features.dtype
    np.testing.assert_array_equal(resumed.features, reference.features)
    np.testing.assert_array_equal(resumed.labels, reference.labels)
    assert resumed.sample_ids == reference.sample_ids
    assert resumed.class_names == reference.class_names
    assert resumed.manifest["counts"] == reference.manifest["counts"]
    assert resumed.manifest["skipped"] == reference.manifest["skipped"]
    assert resumed.manifest["counts"]["skipped"] == 1
    if point == "mid-chunk-rename":
        assert resumed.manifest["timing"]["resumed_chunks"] == 2
    assert not (folder / CHUNKS_DIR).exists()
    assert not (folder / REQUEST_FILE).exists()


def test_concurrent_extract_waits_then_takes_over(dataset, tmp_path, killed_runs):
    cache_dir = tmp_path / "cache"
    marker = tmp_path / "first.paused"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"

    # The first process stops after two chunks; the second must wait, not write beside it.
    first = start_driver(_extract_args(dataset, cache_dir), first_log, "write_chunk:2", marker)
    second = None
    try:
        wait_for(marker.exists, first, first_log, "the first extraction to pause")
        second = start_driver(_extract_args(dataset, cache_dir), second_log)
        wait_for(
            lambda: "waiting" in second_log.read_text(errors="replace"),
            second,
            second_log,
            "the second extraction to wait for the first",
        )
        chunks = sorted(path.name for path in (cache_folder(cache_dir) / CHUNKS_DIR).iterdir())
        assert chunks == ["chunk-000000.npz", "chunk-000001.npz"]

        # The kernel drops the lock of a killed process, so the second one takes over.
        first.send_signal(signal.SIGKILL)
        first.wait(CHILD_TIMEOUT_S)
        assert second.wait(CHILD_TIMEOUT_S) == 0, second_log.read_text()
    finally:
        kill_all([first] + ([second] if second is not None else []))

    features = load_features(cache_folder(cache_dir))
    reference = load_features(cache_folder(killed_runs["reference"]))
    assert features.manifest["timing"]["resumed_chunks"] == 2
    np.testing.assert_array_equal(features.features, reference.features)
    assert features.manifest["counts"] == reference.manifest["counts"]


# ---------------------------------------------------------------------------
# Damaged complete caches: rejected on load, with a message to extract them again.
# ---------------------------------------------------------------------------


def _edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    change(manifest)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGES = {
    "truncated-features": (
        lambda folder: _truncate(folder / FEATURES_FILE),
        r"is damaged \(mmap length is greater than file size\)",
    ),
    "truncated-labels": (
        lambda folder: _truncate(folder / LABELS_FILE, 0.9),
        r"is damaged",
    ),
    "labels-wrong-length": (
        lambda folder: np.save(folder / LABELS_FILE, np.zeros(3, dtype=np.int64)),
        r"inconsistent: labels have shape \(3,\) and dtype int64, expected \(20,\) and int64",
    ),
    "labels-float": (
        lambda folder: np.save(folder / LABELS_FILE, np.zeros(20, dtype=np.float64)),
        r"labels have shape \(20,\) and dtype float64",
    ),
    "features-removed": (
        lambda folder: (folder / FEATURES_FILE).unlink(),
        r"is damaged \(\[Errno 2\] No such file",
    ),
    "sample-ids-not-json": (
        lambda folder: (folder / SAMPLE_IDS_FILE).write_text("[1,"),
        r"is damaged \(Expecting value",
    ),
    "manifest-edited-backbone": (
        lambda folder: _edit_manifest(folder, lambda m: m.update(backbone="resnet50")),
        r'backbone "resnet50" differs from the request\'s "pixels"',
    ),
    "manifest-edited-classes": (
        lambda folder: _edit_manifest(folder, lambda m: m["class_names"].reverse()),
        r"class_names .* differs from the request's",
    ),
    "manifest-edited-count": (
        lambda folder: _edit_manifest(folder, lambda m: m["counts"].update(extracted=19)),
        r"features have shape \(20, 64\), manifest says \(19, 64\)",
    ),
    "manifest-field-removed": (
        lambda folder: _edit_manifest(folder, lambda m: m.pop("counts")),
        r"manifest\.json has a missing or invalid field \(KeyError: 'counts'\)",
    ),
    "manifest-not-object": (
        lambda folder: (folder / MANIFEST_FILE).write_text("[1, 2]"),
        r"manifest\.json contains a JSON list, not an object",
    ),
    "manifest-not-utf8": (
        lambda folder: (folder / MANIFEST_FILE).write_bytes(b"\xff\xfe{}"),
        r"manifest\.json is not valid JSON",
    ),
    "other-format-version": (
        lambda folder: _edit_manifest(folder, lambda m: m.update(format=2)),
        r"has format 2 and complete=True; this version reads complete caches of format 1",
    ),
    "marked-incomplete": (
        lambda folder: _edit_manifest(folder, lambda m: m.update(complete=False)),
        r"complete=False",
    ),
}


def _pixels_args(cache_dir: Path) -> list[str]:
    return [
        "extract",
        "--backbone",
        "pixels",
        "--image-size",
        "8",
        "--limit",
        "2",
        "--device",
        "cpu",
        "--cache-dir",
        str(cache_dir),
    ]


@pytest.fixture
def pixels_cache(tmp_path) -> Path:
    """A complete cache of 20 Fashion-MNIST sample images as 8 x 8 gray pixels, `[20, 64]`."""
    assert main(["-q", *_pixels_args(tmp_path / "cache")]) == 0
    return cache_folder(tmp_path / "cache")


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_cache_rejected(damage, pixels_cache, capsys):
    change, message = DAMAGES[damage]
    change(pixels_cache)

    with pytest.raises(CacheCorruptError, match=message):
        load_features(pixels_cache)
    with pytest.raises(CacheCorruptError, match=r"[Dd]elete the folder and extract again"):
        load_features(pixels_cache)

    # Both commands that read a cache stop with one line naming the folder.
    capsys.readouterr()
    assert main(["extract", *_pixels_args(pixels_cache.parent)[1:]]) == 2
    assert main(["fit", "--features", str(pixels_cache), "--out", str(pixels_cache / "o")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2
    for line in errors:
        assert str(pixels_cache) in line
        assert "elete the folder and extract again" in line
        assert "Traceback" not in line


def test_pickled_cache_arrays_never_run(pixels_cache, tmp_path):
    marker = tmp_path / "pickle-ran"
    for name in (FEATURES_FILE, LABELS_FILE):
        original = (pixels_cache / name).read_bytes()
        bad.write_npy_with_pickle(pixels_cache / name, marker)
        with pytest.raises(CacheCorruptError, match=r"is damaged \(.*(Object arrays|objects)"):
            load_features(pixels_cache)
        (pixels_cache / name).write_bytes(original)
    assert not marker.exists()
    assert len(load_features(pixels_cache)) == 20


def test_pickled_chunk_dropped_on_resume(dataset, tmp_path, killed_runs, one_thread, monkeypatch):
    # A partial cache whose first chunk was replaced by a pickle: the resume drops and
    # recomputes that chunk without unpickling it.
    marker = tmp_path / "pickle-ran"
    original_write = CacheWriter.write_chunk

    def stop_after_two(self, chunk):
        if chunk.index == 2:
            raise KeyboardInterrupt
        original_write(self, chunk)

    monkeypatch.setattr(
        extract,
        "extract_features",
        functools.partial(extract.extract_features, chunk_size=CHUNK_SIZE),
    )
    monkeypatch.setattr(CacheWriter, "write_chunk", stop_after_two)
    assert main(_extract_args(dataset, tmp_path / "cache")) == 130
    monkeypatch.setattr(CacheWriter, "write_chunk", original_write)
    folder = cache_folder(tmp_path / "cache")
    bad.write_npy_with_pickle(folder / CHUNKS_DIR / "chunk-000000.npz", marker)

    assert main(_extract_args(dataset, tmp_path / "cache")) == 0

    assert not marker.exists()
    resumed = load_features(folder)
    reference = load_features(cache_folder(killed_runs["reference"]))
    assert resumed.manifest["timing"]["resumed_chunks"] == 1
    np.testing.assert_array_equal(resumed.features, reference.features)
