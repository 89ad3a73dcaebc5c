"""FLSL's asymmetric multi-crop augmentation (FLSL-method.md, "Views"), made with PIL.

From one image: a teacher crop T of the image; a student global crop and local crops cut
**from the teacher crop** (so every student token has a counterpart in T); each view then gets
its own photometric augmentation. Crops are taken from the original pixels in one
crop-and-resize (bicubic), so a student view cut from T is never an upsampled copy of T.

Every random choice is drawn into a plan (`view_plan.py`) from a `numpy.random.Generator` the
caller seeds per sample, so a sample's views depend only on (seed, epoch, sample key): exact
resume needs no worker RNG state. This module is the plan's PIL executor; `device_views.py`
carries out the same plan with batched tensor ops.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from flsl_cli.config.schema import Recipe
from flsl_cli.data.normalize import normalized_tensor
from flsl_cli.data.view_plan import (
    RATIO,
    Box,
    CropPlan,
    Photometric,
    SamplePlan,
    complete_plan,
    draw_crops,
    sample_crop,
)

__all__ = ["RATIO", "Box", "CropPlan", "MultiCropAugment", "sample_crop"]


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def open_image(data: bytes) -> Image.Image:
    """The image with only its header read: size known, pixels not decoded yet."""
    return Image.open(io.BytesIO(data))


Scale = tuple[float, float]  # decoded pixels per original pixel, across and down


def crop_resize(image: Image.Image, box: Box, size: int, *, scale: Scale = (1.0, 1.0)) -> Image.Image:
    """The `box` of the original image (left, top, width, height in its pixels), resized to a
    square of `size`, from `image` decoded at `scale` of the original size."""
    left, top, w, h = box
    sx, sy = scale
    edges = (left * sx, top * sy, min((left + w) * sx, image.width), min((top + h) * sy, image.height))
    return image.resize((size, size), Image.Resampling.BICUBIC, box=edges)


def decode_for(image: Image.Image, plan: CropPlan, *, global_size: int, local_size: int) -> tuple[Image.Image, Scale]:
    """Decode the pixels, at reduced resolution when every view still gets at least as many source
    pixels as it outputs (JPEG draft mode: scaling in the DCT, 2-8x less decoding work).
    Returns the RGB image and its scale relative to the original, per axis: the decoder rounds
    each side up on its own (2001 x 1500 at 1/4 is 501 x 375)."""
    width, height = image.size
    needed = max(
        size / min(box[2], box[3])
        for box, size in [
            (plan.teacher, global_size),
            (plan.student, global_size),
            *[(box, local_size) for box in plan.locals_],
        ]
    )
    if image.format == "JPEG" and needed <= 0.5:
        image.draft("RGB", (math.ceil(width * needed), math.ceil(height * needed)))
    rgb = image.convert("RGB")
    return rgb, (rgb.width / width, rgb.height / height)


@dataclass(frozen=True)
class MultiCropAugment:
    """Makes the teacher view, the student global view and the local views of one image."""

    recipe: Recipe

    def __call__(self, image: Image.Image, *, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        crops = self.plan(image.size, rng=rng)
        aug = self.recipe.augment
        decoded, scale = decode_for(image, crops, global_size=aug.global_size, local_size=aug.local_size)
        return self.render(decoded, crops, scale=scale, rng=rng)

    def plan(self, size: tuple[int, int], *, rng: np.random.Generator) -> CropPlan:
        """The crop boxes, the first draws of a sample's plan."""
        return draw_crops(self.recipe.augment, size, rng=rng)

    def render(
        self, image: Image.Image, crops: CropPlan, *, scale: Scale, rng: np.random.Generator
    ) -> dict[str, torch.Tensor]:
        """Draw the rest of the plan, then make the views."""
        return self.execute(image, complete_plan(self.recipe, crops, rng=rng), scale=scale)

    def execute(self, image: Image.Image, plan: SamplePlan, *, scale: Scale) -> dict[str, torch.Tensor]:
        """The views of `plan` from `image`, decoded at `scale` of the original size."""
        aug = self.recipe.augment
        sizes = [aug.global_size, aug.global_size] + [aug.local_size] * len(plan.crops.locals_)
        views = [
            photometric(crop_resize(image, box, size, scale=scale), choice)
            for box, size, choice in zip(plan.crops.boxes, sizes, plan.photometric)
        ]
        made = {
            "teacher": to_tensor(views[0]),
            "global": to_tensor(views[1]),
            "global_queries": torch.from_numpy(plan.global_queries),
        }
        if plan.local_queries is not None:
            made["locals"] = torch.stack([to_tensor(view) for view in views[2:]])
            made["local_queries"] = torch.from_numpy(plan.local_queries)
        return made


_PIL_JITTER = {
    "brightness": TF.adjust_brightness,
    "contrast": TF.adjust_contrast,
    "saturation": TF.adjust_saturation,
    "hue": TF.adjust_hue,
}


def photometric(image: Image.Image, choice: Photometric) -> Image.Image:
    """One view's photometric augmentation with PIL (torchvision's ColorJitter ops)."""
    for name, factor in choice.jitter:
        image = _PIL_JITTER[name](image, factor)
    if choice.grayscale:
        image = image.convert("L").convert("RGB")
    if choice.blur_sigma is not None:
        image = image.filter(ImageFilter.GaussianBlur(radius=choice.blur_sigma))
    if choice.solarize:
        image = ImageOps.solarize(image, threshold=128)
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> normalized float tensor (3, H, W)."""
    return normalized_tensor(image)
