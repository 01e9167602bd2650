"""The experiment runner on real offline features: rows, splits, resume and output folders."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from spela_transfer.cache import FeatureSet
from spela_transfer.config import (
    ExperimentConfig,
    ExtractConfig,
    ProtocolConfig,
    experiment_config_to_dict,
    load_experiment_config,
)
from spela_transfer.errors import SpelaTransferError
from spela_transfer.evaluation.report import markdown_tables, summarize, write_report
from spela_transfer.evaluation.results import RUNS_COLUMNS, TIMING_COLUMNS
from spela_transfer.evaluation.runner import (
    check_resume_settings,
    prepare_output_folder,
    resolve_device,
    run_experiment,
)

TINY = ExperimentConfig(
    protocol=ProtocolConfig(test_sizes=(0.5, 0.99), k_shots=(1, 5), k_shot_test_size=0.5),
    seeds=(0, 1),
    epochs=2,
    device="cpu",
)


@pytest.fixture(scope="module")
def tiny_runs(offline_features, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tiny")
    runs = run_experiment(offline_features, TINY, out_dir)
    return out_dir, runs


def test_runner_writes_every_run(tiny_runs):
    out_dir, runs = tiny_runs

    # Per point: SPELA 2 seeds × 2 exits, backprop 2 seeds × 1 exit, logreg 1 run.
    assert len(runs) == 4 * (2 * 2 + 2 + 1)
    assert tuple(runs.columns) == RUNS_COLUMNS
    assert set(runs["head"]) == {"spela", "backprop", "logreg"}
    assert (out_dir / "details.jsonl").is_file()
    assert (out_dir / "config.yaml").is_file()


def test_runner_same_split_for_every_head(tiny_runs):
    _, runs = tiny_runs

    for point, rows in runs.groupby(["protocol", "point"]):
        assert rows["split_hash"].nunique() == 1, point
        assert rows["train_count"].nunique() == 1, point


def test_runner_counts_match_protocol(tiny_runs):
    _, runs = tiny_runs
    outputs = runs[runs["is_output"]]

    test_size = outputs[(outputs["protocol"] == "test-size") & (outputs["point"] == "0.5")]
    assert set(test_size["train_count"]) == {500}
    assert set(test_size["test_count"]) == {500}
    five_shot = outputs[(outputs["protocol"] == "k-shot") & (outputs["point"] == "5")]
    assert set(five_shot["train_count"]) == {50}
    assert set(five_shot["test_count"]) == {500}


def test_runner_spela_reports_every_exit(tiny_runs):
    _, runs = tiny_runs
    spela = runs[(runs["head"] == "spela") & (runs["point"] == "0.5")]

    assert sorted(set(spela["exit_layer"])) == ["layer1", "layer2"]
    assert spela[spela["is_output"]]["exit_layer"].unique().tolist() == ["layer2"]


def test_runner_records_timing_and_memory(tiny_runs):
    _, runs = tiny_runs

    assert (runs["fit_seconds"] >= 0).all()
    assert (runs["peak_rss_mb"] > 0).all()
    assert runs["top5"].notna().all()
    assert runs["top1"].between(0, 1).all()


def test_runner_details_have_confusion(tiny_runs):
    out_dir, runs = tiny_runs
    details = [json.loads(line) for line in (out_dir / "details.jsonl").read_text().splitlines()]

    assert len(details) == int(runs["is_output"].sum())
    first = details[0]
    assert np.array(first["confusion_matrix"]).shape == (10, 10)
    assert len(first["per_class_accuracy"]) == 10


def test_runner_run_json(tiny_runs, offline_features):
    out_dir, _ = tiny_runs
    info = json.loads((out_dir / "run.json").read_text())

    assert info["cache_key"] == offline_features.key
    assert info["seeds"] == [0, 1]
    assert info["config"]["epochs"] == 2
    for package in ("torch", "timm", "torchvision", "scikit-learn", "numpy", "spela-transfer"):
        assert info["versions"][package], package
    for key in ("platform", "cpu", "cpu_count", "torch_threads", "device"):
        assert key in info["machine"], key


def test_resume_same_runs_apart_from_timing(tiny_runs, offline_features, tmp_path):
    source_dir, complete = tiny_runs
    for name in ("runs.csv", "run.json", "details.jsonl"):
        (tmp_path / name).write_bytes((source_dir / name).read_bytes())

    # Keep the first point's runs plus half of a row, as a process killed mid-write would.
    lines = (tmp_path / "runs.csv").read_text().splitlines(keepends=True)
    kept = 1 + 7
    (tmp_path / "runs.csv").write_text("".join(lines[:kept]) + lines[kept][:20])

    resumed = run_experiment(offline_features, TINY, tmp_path, resume=True)

    columns = [c for c in RUNS_COLUMNS if c not in TIMING_COLUMNS]
    pd.testing.assert_frame_equal(resumed[columns], complete[columns])


def test_parallel_fits_same_runs(tiny_runs, offline_features, tmp_path):
    # Two fit processes must train and score exactly what one process does. Only the
    # order in which fits finish, and so the row order, may differ.
    _, serial = tiny_runs
    config = dataclasses.replace(TINY, parallel_fits=2)

    parallel = run_experiment(offline_features, config, tmp_path)

    columns = [c for c in RUNS_COLUMNS if c not in TIMING_COLUMNS]
    keys = ["head", "protocol", "point", "seed", "exit_layer"]
    pd.testing.assert_frame_equal(
        parallel[columns].sort_values(keys).reset_index(drop=True),
        serial[columns].sort_values(keys).reset_index(drop=True),
    )
    assert (parallel["peak_rss_mb"] > 0).all()
    # The summary puts its rows in one order, whatever order the fits finished in.
    pd.testing.assert_frame_equal(summarize(parallel), summarize(serial))
    pd.testing.assert_frame_equal(summarize(serial.iloc[::-1]), summarize(serial))


def test_parallel_fits_must_be_positive():
    with pytest.raises(ValueError, match="parallel_fits must be a positive integer, got 0"):
        dataclasses.replace(TINY, parallel_fits=0)


def test_resume_drops_details_of_unfinished_runs(tiny_runs, offline_features, tmp_path):
    source_dir, _ = tiny_runs
    for name in ("runs.csv", "run.json", "details.jsonl"):
        (tmp_path / name).write_bytes((source_dir / name).read_bytes())
    # A kill after details.jsonl but before runs.csv leaves details of runs not in runs.csv.
    lines = (tmp_path / "runs.csv").read_text().splitlines(keepends=True)
    (tmp_path / "runs.csv").write_text("".join(lines[: 1 + 7]))

    run_experiment(offline_features, TINY, tmp_path, resume=True)

    def detail_keys(path):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        return sorted((r["head"], r["protocol"], r["point"], r["seed"]) for r in records)

    resumed_keys = detail_keys(tmp_path / "details.jsonl")
    assert len(resumed_keys) == len(set(resumed_keys))
    assert resumed_keys == detail_keys(source_dir / "details.jsonl")


def test_resume_of_complete_sweep_trains_nothing(tiny_runs, offline_features, tmp_path):
    source_dir, _ = tiny_runs
    for name in ("runs.csv", "run.json"):
        (tmp_path / name).write_bytes((source_dir / name).read_bytes())
    before = (tmp_path / "runs.csv").read_bytes()

    run_experiment(offline_features, TINY, tmp_path, resume=True)

    assert (tmp_path / "runs.csv").read_bytes() == before


def test_resume_rejects_other_settings(tiny_runs, offline_features, tmp_path):
    source_dir, _ = tiny_runs
    for name in ("runs.csv", "run.json"):
        (tmp_path / name).write_bytes((source_dir / name).read_bytes())
    changed = dataclasses.replace(TINY, epochs=3)

    with pytest.raises(
        SpelaTransferError, match=r"cannot resume .* other settings \(epochs 2 != 3\)"
    ):
        run_experiment(offline_features, changed, tmp_path, resume=True)


def test_resume_compares_resolved_head_settings(tiny_runs, offline_features, tmp_path):
    source_dir, _ = tiny_runs
    for name in ("runs.csv", "run.json"):
        (tmp_path / name).write_bytes((source_dir / name).read_bytes())
    before = (tmp_path / "runs.csv").read_bytes()

    # The learning rate the heads already used, spelled as a head setting: nothing to redo.
    same = dataclasses.replace(TINY, spela={"lr": TINY.lr}, backprop={"lr": TINY.lr})
    run_experiment(offline_features, same, tmp_path, resume=True)
    assert (tmp_path / "runs.csv").read_bytes() == before

    other_loss = dataclasses.replace(TINY, spela={"loss": "neg_cos"})
    with pytest.raises(SpelaTransferError, match=r"\(spela loss 'log2cos' != 'neg_cos'\)"):
        run_experiment(offline_features, other_loss, tmp_path, resume=True)


def test_resume_with_fewer_seeds_records_all(tiny_runs, offline_features, tmp_path):
    source_dir, _ = tiny_runs
    for name in ("runs.csv", "run.json"):
        (tmp_path / name).write_bytes((source_dir / name).read_bytes())
    fewer = dataclasses.replace(
        TINY, seeds=(0,), protocol=dataclasses.replace(TINY.protocol, test_sizes=(0.5,))
    )

    runs = run_experiment(offline_features, fewer, tmp_path, resume=True)

    info = json.loads((tmp_path / "run.json").read_text())
    assert info["seeds"] == [0, 1]
    assert info["config"]["protocol"]["test_sizes"] == [0.5, 0.99]
    saved = load_experiment_config(tmp_path / "config.yaml")
    assert saved.seeds == (0, 1)
    assert saved.protocol.test_sizes == (0.5, 0.99)
    assert set(runs["seed"]) == {0, 1}


def test_output_folder_with_results_rejected(tmp_path):
    (tmp_path / "runs.csv").write_text("head\n")

    with pytest.raises(
        SpelaTransferError, match=r"already contains results \(runs.csv\); pass --resume"
    ):
        prepare_output_folder(tmp_path, resume=False, force=False)


def test_force_deletes_only_result_files(tmp_path):
    (tmp_path / "runs.csv").write_text("head\n")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "k_shot.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("mine")

    prepare_output_folder(tmp_path, resume=False, force=True)

    assert not (tmp_path / "runs.csv").exists()
    assert not (tmp_path / "plots").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_and_force_rejected_together(tmp_path):
    with pytest.raises(ValueError, match="--resume and --force contradict each other"):
        prepare_output_folder(tmp_path, resume=True, force=True)


def test_output_folder_that_is_a_file(tmp_path):
    path = tmp_path / "out"
    path.write_text("")
    with pytest.raises(NotADirectoryError, match="is a file; pick another --out"):
        prepare_output_folder(path, resume=False, force=False)


def test_top5_empty_with_five_classes(offline_features, tmp_path):
    mask = np.asarray(offline_features.labels) < 5
    rows = np.flatnonzero(mask)
    five_classes = FeatureSet(
        path=offline_features.path,
        key=offline_features.key + "-first5",
        features=offline_features.load_features(rows),
        labels=np.asarray(offline_features.labels)[rows],
        class_names=offline_features.class_names[:5],
        sample_ids=[offline_features.sample_ids[i] for i in rows],
        manifest=offline_features.manifest,
    )
    config = dataclasses.replace(
        TINY,
        heads=("spela", "logreg"),
        protocol=ProtocolConfig(names=("test-size",), test_sizes=(0.5,)),
        epochs=1,
    )

    runs = run_experiment(five_classes, config, tmp_path)

    assert runs["top5"].isna().all()
    assert set(runs["top5_note"]) == {
        "top-5 accuracy needs more than 5 classes, but the data has 5"
    }
    table = markdown_tables(summarize(runs))
    assert "| 0.50 |" in table
    assert "— |" in table
    assert (
        "Top-5 is empty (—) because top-5 accuracy needs more than 5 classes, but the data has 5."
        in table
    )


def test_invalid_head_setting_rejected_by_config():
    # Checked when the config is built, so that a sweep never starts with a bad head setting.
    with pytest.raises(ValueError, match="spela: unknown setting 'bogus'"):
        dataclasses.replace(TINY, heads=("spela",), spela={"bogus": 1})
    with pytest.raises(ValueError, match="invalid backprop setting: activation must be one of"):
        dataclasses.replace(TINY, heads=("backprop",), backprop={"activation": "swish"})
    # Settings of a head that does not run are not checked.
    dataclasses.replace(TINY, heads=("logreg",), spela={"bogus": 1})


def test_threads_restored_after_run(offline_features, tmp_path):
    before = torch.get_num_threads()
    config = dataclasses.replace(
        TINY,
        heads=("logreg",),
        protocol=ProtocolConfig(names=("test-size",), test_sizes=(0.5,)),
        threads=1,
    )

    run_experiment(offline_features, config, tmp_path)

    assert torch.get_num_threads() == before
    assert json.loads((tmp_path / "run.json").read_text())["machine"]["torch_threads"] == 1


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device 'gpu0' is not a torch device"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_resolve_device_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available; use --device cpu"):
        resolve_device("cuda")


def test_point_without_training_sample_skipped(offline_features, tmp_path):
    # 0.9999 of 1,000 samples leaves no training sample, so that point cannot run.
    config = dataclasses.replace(
        TINY,
        heads=("logreg",),
        protocol=ProtocolConfig(names=("test-size",), test_sizes=(0.5, 0.9999)),
    )

    runs = run_experiment(offline_features, config, tmp_path)

    assert set(runs["point"].astype(str)) == {"0.5"}
    info = json.loads((tmp_path / "run.json").read_text())
    assert len(info["skipped_points"]) == 1
    assert info["skipped_points"][0]["point"] == "0.9999"
    assert "leaves 0 for training" in info["skipped_points"][0]["reason"]
    table = write_report(tmp_path, runs)
    assert "Skipped test size 0.9999 because test size 0.9999 of 1000 samples leaves 0" in table


def test_no_runnable_point_fails_before_writing(offline_features, tmp_path):
    config = dataclasses.replace(
        TINY, protocol=ProtocolConfig(names=("test-size",), test_sizes=(0.9999,))
    )
    out_dir = tmp_path / "out"

    with pytest.raises(ValueError, match=r"no protocol point can run on 1000 samples \(test-size"):
        run_experiment(offline_features, config, out_dir)
    assert not out_dir.exists()


def test_run_json_torch_version_matches_manifest(tiny_runs, offline_features):
    out_dir, _ = tiny_runs
    info = json.loads((out_dir / "run.json").read_text())

    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["torch"] == offline_features.manifest["versions"]["torch"]


def test_missing_classes_note_uses_names(tiny_runs, offline_features):
    _, runs = tiny_runs

    table = markdown_tables(summarize(runs), offline_features.class_names)

    # At test size 0.99, 10 training samples cannot cover all 10 classes.
    note = next(line for line in table.splitlines() if "had no training sample" in line)
    assert any(name in note for name in offline_features.class_names)


def test_resume_check_before_extraction(tmp_path):
    (tmp_path / "runs.csv").write_text("head\n")
    previous = ExperimentConfig(extract=ExtractConfig(dataset="one-folder"))
    (tmp_path / "run.json").write_text(
        json.dumps({"cache_key": "k", "config": experiment_config_to_dict(previous)})
    )
    requested = ExperimentConfig(extract=ExtractConfig(dataset="other-folder"))

    check_resume_settings(tmp_path, previous)
    with pytest.raises(SpelaTransferError, match=r"extract dataset 'one-folder' != 'other-folder'"):
        check_resume_settings(tmp_path, requested)
