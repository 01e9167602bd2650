"""Benchmark feature extraction: the whole pipeline against the bare backbone forward.

For each backbone, on a folder of generated JPEG photos of camera size (500 x 375 and
375 x 500), it measures in one process, with the same batch size and torch thread count:

1. bare forward: the backbone on ready, normalized tensors (the upper bound);
2. plain loop: decode and resize each image with PIL in the main process, then forward;
3. pipeline: `extract_features` into a fresh cache (decode in DataLoader workers,
   resize, forward, chunked writes), timed from the call to its return;
4. cache hit: the same `extract_features` request again.

With --memory it also extracts 5,000 and all 70,000 Fashion-MNIST images (Debian's
IDX files) through the `pixels` backbone, each in its own process, and prints the peak
resident memory of both. Features stream to disk, so the peak should barely grow with N.

The pipeline runs twice: with no decode worker (decoding in the main process, like the
plain loop) and with the default workers, whose decoding overlaps the forward.

Run: python benchmarks/bench_extract.py [--images 96] [--batch-size 32] [--threads N] [--memory]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from spela_transfer.backbones import resolve_backbone
from spela_transfer.config import ExtractConfig
from spela_transfer.data import convert_mode, resize_and_crop
from spela_transfer.data.named import DEBIAN_FASHION_MNIST
from spela_transfer.extract import _normalize, extract_features

# Backbone, pretrained weights, and its share of --images. resnet50 costs about twice
# the CPU time per image of the offline backbone on a 2-core Xeon, so it gets half.
BACKBONES = (("efficientnet_lite0.offline", True, 1.0), ("resnet50", False, 0.5))


def make_photos(folder: Path, count: int, seed: int = 0) -> None:
    """Write `count` JPEG photos with smooth shapes and texture, like camera pictures."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = (500, 375) if index % 3 else (375, 500)
        coarse = rng.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        image = image.filter(ImageFilter.GaussianBlur(3))
        texture = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float64) + texture, 0, 255).astype(np.uint8)
        class_folder = folder / f"class{index % 4}"
        class_folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(class_folder / f"{index:05d}.jpg", quality=90)


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished child processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def time_bare_forward(backbone, count: int, batch_size: int) -> tuple[float, float]:
    """Images per second and CPU seconds per image of the forward alone on a ready batch."""
    channels, height, width = backbone.preprocessing.input_size
    batch = torch.randn(batch_size, channels, height, width)
    backbone(batch)  # warm-up: the first call of a shape allocates and selects kernels
    batches = max(1, count // batch_size)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        backbone(batch)
    images = batches * batch_size
    return images / (time.perf_counter() - started), (cpu_seconds() - cpu_started) / images


def time_plain_loop(backbone, paths: list[Path], batch_size: int) -> float:
    """Images per second when the main process decodes each batch before its forward."""
    preprocessing = backbone.preprocessing
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        arrays = []
        for path in paths[start : start + batch_size]:
            image = convert_mode(Image.open(path), preprocessing.channels)
            arrays.append(resize_and_crop(image, preprocessing))
        backbone(_normalize(np.stack(arrays), preprocessing))
    return len(paths) / (time.perf_counter() - started)


def machine_description() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"


def time_pipeline(config: ExtractConfig) -> tuple[float, float, float, float, float]:
    """Measure a first `extract_features` and its cache hit.

    Returns:
        Images per second and CPU seconds per image of the whole first call (decode
        workers included), images per second of its extraction loop alone (from the
        manifest: decoding, forward and chunk writes, without the file listing, backbone
        build and final merge), then the wall seconds of the first call and of the hit.
    """
    started, cpu_started = time.perf_counter(), cpu_seconds()
    features = extract_features(config, progress=False)
    first = time.perf_counter() - started
    cpu_per_image = (cpu_seconds() - cpu_started) / len(features)
    started = time.perf_counter()
    extract_features(config, progress=False)
    hit = time.perf_counter() - started
    loop_rate = features.manifest["timing"]["images_per_second"]
    return len(features) / first, cpu_per_image, loop_rate, first, hit


def peak_memory_child(limit: int | None, cache_dir: str) -> None:
    """Extract Fashion-MNIST through `pixels` and print the peak resident memory in MiB."""
    config = ExtractConfig(
        dataset="fashion-mnist", backbone="pixels", limit=limit, cache_dir=cache_dir, device="cpu"
    )
    features = extract_features(config, progress=False)
    print(f"{len(features)} {features.features.nbytes / 2**20:.1f} {peak_memory_mib():.1f}")


def peak_memory_mib() -> float:
    """Peak resident memory of this process in MiB."""
    # Linux's ru_maxrss keeps the parent's peak across fork and exec, so a child started
    # by a large parent would report the parent's peak; VmHWM starts afresh at exec.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory(root: Path) -> None:
    """Peak memory of extracting 5,000 and all 70,000 Fashion-MNIST images, in subprocesses."""
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        print("memory: skipped, Debian package dataset-fashion-mnist is not installed")
        return
    print("| images | features on disk (MiB) | peak resident memory (MiB) |")
    print("|---|---|---|")
    for limit in (500, None):
        command = [sys.executable, __file__, "--memory-child", str(limit or 0), str(root)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        count, disk, peak = output.split()
        print(f"| {count} | {disk} | {peak} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="photos for the offline backbone")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--num-workers", type=int, default=None, help="decode workers (auto)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="rounds per measurement; the best one counts"
    )
    parser.add_argument(
        "--memory", action="store_true", help="also measure peak memory against N (pixels)"
    )
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        limit, cache_dir = args.memory_child
        peak_memory_child(int(limit) or None, cache_dir)
        return
    torch.set_num_threads(args.threads)

    print(f"machine: {machine_description()}; torch threads: {args.threads}")
    print(
        "| backbone | images | bare forward | plain loop | pipeline, 0 workers | pipeline "
        "| pipeline / bare | its loop / bare | plain / bare | CPU ms per image, bare / pipeline "
        "| cache hit / first run |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        for name, pretrained, share in BACKBONES:
            count = max(
                args.batch_size, int(args.images * share) // args.batch_size * args.batch_size
            )
            folder = root / f"photos-{count}"
            if not folder.exists():
                make_photos(folder, count)
            paths = sorted(folder.rglob("*.jpg"))
            backbone = resolve_backbone(name, pretrained=pretrained).build("cpu")

            # Rounds alternate the measurements, so a burst of load from other processes
            # hits all of them alike. The best round of each is the least disturbed.
            bare, plain, serial, pipeline, loop, first, hit = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
            bare_cpu, pipeline_cpu = float("inf"), float("inf")
            for round_index in range(args.repeats):
                rate, cpu = time_bare_forward(backbone, count, args.batch_size)
                bare, bare_cpu = max(bare, rate), min(bare_cpu, cpu)
                plain = max(plain, time_plain_loop(backbone, paths, args.batch_size))
                for workers in (0, args.num_workers):
                    config = ExtractConfig(
                        dataset=str(folder),
                        backbone=name,
                        pretrained=pretrained,
                        batch_size=args.batch_size,
                        num_workers=workers,
                        cache_dir=str(root / f"cache-{round_index}-{workers}"),
                        device="cpu",
                    )
                    rate, cpu, loop_rate, first_seconds, hit_seconds = time_pipeline(config)
                    if workers == 0:
                        serial = max(serial, rate)
                        continue
                    pipeline_cpu = min(pipeline_cpu, cpu)
                    loop = max(loop, loop_rate)
                    if rate > pipeline:
                        pipeline, first, hit = rate, first_seconds, hit_seconds

            weights = "" if pretrained else " (random weights)"
            print(
                f"| {name}{weights} | {count} | {bare:.1f} | {plain:.1f} | {serial:.1f} "
                f"| {pipeline:.1f} | {pipeline / bare:.0%} | {loop / bare:.0%} "
                f"| {plain / bare:.0%} "
                f"| {bare_cpu * 1000:.0f} / {pipeline_cpu * 1000:.0f} "
                f"| {hit / first:.2%} ({hit:.2f} s / {first:.1f} s) |",
                flush=True,
            )
        print(f"throughputs in images per second, best of {args.repeats} rounds")
        if args.memory:
            measure_memory(root / "memory-cache")


if __name__ == "__main__":
    main()
