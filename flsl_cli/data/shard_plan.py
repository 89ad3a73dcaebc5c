"""Planning `flsl data shards`: which image goes into which shard, decided before anything is
written.

`plan_shards` scans SRC (see `imagefolder`), labels every image (class folders, or `--labels`
for a flat directory), reads the boxes (see `annotations`) and maps their synsets to labels,
gives each sample a webdataset-safe key from its file name, and cuts the sample list into
shards: by count (`samples_per_shard`) or by estimated tar size (`shard_size`). The plan depends
only on the input and the settings, never on the number of workers, and every input problem is
raised here as a DataError. Its digest (over each sample's path, size, key, label and boxes,
and the class list) tells a rerun whether DEST's unfinished shards belong to the same plan.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flsl_cli import __version__
from flsl_cli.data.annotations import (
    RawBox,
    find_voc_files,
    image_stem,
    read_class_names,
    read_labels,
    read_loc_csv,
    read_voc_xml,
)
from flsl_cli.data.imagefolder import SourceImage, SourceTree, scan_source
from flsl_cli.data.shard_workers import WorkerPool
from flsl_cli.errors import DataError

SAMPLE_FORMAT = "flsl-shards-sample/1"  # bump when the bytes written for a sample change
DEFAULT_SHARD_SIZE = "1GB"
_VOC_CHUNK = 2000  # XML files per task when they are read by worker processes
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

Box = tuple[float, float, float, float, int]  # x0, y0, x1, y1, label
ProgressFn = Callable[[str, int, int], None]  # (stage: "annotations" | "shards", done, total)


@dataclass(frozen=True, slots=True)
class PlannedSample:
    relpath: str  # POSIX path under SRC
    size: int  # file size in bytes
    key: str
    label: int
    boxes: tuple[Box, ...] | None  # None without --boxes


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker process needs to write one shard."""

    name: str
    src_root: str
    samples: tuple[PlannedSample, ...]
    classes: tuple[str, ...]
    synsets: tuple[str, ...]


@dataclass(frozen=True)
class ShardSettings:
    source: str
    layout: str  # "imagefolder" or "flat"
    prefix: str
    shard_size: str | None
    shard_bytes: int | None
    samples_per_shard: int | None
    labels: str | None
    boxes: str | None
    class_names: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "layout": self.layout,
            "labels": self.labels,
            "boxes": self.boxes,
            "class_names": self.class_names,
            "prefix": self.prefix,
            "shard_size": self.shard_size,
            "shard_bytes": self.shard_bytes,
            "samples_per_shard": self.samples_per_shard,
            "flsl_version": __version__,
        }

    def shape(self) -> dict[str, Any]:
        """The settings that change what is written (compared when a rerun is refused)."""
        return {
            "layout": self.layout,
            "prefix": self.prefix,
            "shard_bytes": self.shard_bytes,
            "samples_per_shard": self.samples_per_shard,
            "boxes": self.boxes is not None,
            "class_names": self.class_names is not None,
        }


@dataclass(frozen=True)
class ShardPlan:
    settings: ShardSettings
    synsets: tuple[str, ...]
    classes: tuple[str, ...]
    jobs: tuple[ShardJob, ...]
    digest: str

    @property
    def num_samples(self) -> int:
        return sum(len(job.samples) for job in self.jobs)


