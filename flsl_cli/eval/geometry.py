"""The k-NN evaluation's geometry: resize the shorter side, center crop, and the same transform
for boxes; a box split into grid x grid cells and the patch token under each cell's center.

The pixel transform follows torchvision's `Resize(shorter)` + `CenterCrop(crop)` exactly (the
longer side is truncated to whole pixels, the crop offset rounded). A box is mapped with the
scale factors the pixels actually got (`new_width / width`, `new_height / height`): one scale
for both axes up to the rounding of the longer side to whole pixels, never the released
script's separate `shorter / width`, `shorter / height` that squash non-square images.

Coordinates are continuous pixel coordinates: a box [x0, y0, x1, y1] covers x0 <= x < x1, so an
image of width W spans [0, W]. Token indices are row-major over the crop's token grid.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

BoxXYXY = tuple[float, float, float, float]


def resized_size(width: int, height: int, *, shorter: int) -> tuple[int, int]:
    """(new_width, new_height) with the shorter side equal to `shorter`, as torchvision's Resize."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


@dataclass(frozen=True)
class EvalGeometry:
    """Resize (shorter side) + center crop of one image of a given size."""

    width: int
    height: int
    resize: int
    crop: int

    @property
    def resized(self) -> tuple[int, int]:
        return resized_size(self.width, self.height, shorter=self.resize)

    @property
    def offset(self) -> tuple[int, int]:
        """(left, top) of the crop in the resized image, as torchvision's center_crop."""
        new_width, new_height = self.resized
        return int(round((new_width - self.crop) / 2.0)), int(round((new_height - self.crop) / 2.0))

    @property
    def scale(self) -> tuple[float, float]:
        new_width, new_height = self.resized
        return new_width / self.width, new_height / self.height

    def transform_image(self, image: Image.Image) -> Image.Image:
        """The crop x crop RGB image the model sees (bicubic resize, then center crop)."""
        assert image.size == (self.width, self.height), (image.size, self.width, self.height)
        left, top = self.offset
        resized = image.resize(self.resized, Image.Resampling.BICUBIC)
        return resized.crop((left, top, left + self.crop, top + self.crop))

    def map_box(self, box: BoxXYXY) -> BoxXYXY | None:
        """The box in crop coordinates, clipped to the crop; None if nothing of it is left."""
        scale_x, scale_y = self.scale
        left, top = self.offset
        x0, y0, x1, y1 = box
        x0, x1 = (_clip(x * scale_x - left, self.crop) for x in (x0, x1))
        y0, y1 = (_clip(y * scale_y - top, self.crop) for y in (y0, y1))
        if x1 <= x0 or y1 <= y0:
            return None
        return x0, y0, x1, y1


def _clip(value: float, size: int) -> float:
    return min(max(value, 0.0), float(size))


def box_area(box: BoxXYXY) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def largest_mapped_box(boxes: list[BoxXYXY], geometry: EvalGeometry) -> BoxXYXY | None:
    """The largest box after mapping and clipping to the crop (None if all fall outside it)."""
    mapped = [m for m in (geometry.map_box(box) for box in boxes) if m is not None]
    return max(mapped, key=box_area) if mapped else None


def cell_token_indices(box: BoxXYXY, *, grid: int, patch: int, crop: int) -> list[int]:
    """Row-major token index under the center of each of the box's grid x grid cells.

    The crop is a (crop / patch)^2 token grid; token (r, c) covers rows r*patch..(r+1)*patch.
    A center exactly on the crop's far edge belongs to the last token.
    """
    per_side = crop // patch
    x0, y0, x1, y1 = box
    cell_w, cell_h = (x1 - x0) / grid, (y1 - y0) / grid
    indices = []
    for row in range(grid):
        center_y = y0 + (row + 0.5) * cell_h
        token_row = min(int(center_y // patch), per_side - 1)
        for col in range(grid):
            center_x = x0 + (col + 0.5) * cell_w
            token_col = min(int(center_x // patch), per_side - 1)
            indices.append(token_row * per_side + token_col)
    return indices
