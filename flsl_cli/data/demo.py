"""The built-in demo dataset: procedurally generated images of textured shapes on clutter.

It lets a user try the whole tool without ImageNet. `write_demo_dataset` draws small RGB
images, each holding one to three objects on a cluttered background, and stores them as
webdataset shards (see `flsl_cli.data.shard_writer`):

    out_dir/
      dataset.json            what was generated: classes, counts, seed, image size
      train/index.json        shard list of the training split
      train/demo-train-000000.tar ...
      val/index.json
      val/demo-val-000000.tar ...

Every object class has a fixed shape *and* its own surface texture (a striped square, a dotted
triangle, a checkered cross, ...), with random colours, size (15%-60% of the image side),
position and a small rotation per instance. Backgrounds are random colour gradients with
low-frequency blotches, noise, thin lines and small blobs, so a model has to tell objects from
background to learn useful dense features.

Each sample has `jpg` (JPEG, quality 90), `cls` (ASCII label: the class of the largest object
by box area) and `json` (image size, label and tight pixel xyxy boxes; x1/y1 are exclusive).
Output is byte-for-byte deterministic for a given seed and settings: every image gets its own
random generator seeded from (seed, index), so the result does not depend on generation order.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pydantic import ValidationError

from flsl_cli import storage
from flsl_cli.config.load import validation_problems
from flsl_cli.config.schema import DemoDataConfig
from flsl_cli.data.shard_writer import ShardWriter
from flsl_cli.errors import DataError

DEMO_VERSION = "demo/1"
DEMO_CLASSES: tuple[str, ...] = ("disc", "square", "triangle", "ring", "cross", "star", "hexagon")
# Surface pattern of each class, in DEMO_CLASSES order.
DEMO_TEXTURES: tuple[str, ...] = ("solid", "stripes", "dots", "segments", "checker", "diagonal", "grid")

MIN_TRAIN_SHARDS = 4  # 2 processes x 2 data workers in the tests: every reader slot needs a shard
_MIN_OBJECT_FRACTION = 0.15
_MAX_OBJECT_FRACTION = 0.60
_MAX_OVERLAP = 0.3  # share of the smaller object's box another object may cover
_SUPERSAMPLE = 2  # shape masks are drawn at 2x and averaged down for smooth edges
_SPLIT_STREAM = 1  # seed-sequence tags that keep the split and image streams independent
_IMAGE_STREAM = 2


@dataclass(frozen=True)
class _Placement:
    class_index: int
    x0: float
    y0: float
    side: float


def write_demo_dataset(
    out_dir: Path,
    *,
    images: int = 2000,
    seed: int = 0,
    image_size: int = 96,
    val_fraction: float = 0.2,
    samples_per_shard: int = 100,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Generate the demo dataset into `out_dir` (which must not exist or be empty).

    The dataset is built in a hidden sibling directory and renamed into place only when
    complete. `val_fraction` of the images (rounded; at least one image stays in train) go to
    the val split. If the train split would get fewer than 4 shards, its shards are made smaller
    so it gets at least 4 (when it holds at least 4 images). `on_progress(done, total)` is called
    after each image. Returns the contents of `out_dir/dataset.json`.
    """
    out_dir = Path(out_dir)
    _remove_abandoned(out_dir)
    _check_settings(out_dir, images, seed, image_size, val_fraction, samples_per_shard)
    _refuse_existing(out_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    try:
        tmp_dir.mkdir()
        info = _write_splits(
            tmp_dir,
            images=images,
            seed=seed,
            image_size=image_size,
            val_fraction=val_fraction,
            samples_per_shard=samples_per_shard,
            on_progress=on_progress,
        )
        storage.write_json_atomic(tmp_dir / "dataset.json", info, indent=2)
        _move_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return info


def render_demo_sample(index: int, *, seed: int = 0, image_size: int = 96) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw image `index` of the dataset with `seed`: an HxWx3 uint8 array and its annotation."""
    rng = np.random.default_rng([seed, _IMAGE_STREAM, index])
    return _render_image(rng, image_size)


# -- dataset layout -----------------------------------------------------------------------------


def _check_settings(
    out_dir: Path, images: int, seed: int, image_size: int, val_fraction: float, samples_per_shard: int
) -> None:
    problems = []
    try:  # the limits of a recipe's data.demo section
        DemoDataConfig(images=images, seed=seed, image_size=image_size)
    except ValidationError as exc:
        problems += validation_problems(exc, section=("data", "demo"))
    if not 0.0 <= val_fraction < 1.0:
        problems.append(f"val_fraction must be in [0, 1) (got {val_fraction})")
    if samples_per_shard < 1:
        problems.append(f"samples_per_shard must be at least 1 (got {samples_per_shard})")
    if problems:
        raise DataError(
            "invalid demo dataset settings: " + "; ".join(problems),
            where=str(out_dir),
            fix="Change the demo dataset options",
        )


def _refuse_existing(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(
            "the output path exists and is not a directory",
            where=str(out_dir),
            fix="Choose another output path",
        )
    if any(out_dir.iterdir()):
        raise DataError(
            "the output directory already exists and is not empty; refusing to overwrite it",
            where=str(out_dir),
            fix="Choose a new output directory or delete the existing one first",
        )


def _remove_abandoned(out_dir: Path) -> None:
    """Remove the build folders (`.NAME.tmp-PID`) of generations into `out_dir` that were killed
    before they could clean up; one whose process still runs is left to it."""
    for leftover in storage.abandoned_temp_files(out_dir.parent):
        if leftover.name.startswith(f".{out_dir.name}.tmp-"):
            shutil.rmtree(leftover, ignore_errors=True)


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    try:
        os.replace(tmp_dir, out_dir)  # an existing empty directory is replaced atomically
    except OSError as err:
        raise DataError(
            f"could not move the finished dataset into place ({err.strerror or err})",
            where=str(out_dir),
            fix="Make sure nothing else writes to this directory and that it is empty, then retry",
        ) from err


def _split_val_indices(images: int, seed: int, val_fraction: float) -> set[int]:
    n_val = min(int(round(images * val_fraction)), images - 1)
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    return {int(i) for i in rng.permutation(images)[:n_val]}


def _train_samples_per_shard(n_train: int, samples_per_shard: int) -> int:
    if math.ceil(n_train / samples_per_shard) < MIN_TRAIN_SHARDS and n_train >= MIN_TRAIN_SHARDS:
        return n_train // MIN_TRAIN_SHARDS  # ceil(n / (n // 4)) >= 4
    return samples_per_shard


def _write_splits(
    root: Path,
    *,
    images: int,
    seed: int,
    image_size: int,
    val_fraction: float,
    samples_per_shard: int,
    on_progress: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    val_indices = _split_val_indices(images, seed, val_fraction)
    n_val = len(val_indices)
    n_train = images - n_val
    shard_sizes = {
        "train": _train_samples_per_shard(n_train, samples_per_shard),
        "val": samples_per_shard,
    }
    classes = list(DEMO_CLASSES)
    class_counts = {split: [0] * len(classes) for split in shard_sizes}

    def split_writer(split: str) -> ShardWriter:
        meta = {"dataset": DEMO_VERSION, "split": split, "seed": seed, "image_size": image_size}
        return ShardWriter(
            root / split,
            prefix=f"demo-{split}",
            samples_per_shard=shard_sizes[split],
            classes=classes,
            meta=meta,
        )

    with split_writer("train") as train_writer, split_writer("val") as val_writer:
        writers = {"train": train_writer, "val": val_writer}
        for index in range(images):
            split = "val" if index in val_indices else "train"
            image, annotation = render_demo_sample(index, seed=seed, image_size=image_size)
            writers[split].write(f"{split}-{index:07d}", _encode_sample(image, annotation))
            class_counts[split][annotation["label"]] += 1
            if on_progress is not None:
                on_progress(index + 1, images)

    splits = {
        split: {
            "path": split,
            "num_samples": writers[split].num_samples,
            "num_shards": len(writers[split].shards),
            "samples_per_shard": shard_sizes[split],
            "class_counts": class_counts[split],
        }
        for split in ("train", "val")
    }
    return {
        "version": DEMO_VERSION,
        "classes": classes,
        "textures": list(DEMO_TEXTURES),
        "num_classes": len(classes),
        "num_images": images,
        "seed": seed,
        "image_size": image_size,
        "val_fraction": val_fraction,
        "splits": splits,
    }


def _encode_sample(image: np.ndarray, annotation: dict[str, Any]) -> dict[str, bytes]:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="JPEG", quality=90)
    return {
        "jpg": buffer.getvalue(),
        "cls": str(annotation["label"]).encode("ascii"),
        "json": json.dumps(annotation, separators=(",", ":")).encode("utf-8"),
    }


# -- drawing ------------------------------------------------------------------------------------


def _render_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    canvas = _background(rng, size)
    background_mean = canvas.reshape(-1, 3).mean(axis=0)
    boxes: list[dict[str, Any]] = []
    for placement in _place_objects(rng, size):
        alpha = _shape_alpha(rng, placement, size)
        box = _tight_box(alpha)
        if box is None:  # cannot happen for the sizes used, but never emit an empty box
            continue
        pattern = _texture(rng, placement, size)
        primary = _distinct_colour(rng, background_mean, min_distance=110.0)
        secondary = _distinct_colour(rng, primary, min_distance=120.0)
        colour = primary + (secondary - primary) * pattern[..., None]
        canvas += (colour - canvas) * alpha[..., None]
        name = DEMO_CLASSES[placement.class_index]
        boxes.append({"bbox": box, "class": placement.class_index, "name": name})

    canvas += _noise(rng, canvas.shape, sigma=rng.uniform(1.5, 4.0))
    image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)

    areas = [(b["bbox"][2] - b["bbox"][0]) * (b["bbox"][3] - b["bbox"][1]) for b in boxes]
    label = boxes[int(np.argmax(areas))]["class"]
    annotation = {
        "width": size,
        "height": size,
        "label": label,
        "class_name": DEMO_CLASSES[label],
        "boxes": boxes,
    }
    return image, annotation


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (ys, xs) of a size x size image, read-only."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    ys.flags.writeable = False
    xs.flags.writeable = False
    return ys, xs


def _noise(rng: np.random.Generator, shape: tuple[int, ...], *, sigma: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _distinct_colour(rng: np.random.Generator, other: np.ndarray, *, min_distance: float) -> np.ndarray:
    """A random colour at least `min_distance` (RGB L2) from `other`, or the farthest of 12 tries."""
    best, best_distance = None, -1.0
    for _ in range(12):
        colour = _random_colour(rng)
        distance = float(np.linalg.norm(colour - other))
        if distance >= min_distance:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    assert best is not None
    return best


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient + blotches + noise, with thin lines and small blobs of clutter; float32 HxWx3."""
    ys, xs = _pixel_grid(size)
    start, end = _random_colour(rng), _random_colour(rng)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ramp = (xs * math.cos(angle) + ys * math.sin(angle)) / size
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    canvas = start + (end - start) * ramp[..., None]

    cells = int(rng.integers(3, 7))
    coarse = rng.normal(0.0, 28.0, (cells, cells, 3))
    blotches = Image.fromarray(np.clip(coarse + 128.0, 0, 255).astype(np.uint8), mode="RGB")
    blotches = blotches.resize((size, size), Image.Resampling.BICUBIC)
    canvas += np.asarray(blotches, dtype=np.float32) - 128.0
    canvas += _noise(rng, canvas.shape, sigma=rng.uniform(3.0, 10.0))

    clutter = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(-0.1 * size, 1.1 * size, 4))
        width = 1 if rng.random() < 0.7 else 2
        draw.line([(x0, y0), (x1, y1)], fill=_fill(rng), width=width)
    for _ in range(int(rng.integers(3, 9))):
        cx, cy = (float(v) for v in rng.uniform(0.0, size, 2))
        rx, ry = (float(v) for v in rng.uniform(0.01, 0.035, 2) * size)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=_fill(rng))
    return np.asarray(clutter, dtype=np.float32).copy()


