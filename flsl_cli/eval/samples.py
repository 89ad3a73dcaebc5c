"""Reading evaluation samples from webdataset shards: the split over ranks and loader workers,
labels and boxes from each sample's `json`, and the model input with its token indices.

A sample's `json` is `{"width", "height", "label", "boxes": [{"bbox": [x0, y0, x1, y1], "class"}]}`
(pixel xyxy, x1/y1 exclusive), as written by `flsl data demo` and `flsl data shards --boxes`;
the label may also come from `cls`. Boxes are in the pixels of the annotated image (its json
width/height, rescaled if the stored image has another size). In bbox mode the boxes of the image's own class are used
when the boxes say their class (on ImageNet every box is of the image's class; on the demo data
other objects share the image), otherwise all boxes; the largest after the crop is kept.
An image with no usable box is skipped and counted, never guessed. A shard that cannot be read
to its end stops the evaluation (numbers over part of a set would not be comparable).

Every sample gets an id, `(shard number << 32) | position in the shard`, so features gathered
from any number of processes can be put back in one order.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from flsl_cli.data.augment import decode_image
from flsl_cli.data.shards import IMAGE_FIELDS, BadShard, ShardSet, image_field, iter_samples, reader_slot
from flsl_cli.errors import DataError
from flsl_cli.eval.geometry import BoxXYXY, EvalGeometry, cell_token_indices, largest_mapped_box

SKIP_NO_BOXES = "no boxes"
SKIP_OUTSIDE_CROP = "boxes outside the crop"


@dataclass(frozen=True)
class SampleSettings:
    mode: str  # "bbox" or "global"
    grid: int
    resize: int
    crop: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class ReadPlan:
    """Which shards to read, and at most how many samples (the first, in shard order)."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    limit: int | None = None

    @classmethod
    def from_shards(cls, shards: ShardSet, *, limit: int | None = None) -> ReadPlan:
        return cls(
            urls=tuple(s.url for s in shards.shards), counts=tuple(s.samples for s in shards.shards), limit=limit
        )

    @property
    def num_samples(self) -> int:
        total = sum(self.counts)
        return total if self.limit is None else min(total, self.limit)

    def assignment(self, *, slot: int, slots: int) -> Iterator[tuple[int, int, str]]:
        """(shard number, position, url) of the samples reader `slot` of `slots` owns.

        With at least as many shards as readers each reader owns whole shards; otherwise every
        reader walks all shards and owns every slots-th sample.
        """
        offsets = np.concatenate([[0], np.cumsum(self.counts)]).tolist()
        by_shard = len(self.urls) >= slots
        for number, url in enumerate(self.urls):
            if by_shard and number % slots != slot:
                continue
            if self.limit is not None and offsets[number] >= self.limit:
                break
            yield number, offsets[number], url

    def expected(self, *, slot: int, slots: int) -> int:
        """Samples reader `slot` reads (for progress bars; from the shard counts)."""
        offsets = np.concatenate([[0], np.cumsum(self.counts)]).tolist()
        limit = self.num_samples
        if len(self.urls) >= slots:
            return sum(max(0, min(offsets[i + 1], limit) - offsets[i]) for i in range(slot, len(self.urls), slots))
        return len(range(slot, limit, slots))


def sample_id(shard_number: int, position: int) -> int:
    return (shard_number << 32) | position


def parse_annotation(fields: dict[str, bytes], *, where: str) -> tuple[int, list[BoxXYXY], tuple[int, int] | None]:
    """(label, boxes of the image's class (or all boxes), (width, height) if the json gives it)."""
    annotation: dict = {}
    if "json" in fields:
        try:
            annotation = json.loads(fields["json"])
            if not isinstance(annotation, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise DataError(
                f"the sample's json is unreadable ({exc})",
                where=where,
                fix="Regenerate the shards with `flsl data shards --boxes`",
            ) from None
    label: Any = annotation.get("label")
    if label is None and "cls" in fields:
        label = fields["cls"].decode("ascii", "replace").strip()
    try:
        label = int(label)
    except (TypeError, ValueError):
        raise DataError(
            f"the sample has no integer class label (json 'label' or 'cls'; found {label!r})",
            where=where,
            fix="Write shards whose samples carry their class as `cls` or json 'label'",
        ) from None
    try:
        entries = [
            (box["bbox"], box.get("class")) if isinstance(box, dict) else (box, None)
            for box in annotation.get("boxes") or []
        ]
        if any(len(bbox) != 4 for bbox, _ in entries):
            raise ValueError("a bbox is not [x0, y0, x1, y1]")
        boxes = [((float(x0), float(y0), float(x1), float(y1)), cls) for (x0, y0, x1, y1), cls in entries]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"the sample's boxes are malformed ({exc})",
            where=where,
            fix='Boxes are {"bbox": [x0, y0, x1, y1], "class": label} in pixels',
        ) from None
    names = {label, annotation.get("class_name")} - {None}
    own = [bbox for bbox, cls in boxes if cls in names]
    chosen = own if own else [bbox for bbox, _ in boxes]
    size = None
    if "width" in annotation and "height" in annotation:
        size = (int(annotation["width"]), int(annotation["height"]))
    return label, chosen, size


