"""`spela-transfer fit` killed mid-sweep and resumed: the same runs, and earlier results kept."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import _bad_inputs as bad
import pandas as pd
import pytest
import torch

from spela_transfer.cli import main
from spela_transfer.evaluation.results import DETAILS_FILE, RUNS_FILE, TIMING_COLUMNS

# 5-shot runs on 10 images per class leave some classes short, which is expected here.
pytestmark = pytest.mark.filterwarnings(
    "ignore::spela_transfer.evaluation.protocols.FewSamplesWarning"
)

DRIVER = Path(bad.__file__)
CHILD_TIMEOUT_S = 300
# 2 test sizes + 2 k-shots, 3 heads: 12 fits, each appended to runs.csv on its own.
SWEEP_FLAGS = [
    "--heads",
    "spela,backprop,logreg",
    "--protocols",
    "test-size,k-shot",
    "--test-sizes",
    "0.5,0.9",
    "--k-shots",
    "1,5",
    "--seeds",
    "0,1",
    "--epochs",
    "2",
    "--hidden-widths",
    "16,8",
    "--device",
    "cpu",
]
KILL_AFTER_FITS = 5


@pytest.fixture
def one_thread():
    # The killed child runs with one thread too, so float sums round the same way.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory) -> Path:
    """A pixels cache of 100 Fashion-MNIST sample images, `[100, 64]`."""
    cache_dir = tmp_path_factory.mktemp("fit-cache")
    args = ["-q", "extract", "--backbone", "pixels", "--image-size", "8", "--limit", "10"]
    assert main([*args, "--device", "cpu", "--cache-dir", str(cache_dir)]) == 0
    return next(cache_dir.iterdir())


def fit_args(features_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "fit", "--features", str(features_dir), "--out", str(out), *SWEEP_FLAGS, *extra]


def comparable_runs(out: Path) -> pd.DataFrame:
    runs = pd.read_csv(out / RUNS_FILE, dtype=str, keep_default_na=False)
    return runs.drop(columns=list(TIMING_COLUMNS))


def details_keys(out: Path) -> list[tuple]:
    lines = (out / DETAILS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return sorted((r["head"], r["protocol"], r["point"], r["seed"]) for r in records)


def kill_fit_after(features_dir: Path, out: Path, fits: int, log: Path) -> None:
    """Run `fit` in a child process and SIGKILL it once `fits` fits are recorded."""
    marker = log.with_suffix(".paused")
    command = [sys.executable, str(DRIVER), "--pause", f"append_runs:{fits}"]
    command += ["--marker", str(marker), "--", *fit_args(features_dir, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as log_file:
        child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)

    deadline = time.monotonic() + CHILD_TIMEOUT_S
    try:
        while not marker.exists():
            assert child.poll() is None, f"fit exited early:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"fit never paused:\n{log.read_text()}"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(CHILD_TIMEOUT_S) == -signal.SIGKILL
    finally:
        if child.poll() is None:  # a failed check must not leave the child running
            child.kill()
            child.wait(CHILD_TIMEOUT_S)


@pytest.fixture(scope="module")
def killed_sweep(features_dir, tmp_path_factory) -> Path:
    """Output folder of a sweep killed after `KILL_AFTER_FITS` of its 12 fits."""
    out = tmp_path_factory.mktemp("killed") / "results"
    kill_fit_after(features_dir, out, KILL_AFTER_FITS, out.parent / "fit.log")
    return out


@pytest.fixture(scope="module")
def reference_sweep(features_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "results"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(fit_args(features_dir, out)) == 0
    finally:
        torch.set_num_threads(previous)
    return out


def test_killed_sweep_keeps_finished_runs(killed_sweep, reference_sweep):
    runs = comparable_runs(killed_sweep)
    outputs = runs[runs["is_output"] == "True"]
    # logreg trains one seed, SPELA and backprop two, so 5 fits give 2+2+1+2+2 output rows.
    assert len(outputs) == 9
    reference = comparable_runs(reference_sweep)
    pd.testing.assert_frame_equal(runs, reference.iloc[: len(runs)])


def test_resume_after_kill_equals_uninterrupted(
    killed_sweep, reference_sweep, features_dir, one_thread, capsys
):
    assert main(fit_args(features_dir, killed_sweep, "--resume")) == 0
    assert "SPELA top-1" in capsys.readouterr().out

    pd.testing.assert_frame_equal(comparable_runs(killed_sweep), comparable_runs(reference_sweep))
    assert details_keys(killed_sweep) == details_keys(reference_sweep)
    assert (killed_sweep / "summary.csv").is_file()


def test_resume_drops_torn_last_line(features_dir, reference_sweep, tmp_path, one_thread):
    out = tmp_path / "results"
    kill_fit_after(features_dir, out, 2, tmp_path / "fit.log")
    # A kill in the middle of a write leaves a line without its newline.
    with (out / RUNS_FILE).open("a") as handle:
        handle.write("efficientnet,fashion-mnist-sample,key,spela,test-size,0.9,0.9,")

    assert main(fit_args(features_dir, out, "--resume")) == 0

    pd.testing.assert_frame_equal(comparable_runs(out), comparable_runs(reference_sweep))


def test_rerun_without_resume_keeps_results(reference_sweep, features_dir, capsys):
    before = (reference_sweep / RUNS_FILE).read_bytes()

    assert main(fit_args(features_dir, reference_sweep)[1:]) == 2

    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "already contains results" in error
    assert "pass --resume to continue them, --force to overwrite them" in error
    assert (reference_sweep / RUNS_FILE).read_bytes() == before


def test_resume_with_other_settings_rejected(reference_sweep, features_dir, capsys):
    before = (reference_sweep / RUNS_FILE).read_bytes()
    args = fit_args(features_dir, reference_sweep, "--resume")[1:]
    args[args.index("--epochs") + 1] = "3"

    assert main(args) == 2

    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "cannot resume" in error
    assert "epochs 2 != 3" in error
    assert (reference_sweep / RUNS_FILE).read_bytes() == before


def test_fit_on_damaged_cache_keeps_results(reference_sweep, features_dir, tmp_path, capsys):
    # A cache damaged after a sweep: the rerun stops and the earlier results stay.
    import shutil

    damaged = tmp_path / features_dir.name
    shutil.copytree(features_dir, damaged)
    data = (damaged / "features.npy").read_bytes()
    (damaged / "features.npy").write_bytes(data[: len(data) // 2])
    before = (reference_sweep / RUNS_FILE).read_bytes()

    args = fit_args(damaged, reference_sweep, "--resume")[1:]
    assert main(args) == 2

    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "delete the folder and extract again" in error
    assert (reference_sweep / RUNS_FILE).read_bytes() == before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'head,protocol\n"unterminated\n', r"is not a valid CSV \(Error tokenizing data"),
        (b"\xff\xfe\x00 not text\n", r"is not a valid CSV \('utf-8' codec can't decode"),
        (b"head,seed\nspela,0\n", r"lacks the columns backbone, dataset, cache_key"),
    ],
)
def test_damaged_runs_csv_rejected(content, message, reference_sweep, features_dir, tmp_path):
    import shutil

    out = tmp_path / "results"
    shutil.copytree(reference_sweep, out)
    (out / RUNS_FILE).write_bytes(content)

    for args in (["report", str(out)], fit_args(features_dir, out, "--resume")[1:]):
        code, stdout, stderr = bad.run_cli(args)
        assert code == 2
        line = bad.error_line(stderr)
        assert f"results file {str(out / RUNS_FILE)!r}" in line
        assert re.search(message, line), line
        assert "run fit with --force to write it again" in line
        assert (out / RUNS_FILE).read_bytes() == content


def process_group_ends(group: int, seconds: float) -> bool:
    """Wait until no process of `group` is left, giving helpers that exit on their own time.

    Returns:
        True once the group is empty, False if processes remain after `seconds`.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_ctrl_c_stops_parallel_fits(features_dir, tmp_path):
    # Ctrl-C reaches the whole process group: the parent must stop the fit processes, keep
    # the finished fits and print one line, and --resume must finish the sweep.
    out = tmp_path / "results"
    flags = [*fit_args(features_dir, out)[1:], "--parallel-fits", "2", "--epochs", "300"]
    command = [sys.executable, "-m", "spela_transfer", *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
    )
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    try:
        while not (out / RUNS_FILE).exists() or len((out / RUNS_FILE).read_text().splitlines()) < 2:
            assert child.poll() is None, child.communicate()[1].decode()
            assert time.monotonic() < deadline, "no fit finished in time"
            time.sleep(0.05)
        os.killpg(child.pid, signal.SIGINT)
        _, stderr = child.communicate(timeout=CHILD_TIMEOUT_S)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(CHILD_TIMEOUT_S)

    assert child.returncode == 130
    assert "Traceback" not in stderr.decode()
    saved_runs = pd.read_csv(out / RUNS_FILE)
    match = re.search(
        r"interrupted; (\d+) finished runs? \((\d+) rows?\) (is|are) kept in ", stderr.decode()
    )
    assert match, stderr.decode()
    run_key = ["head", "protocol", "point", "seed"]
    assert int(match[1]) == len(saved_runs.drop_duplicates(run_key))
    assert int(match[2]) == len(saved_runs)
    assert f"rerun with --resume --out {out} to continue" in stderr.decode()
    assert process_group_ends(child.pid, seconds=10), "a fit process outlived the command"
    kept_rows = len(comparable_runs(out))

    resumed = subprocess.run(
        [*command, "--resume"], capture_output=True, env=env, timeout=CHILD_TIMEOUT_S
    )

    assert resumed.returncode == 0, resumed.stderr.decode()
    # Each of the 4 points has 7 rows: SPELA 2 seeds × 2 exits, backprop 2 seeds, logreg 1.
    assert kept_rows < 4 * 7
    assert len(comparable_runs(out)) == 4 * 7