def plan_shards(
    src: Path,
    *,
    labels: Path | None = None,
    boxes: Path | None = None,
    class_names: Path | None = None,
    shard_size: str | None = None,
    samples_per_shard: int | None = None,
    prefix: str | None = None,
    on_progress: ProgressFn | None = None,
    pool: WorkerPool | None = None,
) -> ShardPlan:
    """Which sample goes into which shard; raises DataError for every problem with the input."""
    src = Path(src).expanduser()
    shard_bytes = _check_sizes(shard_size, samples_per_shard)
    prefix = _check_prefix(prefix, src)
    names = read_class_names(class_names) if class_names is not None else None
    tree = scan_source(src, flat=labels is not None)
    if labels is None:
        synsets = tree.folders
        if names is not None:
            unnamed = [s for s in synsets if s not in names]
            if unnamed:
                raise DataError(
                    f"{len(unnamed)} class folder(s) of SRC are not in the class-names file, e.g. {unnamed[0]!r}",
                    where=str(class_names),
                    fix="Give the class-names file of this data set (ImageNet: LOC_synset_mapping.txt)",
                )
        image_labels = _folder_labels(tree, synsets)
    else:
        synsets, image_labels = _file_labels(tree, labels, names, class_names)
    classes = tuple(names[s] if names is not None else s for s in synsets)
    settings = ShardSettings(
        source=str(src.resolve()),
        layout=tree.layout,
        prefix=prefix,
        shard_size=None if shard_bytes is None else (shard_size or DEFAULT_SHARD_SIZE),
        shard_bytes=shard_bytes,
        samples_per_shard=samples_per_shard,
        labels=_str(labels),
        boxes=_str(boxes),
        class_names=_str(class_names),
    )

    image_boxes = None
    if boxes is not None:
        stems = {image_stem(image.relpath) for image in tree.images}
        raw = {
            stem: items
            for stem, items in _read_boxes(Path(boxes), tree.images, on_progress=on_progress, pool=pool).items()
            if stem in stems
        }
        if not raw:
            raise DataError(
                f"none of the {len(tree.images)} images of SRC has a box in --boxes",
                where=str(boxes),
                fix="Give the annotations of this SRC (boxes are matched by file name without "
                "extension, e.g. n01440764_10026)",
            )
        image_boxes = _map_boxes(raw, {synset: label for label, synset in enumerate(synsets)}, synsets)

    samples = []
    used_keys: set[str] = set()
    for image, label in zip(tree.images, image_labels):
        stem = image_stem(image.relpath)
        sample_boxes = None if image_boxes is None else image_boxes.get(stem, ())
        samples.append(PlannedSample(image.relpath, image.size, _unique_key(stem, used_keys), label, sample_boxes))

    groups = _cut(samples, shard_bytes=shard_bytes, samples_per_shard=samples_per_shard, classes=classes)
    jobs = tuple(
        ShardJob(f"{prefix}-{i:06d}.tar", str(src.resolve()), tuple(group), classes, tuple(synsets))
        for i, group in enumerate(groups)
    )
    return ShardPlan(settings, tuple(synsets), classes, jobs, _digest(jobs, settings))


def _check_sizes(shard_size: str | None, samples_per_shard: int | None) -> int | None:
    """Bytes per shard, or None when shards are cut by sample count."""
    if shard_size is not None and samples_per_shard is not None:
        raise DataError(
            "--shard-size and --samples-per-shard are both given",
            fix="Give one of them (shards are cut by size or by count)",
        )
    if samples_per_shard is not None:
        if samples_per_shard < 1:
            raise DataError(
                f"--samples-per-shard must be at least 1 (got {samples_per_shard})", fix="Give a positive count"
            )
        return None
    return parse_size(shard_size or DEFAULT_SHARD_SIZE)