def _fill(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(0, 256, 3))
    return (r, g, b)


def _place_objects(rng: np.random.Generator, size: int) -> list[_Placement]:
    """1-3 square object boxes, largest first, each covered at most 30% by any other."""
    count = int(rng.integers(1, 4))
    fractions = np.sort(rng.uniform(_MIN_OBJECT_FRACTION, _MAX_OBJECT_FRACTION, count))[::-1]
    class_indices = rng.integers(0, len(DEMO_CLASSES), count)
    min_side = _MIN_OBJECT_FRACTION * size
    placed: list[_Placement] = []
    for fraction, class_index in zip(fractions, class_indices):
        side = float(fraction) * size
        for attempt in range(30):
            if attempt and attempt % 10 == 0:
                side = max(side * 0.8, min_side)
            x0, y0 = (float(v) for v in rng.uniform(0.0, size - side, 2))
            candidate = _Placement(int(class_index), x0, y0, side)
            if all(_overlap_share(candidate, other) <= _MAX_OVERLAP for other in placed):
                placed.append(candidate)
                break
    return placed


def _overlap_share(a: _Placement, b: _Placement) -> float:
    """Intersection area of the two boxes over the smaller box's area."""
    dx = min(a.x0 + a.side, b.x0 + b.side) - max(a.x0, b.x0)
    dy = min(a.y0 + a.side, b.y0 + b.side) - max(a.y0, b.y0)
    if dx <= 0 or dy <= 0:
        return 0.0
    return dx * dy / min(a.side, b.side) ** 2


