"""Image folders (one sub-folder per class) and CSV files of `path,label`."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np

from spela_transfer.data.sources import FileSource, file_list_digest, file_sha256

logger = logging.getLogger(__name__)

# torchvision's image extensions plus GIF.
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
)
# Sub-folders that make a folder a split layout: `<root>/train/<class>/...` and `<root>/test/...`.
SPLIT_FOLDERS = ("train", "test")


def _visible_dirs(folder: Path) -> list[Path]:
    # Dot-folders such as .ipynb_checkpoints or .git are never classes.
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        # A broken symlink (dangling or a loop) is listed, so extraction records it as skipped.
        and (path.is_file() or path.is_symlink())
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def is_split_layout(root: Path) -> bool:
    """Check that `root` has `train/` and `test/` folders, each with one folder per class."""
    names = {path.name for path in _visible_dirs(root)}
    return all(split in names for split in SPLIT_FOLDERS)


def open_image_folder(root: str | Path, split: str = "all") -> FileSource:
    """List an image folder: `root/<class>/<image>` or `root/{train,test}/<class>/<image>`.

    With the split layout, `split` picks `train`, `test` or both (`all`), and the
    classes are the union over both splits, so every split gets the same labels.
    Dot-folders are ignored, and empty class folders are left out and reported.

    Raises:
        NotADirectoryError: `root` is not a folder.
        ValueError: `split` is not `all` for a folder without the split layout, or no
            image was found.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"dataset folder {str(root)!r} is not a directory")

    if is_split_layout(root):
        split_roots = {name: root / name for name in SPLIT_FOLDERS}
        chosen = list(SPLIT_FOLDERS) if split == "all" else [split]
    elif split != "all":
        raise ValueError(
            f"split {split!r} needs sub-folders {root / 'train'} and {root / 'test'}, which "
            f"{str(root)!r} does not have; use split 'all' for a folder of class folders"
        )
    else:
        split_roots = {"all": root}
        chosen = ["all"]

    files_by_class: dict[str, dict[str, list[Path]]] = {}
    for split_name, split_root in split_roots.items():
        for class_dir in _visible_dirs(split_root):
            files = _image_files(class_dir)
            files_by_class.setdefault(class_dir.name, {})[split_name] = files

    empty = sorted(name for name, by_split in files_by_class.items() if not any(by_split.values()))
    if empty:
        logger.warning(
            "%s: left out %d empty class folder(s) with no image (%s): %s",
            root,
            len(empty),
            "/".join(IMAGE_EXTENSIONS),
            ", ".join(empty),
        )
    class_names = sorted(name for name in files_by_class if name not in empty)
    if not class_names:
        raise ValueError(
            f"dataset folder {str(root)!r} contains no image files in class sub-folders; "
            f"expected {root}/<class>/<image> with extensions {', '.join(IMAGE_EXTENSIONS)}"
        )

    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        for split_name in chosen:
            files = files_by_class[name].get(split_name, [])
            paths.extend(files)
            labels.extend([label] * len(files))
    if not paths:
        raise ValueError(f"dataset folder {str(root)!r}, split {split!r}: no image files found")

    digest, total_bytes = file_list_digest(paths, root)
    return FileSource(
        name=str(root),
        class_names=class_names,
        labels=np.asarray(labels, dtype=np.int64),
        sample_ids=[str(path) for path in paths],
        identity={
            "kind": "folder",
            "root": str(root.resolve()),
            "split": split if len(split_roots) > 1 else "all",
            "files": len(paths),
            "bytes": total_bytes,
            "file_list_sha256": digest,
        },
        details={"empty_class_folders": empty},
    )


def open_csv(path: str | Path) -> FileSource:
    """Read a CSV with header `path,label`; relative paths are relative to the CSV's folder.

    Labels may be any strings; classes are the sorted distinct labels (numerically when
    every label is an integer).

    Raises:
        FileNotFoundError: The CSV does not exist.
        ValueError: The header lacks `path` or `label`, a row is incomplete, the CSV
            has no rows or is not UTF-8, or one path is listed with two labels.
    """
    csv_path = Path(path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"dataset CSV {str(csv_path)!r} not found")

    with io.StringIO(_read_utf8(csv_path), newline="") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        if "path" not in columns or "label" not in columns:
            raise ValueError(
                f"dataset CSV {str(csv_path)!r} has columns {columns!r}; expected a header "
                "row with 'path' and 'label'"
            )
        rows = []
        for line_number, row in enumerate(reader, start=2):
            image_path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            if not image_path or not label:
                raise ValueError(
                    f"dataset CSV {str(csv_path)!r}, line {line_number}: empty path or label "
                    f"in {row!r}"
                )
            rows.append((image_path, label))
    if not rows:
        raise ValueError(f"dataset CSV {str(csv_path)!r} has a header but no rows")
    rows, duplicates = _drop_duplicate_rows(csv_path, rows)

    base = csv_path.parent
    paths = [
        Path(image_path) if Path(image_path).is_absolute() else base / image_path
        for image_path, _ in rows
    ]
    distinct = {label for _, label in rows}
    numeric = all(label.lstrip("-").isdigit() for label in distinct)
    class_names = sorted(distinct, key=int) if numeric else sorted(distinct)
    class_to_idx = {name: index for index, name in enumerate(class_names)}

    digest, total_bytes = file_list_digest(paths, base)
    return FileSource(
        name=str(csv_path),
        class_names=class_names,
        labels=np.asarray([class_to_idx[label] for _, label in rows], dtype=np.int64),
        sample_ids=[str(path) for path in paths],
        identity={
            "kind": "csv",
            "csv": str(csv_path.resolve()),
            "csv_sha256": file_sha256(csv_path),
            "files": len(paths),
            "bytes": total_bytes,
            "file_list_sha256": digest,
        },
        details={"duplicate_rows_dropped": duplicates},
    )


def _read_utf8(csv_path: Path) -> str:
    try:
        return csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"dataset CSV {str(csv_path)!r} is not valid UTF-8 ({error}); save it as UTF-8"
        ) from error


def _drop_duplicate_rows(
    csv_path: Path, rows: list[tuple[str, str]]
) -> tuple[list[tuple[str, str]], int]:
    """Keep the first row of each path, because a repeated image could land in train and test.

    Raises:
        ValueError: One path is listed with two different labels.
    """
    first_labels: dict[str, str] = {}
    kept = []
    for image_path, label in rows:
        first_label = first_labels.setdefault(image_path, label)
        if first_label != label:
            raise ValueError(
                f"dataset CSV {str(csv_path)!r} lists {image_path!r} with labels "
                f"{first_label!r} and {label!r}; give each image one label"
            )
        if len(kept) < len(first_labels):
            kept.append((image_path, label))
    duplicates = len(rows) - len(kept)
    if duplicates:
        logger.warning(
            "%s: dropped %d duplicate row(s) that repeat an earlier path and label",
            csv_path,
            duplicates,
        )
    return kept, duplicates
