"""Builders of damaged, unusual and hostile input files for the robustness tests.

Every builder writes into a folder the test owns (usually under `tmp_path`) with
Pillow and numpy only, so no test downloads anything.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Lines of the command line's logging handler start with a timestamp.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")

# EXIF tag 0x0112: 6 means "rotate 90 degrees clockwise to display".
EXIF_ORIENTATION_TAG = 0x0112


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """Run `spela-transfer` in this process; return the exit code, stdout and stderr."""
    from spela_transfer.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(args)
    return code, stdout.getvalue(), stderr.getvalue()


def error_line(stderr: str) -> str:
    """Return the error line of a failed command; fail unless stderr is that line plus logs."""
    lines = [line for line in stderr.splitlines() if not LOG_LINE.match(line)]
    assert len(lines) == 1, stderr
    assert "error:" in lines[0]
    return lines[0]


def save_good_image(path: Path, seed: int, size: tuple[int, int] = (24, 16)) -> Path:
    """Write a random RGB image of `size` (width, height); the suffix picks the format."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_good_folder(root: Path, classes: tuple[str, ...] = ("ant", "bee"), per_class: int = 3):
    """Write `per_class` good PNG images into one sub-folder per class."""
    for class_index, name in enumerate(classes):
        for index in range(per_class):
            save_good_image(root / name / f"good-{index}.png", seed=100 * class_index + index)
    return root


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG cut after its first third: the header parses, the pixel data ends early."""
    save_good_image(path.with_suffix(".full.jpg"), seed=7, size=(64, 64))
    data = path.with_suffix(".full.jpg").read_bytes()
    path.with_suffix(".full.jpg").unlink()
    path.write_bytes(data[: len(data) // 3])
    return path


def write_truncated_png(path: Path) -> Path:
    """A PNG cut in the middle of its IDAT chunk."""
    save_good_image(path.with_name("full-" + path.name), seed=8, size=(64, 64))
    data = path.with_name("full-" + path.name).read_bytes()
    path.with_name("full-" + path.name).unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_zero_bytes(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_text_as_image(path: Path) -> Path:
    """A text file with an image extension."""
    path.write_text("this is a text file, not an image\n", encoding="utf-8")
    return path


def write_png_named_jpg(path: Path) -> Path:
    """A valid PNG whose name ends in `.jpg`: Pillow detects the format from the content."""
    image = Image.fromarray(np.full((12, 12, 3), 90, dtype=np.uint8))
    image.save(path, format="PNG")
    return path


def write_cmyk_jpeg(path: Path) -> Path:
    Image.new("CMYK", (20, 14), (10, 80, 160, 20)).save(path, format="JPEG")
    return path


def write_16bit_png(path: Path) -> Path:
    ramp = np.linspace(0, 65535, 20 * 16).astype(np.uint16).reshape(16, 20)
    Image.fromarray(ramp).save(path, format="PNG")
    return path


def write_palette_png_with_transparency(path: Path) -> Path:
    """A palette PNG whose color index 0 is transparent (a `tRNS` chunk)."""
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    image.paste(1, (4, 4, 12, 12))
    image.save(path, format="PNG", transparency=0)
    return path


def write_animated_gif(path: Path, frames: int = 3) -> Path:
    images = [Image.new("P", (16, 16), index * 40) for index in range(frames)]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=50)
    return path


def write_multipage_tiff(path: Path, pages: int = 3) -> Path:
    images = [Image.new("RGB", (16, 12), (index * 60, 0, 0)) for index in range(pages)]
    images[0].save(path, format="TIFF", save_all=True, append_images=images[1:])
    return path


def write_exif_rotated_jpeg(path: Path) -> Path:
    """Write a 30 x 10 JPEG whose EXIF orientation tag makes viewers show it as 10 x 30."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, :15] = 255
    Image.fromarray(pixels).save(path, format="JPEG", exif=exif.tobytes())
    return path


def write_one_pixel(path: Path) -> Path:
    Image.new("RGB", (1, 1), (200, 10, 10)).save(path)
    return path


def write_very_wide(path: Path, width: int = 4000, height: int = 2) -> Path:
    Image.new("RGB", (width, height), (0, 120, 240)).save(path)
    return path


