"""Awkward numbers and settings, and hostile files: a clear error or a recorded warning.

Also checks that nothing read from a file is executed: weights load with
`weights_only=True`, YAML with a safe loader, and CSV labels stay plain strings.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import _bad_inputs as bad
import numpy as np
import pandas as pd
import pytest
import torch
from _bad_inputs import error_line, run_cli

import spela_transfer
from spela_transfer.cache import CacheWriter, Chunk, FeatureSet, load_features
from spela_transfer.config import load_experiment_config

NUM_SAMPLES = 60
FIT_FLAGS = [
    "--heads",
    "spela,backprop,logreg",
    "--protocols",
    "test-size",
    "--test-sizes",
    "0.5",
    "--seeds",
    "0",
    "--epochs",
    "2",
    "--hidden-widths",
    "8,4",
    "--device",
    "cpu",
]


def write_cache(
    folder: Path, features: np.ndarray, labels: np.ndarray, class_names: list[str]
) -> FeatureSet:
    """Write a complete cache of hand-made features `[N, D]`, as `extract` would."""
    request = {"backbone": "pixels", "class_names": class_names, "dtype": str(features.dtype)}
    writer = CacheWriter(folder, request, total=len(labels), chunk_size=len(labels))
    writer.write_chunk(
        Chunk(
            index=0,
            positions=np.arange(len(labels), dtype=np.int64),
            features=features,
            skipped_positions=np.zeros(0, dtype=np.int64),
            skipped_reasons=np.zeros(0, dtype=str),
        )
    )
    manifest = {"backbone": "pixels", "class_names": class_names, "request": request}
    sample_ids = [f"hand-made:all:{index}" for index in range(len(labels))]
    return writer.finalize(np.asarray(labels), sample_ids, manifest, str(features.dtype))


def separable_features(labels: np.ndarray, width: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(size=(len(labels), width)) + 3.0 * labels[:, None]).astype(np.float32)


THREE_CLASSES = np.arange(NUM_SAMPLES) % 3


def fit_cache(tmp_path: Path, features, labels, class_names, *extra: str):
    cache = write_cache(tmp_path / "cache", features, labels, class_names)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        ["fit", "--features", str(cache.path), "--out", str(out), *FIT_FLAGS, *extra]
    )
    return code, stdout, stderr, out


# ---------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_rejected(value, tmp_path):
    features = separable_features(THREE_CLASSES)
    features[7, 3] = value

    code, stdout, stderr, out = fit_cache(tmp_path, features, THREE_CLASSES, ["a", "b", "c"])

    assert code == 2
    line = error_line(stderr)
    assert "contain NaN or inf in 1 of 60 rows (first: 'hand-made:all:7')" in line
    # The cache is float32, so float16 overflow cannot be the cause.
    assert "float16" not in line
    assert "check those images and the backbone" in line
    assert not out.exists()


def test_float16_overflow_rejected(tmp_path):
    # Activations above 65504 become inf when the cache stores float16.
    features = separable_features(THREE_CLASSES)
    features[0, 0] = 1e6
    with np.errstate(over="ignore"):
        half = features.astype(np.float16)

    code, _, stderr, _ = fit_cache(tmp_path, half, THREE_CLASSES, ["a", "b", "c"])

    assert code == 2
    assert "float16 storage overflows above 65504" in error_line(stderr)


def test_constant_features_warn(tmp_path):
    features = np.ones((NUM_SAMPLES, 8), dtype=np.float32)

    code, stdout, stderr, out = fit_cache(tmp_path, features, THREE_CLASSES, ["a", "b", "c"])

    assert code == 0, stderr
    assert "are the same for every sample, so every head will score at chance level" in stderr
    runs = pd.read_csv(out / "runs.csv")
    assert set(runs["head"]) == {"spela", "backprop", "logreg"}


def test_constant_column_no_warning(tmp_path):
    features = separable_features(THREE_CLASSES)
    features[:, 0] = 0.0  # a dead unit, common in ReLU features and harmless
    code, _, stderr, _ = fit_cache(tmp_path, features, THREE_CLASSES, ["a", "b", "c"])
    assert code == 0, stderr
    assert "same for every sample" not in stderr


def test_single_class_rejected(tmp_path):
    labels = np.zeros(NUM_SAMPLES, dtype=np.int64)
    features = separable_features(labels)

    code, _, stderr, out = fit_cache(tmp_path, features, labels, ["only"])

    assert code == 2
    assert "contain 1 class (['only']); the heads need at least 2 classes" in error_line(stderr)
    assert not out.exists()


def test_too_many_classes_for_width_one(tmp_path):
    labels = np.arange(NUM_SAMPLES) % 30
    features = separable_features(labels)
    names = [f"c{index}" for index in range(30)]

    code, _, stderr, _ = fit_cache(tmp_path, features, labels, names, "--hidden-widths", "4,1")

    assert code == 2
    line = error_line(stderr)
    assert "a layer of width 1 can hold at most 2 distinct class vectors" in line
    assert "widen the layers in hidden_widths" in line


def test_crowded_class_vectors_logged(tmp_path):
    labels = np.arange(NUM_SAMPLES) % 30
    features = separable_features(labels)
    names = [f"c{index}" for index in range(30)]

    code, _, stderr, _ = fit_cache(tmp_path, features, labels, names, "--hidden-widths", "4,3")

    assert code == 0, stderr
    # Every fit of the sweep builds the same crowded vectors, so each layer is reported once.
    assert stderr.count("30 classes exceed width 4 + 1, Coulomb class vectors") == 1
    assert stderr.count("30 classes exceed width 3 + 1") == 1
    assert "widen it to at least 29 in hidden_widths" in stderr


def test_class_without_training_sample_recorded(tmp_path):
    # 30 classes of 2 samples at test size 0.9: most classes get no training sample.
    labels = np.arange(NUM_SAMPLES) % 30
    features = separable_features(labels)
    names = [f"c{index}" for index in range(30)]

    code, stdout, stderr, out = fit_cache(
        tmp_path, features, labels, names, "--test-sizes", "0.9", "--heads", "spela,logreg"
    )

    assert code == 0, stderr
    assert re.search(r"test-size 0\.9: classes with no training sample \(\d+\)", stderr)
    runs = pd.read_csv(out / "runs.csv", dtype=str, keep_default_na=False)
    assert (runs["missing_train_classes"] != "").all()
    assert "had no training sample" in stdout


def test_point_with_one_training_class_skipped(tmp_path):
    # Of 18 samples, test size 0.9 leaves 1 for training and 0.99 leaves none. Those points
    # are skipped and the sweep goes on.
    labels = np.arange(18) % 3
    features = separable_features(labels)
    sizes = ["--test-sizes", "0.5,0.9,0.99"]

    code, stdout, stderr, out = fit_cache(tmp_path, features, labels, ["a", "b", "c"], *sizes)

    assert code == 0, stderr
    assert re.search(
        r"test-size 0\.9: skipped because every training sample is of one class \([abc]\)",
        stderr,
    )
    runs = pd.read_csv(out / "runs.csv", dtype=str)
    assert set(runs["point"]) == {"0.5"}
    assert "Skipped test size 0.9 because" in stdout


def test_k_larger_than_class_warns(tmp_path):
    features = separable_features(THREE_CLASSES)
    args = ["--protocols", "k-shot", "--k-shots", "50", "--heads", "logreg"]

    code, _, stderr, out = fit_cache(tmp_path, features, THREE_CLASSES, ["a", "b", "c"], *args)

    # The command line logs the FewSamplesWarning as one line that names the classes.
    assert code == 0, stderr
    assert "50-shot: classes with fewer than 50 training samples keep all they have: a (" in stderr
    assert "FewSamplesWarning" not in stderr
    runs = pd.read_csv(out / "runs.csv")
    assert (runs["train_count"] < 3 * 50).all()
    assert (runs["train_count"] > 0).all()


def test_stratify_with_singleton_class(tmp_path):
    labels = THREE_CLASSES.copy()
    labels[-1] = 3
    features = separable_features(labels)

    code, _, stderr, _ = fit_cache(tmp_path, features, labels, ["a", "b", "c", "d"], "--stratify")

    assert code == 2
    assert "cannot stratify: these classes have fewer than 2 samples" in error_line(stderr)


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("settings") / "cache"
    return write_cache(
        folder, separable_features(THREE_CLASSES), THREE_CLASSES, ["a", "b", "c"]
    ).path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seeds", "a,b"], r"--seeds must be whole numbers such as 0, 1, 2; got 'a'"),
        (["--seeds", "1.5"], r"got '1\.5'"),
        (["--seeds", "-1"], r"seeds must be integers of 0 or more, got -1"),
        (["--seeds", "0,0"], r"seeds must not repeat a value"),
        (["--epochs", "-1"], r"epochs must be a positive integer, got -1"),
        (["--epochs", "0"], r"epochs must be a positive integer, got 0"),
        (["--batch-size", "0"], r"batch_size must be a positive integer, got 0"),
        (["--batch-size", "-32"], r"batch_size must be a positive integer, got -32"),
        (["--lr", "-0.1"], r"lr must be a positive number, got -0\.1"),
        (["--lr", "0"], r"lr must be a positive number, got 0"),
        (["--hidden-widths", "8,0"], r"hidden_widths must be positive integers"),
        (["--test-sizes", "1.5"], r"strictly between 0 and 1.*got 1\.5"),
        (["--test-sizes", "0"], r"strictly between 0 and 1.*got 0\.0"),
        (["--test-sizes", "half"], r"--test-sizes expects comma-separated float values"),
        (["--k-shots", "0", "--protocols", "k-shot"], r"k-shot must be a positive integer, got 0"),
        (["--heads", "svm"], r"unknown heads 'svm'; valid heads: spela, backprop, logreg"),
        (["--protocols", "loo"], r"unknown protocols 'loo'"),
        (
            ["--spela", "loss=mse"],
            r"command-line flags: invalid spela setting: loss must be one of",
        ),
        (["--backprop", "activaton=relu"], r"backprop: unknown setting 'activaton'"),
    ],
)
def test_fit_flag_rejected(flags, message, small_cache, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        ["fit", "--features", str(small_cache), "--out", str(out), *FIT_FLAGS, *flags]
    )
    assert code == 2
    assert stdout == ""
    assert re.search(message, error_line(stderr)), stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("seeds: [0.5]\n", r"seeds must be whole numbers such as 0, 1, 2; got 0\.5"),
        ("seeds: [true]\n", r"got True"),
        ("seeds: ['zero']\n", r"got 'zero'"),
        ("epochs: -5\n", r"epochs must be a positive integer, got -5"),
        ("batch_size: 0\n", r"batch_size must be a positive integer, got 0"),
        (
            "spela: {epochs: -3}\n",
            r"invalid spela setting: epochs must be a positive integer, got -3",
        ),
        ("spela: {batch_size: 0}\n", r"invalid spela setting: batch_size must be a positive"),
        (
            "spela: {normalize_input: maybe}\n",
            r"invalid spela setting: normalize_input must be true or false, got 'maybe'",
        ),
        ("extract: {pretrained: 2}\n", r"extract: pretrained must be true or false, got 2"),
        (
            "spela: {activation: swish}\n",
            r"invalid spela setting: activation must be one of 'leaky_relu'.*got 'swish'",
        ),
        (
            "spela: {loss: mse}\n",
            r"invalid spela setting: loss must be one of 'neg_cos', 'log2cos', 'euclidean'; "
            r"got 'mse'",
        ),
        ("backprop: {activation: swish}\n", r"invalid backprop setting: activation must be one of"),
        (
            "backprop: {activaton: relu}\n",
            r"backprop: unknown setting 'activaton'; valid settings: hidden_widths",
        ),
        ("extract: {batch_size: 0}\n", r"extract: batch_size must be a positive integer"),
        ("parallel_fits: 0\n", r"parallel_fits must be a positive integer, got 0"),
        ("spela: [1, 2]\n", r"spela must be a mapping of head settings"),
        ("epoch: 3\n", r"unknown setting 'epoch'; valid settings: "),
        ("protocol: {test_sizes: [1.2]}\n", r"got 1\.2"),
        ("seeds: [0, 1\n", r"invalid YAML"),
        ("- just\n- a list\n", r"expected a mapping of settings, got list"),
    ],
)
def test_fit_yaml_rejected(yaml_text, message, small_cache, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml_text)
    out = tmp_path / "out"

    code, stdout, stderr = run_cli(
        ["fit", "--config", str(config), "--features", str(small_cache), "--out", str(out)]
    )

    assert code == 2
    assert stdout == ""
    assert re.search(message, error_line(stderr)), stderr
    assert str(config) in error_line(stderr)
    assert not out.exists()


def test_bad_value_in_file_named_with_flags(small_cache, tmp_path):
    # A file value that a flag does not touch is still the file's fault; a bad flag is not.
    config = tmp_path / "config.yaml"
    config.write_text("batch_size: 0\n")
    code, _, stderr = run_cli(
        ["fit", "--config", str(config), "--features", str(small_cache), "--epochs", "2"]
    )
    assert code == 2
    assert error_line(stderr).startswith(f"spela-transfer fit: error: {config}: batch_size")

    config.write_text("epochs: 2\n")
    code, _, stderr = run_cli(
        ["fit", "--config", str(config), "--features", str(small_cache), "--epochs", "0"]
    )
    assert code == 2
    assert "error: command-line flags: epochs must be a positive integer" in error_line(stderr)


def test_head_settings_checked_before_extraction(tmp_path):
    cache = tmp_path / "cache"
    code, _, stderr = run_cli(
        ["fit", "--cache-dir", str(cache), "--limit", "20", "--spela", "loss=mse"]
    )
    assert code == 2
    assert "invalid spela setting: loss must be one of" in error_line(stderr)
    assert not cache.exists()


def test_seeds_as_strings_accepted(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("seeds: ['0', '1', '2']\n")
    assert load_experiment_config(config).seeds == (0, 1, 2)
    config.write_text("seeds: '3, 4'\n")
    assert load_experiment_config(config).seeds == (3, 4)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], r"batch_size must be a positive integer, got 0"),
        (["--batch-size", "-8"], r"batch_size must be a positive integer, got -8"),
        (["--image-size", "0"], r"image_size must be a positive integer, got 0"),
        (["--limit", "0"], r"limit must be a positive integer, got 0"),
        (["--num-workers", "-1"], r"num_workers must be 0 or more, got -1"),
        (["--backbone", "no_such_model_xyz"], r"no_such_model_xyz"),
    ],
)
def test_extract_flag_rejected(flags, message, tmp_path):
    cache_dir = tmp_path / "cache"
    code, stdout, stderr = run_cli(
        [
            "extract",
            "--backbone",
            "pixels",
            "--limit",
            "1",
            "--device",
            "cpu",
            "--cache-dir",
            str(cache_dir),
            *flags,
        ]
    )
    assert code == 2
    assert stdout == ""
    assert re.search(message, error_line(stderr)), stderr
    assert not cache_dir.exists() or not any(cache_dir.glob("*/manifest.json"))


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("extract: {batch_size: 0}\n", r"batch_size must be a positive integer, got 0"),
        ("image_size: -1\n", r"image_size must be a positive integer, got -1"),
        ("extract: {download: maybe}\n", r"download must be true or false, got 'maybe'"),
    ],
)
def test_extract_yaml_rejected_names_file(yaml_text, message, tmp_path):
    config = tmp_path / "extract.yaml"
    config.write_text(yaml_text)
    cache_dir = tmp_path / "cache"
    code, stdout, stderr = run_cli(
        ["extract", "--config", str(config), "--backbone", "pixels", "--cache-dir", str(cache_dir)]
    )
    assert code == 2
    assert stdout == ""
    assert error_line(stderr).startswith(f"spela-transfer extract: error: {config}: ")
    assert re.search(message, error_line(stderr)), stderr
    assert not cache_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda(small_cache, tmp_path):
    code, _, stderr = run_cli(
        [
            "fit",
            "--features",
            str(small_cache),
            "--out",
            str(tmp_path / "o"),
            *FIT_FLAGS,
            "--device",
            "cuda:3",
        ]
    )
    assert code == 2
    assert "CUDA is not available" in error_line(stderr)


# ---------------------------------------------------------------------------
# Safety: nothing in a file the tool reads is executed.
# ---------------------------------------------------------------------------


# torch warns about the pickle protocol before it rejects the file.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickled_weights_file_rejected(tmp_path):
    marker = tmp_path / "pickle-ran"
    weights = bad.write_pickle_payload(tmp_path / "evil.pth", marker)

    code, stdout, stderr = run_cli(
        [
            "extract",
            "--backbone",
            "resnet18",
            "--weights",
            str(weights),
            "--limit",
            "1",
            "--image-size",
            "32",
            "--device",
            "cpu",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )

    assert code == 2
    line = error_line(stderr)
    assert f"weights file {str(weights)!r} could not be loaded as a state dict" in line
    assert "pickled objects other than tensors, which are never run" in line
    assert "weights_only=False" not in stderr
    assert not marker.exists()


def test_broken_safetensors_rejected(tmp_path):
    weights = tmp_path / "broken.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")

    code, _, stderr = run_cli(
        [
            "extract",
            "--backbone",
            "resnet18",
            "--weights",
            str(weights),
            "--limit",
            "1",
            "--image-size",
            "32",
            "--device",
            "cpu",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )

    assert code == 2
    assert f"weights file {str(weights)!r} is not a valid .safetensors file" in error_line(stderr)


@pytest.mark.parametrize("command", ["fit", "extract"])
def test_yaml_python_tags_never_run(command, small_cache, tmp_path):
    marker = tmp_path / "yaml-ran"
    config = tmp_path / "config.yaml"
    config.write_text(f"seeds: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n")
    args = [command, "--config", str(config)]
    if command == "fit":
        args += ["--features", str(small_cache), "--out", str(tmp_path / "o")]
    else:
        args += ["--cache-dir", str(tmp_path / "cache")]

    code, _, stderr = run_cli(args)

    assert code == 2
    assert "python/object/apply" in error_line(stderr)
    assert not marker.exists()


def test_csv_label_is_never_evaluated(tmp_path):
    marker = tmp_path / "label-ran"
    folder = tmp_path / "data"
    bad.save_good_image(folder / "a.png", seed=0)
    bad.save_good_image(folder / "b.png", seed=1)
    code_label = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    (folder / "data.csv").write_text(f'path,label\na.png,"{code_label}"\nb.png,plain\n')

    code, _, stderr = run_cli(
        [
            "extract",
            "--dataset",
            str(folder / "data.csv"),
            "--backbone",
            "pixels",
            "--image-size",
            "4",
            "--device",
            "cpu",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )

    assert code == 0, stderr
    features = load_features(next((tmp_path / "cache").iterdir()))
    assert code_label in features.class_names
    assert not marker.exists()


def test_cache_files_hold_no_pickles(small_cache):
    for path in small_cache.iterdir():
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            assert array.dtype != object
        elif path.suffix == ".json":
            json.loads(path.read_text())


# Calls that can run code stored in a file or string.
UNSAFE_CALLS = (
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "pickle.load",
    "pickle.loads",
    "marshal.load",
    "marshal.loads",
    "eval",
    "exec",
)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_source_never_loads_unsafely():
    """Scan the package source: every loader call of a file format that can run code is safe."""
    package = Path(spela_transfer.__file__).parent
    problems = []
    loads = {"torch.load": 0, "np.load": 0, "yaml.safe_load": 0}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call, name in _calls(tree):
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
            where = f"{path.relative_to(package)}:{call.lineno}"
            if name == "torch.load":
                loads[name] += 1
                if keywords.get("weights_only") != "True":
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load"):
                loads["np.load"] += 1
                if keywords.get("allow_pickle") != "False":
                    problems.append(f"{where}: np.load without allow_pickle=False")
            elif name == "yaml.safe_load":
                loads[name] += 1
            elif name in UNSAFE_CALLS:
                problems.append(f"{where}: {name}")

    assert problems == []
    # The scan found the loaders it checks, so it reads the right files.
    assert loads["torch.load"] >= 2
    assert loads["np.load"] >= 3
    assert loads["yaml.safe_load"] >= 2


def test_cache_dir_is_a_file(tmp_path):
    not_a_folder = tmp_path / "features"
    not_a_folder.write_text("a file where the cache folder should be")

    code, _, stderr = run_cli(
        [
            "extract",
            "--backbone",
            "pixels",
            "--limit",
            "1",
            "--device",
            "cpu",
            "--cache-dir",
            str(not_a_folder),
        ]
    )

    assert code == 2
    line = error_line(stderr)
    assert "Not a directory" in line
    assert str(not_a_folder) in line
    assert not_a_folder.read_text() == "a file where the cache folder should be"
