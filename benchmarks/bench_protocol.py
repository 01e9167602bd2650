"""Time the whole reference protocol: 11 test sizes × 5 seeds × SPELA and backprop heads.

Features are synthetic by default: 10,000 × 1,280 float32 with 10 classes, each
class a Gaussian blob around its own random mean, so the heads have something
to learn. The run goes through `run_experiment`, the code path of
`spela-transfer fit`, with 50 epochs, batch 32 and Adam 1e-3, and prints the
wall time, the time per run and a row for BENCHMARKS.md.

    python benchmarks/bench_protocol.py                  # the reference protocol
    taskset -c 0,1 python benchmarks/bench_protocol.py   # pinned to 2 cores
    python benchmarks/bench_protocol.py --epochs 5       # a tenth of the work, scaled up
    python benchmarks/bench_protocol.py --parallel-fits 2 --threads 1   # 2 fits at once
    python benchmarks/bench_protocol.py --features features/<key>   # real cached features
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_heads import describe_machine

from spela_transfer.cache import FeatureSet, load_features
from spela_transfer.config import REFERENCE_TEST_SIZES, ExperimentConfig, ProtocolConfig
from spela_transfer.evaluation.runner import run_experiment

BUDGET_SECONDS = 15 * 60


def synthetic_features(samples: int, dimension: int, classes: int, seed: int) -> FeatureSet:
    """Build Gaussian-blob features [samples, dimension] with balanced labels [samples]."""
    generator = np.random.default_rng(seed)
    labels = np.arange(samples, dtype=np.int64) % classes
    means = generator.normal(0.0, 1.0, (classes, dimension)).astype(np.float32)
    noise = generator.normal(0.0, 4.0, (samples, dimension)).astype(np.float32)
    features = np.maximum(means[labels] + noise, 0.0)  # non-negative, like pooled ReLU features
    return FeatureSet(
        path=Path("synthetic"),
        key=f"synthetic-{samples}x{dimension}-{classes}c-seed{seed}",
        features=features,
        labels=labels,
        class_names=[f"class{i}" for i in range(classes)],
        sample_ids=[f"synthetic:{i}" for i in range(samples)],
        manifest={"backbone": "synthetic", "dataset": "synthetic"},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", help="a feature cache folder instead of synthetic features")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--dimension", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5, help="number of head seeds")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads of the heads (default: torch's choice)"
    )
    parser.add_argument(
        "--parallel-fits", type=int, default=1, help="fits at once, each in its own process"
    )
    parser.add_argument("--heads", default="spela,backprop")
    parser.add_argument(
        "--test-sizes",
        default=",".join(map(str, REFERENCE_TEST_SIZES)),
        help="comma-separated test sizes (default: the 11 of the reference protocol)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    if args.features:
        features = load_features(args.features)
    else:
        features = synthetic_features(args.samples, args.dimension, args.classes, seed=0)
    test_sizes = tuple(float(value) for value in args.test_sizes.split(","))
    heads = tuple(args.heads.split(","))
    config = ExperimentConfig(
        heads=heads,
        protocol=ProtocolConfig(names=("test-size",), test_sizes=test_sizes, split_seed=100),
        seeds=tuple(range(args.seeds)),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=1e-3,
        device=args.device,
        threads=args.threads,
        parallel_fits=args.parallel_fits,
    )

    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        runs = run_experiment(features, config, out_dir)
        wall = time.perf_counter() - start

    outputs = runs[runs["is_output"]]
    num_runs = len(outputs)
    fit_by_head = outputs.groupby("head")["fit_seconds"].sum()
    top1 = outputs[outputs["point"] == "0.1"].groupby("head")["top1"].mean()
    print(f"machine: {describe_machine()}")
    print(
        f"fits: {args.parallel_fits} process(es) × {args.threads or 'default'} thread(s), "
        f"device {args.device}"
    )
    print(f"features: {len(features)} × {features.num_features}, {features.num_classes} classes")
    print(
        f"runs: {num_runs} ({len(test_sizes)} test sizes × {args.seeds} seeds × {len(heads)} heads)"
    )
    print(f"wall time: {wall:.1f} s ({wall / 60:.1f} min), {wall / num_runs:.2f} s per run")
    for head, seconds in fit_by_head.items():
        accuracy = top1.get(head, float("nan"))
        print(f"  {head}: fit {seconds:.1f} s in all; top-1 at test size 0.1: {accuracy:.3f}")
    # Training time is linear in epochs, so scaling a short run's whole wall time
    # (fixed costs included) over-estimates the 50-epoch run a little.
    scale = 50 / args.epochs
    estimate = wall * scale
    verdict = "within" if estimate <= BUDGET_SECONDS else "over"
    label = "measured" if args.epochs == 50 else f"estimated from {args.epochs} epochs"
    print(f"50-epoch wall time ({label}): {estimate / 60:.1f} min, {verdict} the 15 min budget")


if __name__ == "__main__":
    main()
