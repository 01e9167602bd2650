"""Benchmark the SPELA head against the backprop head: speed, memory, batched seeds, variants.

Usage:
    python benchmarks/bench_heads.py speed      # epoch time, multiply-add ratio, matmul efficiency
    python benchmarks/bench_heads.py memory     # peak RSS of one training step, in subprocesses
    python benchmarks/bench_heads.py seeds      # S = 5 seeds in one fit against five fits
    python benchmarks/bench_heads.py variants   # loss x input normalisation on real features
    python benchmarks/bench_heads.py pixels     # raw-pixel Fashion-MNIST runs of the SPELA paper
    python benchmarks/bench_heads.py all        # speed, memory, seeds, variants

Both heads use the same optimizer implementation (`make_optimizer`: torch's fused Adam),
the same batches and the same thread count, and are timed alternately in one process.
Features are random for the speed runs, because timing does not depend on their values.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from spela_transfer.heads import BackpropConfig, SpelaConfig, fit_backprop, fit_spela
from spela_transfer.heads._batched import kaiming_normal, make_optimizer
from spela_transfer.heads.class_vectors import make_class_vectors
from spela_transfer.heads.fit import backprop_batch_step, spela_batch_step

# (input width, hidden widths, classes): the two head shapes of the reference settings.
SHAPES = [(2048, (1024, 1024), 100), (2048, (512, 64), 10)]
STEPS_PER_EPOCH = {256: 16, 32: 64}


def describe_machine() -> str:
    """Return one line naming the CPU, core count, torch version and thread count."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}"
    )


def multiply_adds(in_width: int, widths: tuple[int, ...], num_classes: int) -> tuple[int, int]:
    """Count multiply-adds per training sample of SPELA and of backprop.

    Each layer costs a forward and a weight-gradient product; backprop adds its
    output layer and an input-gradient product for every layer but the first.
    """
    spela_layers = list(zip((in_width,) + widths[:-1], widths, strict=True))
    backprop_layers = spela_layers + [(widths[-1], num_classes)]
    spela = sum(2 * n_in * n_out for n_in, n_out in spela_layers)
    backprop = sum(2 * n_in * n_out for n_in, n_out in backprop_layers)
    backprop += sum(n_in * n_out for n_in, n_out in backprop_layers[1:])
    return spela, backprop


def build_spela(in_width, widths, num_classes, config):
    """Return class vectors, weights, biases and optimizers of one SPELA head (S = 1).

    As `fit_spela` does in `per_batch` order, one optimizer covers every layer.
    """
    generator = torch.Generator().manual_seed(0)
    vectors, weights, biases = [], [], []
    previous = in_width
    for width in widths:
        vectors.append(make_class_vectors(num_classes, width, "symmetric", generator)[None])
        weights.append(kaiming_normal(width, previous, generator)[None].requires_grad_(True))
        biases.append(torch.zeros(1, width, requires_grad=True))
        previous = width
    optimizers = [make_optimizer(weights + biases, config, torch.device("cpu"))[0]]
    return vectors, weights, biases, optimizers


def build_backprop(in_width, widths, num_classes, config):
    """Return weights, biases and the optimizer of one backprop head (S = 1)."""
    generator = torch.Generator().manual_seed(0)
    all_widths = widths + (num_classes,)
    in_widths = (in_width,) + widths
    weights = [
        kaiming_normal(out, inp, generator)[None].requires_grad_(True)
        for out, inp in zip(all_widths, in_widths, strict=True)
    ]
    biases = [torch.zeros(1, width, requires_grad=True) for width in all_widths]
    optimizer = make_optimizer(weights + biases, config, torch.device("cpu"))[0]
    return weights, biases, optimizer


