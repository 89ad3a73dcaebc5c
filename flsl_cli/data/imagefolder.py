"""Finding the images of a source directory for `flsl data shards`.

Two layouts:

* ImageFolder (ImageNet's `train/`): one folder per class (synset) directly under SRC, images
  anywhere below it. Classes are the sorted folder names; images are sorted by (folder,
  path inside it).
* flat (ImageNet's `val/`): images directly in SRC, labelled from a separate file; sorted by
  file name.

Hidden files and folders (names starting with '.') and files without an image extension are
ignored. Only names and sizes are read here; the images are opened when the shards are written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flsl_cli.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True, slots=True)
class SourceImage:
    relpath: str  # POSIX path relative to SRC
    size: int  # bytes on disk
    folder: str | None  # the class folder (ImageFolder layout), None in a flat directory


@dataclass(frozen=True)
class SourceTree:
    root: Path
    layout: str  # "imagefolder" or "flat"
    folders: tuple[str, ...]  # class folders, sorted (empty for a flat directory)
    images: tuple[SourceImage, ...]


def scan_source(src: Path, *, flat: bool) -> SourceTree:
    """The images of `src`: a flat directory when `flat` (labels come from a file), otherwise an
    ImageFolder tree. Raises DataError when `src` is missing or holds no images."""
    src = Path(src).expanduser()
    if not src.exists():
        raise DataError("SRC does not exist", where=str(src), fix="Give the ImageNet train/ or val/ directory")
    if not src.is_dir():
        raise DataError("SRC is not a directory", where=str(src), fix="Give the ImageNet train/ or val/ directory")
    try:
        entries = sorted((e for e in os.scandir(src) if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as err:
        raise DataError(
            f"cannot list SRC ({err.strerror or err})", where=str(src), fix="Check the directory's permissions"
        ) from None
    folders = tuple(e.name for e in entries if e.is_dir())
    top_images = tuple(
        SourceImage(e.name, e.stat().st_size, None) for e in entries if e.is_file() and _is_image_name(e.name)
    )

    if flat:
        if not top_images:
            held = (
                f" (it holds {len(folders)} folder(s); --labels is for a flat directory like ImageNet's val/)"
                if folders
                else ""
            )
            raise DataError(
                f"SRC holds no images{held}",
                where=str(src),
                fix="Give a directory with image files directly inside, or drop --labels for a folder-per-class tree",
            )
        return SourceTree(src, "flat", (), top_images)

    images = []
    for folder in folders:
        images.extend(_walk_images(src, folder))
    if not images:
        if top_images:
            raise DataError(
                f"SRC is a flat directory of {len(top_images)} images with no class folders",
                where=str(src),
                fix="Give the labels with --labels (e.g. LOC_val_solution.csv), or arrange the "
                "images in one folder per class",
            )
        raise DataError(
            f"SRC holds no images ({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES[:4])}, ...) in class folders",
            where=str(src),
            fix="Give an ImageFolder tree (one folder per class, like ImageNet's train/) or a flat "
            "directory with --labels",
        )
    return SourceTree(src, "imagefolder", folders, tuple(images))


def _walk_images(src: Path, folder: str) -> list[SourceImage]:
    """The images under `src/folder`, any depth, sorted by path."""
    found = []
    pending = [folder]
    while pending:
        relative = pending.pop()
        try:
            entries = list(os.scandir(src / relative))
        except OSError as err:
            raise DataError(
                f"cannot list a class folder ({err.strerror or err})",
                where=str(src / relative),
                fix="Check the directory's permissions",
            ) from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = f"{relative}/{entry.name}"
            if entry.is_dir():
                pending.append(path)
            elif entry.is_file() and _is_image_name(entry.name):
                found.append(SourceImage(path, entry.stat().st_size, folder))
    found.sort(key=lambda image: image.relpath.split("/"))
    return found


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)
