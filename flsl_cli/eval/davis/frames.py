"""Frames and masks of a DAVIS sequence as the propagation needs them: the size the model sees,
the normalised frame tensor, the first mask's one-hot labels on the token grid, and the id maps
of the annotations (palette PNGs).

Sizes follow DINO's `read_frame`/`read_seg`: the short side becomes `short_side` (480) and the
long side keeps the aspect ratio, floored to a multiple of 64 pixels (854 x 480 -> 832 x 480).
Unlike DINO: (1) frame and mask get the same size from one rule (DINO's two functions test the
orientation differently, so a square frame and its mask get transposed sizes), (2) the long side
is never made shorter than the short one, and (3) both sides are then floored to a multiple of
the patch size, so the token grid covers the frame exactly (DINO leaves a 480 px side for any
patch size; with patch 14 the last 4 pixels get no token and the upsampled masks are 4 px short
before the final resize). For patch 8 and 16 the sizes are DINO's.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flsl_cli import storage
from flsl_cli.errors import DataError

LONG_SIDE_MULTIPLE = 64  # DINO floors the long side to a multiple of 64


def model_size(height: int, width: int, *, short_side: int, patch: int) -> tuple[int, int]:
    """(height, width) in pixels of a frame of `height` x `width` as the model sees it."""
    short, long = min(height, width), max(height, width)
    scaled_long = max(short_side, math.floor(short_side * long / short / LONG_SIDE_MULTIPLE) * LONG_SIDE_MULTIPLE)
    side_short = short_side // patch * patch
    side_long = scaled_long // patch * patch
    return (side_long, side_short) if height > width else (side_short, side_long)


def read_image(url: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(storage.read_bytes(url)))
        image.load()
    except FileNotFoundError:
        raise DataError("the file does not exist", where=url, fix="Check the DAVIS folder") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot read the image ({str(exc).strip() or type(exc).__name__})",
            where=url,
            fix="Replace the damaged file with the one from the DAVIS 2017 download",
        ) from None
    return image


def frame_tensor(
    image: Image.Image, *, size_hw: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """(3, h, w) float frame: RGB, resized bilinearly (half-pixel centres, no antialiasing, as
    OpenCV's INTER_LINEAR that DINO uses), scaled to [0, 1] and normalised."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float()
    if tuple(pixels.shape[1:]) != tuple(size_hw):
        pixels = F.interpolate(pixels[None], size=size_hw, mode="bilinear", align_corners=False, antialias=False)[0]
    pixels = pixels / 255.0
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def mask_ids(image: Image.Image, *, url: str) -> np.ndarray:
    """(h, w) uint8 object ids of an annotation: a palette PNG (or a single-channel one)."""
    if image.mode not in ("P", "L"):
        raise DataError(
            f"the annotation is a {image.mode} image, not a palette PNG of object ids",
            where=url,
            fix="Use the DAVIS 2017 annotations (indexed PNGs: 0 background, 1..N objects)",
        )
    return np.array(image, dtype=np.uint8)


def first_mask_palette(image: Image.Image, *, url: str) -> list[int]:
    """The palette of the first annotation, which the predicted PNGs are written with."""
    palette = image.getpalette() if image.mode == "P" else None
    if not palette:
        raise DataError(
            "the first frame's annotation is not a palette PNG",
            where=url,
            fix="Use the DAVIS 2017 annotations (indexed PNGs with the DAVIS palette)",
        )
    return palette


def grid_labels(ids_hw: np.ndarray, *, grid_hw: tuple[int, int], channels: int) -> torch.Tensor:
    """(h x w tokens, channels) one-hot labels of the first mask on the token grid: the mask
    resized straight to the grid by nearest neighbour (PIL's, as DINO's `read_seg`); void (255)
    counts as background."""
    small = np.asarray(Image.fromarray(ids_hw).resize((grid_hw[1], grid_hw[0]), Image.Resampling.NEAREST)).astype(
        np.int64
    )
    small[small >= channels] = 0
    return F.one_hot(torch.from_numpy(small).reshape(-1), channels).float()


def to_original_size(ids_hw: torch.Tensor, *, size_hw: tuple[int, int]) -> np.ndarray:
    """Predicted ids (model size) resized to the annotation's size by nearest neighbour (PIL's,
    as DINO's)."""
    small = Image.fromarray(ids_hw.to(torch.uint8).cpu().numpy())
    return np.array(small.resize((size_hw[1], size_hw[0]), Image.Resampling.NEAREST))


def write_palette_png(ids_hw: np.ndarray, *, palette: list[int]) -> bytes:
    """An indexed PNG of object ids with `palette`, as DAVIS's annotations are written."""
    ids_hw = np.ascontiguousarray(ids_hw, dtype=np.uint8)
    image = Image.frombytes("P", (ids_hw.shape[1], ids_hw.shape[0]), ids_hw.tobytes())
    image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