def prepare(fields: dict[str, bytes], *, settings: SampleSettings, where: str) -> dict:
    """One sample as the model input: label, image (3, crop, crop), token indices per cell (g),
    or `skip` with the reason."""
    label, boxes, size = parse_annotation(fields, where=where)
    if settings.mode == "bbox" and not boxes:
        return {"label": label, "skip": SKIP_NO_BOXES}
    field = image_field(fields)
    data = None if field is None else fields[field]
    if data is None:
        raise DataError(
            f"the sample has no image (looked for {', '.join(IMAGE_FIELDS)})",
            where=where,
            fix="Write shards with the image as .jpg or .png",
        )
    try:
        image = decode_image(data)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a damaged sample
        raise DataError(f"cannot decode the image ({exc})", where=where, fix="Regenerate the shards") from None
    geometry = EvalGeometry(width=image.width, height=image.height, resize=settings.resize, crop=settings.crop)
    cells: list[int] = []
    if settings.mode == "bbox":
        if size is not None and size != image.size:  # boxes are in the annotated image's pixels
            sx, sy = image.width / size[0], image.height / size[1]
            boxes = [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes]
        box = largest_mapped_box(boxes, geometry)
        if box is None:
            return {"label": label, "skip": SKIP_OUTSIDE_CROP}
        cells = cell_token_indices(box, grid=settings.grid, patch=settings.patch_size, crop=settings.crop)
    array = np.asarray(geometry.transform_image(image), dtype=np.float32) / 255.0
    normalized = (array - np.asarray(settings.mean, dtype=np.float32)) / np.asarray(settings.std, dtype=np.float32)
    pixels = torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))
    return {"label": label, "skip": None, "image": pixels, "cells": torch.tensor(cells, dtype=torch.int64)}


class EvalSamples(IterableDataset):
    """The samples this rank's readers own, prepared for the model (see `ReadPlan.assignment`)."""

    def __init__(self, plan: ReadPlan, *, rank: int, world_size: int, settings: SampleSettings) -> None:
        super().__init__()
        self.plan = plan
        self.rank = rank
        self.world_size = world_size
        self.settings = settings

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slots, slot = self.world_size * workers, reader_slot(rank=self.rank, worker=worker, workers=workers)
        by_shard = len(self.plan.urls) >= slots
        limit = self.plan.limit
        try:
            for number, offset, url in self.plan.assignment(slot=slot, slots=slots):
                for position, sample in enumerate(iter_samples(url, expected=self.plan.counts[number])):
                    if isinstance(sample, BadShard):  # a partial evaluation would not be comparable
                        raise DataError(
                            f"the shard could not be read to its end: {sample.reason}; {sample.samples} sample(s) lost",
                            where=url,
                            fix="Restore or regenerate the shard, then evaluate again",
                        )
                    key, fields = sample
                    if limit is not None and offset + position >= limit:
                        break
                    if not by_shard and (offset + position) % slots != slot:
                        continue
                    item = prepare(fields, settings=self.settings, where=f"{url} (sample {key})")
                    yield {"id": sample_id(number, position), **item}
        except DataError as exc:  # handed over as an item (it pickles intact): torch's loader re-raises
            yield {"error": exc}  # a worker's exception as text


def collate(items: list[dict]) -> dict:
    """A batch of prepared samples; skipped ones are only counted; a data error is passed on."""
    errors = [item["error"] for item in items if "error" in item]
    if errors:
        return {"error": errors[0]}
    kept = [item for item in items if item["skip"] is None]
    skipped = Counter(item["skip"] for item in items if item["skip"] is not None)
    if kept:
        images = torch.stack([item["image"] for item in kept])
        cells = torch.stack([item["cells"] for item in kept])
    else:
        images, cells = torch.zeros((0, 3, 1, 1)), torch.zeros((0, 0), dtype=torch.int64)
    return {
        "id": torch.tensor([item["id"] for item in kept], dtype=torch.int64),
        "label": torch.tensor([item["label"] for item in kept], dtype=torch.int64),
        "images": images,
        "cells": cells,
        "skipped": dict(skipped),
        "seen": len(items),
    }
