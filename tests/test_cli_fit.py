"""`spela-transfer fit` and `report` end to end, and their one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from spela_transfer.cli import main

TINY_FLAGS = [
    "--heads",
    "spela,backprop,logreg",
    "--protocols",
    "test-size,k-shot",
    "--test-sizes",
    "0.5,0.9",
    "--k-shots",
    "2",
    "--seeds",
    "0,1",
    "--epochs",
    "2",
    "--device",
    "cpu",
]


def fit(*flags: str) -> int:
    return main(["fit", *flags])


@pytest.fixture(scope="module")
def fitted_folder(offline_features, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fit") / "results"
    code = main(
        ["fit", "--features", str(offline_features.path), "--out", str(out_dir), *TINY_FLAGS]
    )
    assert code == 0
    return out_dir


def test_fit_writes_all_results(fitted_folder):
    for name in (
        "runs.csv",
        "summary.csv",
        "summary.md",
        "run.json",
        "config.yaml",
        "details.jsonl",
    ):
        assert (fitted_folder / name).is_file(), name
    for name in ("accuracy_vs_test_size.png", "spela_exit_layers.png", "k_shot.png"):
        assert (fitted_folder / "plots" / name).stat().st_size > 1000, name


def test_fit_takes_backbone_from_cache(fitted_folder, offline_features):
    info = json.loads((fitted_folder / "run.json").read_text())

    assert info["config"]["extract"]["backbone"] == "efficientnet_lite0.offline"
    # The results record the settings that made the cache, not the demo's defaults.
    assert info["config"]["extract"] == offline_features.manifest["config"]
    assert info["config"]["extract"]["limit"] == 100
    assert info["config"]["features"] == str(offline_features.path)
    assert info["config"]["protocol"]["test_sizes"] == [0.5, 0.9]
    assert (
        info["command"][:2] == ["spela-transfer", "fit"] or info["command"][0] == "spela-transfer"
    )


def test_fit_prints_markdown_table(offline_features, tmp_path, capsys):
    code = fit(
        "--features",
        str(offline_features.path),
        "--out",
        str(tmp_path / "r"),
        "--heads",
        "spela,backprop",
        "--test-sizes",
        "0.5",
        "--k-shots",
        "2",
        "--seeds",
        "0",
        "--epochs",
        "1",
    )

    output = capsys.readouterr().out
    assert code == 0
    assert output.startswith("### Test-size sweep")
    assert "| Test size | SPELA top-1 | SPELA top-5 | BP top-1 | BP top-5 |" in output
    assert "| 0.50 |" in output
    assert "| 2 (20 / 500) |" in output
    assert "Seeds per cell: SPELA 1, BP 1." in output


def test_fit_resume_keeps_runs(fitted_folder, offline_features, capsys):
    before = (fitted_folder / "runs.csv").read_text()

    code = fit(
        "--features",
        str(offline_features.path),
        "--out",
        str(fitted_folder),
        "--resume",
        *TINY_FLAGS,
    )

    assert code == 0
    assert (fitted_folder / "runs.csv").read_text() == before


def test_report_redraws(fitted_folder, capsys):
    expected = (fitted_folder / "summary.md").read_text()
    (fitted_folder / "summary.csv").unlink()
    (fitted_folder / "plots" / "k_shot.png").unlink()

    code = main(["report", str(fitted_folder)])

    assert code == 0
    assert capsys.readouterr().out == expected
    assert (fitted_folder / "summary.csv").is_file()
    assert (fitted_folder / "plots" / "k_shot.png").is_file()


def run_error(capsys, *argv: str) -> str:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "Traceback" not in captured.err
    assert captured.err.count("\n") == 1
    return captured.err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--heads", "spela,svm"], r"unknown heads 'svm'; valid heads: spela, backprop, logreg"),
        (
            ["--protocols", "episodes"],
            r"unknown protocols 'episodes'; valid protocols: test-size, k-shot",
        ),
        (
            ["--test-sizes", "0.1,1.5"],
            r"test size must be a fraction strictly between 0 and 1 .*got 1.5",
        ),
        (["--test-sizes", "0"], r"got 0.0"),
        (
            ["--test-sizes", "half"],
            r"--test-sizes expects comma-separated float values, got 'half'",
        ),
        (["--seeds", "0,one"], r"--seeds must be whole numbers such as 0, 1, 2; got 'one'"),
        (["--epochs", "0"], r"epochs must be a positive integer, got 0"),
        (["--parallel-fits", "0"], r"parallel_fits must be a positive integer, got 0"),
        (["--config", "missing.yaml"], r"config file 'missing.yaml' not found"),
    ],
)
def test_fit_rejects_bad_flags(capsys, flags, message):
    error = run_error(capsys, "fit", *flags)

    assert error.startswith("spela-transfer fit: error: ")
    assert re.search(message, error), error


def test_fit_features_not_a_cache(capsys, tmp_path):
    error = run_error(capsys, "fit", "--features", str(tmp_path))

    assert "has no manifest.json: it is not a spela-transfer feature cache" in error
    assert "pass a folder written by spela-transfer extract" in error


def test_fit_features_missing(capsys, tmp_path):
    error = run_error(capsys, "fit", "--features", str(tmp_path / "nowhere"))

    assert "nowhere' not found; pass a folder written by spela-transfer extract" in error


def test_fit_features_file_names_its_folder(capsys, offline_features):
    manifest = offline_features.path / "manifest.json"

    error = run_error(capsys, "fit", "--features", str(manifest))

    assert f"{str(manifest)!r} is a file, not a folder" in error
    assert f"pass the cache folder that holds it, {str(offline_features.path)!r}" in error


def test_fit_cache_of_other_backbone(capsys, offline_features):
    error = run_error(
        capsys, "fit", "--features", str(offline_features.path), "--backbone", "resnet50.tv_in1k"
    )

    assert "come from backbone 'efficientnet_lite0.offline'" in error
    assert "requests 'resnet50.tv_in1k'" in error


def test_fit_config_backbone_mismatch(capsys, offline_features, tmp_path):
    config = tmp_path / "resnet.yaml"
    config.write_text("extract: {backbone: resnet50.tv_in1k}\n")

    error = run_error(
        capsys, "fit", "--config", str(config), "--features", str(offline_features.path)
    )

    assert "requests 'resnet50.tv_in1k'" in error


def test_fit_output_folder_with_results(capsys, fitted_folder, offline_features):
    error = run_error(
        capsys, "fit", "--features", str(offline_features.path), "--out", str(fitted_folder)
    )

    assert "already contains results" in error
    assert "pass --resume to continue them, --force to overwrite them" in error


def test_fit_resume_and_force_exclusive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--resume", "--force"])

    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_fit_debug_shows_traceback():
    with pytest.raises(ValueError, match="unknown heads 'svm'"):
        main(["--debug", "fit", "--heads", "svm"])


def test_report_missing_folder(capsys, tmp_path):
    error = run_error(capsys, "report", str(tmp_path / "nowhere"))

    assert "results folder" in error
    assert "not found; pass a folder written by spela-transfer fit" in error


def test_report_folder_without_runs(capsys, tmp_path):
    error = run_error(capsys, "report", str(tmp_path))

    assert "no runs.csv in" in error


def test_module_entry_point_end_to_end(tmp_path):
    command = [
        sys.executable,
        "-m",
        "spela_transfer",
        "--quiet",
        "fit",
        "--dataset",
        "fashion-mnist-sample",
        "--backbone",
        "pixels",
        "--limit",
        "4",
        "--cache-dir",
        str(tmp_path / "features"),
        "--heads",
        "spela",
        "--protocols",
        "test-size",
        "--test-sizes",
        "0.5",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "results"),
    ]

    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("### Test-size sweep")
    assert "| 0.50 |" in result.stdout
    assert (tmp_path / "results" / "runs.csv").is_file()

    bad = subprocess.run(
        [*command[:4], "fit", "--heads", "svm"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "unknown heads 'svm'" in bad.stderr


def test_flag_prefixes_rejected(capsys):
    for argv in (["fit", "--download-w"], ["--qui", "fit"], ["fit", "--epoch", "3"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)

        assert exit_info.value.code == 2, argv
        assert "unrecognized arguments" in capsys.readouterr().err, argv


def test_fit_flags_set_every_field():
    from spela_transfer.cli import build_parser
    from spela_transfer.cli.fit import overrides_from_args
    from spela_transfer.config import load_experiment_config

    args = build_parser().parse_args(
        [
            "fit",
            "--download",
            "--split",
            "train",
            "--subset-seed",
            "3",
            "--on-bad-image",
            "fail",
            "--dtype",
            "float16",
            "--no-pretrained",
            "--num-workers",
            "0",
            "--extract-batch-size",
            "7",
            "--batch-size",
            "16",
            "--logreg-max-iter",
            "50",
            "--parallel-fits",
            "2",
        ]
    )
    config = load_experiment_config(None, overrides_from_args(args))

    assert config.extract.download is True
    assert config.extract.split == "train"
    assert config.extract.subset_seed == 3
    assert config.extract.on_bad_image == "fail"
    assert config.extract.dtype == "float16"
    assert config.extract.pretrained is False
    assert config.extract.num_workers == 0
    assert config.extract.batch_size == 7
    assert config.batch_size == 16
    assert config.logreg_max_iter == 50
    assert config.parallel_fits == 2


def test_fit_download_flag_reaches_dataset(capsys, tmp_path):
    error = run_error(capsys, "fit", "--dataset", "cifar10", "--root", str(tmp_path))
    assert "not found in root" in error
    assert "add --download" in error

    # The test session blocks the network, so the download fails at once.
    error = run_error(capsys, "fit", "--dataset", "cifar10", "--root", str(tmp_path), "--download")
    assert "downloading dataset 'cifar10'" in error


def test_fit_skips_point_without_training_sample(offline_features, tmp_path, capsys):
    out_dir = tmp_path / "r"
    code = fit(
        "--features",
        str(offline_features.path),
        "--out",
        str(out_dir),
        "--heads",
        "logreg",
        "--protocols",
        "test-size",
        "--test-sizes",
        "0.5,0.9999",
    )
    captured = capsys.readouterr()

    assert code == 0
    assert "Skipped test size 0.9999 because" in captured.out
    assert "test-size 0.9999: skipped because" in captured.err
    assert json.loads((out_dir / "run.json").read_text())["skipped_points"]


def test_fit_resume_uses_saved_config(fitted_folder, tmp_path, monkeypatch, capsys):
    import shutil

    import spela_transfer.extract

    def no_extraction(*args, **kwargs):
        raise AssertionError("a resume of a --features sweep must not extract")

    monkeypatch.setattr(spela_transfer.extract, "extract_features", no_extraction)
    out_dir = tmp_path / "copy"
    shutil.copytree(fitted_folder, out_dir)
    before = (out_dir / "runs.csv").read_text()

    code = fit("--resume", "--out", str(out_dir))

    assert code == 0
    assert (out_dir / "runs.csv").read_text() == before


def test_fit_resume_mismatch_before_features(fitted_folder, tmp_path, capsys):
    import shutil

    out_dir = tmp_path / "copy"
    shutil.copytree(fitted_folder, out_dir)

    # The missing --features folder would fail later, so this error comes first.
    error = run_error(
        capsys,
        "fit",
        "--resume",
        "--out",
        str(out_dir),
        "--epochs",
        "3",
        "--features",
        str(tmp_path / "nowhere"),
    )

    assert "cannot resume" in error
    assert "epochs 2 != 3" in error


def test_fit_one_class_dataset_rejected(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "images" / "only").mkdir(parents=True)
    for index in range(2):
        Image.new("RGB", (8, 8), (index, 0, 0)).save(tmp_path / "images" / "only" / f"{index}.png")

    error = run_error(
        capsys,
        "fit",
        "--dataset",
        str(tmp_path / "images"),
        "--backbone",
        "pixels",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "r"),
    )

    assert "contains 1 class (only), but at least 2 are needed" in error
    assert not (tmp_path / "c").exists()


def test_fit_head_setting_flags(tmp_path):
    from spela_transfer.cli import build_parser
    from spela_transfer.cli.fit import command_line, overrides_from_args
    from spela_transfer.config import load_experiment_config

    config_file = tmp_path / "heads.yaml"
    config_file.write_text("spela: {loss: log2cos, lr_gamma: 0.5}\n")
    args = build_parser().parse_args(
        [
            "fit",
            "--spela",
            "optimizer=sgd",
            "--spela",
            "momentum=0.9",
            "--backprop",
            "shuffle=false",
        ]
    )

    config = load_experiment_config(config_file, overrides_from_args(args))

    assert config.spela == {"loss": "log2cos", "lr_gamma": 0.5, "optimizer": "sgd", "momentum": 0.9}
    assert config.backprop == {"shuffle": False}
    assert command_line(args)[-6:] == [
        "--spela",
        "optimizer=sgd",
        "--spela",
        "momentum=0.9",
        "--backprop",
        "shuffle=false",
    ]


def test_fit_head_setting_needs_equals(capsys):
    error = run_error(capsys, "fit", "--spela", "loss")

    assert "--spela expects KEY=VALUE, such as loss=log2cos; got 'loss'" in error


def test_fit_has_flag_for_every_field():
    import argparse
    import dataclasses

    from spela_transfer.cli import build_parser
    from spela_transfer.config import ExperimentConfig, ExtractConfig, ProtocolConfig

    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    dests = {action.dest for action in subcommands.choices["fit"]._actions}
    # Fields whose flag has another name than the field.
    renamed = {"batch_size": "extract_batch_size", "names": "protocols"}

    for cls, skip in (
        (ExtractConfig, set()),
        (ExperimentConfig, {"extract", "protocol"}),
        (ProtocolConfig, set()),
    ):
        for field in dataclasses.fields(cls):
            if field.name in skip:
                continue
            dest = field.name
            if cls is not ExperimentConfig:
                dest = renamed.get(field.name, field.name)
            assert dest in dests, f"{cls.__name__}.{field.name} has no fit flag"


def test_interrupted_sweep_hint_counts_kept_runs(fitted_folder, tmp_path):
    from spela_transfer.cli.fit import interrupted_sweep_hint

    assert interrupted_sweep_hint(tmp_path) == (
        f"no run had finished; rerun with --resume --out {tmp_path} to continue"
    )
    # The tiny sweep: 2 test sizes and one k-shot point; SPELA and backprop 2 seeds, logreg 1.
    rows = len((fitted_folder / "runs.csv").read_text().splitlines()) - 1
    assert interrupted_sweep_hint(fitted_folder).startswith(
        f"15 finished runs ({rows} rows) are kept in {fitted_folder / 'runs.csv'};"
    )
    lines = (fitted_folder / "runs.csv").read_text().splitlines()
    one_run = tmp_path / "one"
    one_run.mkdir()
    (one_run / "runs.csv").write_text("\n".join(lines[:2]) + "\n")
    assert "1 finished run (1 row) is kept" in interrupted_sweep_hint(one_run)


def test_fit_interrupted_while_extracting(tmp_path, monkeypatch, capsys):
    from spela_transfer.cache import CacheWriter

    def interrupt(self, chunk):
        raise KeyboardInterrupt

    monkeypatch.setattr(CacheWriter, "write_chunk", interrupt)
    code = fit("--cache-dir", str(tmp_path / "cache"), "--limit", "20", "--out", str(tmp_path))

    assert code == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "spela-transfer fit: interrupted; complete feature chunks are kept; "
        "rerun the same command to resume extracting"
    )
