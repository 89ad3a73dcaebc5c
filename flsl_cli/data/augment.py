"""FLSL's asymmetric multi-crop augmentation (FLSL-method.md, "Views").

From one image: a teacher crop T of the image; a student global crop and local crops cut
**from the teacher crop** (so every student token has a counterpart in T); each view then gets
its own photometric augmentation. Crops are taken from the original pixels in one
crop-and-resize (bicubic), so a student view cut from T is never an upsampled copy of T.

All random choices come from a `numpy.random.Generator` the caller seeds per sample, so a
sample's views depend only on (seed, epoch, sample key): exact resume needs no worker RNG state.
The student views' query indices are drawn here too, from the same generator.
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
from flsl_cli.losses.queries import grid_query_indices

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
RATIO = (3.0 / 4.0, 4.0 / 3.0)

Box = tuple[float, float, float, float]  # left, top, width, height


def sample_crop(width: float, height: float, *, scale: tuple[float, float], rng: np.random.Generator) -> Box:
    """RandomResizedCrop's box sampling (area fraction in `scale`, aspect ratio in 3/4..4/3)."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            return float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), w, h
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, width / RATIO[0]
    elif ratio > RATIO[1]:
        w, h = height * RATIO[1], height
    else:
        w, h = width, height
    return (width - w) / 2, (height - h) / 2, w, h


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def open_image(data: bytes) -> Image.Image:
    """The image with only its header read: size known, pixels not decoded yet."""
    return Image.open(io.BytesIO(data))


def crop_resize(image: Image.Image, box: Box, size: int) -> Image.Image:
    left, top, w, h = box
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))


@dataclass(frozen=True)
class CropPlan:
    """Where each view is cut from, in the original image's pixels."""

    teacher: Box
    student: Box
    locals_: tuple[Box, ...]


def decode_for(image: Image.Image, plan: CropPlan, *, global_size: int, local_size: int) -> tuple[Image.Image, float]:
    """Decode the pixels, at reduced resolution when every view still gets at least as many source
    pixels as it outputs (JPEG draft mode: scaling in the DCT, 2-8x less decoding work).
    Returns the RGB image and its scale relative to the original."""
    width, height = image.size
    needed = max(size / min(box[2], box[3])
                 for box, size in [(plan.teacher, global_size), (plan.student, global_size),
                                   *[(box, local_size) for box in plan.locals_]])
    if image.format == "JPEG" and needed <= 0.5:
        image.draft("RGB", (math.ceil(width * needed), math.ceil(height * needed)))
    rgb = image.convert("RGB")
    return rgb, rgb.width / width


@dataclass(frozen=True)
class MultiCropAugment:
    """Makes the teacher view, the student global view and the local views of one image."""

    recipe: Recipe

    def __call__(self, image: Image.Image, *, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        plan = self.plan(image.size, rng=rng)
        aug = self.recipe.augment
        decoded, scale = decode_for(image, plan, global_size=aug.global_size, local_size=aug.local_size)
        return self.render(decoded, plan, scale=scale, rng=rng)

    def plan(self, size: tuple[int, int], *, rng: np.random.Generator) -> CropPlan:
        aug = self.recipe.augment
        width, height = size
        teacher = sample_crop(width, height, scale=aug.teacher_scale, rng=rng)

        def inside_teacher(scale: tuple[float, float]) -> Box:
            left, top, w, h = sample_crop(teacher[2], teacher[3], scale=scale, rng=rng)
            return teacher[0] + left, teacher[1] + top, w, h

        student = inside_teacher(aug.student_scale)
        return CropPlan(teacher=teacher, student=student,
                        locals_=tuple(inside_teacher(aug.local_scale) for _ in range(aug.local_crops)))

    def render(self, image: Image.Image, plan: CropPlan, *, scale: float, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        aug = self.recipe.augment
        patch = self.recipe.model.patch_size

        def cut(box: Box, size: int) -> Image.Image:
            return self._photometric(crop_resize(image, tuple(v * scale for v in box), size), rng)

        teacher = cut(plan.teacher, aug.global_size)
        student = cut(plan.student, aug.global_size)
        locals_ = [cut(box, aug.local_size) for box in plan.locals_]

        views = {
            "teacher": to_tensor(teacher),
            "global": to_tensor(student),
            "global_queries": torch.from_numpy(grid_query_indices(
                grid=aug.global_size // patch, window=self.recipe.loss.query_window_global, rng=rng)),
        }
        if locals_:
            views["locals"] = torch.stack([to_tensor(view) for view in locals_])
            views["local_queries"] = torch.from_numpy(np.stack([
                grid_query_indices(grid=aug.local_size // patch, window=self.recipe.loss.query_window_local, rng=rng)
                for _ in locals_
            ]))
        return views

    def _photometric(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        aug = self.recipe.augment
        if rng.random() < aug.color_jitter_p:
            image = color_jitter(image, rng=rng, brightness=aug.brightness, contrast=aug.contrast,
                                 saturation=aug.saturation, hue=aug.hue)
        if rng.random() < aug.grayscale_p:
            image = image.convert("L").convert("RGB")
        if rng.random() < aug.blur_branch_p:
            blur_p, solarize_p = aug.blur_p, 0.0
        else:
            blur_p, solarize_p = aug.alt_blur_p, aug.solarize_p
        if rng.random() < blur_p:
            image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*aug.blur_radius))))
        if rng.random() < solarize_p:
            image = ImageOps.solarize(image, threshold=128)
        return image


def color_jitter(image: Image.Image, *, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float) -> Image.Image:
    """torchvision's ColorJitter (random order of the four adjustments), driven by `rng`."""
    ops = []
    if brightness > 0:
        ops.append((TF.adjust_brightness, rng.uniform(max(0.0, 1 - brightness), 1 + brightness)))
    if contrast > 0:
        ops.append((TF.adjust_contrast, rng.uniform(max(0.0, 1 - contrast), 1 + contrast)))
    if saturation > 0:
        ops.append((TF.adjust_saturation, rng.uniform(max(0.0, 1 - saturation), 1 + saturation)))
    if hue > 0:
        ops.append((TF.adjust_hue, rng.uniform(-hue, hue)))
    for index in rng.permutation(len(ops)):
        op, factor = ops[index]
        image = op(image, float(factor))
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> normalized float tensor (3, H, W)."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