def _shape_alpha(rng: np.random.Generator, placement: _Placement, size: int) -> np.ndarray:
    """Coverage (0..1, float32 HxW) of the placement's shape, fitted into its square box."""
    scale = _SUPERSAMPLE
    mask = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0 = placement.x0 * scale, placement.y0 * scale
    x1, y1 = x0 + placement.side * scale, y0 + placement.side * scale
    name = DEMO_CLASSES[placement.class_index]
    if name == "disc":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif name == "ring":
        draw.ellipse([x0, y0, x1, y1], fill=255)
        inset = (x1 - x0) * rng.uniform(0.22, 0.3)
        draw.ellipse([x0 + inset, y0 + inset, x1 - inset, y1 - inset], fill=0)
    else:
        points = _fit_to_box(_unit_outline(rng, name), x0, y0, x1 - x0)
        draw.polygon(points, fill=255)
    small = mask.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _unit_outline(rng: np.random.Generator, name: str) -> np.ndarray:
    """Polygon outline (N x 2) of a shape around the origin, with a small random rotation."""
    jitter = math.radians(rng.uniform(-15.0, 15.0))
    if name == "square":
        points = _regular_polygon(4, math.pi / 4)
    elif name == "triangle":
        points = _regular_polygon(3, -math.pi / 2)
    elif name == "hexagon":
        points = _regular_polygon(6, 0.0)
    elif name == "star":
        outer = _regular_polygon(5, -math.pi / 2)
        inner = 0.45 * _regular_polygon(5, -math.pi / 2 + math.pi / 5)
        points = np.stack([outer, inner], axis=1).reshape(-1, 2)
    elif name == "cross":
        a, b = 0.18, 0.5  # arm half-width, arm length
        points = np.array(
            [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
             (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
        )  # fmt: skip
    else:
        raise ValueError(f"no outline for shape {name!r}")
    rotation = np.array([[math.cos(jitter), -math.sin(jitter)], [math.sin(jitter), math.cos(jitter)]])
    return points @ rotation.T


def _regular_polygon(corners: int, start_angle: float) -> np.ndarray:
    angles = start_angle + 2.0 * math.pi * np.arange(corners) / corners
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _fit_to_box(points: np.ndarray, x0: float, y0: float, side: float) -> list[tuple[float, float]]:
    """Scale and centre `points` so their extent just fits the square box (aspect kept)."""
    low, high = points.min(axis=0), points.max(axis=0)
    extent = high - low
    scaled = (points - (low + high) / 2.0) * (side / float(extent.max()))
    centre = np.array([x0 + side / 2.0, y0 + side / 2.0])
    return [(float(x), float(y)) for x, y in scaled + centre]


def _tight_box(alpha: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1] (x1, y1 exclusive) around all pixels the shape touches."""
    columns = np.flatnonzero(alpha.max(axis=0) > 0.0)
    rows = np.flatnonzero(alpha.max(axis=1) > 0.0)
    if columns.size == 0 or rows.size == 0:
        return None
    return [int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1]


def _texture(rng: np.random.Generator, placement: _Placement, size: int) -> np.ndarray:
    """Secondary-colour weight (0..1, float32 HxW) of the class's surface pattern."""
    ys, xs = _pixel_grid(size)
    u = xs - (placement.x0 + placement.side / 2.0)
    v = ys - (placement.y0 + placement.side / 2.0)
    period = max(3.0, placement.side / rng.uniform(4.5, 7.0))
    phase_u, phase_v = (float(p) for p in rng.uniform(0.0, period, 2))
    kind = DEMO_TEXTURES[placement.class_index]
    pattern: np.ndarray
    if kind == "solid":
        pattern = np.zeros_like(u)
    elif kind == "stripes":
        pattern = np.floor((v + phase_v) / period) % 2
    elif kind == "dots":
        du = (u + phase_u) % period - period / 2.0
        dv = (v + phase_v) % period - period / 2.0
        pattern = (du * du + dv * dv) < (0.3 * period) ** 2
    elif kind == "segments":
        pattern = np.floor((np.arctan2(v, u) + math.pi) / (math.pi / 4.0)) % 2
    elif kind == "checker":
        pattern = (np.floor((u + phase_u) / period) + np.floor((v + phase_v) / period)) % 2
    elif kind == "diagonal":
        pattern = np.floor((u + v + phase_u) / (period * 0.75)) % 2
    elif kind == "grid":
        line = max(1.0, 0.3 * period)
        pattern = ((u + phase_u) % period < line) | ((v + phase_v) % period < line)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return pattern.astype(np.float32)
