"""The DAVIS 2017 folder layout, read and checked before any work starts:

    DAVIS_ROOT/JPEGImages/480p/SEQ/00000.jpg ...
    DAVIS_ROOT/Annotations/480p/SEQ/00000.png ...   (palette PNGs: 0 background, 1..N objects)
    DAVIS_ROOT/ImageSets/2017/val.txt               (one sequence name a line)

on any storage flsl reads (local paths, s3://, gs://, http(s)://...). Each frame must have its
annotation (the same file name, .png for .jpg), as the benchmark scores every frame; the
official loader and DINO's script take the files in sorted order, as here.
"""

from __future__ import annotations

from dataclasses import dataclass

from flsl_cli import storage
from flsl_cli.errors import DataError

RESOLUTION = "480p"
YEAR = "2017"
_FIX_ROOT = (
    "Pass the folder of the DAVIS 2017 download (DAVIS-2017-trainval-480p.zip unpacks to DAVIS/ with "
    "JPEGImages, Annotations and ImageSets in it)"
)


@dataclass(frozen=True)
class Sequence:
    name: str
    frames: tuple[str, ...]  # URLs of the JPEGs, sorted
    masks: tuple[str, ...]  # URLs of the annotations, one per frame

    def frame_name(self, index: int) -> str:
        """The PNG name of frame `index` (its JPEG's stem)."""
        return storage.basename(self.frames[index]).rsplit(".", 1)[0] + ".png"


def read_layout(
    root: str, *, split: str, sequences: list[str] | None = None, max_sequences: int | None = None
) -> list[Sequence]:
    """The sequences of `split` (or those named, in the split's order), each with its frames
    and annotations, or a DataError saying what is missing and where."""
    root = storage.normalize(root)
    if not storage.isdir(root):
        raise DataError("the DAVIS folder does not exist", where=root, fix=_FIX_ROOT)
    images = storage.join(root, "JPEGImages", RESOLUTION)
    annotations = storage.join(root, "Annotations", RESOLUTION)
    sets = storage.join(root, "ImageSets", YEAR)
    for folder in (images, annotations, sets):
        if not storage.isdir(folder):
            raise DataError(
                f"this is not a DAVIS 2017 folder: {folder[len(root) :].lstrip('/')} is missing",
                where=root,
                fix=_FIX_ROOT,
            )
    names = _split_names(sets, split=split)
    if sequences:
        unknown = [name for name in sequences if name not in names]
        if unknown:
            raise DataError(
                f"sequence(s) {', '.join(unknown)} are not in the {split} split",
                where=root,
                fix=f"Pick names listed in ImageSets/{YEAR}/{split}.txt",
            )
        names = [name for name in names if name in set(sequences)]
    if max_sequences is not None:
        names = names[:max_sequences]
    image_folders, mask_folders = set(storage.listdir(images)), set(storage.listdir(annotations))
    return [
        _sequence(
            name,
            images=images,
            annotations=annotations,
            has_images=name in image_folders,
            has_masks=name in mask_folders,
        )
        for name in names
    ]


def _split_names(sets: str, *, split: str) -> list[str]:
    path = storage.join(sets, f"{split}.txt")
    if not storage.isfile(path):
        available = sorted(name[:-4] for name in storage.listdir(sets) if name.endswith(".txt"))
        raise DataError(
            f"there is no sequence list for the split {split!r}",
            where=path,
            fix=f"Use --split with one of: {', '.join(available) or '(none found)'}",
        )
    try:
        text = storage.read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(
            "the sequence list is not UTF-8 text", where=path, fix="Restore the file from the download"
        ) from None
    names = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not names:
        raise DataError("the sequence list is empty", where=path, fix="Restore the file from the download")
    return names


def _sequence(name: str, *, images: str, annotations: str, has_images: bool, has_masks: bool) -> Sequence:
    frame_dir, mask_dir = storage.join(images, name), storage.join(annotations, name)
    if not has_images:
        raise DataError(f"sequence {name}: the frame folder is missing", where=frame_dir, fix=_FIX_ROOT)
    if not has_masks:
        raise DataError(f"sequence {name}: the annotation folder is missing", where=mask_dir, fix=_FIX_ROOT)
    frames = sorted(n for n in storage.listdir(frame_dir) if n.lower().endswith((".jpg", ".jpeg")))
    masks = sorted(n for n in storage.listdir(mask_dir) if n.lower().endswith(".png"))
    if len(frames) < 3:
        raise DataError(
            f"sequence {name} has {len(frames)} frame(s); the benchmark scores all frames but the first "
            "and the last, so it needs at least 3",
            where=frame_dir,
            fix="Leave the sequence out",
        )
    stems = [n.rsplit(".", 1)[0] for n in frames]
    if len(masks) != len(frames) or [n.rsplit(".", 1)[0] for n in masks] != stems:
        missing = sorted(set(stems) - {n.rsplit(".", 1)[0] for n in masks})
        detail = f"; no annotation for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else ""
        raise DataError(
            f"sequence {name} has {len(frames)} frames but {len(masks)} annotations{detail}",
            where=mask_dir,
            fix="Every frame needs its annotation (same name, .png): use the DAVIS 2017 train/val annotations",
        )
    return Sequence(
        name=name,
        frames=tuple(storage.join(frame_dir, n) for n in frames),
        masks=tuple(storage.join(mask_dir, n) for n in masks),
    )
