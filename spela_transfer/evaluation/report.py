"""Summaries, Markdown tables and plots of a results folder's `runs.csv`."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Files only: no display is needed or wanted.
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from spela_transfer.config import HEAD_NAMES, PROTOCOL_NAMES  # noqa: E402
from spela_transfer.evaluation.results import (  # noqa: E402
    RUN_JSON,
    RUNS_FILE,
    SUMMARY_FILE,
    read_runs,
)

logger = logging.getLogger(__name__)

HEAD_LABELS = {"spela": "SPELA", "backprop": "BP", "logreg": "LogReg"}
PLOTS_FOLDER = "plots"
_GROUP_COLUMNS = ["head", "protocol", "point", "test_size", "k_shot", "exit_layer", "exit_index"]


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Compute mean, std and n over seeds per head, protocol point and exit layer.

    Args:
        runs: Rows of `runs.csv`.

    Returns:
        One row per head × protocol point × exit layer, with `n` (seeds), `is_output`,
        `top1_mean`, `top1_std`, `top5_mean`, `top5_std`, `balanced_accuracy_mean`,
        `balanced_accuracy_std`, `train_count`, `test_count`, `top5_note` and
        `missing_train_classes` (labels without a training sample). The std is
        the sample std (ddof=1), so it is empty when n is 1.
    """
    if runs.empty:
        return pd.DataFrame(columns=[*_GROUP_COLUMNS, "n", "top1_mean", "top1_std"])
    runs = runs.copy()
    runs["k_shot"] = runs["k_shot"].fillna(-1)
    runs["top5_note"] = runs["top5_note"].fillna("")
    runs["missing_train_classes"] = runs["missing_train_classes"].fillna("").astype(str)
    runs["is_output"] = runs["is_output"].astype(str) == "True"

    grouped = runs.groupby(_GROUP_COLUMNS, sort=False, dropna=False)
    summary = grouped.agg(
        n=("seed", "nunique"),
        is_output=("is_output", "first"),
        top1_mean=("top1", "mean"),
        top1_std=("top1", "std"),
        top5_mean=("top5", "mean"),
        top5_std=("top5", "std"),
        balanced_accuracy_mean=("balanced_accuracy", "mean"),
        balanced_accuracy_std=("balanced_accuracy", "std"),
        train_count=("train_count", "mean"),
        test_count=("test_count", "mean"),
        top5_note=("top5_note", "first"),
        missing_train_classes=("missing_train_classes", "first"),
    ).reset_index()
    # Fits finish in any order when they run in parallel or resume, so the rows are sorted
    # into one order: protocol, point, head, exit layer.
    order = summary.assign(
        protocol_rank=summary["protocol"].map({n: i for i, n in enumerate(PROTOCOL_NAMES)}),
        head_rank=summary["head"].map({n: i for i, n in enumerate(HEAD_NAMES)}),
    ).sort_values(
        ["protocol_rank", "test_size", "k_shot", "head_rank", "exit_index"], kind="stable"
    )
    summary = summary.loc[order.index].reset_index(drop=True)
    summary["k_shot"] = summary["k_shot"].where(summary["k_shot"] >= 0)
    return summary


