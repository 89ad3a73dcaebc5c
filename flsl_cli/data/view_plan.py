"""The random plan of one sample's views: every random draw of the multi-crop augmentation.

A plan holds where each view is cut from (boxes in the original image's pixels), each view's
photometric choices (colour-jitter factors and order, grayscale, blur sigma, solarize) and the
student views' query indices. It is drawn from the per-sample generator in one fixed order
(crop boxes; then per view, in the order teacher, student, locals, its photometric choices; then
the query indices), so a sample's views depend only on (seed, epoch, key), whichever executor
makes the pixels: PIL in the data workers (`augment.py`) or batched tensor ops in the training
process (`device_views.py`).

The student and local boxes are drawn in the teacher view's coordinates (the teacher crop
resized to global_size x global_size: area fraction and aspect ratio 3/4..4/3 hold there), then
mapped back to the original pixels, so every view is still cut from the original image in one
crop-and-resize.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flsl_cli.config.schema import AugmentConfig, Recipe
from flsl_cli.losses.queries import grid_query_indices

RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")

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


@dataclass(frozen=True)
class CropPlan:
    """Where each view is cut from, in the original image's pixels."""

    teacher: Box
    student: Box
    locals_: tuple[Box, ...]

    @property
    def boxes(self) -> tuple[Box, ...]:
        """Every view's box in view order: teacher, student, locals."""
        return (self.teacher, self.student, *self.locals_)


@dataclass(frozen=True)
class Photometric:
    """One view's photometric choices, applied in this order: jitter (its ops in the order
    given), grayscale, blur, solarize."""

    jitter: tuple[tuple[str, float], ...] = ()  # (op name from JITTER_OPS, factor), in application order
    grayscale: bool = False
    blur_sigma: float | None = None  # the Gaussian's standard deviation in pixels (PIL's radius)
    solarize: bool = False


@dataclass(frozen=True)
class SamplePlan:
    """Everything random about one sample's views."""

    crops: CropPlan
    photometric: tuple[Photometric, ...]  # one per view, in CropPlan.boxes order
    global_queries: np.ndarray  # (Qg,) token indices of the student global view
    local_queries: np.ndarray | None  # (locals, Ql), None without local views


def draw_crops(aug: AugmentConfig, size: tuple[int, int], *, rng: np.random.Generator) -> CropPlan:
    """The teacher box in the image; the student and local boxes drawn in the teacher view's
    coordinates and mapped back to the image's pixels."""
    width, height = size
    teacher = sample_crop(width, height, scale=aug.teacher_scale, rng=rng)
    side = float(aug.global_size)
    x_scale, y_scale = teacher[2] / side, teacher[3] / side

    def inside_teacher(scale: tuple[float, float]) -> Box:
        left, top, w, h = sample_crop(side, side, scale=scale, rng=rng)
        return teacher[0] + left * x_scale, teacher[1] + top * y_scale, w * x_scale, h * y_scale

    student = inside_teacher(aug.student_scale)
    return CropPlan(
        teacher=teacher, student=student, locals_=tuple(inside_teacher(aug.local_scale) for _ in range(aug.local_crops))
    )


def draw_photometric(aug: AugmentConfig, *, rng: np.random.Generator) -> Photometric:
    """One view's photometric choices (torchvision's ColorJitter with random op order, then
    grayscale, then one of two branches: blur, or a rarer blur and solarize)."""
    jitter: tuple[tuple[str, float], ...] = ()
    if rng.random() < aug.color_jitter_p:
        ops = []
        if aug.brightness > 0:
            ops.append(("brightness", float(rng.uniform(max(0.0, 1 - aug.brightness), 1 + aug.brightness))))
        if aug.contrast > 0:
            ops.append(("contrast", float(rng.uniform(max(0.0, 1 - aug.contrast), 1 + aug.contrast))))
        if aug.saturation > 0:
            ops.append(("saturation", float(rng.uniform(max(0.0, 1 - aug.saturation), 1 + aug.saturation))))
        if aug.hue > 0:
            ops.append(("hue", float(rng.uniform(-aug.hue, aug.hue))))
        jitter = tuple(ops[index] for index in rng.permutation(len(ops)))
    grayscale = bool(rng.random() < aug.grayscale_p)
    if rng.random() < aug.blur_branch_p:
        blur_p, solarize_p = aug.blur_p, 0.0
    else:
        blur_p, solarize_p = aug.alt_blur_p, aug.solarize_p
    blur_sigma = float(rng.uniform(*aug.blur_radius)) if rng.random() < blur_p else None
    solarize = bool(rng.random() < solarize_p)
    return Photometric(jitter=jitter, grayscale=grayscale, blur_sigma=blur_sigma, solarize=solarize)


def complete_plan(recipe: Recipe, crops: CropPlan, *, rng: np.random.Generator) -> SamplePlan:
    """The draws that follow the crop boxes: each view's photometric choices, then the queries."""
    aug, patch, loss = recipe.augment, recipe.model.patch_size, recipe.loss
    photometric = tuple(draw_photometric(aug, rng=rng) for _ in crops.boxes)
    global_queries = grid_query_indices(grid=aug.global_size // patch, window=loss.query_window_global, rng=rng)
    local_queries = None
    if crops.locals_:
        local_queries = np.stack(
            [
                grid_query_indices(grid=aug.local_size // patch, window=loss.query_window_local, rng=rng)
                for _ in crops.locals_
            ]
        )
    return SamplePlan(crops=crops, photometric=photometric, global_queries=global_queries, local_queries=local_queries)


def draw_plan(recipe: Recipe, size: tuple[int, int], *, rng: np.random.Generator) -> SamplePlan:
    """The whole plan of one sample whose image has `size` (width, height)."""
    return complete_plan(recipe, draw_crops(recipe.augment, size, rng=rng), rng=rng)