def parse_size(text: str) -> int:
    """Bytes in '1GB', '500MB', '64MiB', '1.5G' (decimal units; KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise DataError(f"--shard-size {text!r} is not a size", fix="Write it like 1GB, 500MB or 64MiB")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 1:
        raise DataError(f"--shard-size {text!r} is zero", fix="Give a positive size like 1GB")
    return size


def _check_prefix(prefix: str | None, src: Path) -> str:
    if prefix is None:
        name = re.sub(r"[^A-Za-z0-9_-]", "_", src.resolve().name).strip("_")
        return name or "shard"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise DataError(
            f"--prefix {prefix!r} may hold only letters, digits, '_' and '-'", fix="Choose a prefix like 'train'"
        )
    return prefix


def _folder_labels(tree: SourceTree, synsets: tuple[str, ...]) -> list[int]:
    index = {synset: label for label, synset in enumerate(synsets)}
    labels = []
    for image in tree.images:
        assert image.folder is not None, "an ImageFolder tree names each image's class folder"
        labels.append(index[image.folder])
    return labels


def _file_labels(
    tree: SourceTree, labels_path: Path, names: dict[str, str] | None, class_names: Path | None
) -> tuple[tuple[str, ...], list[int]]:
    """Class list and per-image labels of a flat directory, from --labels (and --class-names)."""
    entries = read_labels(labels_path)
    numeric = any(isinstance(value, int) for value, _ in entries.values())
    if numeric and names is None:
        raise DataError(
            "the labels file gives numeric labels, which need the class list",
            where=str(labels_path),
            fix="Add --class-names (e.g. ImageNet's LOC_synset_mapping.txt), or give synsets instead",
        )
    if names is not None:
        synsets = tuple(sorted(names))
    else:
        synsets = tuple(sorted({str(value) for value, _ in entries.values()}))  # all synsets: none is numeric
    index = {synset: label for label, synset in enumerate(synsets)}

    result, missing = [], []
    for image in tree.images:
        entry = entries.get(image_stem(image.relpath))
        if entry is None:
            missing.append(image.relpath)
            continue
        value, where = entry
        if isinstance(value, int):
            if value >= len(synsets):
                raise DataError(
                    f"label {value} is out of range for the {len(synsets)} classes of {class_names}",
                    where=where,
                    fix="Labels are 0-based indices into the sorted class list",
                )
            result.append(value)
        elif value not in index:
            raise DataError(
                f"synset {value!r} is not in the class-names file {class_names}",
                where=where,
                fix="Give the class-names file of this data set (ImageNet: LOC_synset_mapping.txt)",
            )
        else:
            result.append(index[value])
    if missing:
        raise DataError(
            f"{len(missing)} image(s) of SRC have no label in the labels file, e.g. {missing[0]!r}",
            where=str(labels_path),
            fix="Give the labels file that belongs to SRC",
        )
    return synsets, result


def _read_boxes(
    path: Path, images: tuple[SourceImage, ...], *, on_progress: ProgressFn | None, pool: WorkerPool | None
) -> dict[str, list[RawBox]]:
    """{image stem: raw boxes} for the images of SRC that have an annotation."""
    if path.is_dir():
        files = find_voc_files(path)
        wanted = sorted({image_stem(image.relpath) for image in images} & files.keys())
        chunks = [
            [(stem, str(files[stem])) for stem in wanted[i : i + _VOC_CHUNK]] for i in range(0, len(wanted), _VOC_CHUNK)
        ]
        found: dict[str, list[RawBox]] = {}
        results = pool.map(_read_voc_chunk, chunks) if pool is not None else map(_read_voc_chunk, chunks)
        for chunk in results:
            found.update(chunk)
            if on_progress is not None:
                on_progress("annotations", len(found), len(wanted))
        return found
    if path.is_file():
        return read_loc_csv(path)
    raise DataError(
        "--boxes does not exist",
        where=str(path),
        fix="Give a directory of PASCAL-VOC XML files or a LOC_*_solution.csv file",
    )


def _read_voc_chunk(chunk: list[tuple[str, str]]) -> dict[str, list[RawBox]]:
    return {stem: read_voc_xml(Path(path)) for stem, path in chunk}


def _map_boxes(
    raw: dict[str, list[RawBox]], index: dict[str, int], synsets: tuple[str, ...]
) -> dict[str, tuple[Box, ...]]:
    mapped = {}
    for stem in sorted(raw):
        boxes = []
        for box in raw[stem]:
            label = index.get(box.synset)
            if label is None:
                shown = ", ".join(synsets[:3]) + (", ..." if len(synsets) > 3 else "")
                raise DataError(
                    f"a box of class {box.synset!r} is not in the class map ({len(synsets)} classes: {shown})",
                    where=box.where,
                    fix="Give the box annotations of this data set, or add the class to SRC",
                )
            boxes.append((*box.bbox, label))
        mapped[stem] = tuple(boxes)
    return mapped


def _unique_key(stem: str, used: set[str]) -> str:
    """A webdataset-safe key (no '.' or '/') from the file stem, made unique with a suffix."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "sample"
    key, suffix = base, 2
    while key in used:
        key, suffix = f"{base}_{suffix}", suffix + 1
    used.add(key)
    return key


def _tar_bytes(size: int) -> int:
    return 512 + (size + 511) // 512 * 512


def _cut(
    samples: list[PlannedSample], *, shard_bytes: int | None, samples_per_shard: int | None, classes: tuple[str, ...]
) -> list[list[PlannedSample]]:
    if samples_per_shard is not None:
        return [samples[i : i + samples_per_shard] for i in range(0, len(samples), samples_per_shard)]
    assert shard_bytes is not None
    groups: list[list[PlannedSample]] = []
    current: list[PlannedSample] = []
    used = 0
    for sample in samples:
        # image + cls + json members (json: ~100 bytes + names + ~90 per box)
        json_size = 100 + len(sample.relpath) + 2 * len(classes[sample.label]) + 90 * len(sample.boxes or ())
        size = _tar_bytes(sample.size) + _tar_bytes(4) + _tar_bytes(json_size)
        if current and used + size > shard_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(sample)
        used += size
    if current:
        groups.append(current)
    return groups


def _digest(jobs: tuple[ShardJob, ...], settings: ShardSettings) -> str:
    digest = hashlib.sha256()
    header = {
        "sample_format": SAMPLE_FORMAT,
        "layout": settings.layout,
        "boxes": settings.boxes is not None,
        "classes": list(jobs[0].classes) if jobs else [],
        "synsets": list(jobs[0].synsets) if jobs else [],
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for job in jobs:
        digest.update(f"\n{job.name}".encode())
        for s in job.samples:
            digest.update(repr((s.relpath, s.size, s.key, s.label, s.boxes)).encode())
    return f"sha256:{digest.hexdigest()}"


def _str(path: Path | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())
