"""The images `flsl visualize` looks at: read, resized so the short side is about `--size` and
both sides are whole multiples of the patch size (the patch grid covers the image exactly), and
the query points mapped from the original pixels onto the resized image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flsl_cli.errors import FlslError

if TYPE_CHECKING:
    from PIL import Image

# default query points, as fractions (x, y) of the image: spread over it
DEFAULT_POINTS = ((0.5, 0.5), (0.25, 0.3), (0.75, 0.7))


@dataclass(frozen=True)
class PreparedImage:
    source: str
    pixels_hw3: np.ndarray  # uint8 RGB, resized; height and width are multiples of the patch size
    original_size: tuple[int, int]  # (width, height) as read
    points: tuple[tuple[int, int], ...]  # query points (x, y) in original pixels


def read_image(path: str | Path) -> Image.Image:
    """The image as an RGB PIL image, or a FlslError naming the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise FlslError(
            "the image does not exist" if not path.exists() else "the image is not a file",
            where=str(path),
            fix="Pass image files (JPEG, PNG, ...)",
        )
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlslError(
            f"cannot read the image ({reason})", where=str(path), fix="Pass an image file PIL can read (JPEG, PNG, ...)"
        ) from None


def resized_shape(*, width: int, height: int, size: int, patch: int) -> tuple[int, int]:
    """(width, height) with the short side near `size`, both sides whole multiples of `patch`."""
    scale = size / min(width, height)
    return (max(patch, round(width * scale / patch) * patch), max(patch, round(height * scale / patch) * patch))


def parse_points(values: list[str]) -> list[tuple[int, int]]:
    """`X,Y` strings as pixel coordinates."""
    points = []
    for value in values:
        parts = value.split(",")
        try:
            x, y = (int(part) for part in parts)
        except ValueError:
            raise FlslError(
                f"--points {value!r} is not of the form X,Y (whole pixel coordinates)", fix="Pass e.g. --points 120,80"
            ) from None
        points.append((x, y))
    return points


def prepare_image(path: str | Path, *, size: int, patch: int, points: list[tuple[int, int]]) -> PreparedImage:
    """Read and resize one image; every query point must lie inside it."""
    from PIL import Image

    image = read_image(path)
    width, height = image.size
    if not points:
        points = [(min(width - 1, int(fx * width)), min(height - 1, int(fy * height))) for fx, fy in DEFAULT_POINTS]
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            raise FlslError(
                f"the point {x},{y} lies outside the image ({width} x {height} pixels)",
                where=str(path),
                fix=f"Pass points with 0 <= X < {width} and 0 <= Y < {height}",
            )
    target = resized_shape(width=width, height=height, size=size, patch=patch)
    pixels = np.asarray(image.resize(target, Image.Resampling.BICUBIC), dtype=np.uint8)
    return PreparedImage(source=str(path), pixels_hw3=pixels, original_size=(width, height), points=tuple(points))


def point_token(image: PreparedImage, point: tuple[int, int], *, grid_hw: tuple[int, int]) -> tuple[int, int]:
    """The (row, column) of the token under an original-pixel point."""
    width, height = image.original_size
    rows, cols = grid_hw
    x, y = point
    return min(rows - 1, int(y * rows / height)), min(cols - 1, int(x * cols / width))