def make_data(num_samples, in_width, num_classes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.rand(num_samples, in_width, generator=generator) * 4
    labels = torch.randint(num_classes, (num_samples,), generator=generator)
    return features, labels


def run_speed(repeats: int) -> None:
    """Print SPELA and backprop epoch times side by side, with the multiply-add ratio."""
    print(
        "| Head shape | Classes | Batch | SPELA epoch (ms) | BP epoch (ms) | Time ratio | "
        "Multiply-add ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    efficiency_line = ""

    for in_width, widths, num_classes in SHAPES:
        for batch_size, steps in STEPS_PER_EPOCH.items():
            spela_config = SpelaConfig(hidden_widths=widths, batch_size=batch_size)
            backprop_config = BackpropConfig(hidden_widths=widths, batch_size=batch_size)
            features, labels = make_data(batch_size * steps, in_width, num_classes)
            batches = list(torch.randperm(len(labels)).split(batch_size))
            spela = build_spela(in_width, widths, num_classes, spela_config)
            backprop = build_backprop(in_width, widths, num_classes, backprop_config)

            def spela_epoch(
                spela=spela, batches=batches, features=features, labels=labels, config=spela_config
            ):
                vectors, weights, biases, optimizers = spela
                with torch.no_grad():
                    for rows in batches:
                        spela_batch_step(
                            features[rows],
                            labels[rows],
                            vectors,
                            weights,
                            biases,
                            optimizers,
                            config,
                        )

            def backprop_epoch(
                backprop=backprop,
                batches=batches,
                features=features,
                labels=labels,
                config=backprop_config,
            ):
                weights, biases, optimizer = backprop
                for rows in batches:
                    backprop_batch_step(
                        features[rows], labels[rows], weights, biases, optimizer, config
                    )

            spela_epoch()
            backprop_epoch()
            spela_times, backprop_times = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                spela_epoch()
                spela_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                backprop_epoch()
                backprop_times.append(time.perf_counter() - start)

            spela_time = statistics.median(spela_times)
            backprop_time = statistics.median(backprop_times)
            spela_macs, backprop_macs = multiply_adds(in_width, widths, num_classes)
            shape = " → ".join(str(width) for width in (in_width,) + widths)
            print(
                f"| {shape} | {num_classes} | {batch_size} | {spela_time * 1e3:.1f} | "
                f"{backprop_time * 1e3:.1f} | {spela_time / backprop_time:.3f} | "
                f"{spela_macs / backprop_macs:.3f} |",
                flush=True,
            )

            if batch_size == 256 and widths == (1024, 1024):
                efficiency_line = measure_efficiency(
                    in_width, widths[0], batch_size, spela_macs * len(labels), spela_time, repeats
                )

    print()
    print(efficiency_line)


def measure_efficiency(in_width, width, batch_size, useful_macs, spela_time, repeats) -> str:
    """Compare SPELA's training throughput with a bare matmul of the first layer's shape."""
    inputs = torch.rand(batch_size, in_width)
    weight = torch.rand(width, in_width)
    torch.matmul(inputs, weight.T)
    calls = 200
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            torch.matmul(inputs, weight.T)
        times.append(time.perf_counter() - start)
    matmul_flops = 2 * batch_size * in_width * width * calls / statistics.median(times)
    spela_flops = 2 * useful_macs / spela_time
    return (
        f"Efficiency at batch {batch_size}: SPELA trains at {spela_flops / 1e9:.1f} GFLOP/s "
        f"of useful work, a bare torch.matmul [{batch_size}, {in_width}] @ [{in_width}, "
        f"{width}] runs at {matmul_flops / 1e9:.1f} GFLOP/s: ratio "
        f"{spela_flops / matmul_flops:.2f}."
    )


def memory_child(head: str, batch_size: int) -> None:
    """Run in a subprocess: print RSS before a training step and the peak RSS during it, in KiB.

    A one-sample step first allocates the optimizer state and gradients, so the
    measured step adds only what a step itself needs.
    """
    in_width, widths, num_classes = SHAPES[0]
    features, labels = make_data(batch_size, in_width, num_classes)
    if head == "spela":
        config = SpelaConfig(hidden_widths=widths, batch_size=batch_size)
        vectors, weights, biases, optimizers = build_spela(in_width, widths, num_classes, config)
        with torch.no_grad():
            spela_batch_step(features[:1], labels[:1], vectors, weights, biases, optimizers, config)
            before = current_rss_kib()
            spela_batch_step(features, labels, vectors, weights, biases, optimizers, config)
    else:
        config = BackpropConfig(hidden_widths=widths, batch_size=batch_size)
        weights, biases, optimizer = build_backprop(in_width, widths, num_classes, config)
        backprop_batch_step(features[:1], labels[:1], weights, biases, optimizer, config)
        before = current_rss_kib()
        backprop_batch_step(features, labels, weights, biases, optimizer, config)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(before, peak)


def current_rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def run_memory(batch_size: int, repeats: int, threads: int | None) -> None:
    """Measure the peak RSS of one training step of each head, each in a fresh process."""
    # A fixed mmap threshold makes glibc return every freed block of 64 KiB or more at once,
    # so RSS follows the live tensors instead of the allocator's high-water mark.
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    in_width, widths, num_classes = SHAPES[0]
    shape = " → ".join(str(width) for width in (in_width,) + widths)
    print(
        f"Peak memory of one training step, {shape}, {num_classes} classes, batch {batch_size} "
        f"(median of {repeats} processes):"
    )
    for head in ("spela", "backprop"):
        increases, peaks = [], []
        for _ in range(repeats):
            command = [sys.executable, __file__, "memory-child", head, str(batch_size)]
            if threads is not None:
                command += ["--threads", str(threads)]
            output = subprocess.run(
                command,
                capture_output=True,
                text=True,
                check=True,
                env=environment,
            ).stdout.split()
            before, peak = int(output[-2]), int(output[-1])
            increases.append(peak - before)
            peaks.append(peak)
        print(
            f"  {head}: step adds {statistics.median(increases) / 1024:.1f} MiB above the "
            f"{(statistics.median(peaks) - statistics.median(increases)) / 1024:.1f} MiB held "
            f"between steps; process peak {statistics.median(peaks) / 1024:.1f} MiB",
            flush=True,
        )


def run_seeds(num_seeds: int, epochs: int, repeats: int) -> None:
    """Time one fit of several seeds against separate fits, for both heads, alternately."""
    in_width, widths, num_classes = SHAPES[1]
    features, labels = make_data(2048, in_width, num_classes)
    seeds = list(range(num_seeds))
    print(
        f"Batched seeds, {in_width} → {' → '.join(map(str, widths))}, {num_classes} classes, "
        f"2048 samples, batch 32, {epochs} epochs:"
    )
    for name, fit, config in (
        ("SPELA", fit_spela, SpelaConfig(hidden_widths=widths, epochs=epochs)),
        ("BP", fit_backprop, BackpropConfig(hidden_widths=widths, epochs=epochs)),
    ):
        fit(features, labels, num_classes, config, seeds=[0])
        together_times, separate_times = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            fit(features, labels, num_classes, config, seeds=seeds)
            together_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            for seed in seeds:
                fit(features, labels, num_classes, config, seeds=[seed])
            separate_times.append(time.perf_counter() - start)
        together = statistics.median(together_times)
        separate = statistics.median(separate_times)
        print(
            f"  {name}: {num_seeds} seeds in one fit {together:.2f} s, {num_seeds} separate "
            f"fits {separate:.2f} s (medians of {repeats}): ratio {together / separate:.2f}",
            flush=True,
        )


def run_variants(args: argparse.Namespace) -> None:
    """Compare every loss with and without input normalisation on real backbone features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    from spela_transfer.config import ExtractConfig
    from spela_transfer.extract import extract_features

    feature_set = extract_features(
        ExtractConfig(
            dataset="fashion-mnist-sample",
            backbone="efficientnet_lite0.offline",
            image_size=args.image_size,
            limit=args.limit,
            cache_dir=args.cache_dir,
            device="cpu",
        ),
        progress=False,
    )
    features = torch.from_numpy(feature_set.load_features())
    labels = torch.from_numpy(feature_set.labels).long()
    train, test = train_test_split(np.arange(len(labels)), test_size=0.5, random_state=100)
    seeds = list(range(args.seeds))
    num_classes = feature_set.num_classes
    print(
        f"Features: {feature_set.key}, {tuple(features.shape)}, test size 0.5 "
        f"(random_state=100), {args.seeds} seeds, {args.epochs} epochs, batch 32, Adam 1e-3"
    )

    def top1(fitted):
        scores = fitted.exit_scores(features[test])
        return (scores.argmax(dim=-1) == labels[test]).float().mean(dim=-1) * 100

    print("| Loss | Normalise inputs | Top-1 layer 1 (%) | Top-1 output (%) | Fit (s) |")
    print("|---|---|---|---|---|")
    for loss in ("log2cos", "neg_cos", "euclidean"):
        for normalize in (False, True):
            config = SpelaConfig(loss=loss, normalize_input=normalize, epochs=args.epochs)
            start = time.perf_counter()
            accuracy = top1(fit_spela(features[train], labels[train], num_classes, config, seeds))
            elapsed = time.perf_counter() - start
            cells = [f"{accuracy[:, k].mean():.2f} ± {accuracy[:, k].std():.2f}" for k in (0, -1)]
            print(
                f"| {loss} | {'yes' if normalize else 'no'} | {cells[0]} | {cells[1]} | "
                f"{elapsed:.0f} |",
                flush=True,
            )

    config = BackpropConfig(epochs=args.epochs)
    accuracy = top1(fit_backprop(features[train], labels[train], num_classes, config, seeds))
    print(
        f"| backprop head (cross-entropy) | no | | {accuracy[:, 0].mean():.2f} ± "
        f"{accuracy[:, 0].std():.2f} | |"
    )
    scale = features[train].std()
    probe = LogisticRegression(max_iter=2000).fit(features[train] / scale, labels[train])
    probe_top1 = probe.score(features[test] / scale, labels[test]) * 100
    print(f"| logistic regression | no | | {probe_top1:.2f} | |")


def run_pixels(args: argparse.Namespace) -> None:
    """Train SPELA 784 → 1000 → 34 and the same-width BP head on raw Fashion-MNIST pixels.

    Few-shot rows merge the official train and test sets and split them with
    `train_test_split(test_size, random_state=100)`. The official row trains on
    the 60,000 training images and tests on the 10,000 test images.
    """
    from sklearn.model_selection import train_test_split

    from spela_transfer.config import ExtractConfig
    from spela_transfer.extract import extract_features

    feature_set = extract_features(
        ExtractConfig(
            dataset="fashion-mnist",
            backbone="pixels",
            split="all",
            cache_dir=args.cache_dir,
            device="cpu",
        ),
        progress=False,
    )
    features = torch.from_numpy(feature_set.load_features())
    labels = torch.from_numpy(feature_set.labels).long()
    is_train = np.array([":train:" in sample_id for sample_id in feature_set.sample_ids])
    seeds = list(range(args.seeds))
    # Both heads share the widths and the training schedule.
    training = {
        "hidden_widths": (1000, 34),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "lr_step_epochs": args.lr_step_epochs,
        "lr_gamma": args.lr_gamma,
    }
    spela_config = SpelaConfig(
        **training,
        normalize_input=args.normalize,
        loss=args.loss,
        class_vectors=args.class_vectors,
    )
    backprop_config = BackpropConfig(**training)
    print(f"Features: {feature_set.key}, {tuple(features.shape)}; seeds {seeds}")
    print(f"SPELA: {spela_config}")
    print(f"BP: {backprop_config}")
    print(
        "| Split | Train | Test | SPELA hidden (%) | SPELA output (%) | BP (%) "
        "| On the training images: SPELA hidden / output / BP (%) | Fit s SPELA / BP |"
    )
    print("|---|---|---|---|---|---|---|---|")

    splits = []
    if args.official:
        splits.append(("official", np.flatnonzero(is_train), np.flatnonzero(~is_train)))
    for test_size in args.test_sizes:
        train, test = train_test_split(
            np.arange(len(labels)), test_size=test_size, random_state=100
        )
        splits.append((f"merged, test size {test_size}", train, test))

    def top1(fitted, inputs, rows):
        """Top-1 % of every head at every exit, [S, L]."""
        scores = fitted.exit_scores(inputs[rows])
        return (scores.argmax(dim=-1) == labels[rows]).float().mean(dim=-1) * 100

    def cell(values):
        return f"{values.mean():.2f} ± {values.std():.2f}"

    for name, train, test in splits:
        inputs = features
        if args.standardize:
            # One mean and one std over all training pixels, since the images have one channel.
            inputs = (features - features[train].mean()) / features[train].std()
        results = []
        for fit, config in ((fit_spela, spela_config), (fit_backprop, backprop_config)):
            start = time.perf_counter()
            fitted = fit(inputs[train], labels[train], 10, config, seeds)
            elapsed = time.perf_counter() - start
            results.append((top1(fitted, inputs, test), top1(fitted, inputs, train), elapsed))
        (spela, spela_train, spela_time), (backprop, backprop_train, backprop_time) = results
        print(
            f"| {name} | {len(train)} | {len(test)} | {cell(spela[:, 0])} | "
            f"{cell(spela[:, -1])} | {cell(backprop[:, 0])} | {cell(spela_train[:, 0])} / "
            f"{cell(spela_train[:, -1])} / {cell(backprop_train[:, 0])} | "
            f"{spela_time:.0f} / {backprop_time:.0f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "part",
        choices=["speed", "memory", "seeds", "variants", "pixels", "all", "memory-child"],
    )
    parser.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per fit")
    parser.add_argument(
        "--epochs", type=int, default=50, help="epochs of the variant and pixels fits"
    )
    parser.add_argument("--seed-epochs", type=int, default=2, help="epochs of the seed timing")
    parser.add_argument("--image-size", type=int, default=None, help="backbone input size")
    parser.add_argument("--limit", type=int, default=100, help="images per class")
    parser.add_argument("--cache-dir", default="features", help="feature cache folder")
    parser.add_argument(
        "--test-sizes",
        type=float,
        nargs="*",
        default=[0.95, 0.99],
        help="pixels: test sizes of the merged-split runs",
    )
    parser.add_argument("--official", action="store_true", help="pixels: add the official split")
    parser.add_argument("--batch-size", type=int, default=50, help="pixels: batch size")
    parser.add_argument("--optimizer", default="adam", help="pixels: adam or sgd")
    parser.add_argument("--lr", type=float, default=1e-3, help="pixels: learning rate")
    parser.add_argument(
        "--lr-step-epochs", type=int, default=None, help="pixels: epochs between lr decays"
    )
    parser.add_argument("--lr-gamma", type=float, default=0.1, help="pixels: lr decay factor")
    parser.add_argument(
        "--normalize", action="store_true", help="pixels: L2-normalise every SPELA layer input"
    )
    parser.add_argument("--loss", default="log2cos", help="pixels: SPELA's local loss")
    parser.add_argument(
        "--class-vectors", default="symmetric", help="pixels: symmetric or gaussian"
    )
    parser.add_argument(
        "--standardize",
        action="store_true",
        help="pixels: subtract the training pixels' mean and divide by their std",
    )
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.part == "memory-child":
        memory_child(args.extra[0], int(args.extra[1]))
        return

    print(f"Machine: {describe_machine()}")
    print(f"Command: python benchmarks/bench_heads.py {' '.join(sys.argv[1:])}")
    print()
    if args.part in ("speed", "all"):
        run_speed(args.repeats)
        print()
    if args.part in ("memory", "all"):
        run_memory(256, args.repeats, args.threads)
        print()
    if args.part in ("seeds", "all"):
        run_seeds(args.seeds, args.seed_epochs, args.repeats)
        print()
    if args.part in ("variants", "all"):
        run_variants(args)
    if args.part == "pixels":
        run_pixels(args)


if __name__ == "__main__":
    main()