def write_decompression_bomb_png(path: Path, side: int = 20_000) -> Path:
    """A tiny PNG whose header claims `side` x `side` pixels, above Pillow's bomb limit.

    Pillow raises `DecompressionBombError` from `Image.open` when an image has more
    than twice `Image.MAX_IMAGE_PIXELS` pixels (178,956,970 with the default limit).
    It raises before decoding anything, so the pixel data here is one empty row.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    pixels = zlib.compress(b"\x00" * (1 + side // 8))
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
    path.write_bytes(data + chunk(b"IEND", b""))
    return path


def write_non_utf8_name(folder: Path, seed: int) -> Path:
    """A good PNG whose file name is Latin-1 bytes, which are not valid UTF-8."""
    name = b"caf\xe9-" + str(seed).encode() + b".png"
    raw_path = os.fsencode(folder) + b"/" + name
    save_good_image(folder / "staging.png", seed=seed)
    os.rename(os.fsencode(folder / "staging.png"), raw_path)
    return Path(os.fsdecode(raw_path))


def write_pickle_payload(path: Path, marker: Path) -> Path:
    """Pickle an object that, when unpickled, creates the file `marker`.

    Loading this file with any unpickler runs `pathlib.Path.touch(marker)`. A test
    that finds `marker` missing afterwards has shown that no pickled code ran.
    """

    class TouchOnLoad:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path.write_bytes(pickle.dumps({"weight": TouchOnLoad()}))
    return path


def write_npy_with_pickle(path: Path, marker: Path) -> Path:
    """Write an object-dtype `.npy` whose pickled element creates `marker` when loaded."""

    class TouchOnLoad:
        def __reduce__(self):
            return (Path.touch, (marker,))

    array = np.empty(1, dtype=object)
    array[0] = TouchOnLoad()
    with path.open("wb") as file:
        np.save(file, array, allow_pickle=True)
    return path


# ---------------------------------------------------------------------------
# A command-line driver that stops `spela-transfer` at a chosen point, so a test
# can SIGKILL it there:
#
#   python tests/_bad_inputs.py --pause POINT --marker FILE [--chunk-size N] -- ARGS...
#
# POINT is one of:
#   write_chunk:N   before the chunk write that follows N finished ones;
#   replace:NAME    after a file's temporary copy is complete, before its rename to NAME;
#   rmtree          after the manifest is written, before the chunks are deleted;
#   append_runs:N   after N fits of `fit` are recorded.
# At the point, the driver writes FILE and waits until the file FILE.go exists.
# ---------------------------------------------------------------------------


def _pause_forever(marker: Path) -> None:
    """Write `marker`, then wait until the test creates `<marker>.go` (or kills this process)."""
    import time

    marker.write_text(str(os.getpid()))
    go = marker.with_name(marker.name + ".go")
    for _ in range(36_000):
        if go.exists():
            return
        time.sleep(0.1)


def _install_pause(point: str, marker: Path) -> None:
    import shutil

    from spela_transfer import cache
    from spela_transfer.evaluation import runner

    kind, _, argument = point.partition(":")
    if kind == "write_chunk":
        original_write = cache.CacheWriter.write_chunk
        written = []

        def pausing_write(self, chunk):
            if len(written) == int(argument):
                _pause_forever(marker)
            original_write(self, chunk)
            written.append(chunk.index)

        cache.CacheWriter.write_chunk = pausing_write
    elif kind == "replace":
        original_replace = os.replace

        def pausing_replace(source, destination, *args, **kwargs):
            if Path(destination).name == argument:
                _pause_forever(marker)
            return original_replace(source, destination, *args, **kwargs)

        os.replace = pausing_replace
    elif kind == "rmtree":
        original_rmtree = shutil.rmtree

        def pausing_rmtree(*args, **kwargs):
            _pause_forever(marker)
            original_rmtree(*args, **kwargs)

        shutil.rmtree = pausing_rmtree
    elif kind == "append_runs":
        original_append = runner._append_runs
        appended = []

        def pausing_append(*args, **kwargs):
            original_append(*args, **kwargs)
            appended.append(1)
            if len(appended) == int(argument):
                _pause_forever(marker)

        runner._append_runs = pausing_append
    else:
        raise SystemExit(f"unknown pause point {point!r}")


def _use_chunk_size(chunk_size: int) -> None:
    # The command line has no chunk-size flag; `cli.extract.run` imports
    # `extract_features` when it runs, so replacing the module attribute is enough.
    import functools

    from spela_transfer import extract

    extract.extract_features = functools.partial(extract.extract_features, chunk_size=chunk_size)


def _driver_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--pause")
    parser.add_argument("--marker", type=Path)
    parser.add_argument("--chunk-size", type=int)
    parser.add_argument("cli_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if args.chunk_size:
        _use_chunk_size(args.chunk_size)
    if args.pause:
        _install_pause(args.pause, args.marker)
    from spela_transfer.cli import main

    cli_args = args.cli_args[1:] if args.cli_args[:1] == ["--"] else args.cli_args
    return main(cli_args)


if __name__ == "__main__":
    import sys

    raise SystemExit(_driver_main(sys.argv[1:]))