def format_mean_std(mean: float, std: float) -> str:
    """Format fractions as a percentage `83.75 ± 0.33`; `—` when undefined."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def markdown_tables(
    summary: pd.DataFrame,
    class_names: Sequence[str] | None = None,
    skipped_points: Sequence[dict] = (),
) -> str:
    """Render the output-layer summary as Markdown tables, one per protocol.

    Rows are test sizes (or k), and columns are the top-1 and top-5 accuracy of
    each head as mean ± std in percent. This is the layout of the transfer tables
    in the SPELA paper (arXiv 2402.09769).

    Args:
        summary: Output of `summarize`.
        class_names: Name of each label, for the note on classes without training
            samples; None prints the labels.
        skipped_points: Protocol points the sweep could not run, as stored in
            `run.json`; each gets a note under the tables.
    """
    if summary.empty:
        return "No finished runs.\n"
    outputs = summary[summary["is_output"]]
    heads = [head for head in HEAD_LABELS if head in set(outputs["head"])]
    sections = []

    for protocol, title, row_label in (
        ("test-size", "Test-size sweep", "Test size"),
        ("k-shot", "k-shot per class", "k (train / test)"),
    ):
        part = outputs[outputs["protocol"] == protocol]
        if part.empty:
            continue
        header = [row_label]
        for head in heads:
            header += [f"{HEAD_LABELS[head]} top-1", f"{HEAD_LABELS[head]} top-5"]
        lines = [
            f"### {title}: accuracy (%), mean ± std over seeds",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for point in dict.fromkeys(part["point"]):
            rows = part[part["point"] == point]
            first = rows.iloc[0]
            if protocol == "test-size":
                cells = [f"{float(point):.2f}"]
            else:
                cells = [f"{point} ({int(first['train_count'])} / {int(first['test_count'])})"]
            for head in heads:
                row = rows[rows["head"] == head]
                if row.empty:
                    cells += ["", ""]
                    continue
                row = row.iloc[0]
                cells.append(format_mean_std(row["top1_mean"], row["top1_std"]))
                cells.append(format_mean_std(row["top5_mean"], row["top5_std"]))
            lines.append("| " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))

    notes = []
    counts = outputs.groupby("head")["n"].max()
    notes.append(
        "Seeds per cell: "
        + ", ".join(f"{HEAD_LABELS[head]} {int(counts[head])}" for head in heads)
        + (" (logistic regression with lbfgs is deterministic)." if "logreg" in heads else ".")
    )
    missing = outputs[outputs["missing_train_classes"].fillna("") != ""]
    for (protocol, point), rows in missing.groupby(["protocol", "point"], sort=False):
        where = f"test size {point}" if protocol == "test-size" else f"{point}-shot"
        labels = str(rows["missing_train_classes"].iloc[0]).split()
        if class_names is not None:
            labels = [class_names[int(label)] for label in labels]
        if len(labels) == 1:
            notes.append(f"At {where}, class {labels[0]} had no training sample.")
        else:
            notes.append(f"At {where}, classes {', '.join(labels)} had no training samples.")
    top5_notes = sorted(set(outputs["top5_note"]) - {""})
    if top5_notes:
        notes.append("Top-5 is empty (—) because " + "; ".join(top5_notes) + ".")
    for point in skipped_points:
        where = (
            f"test size {point['point']}"
            if point["protocol"] == "test-size"
            else f"{point['point']}-shot"
        )
        notes.append(f"Skipped {where} because {point['reason']}.")
    return "\n\n".join(sections) + "\n\n" + "\n".join(notes) + "\n"


def plot_test_size_curves(summary: pd.DataFrame, path: Path) -> bool:
    """Plot top-1 and top-5 against test size with std error bars for every head.

    Returns:
        Whether there was anything to plot (a file was written).
    """
    data = _outputs(summary, "test-size")
    if data.empty:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, metric in zip(axes, ("top1", "top5"), strict=True):
        for head, rows in data.groupby("head", sort=False):
            rows = rows.sort_values("test_size")
            if rows[f"{metric}_mean"].isna().all():
                continue
            axis.errorbar(
                rows["test_size"],
                100 * rows[f"{metric}_mean"],
                yerr=100 * rows[f"{metric}_std"].fillna(0),
                marker="o",
                capsize=3,
                label=HEAD_LABELS.get(head, head),
            )
        axis.set_title(f"{'Top-1' if metric == 'top1' else 'Top-5'} accuracy")
        axis.set_xlabel("test size (fraction held out)")
        axis.set_ylabel("accuracy (%)")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
        else:
            note = data["top5_note"].iloc[0] or "no values"
            axis.text(0.5, 0.5, note, ha="center", va="center", transform=axis.transAxes, wrap=True)
    _save(figure, path)
    return True


def plot_exit_layers(summary: pd.DataFrame, path: Path) -> bool:
    """Plot SPELA top-1 at every exit layer, one line per test size or k."""
    data = summary[summary["head"] == "spela"]
    if data.empty:
        return False
    figure, axis = plt.subplots(figsize=(8, 4.2))
    for (protocol, point), rows in data.groupby(["protocol", "point"], sort=False):
        rows = rows.sort_values("exit_index")
        label = f"test size {point}" if protocol == "test-size" else f"{point}-shot"
        axis.errorbar(
            rows["exit_index"] + 1,
            100 * rows["top1_mean"],
            yerr=100 * rows["top1_std"].fillna(0),
            marker="o",
            capsize=3,
            label=label,
        )
    layers = data.drop_duplicates("exit_index").sort_values("exit_index")
    axis.set_xticks(layers["exit_index"] + 1, layers["exit_layer"])
    axis.set_title("SPELA top-1 accuracy per exit layer")
    axis.set_xlabel("exit layer")
    axis.set_ylabel("accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    _save(figure, path)
    return True


def plot_k_shot_curves(summary: pd.DataFrame, path: Path) -> bool:
    """Plot top-1 against k (samples per class) with std error bars for every head."""
    data = _outputs(summary, "k-shot")
    if data.empty:
        return False
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for head, rows in data.groupby("head", sort=False):
        rows = rows.sort_values("k_shot")
        axis.errorbar(
            rows["k_shot"],
            100 * rows["top1_mean"],
            yerr=100 * rows["top1_std"].fillna(0),
            marker="o",
            capsize=3,
            label=HEAD_LABELS.get(head, head),
        )
    axis.set_xscale("log")
    ks = sorted(data["k_shot"].dropna().astype(int).unique())
    axis.set_xticks(ks, [str(k) for k in ks])
    axis.set_title("Top-1 accuracy with k training samples per class")
    axis.set_xlabel("k (training samples per class)")
    axis.set_ylabel("accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend()
    _save(figure, path)
    return True


def write_report(out_dir: str | Path, runs: pd.DataFrame | None = None) -> str:
    """Write `summary.csv`, `summary.md` and the plots of a results folder.

    Args:
        out_dir: A results folder of `spela-transfer fit`.
        runs: Its `runs.csv` rows; read from the folder when None.

    Returns:
        The Markdown tables.

    Raises:
        FileNotFoundError: `out_dir` has no `runs.csv`.
    """
    out_dir = Path(out_dir)
    if runs is None:
        if not (out_dir / RUNS_FILE).is_file():
            raise FileNotFoundError(
                f"no {RUNS_FILE} in {str(out_dir)!r}; pass a folder written by spela-transfer fit"
            )
        runs = read_runs(out_dir)

    run_info = {}
    if (out_dir / RUN_JSON).is_file():
        run_info = json.loads((out_dir / RUN_JSON).read_text(encoding="utf-8"))

    summary = summarize(runs)
    summary.to_csv(out_dir / SUMMARY_FILE, index=False, float_format="%.6f")
    markdown = markdown_tables(
        summary, run_info.get("class_names"), run_info.get("skipped_points", ())
    )
    (out_dir / "summary.md").write_text(markdown, encoding="utf-8")

    plots = out_dir / PLOTS_FOLDER
    plots.mkdir(exist_ok=True)
    written = [
        name
        for name, plot in (
            ("accuracy_vs_test_size.png", plot_test_size_curves),
            ("spela_exit_layers.png", plot_exit_layers),
            ("k_shot.png", plot_k_shot_curves),
        )
        if plot(summary, plots / name)
    ]
    logger.info(
        "report: wrote %s, summary.md and %s in %s", SUMMARY_FILE, ", ".join(written), out_dir
    )
    return markdown


def _outputs(summary: pd.DataFrame, protocol: str) -> pd.DataFrame:
    if summary.empty:
        return summary
    return summary[(summary["protocol"] == protocol) & summary["is_output"]]


def _save(figure: plt.Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
