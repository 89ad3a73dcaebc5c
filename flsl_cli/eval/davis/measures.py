"""The measures of the DAVIS 2017 semi-supervised benchmark, as the official evaluation code
computes them (github.com/davisvideochallenge/davis2017-evaluation, `davis2017/metrics.py`:
`db_eval_iou`, `db_eval_boundary`, `f_measure`, `_seg2bmap`; `davis2017/utils.py`:
`db_statistics`; `davis2017/evaluation.py`: which frames and objects count).

- J, region similarity: |pred & gt| / |pred | gt| per object and frame, 1 when both are empty.
- F, boundary F-measure: the 1-pixel boundary maps of both masks (`_seg2bmap`), each dilated by
  a disk of radius `ceil(0.008 * image diagonal)` pixels (8 at 854 x 480); precision = share of
  predicted boundary pixels within the dilated true boundary, recall the converse; F their
  harmonic mean, with the official rules for empty boundaries.
- The first and the last frame of a sequence are not scored; objects are the ids 1..N, N the
  largest id in the first frame's annotation (a later id above N is not an object).
- Per object: mean, recall (share of frames above 0.5) and decay (mean of the first quarter of
  the frames minus that of the last), over the scored frames; overall: the means over all
  objects of all sequences, J&F = (J mean + F mean) / 2.

The official code dilates with OpenCV (`cv2.dilate` by `skimage.morphology.disk`); here the
same binary dilation (a pixel is set when any pixel of the disk around it is) is made of 1-d
max pools over the disk's rows, batched over objects. Void pixels (255) count as background, as the official
loader makes them before it looks for void ones.

Tensor legend: o objects, h x w pixels.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

BOUNDARY_FRACTION = 0.008  # of the image diagonal
VOID_LABEL = 255
DECAY_BINS = 4


def boundary_tolerance(height: int, width: int, *, fraction: float = BOUNDARY_FRACTION) -> int:
    """The dilation radius in pixels: `fraction` of the image diagonal, rounded up (a value of
    at least 1 is a radius in pixels already)."""
    return int(fraction) if fraction >= 1 else math.ceil(fraction * math.hypot(height, width))


def disk(radius: int) -> torch.Tensor:
    """The flat disk footprint of `skimage.morphology.disk(radius)`: (2r+1, 2r+1) booleans,
    true where x^2 + y^2 <= r^2."""
    steps = torch.arange(-radius, radius + 1)
    return (steps[:, None] ** 2 + steps[None, :] ** 2) <= radius**2


def dilate(masks_ohw: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of each mask by `disk(radius)` (outside the image counts as unset): the
    disk is a stack of horizontal runs, row dy of half-width isqrt(r^2 - dy^2), so the dilation
    is a maximum over each run's width (a 1-d max pool per distinct width), shifted by dy and
    combined by maximum (1-d pools and byte maxima: far faster on a CPU than a 2-d pool or a
    convolution with the disk)."""
    if radius <= 0:
        return masks_ohw.bool().clone()
    o, h, w = masks_ohw.shape
    rows = masks_ohw.to(torch.float32).reshape(o * h, 1, w)
    runs: dict[int, torch.Tensor] = {}
    for half in {math.isqrt(radius * radius - dy * dy) for dy in range(radius + 1)}:
        pooled = F.max_pool1d(rows, kernel_size=2 * half + 1, stride=1, padding=half) if half else rows
        runs[half] = pooled.reshape(o, h, w).to(torch.uint8)
    out = torch.zeros((o, h, w), dtype=torch.uint8, device=masks_ohw.device)
    for dy in range(-radius, radius + 1):
        run = runs[math.isqrt(radius * radius - dy * dy)]
        if dy >= 0:
            out[:, : h - dy] = torch.maximum(out[:, : h - dy], run[:, dy:])
        else:
            out[:, -dy:] = torch.maximum(out[:, -dy:], run[:, : h + dy])
    return out.bool()


def boundary_map(masks_ohw: torch.Tensor) -> torch.Tensor:
    """1-pixel boundaries of binary masks, offset half a pixel towards the origin: the official
    `_seg2bmap` (at the mask's own size): a pixel is on the boundary when it differs from its
    right, lower or lower-right neighbour; the last row and column compare along themselves."""
    seg = masks_ohw.bool()
    east = torch.zeros_like(seg)
    south = torch.zeros_like(seg)
    south_east = torch.zeros_like(seg)
    east[:, :, :-1] = seg[:, :, 1:]
    south[:, :-1, :] = seg[:, 1:, :]
    south_east[:, :-1, :-1] = seg[:, 1:, 1:]
    bmap = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    bmap[:, -1, :] = seg[:, -1, :] ^ east[:, -1, :]
    bmap[:, :, -1] = seg[:, :, -1] ^ south[:, :, -1]
    bmap[:, -1, -1] = False
    return bmap


def region_similarity(pred_ohw: torch.Tensor, gt_ohw: torch.Tensor) -> torch.Tensor:
    """J per object (o,): intersection over union, 1 where both masks are empty (`db_eval_iou`)."""
    pred, gt = pred_ohw.bool(), gt_ohw.bool()
    intersection = (pred & gt).flatten(1).count_nonzero(1).double()
    union = (pred | gt).flatten(1).count_nonzero(1).double()
    return torch.where(union == 0, torch.ones_like(union), intersection / union.clamp(min=1))


def boundary_f(
    pred_ohw: torch.Tensor, gt_ohw: torch.Tensor, *, fraction: float = BOUNDARY_FRACTION, radius: int | None = None
) -> torch.Tensor:
    """F per object (o,): the boundary F-measure of `f_measure`, tolerance `boundary_tolerance`
    of the masks' size (or `radius`, for masks cropped from a larger frame)."""
    if radius is None:
        radius = boundary_tolerance(pred_ohw.shape[-2], pred_ohw.shape[-1], fraction=fraction)
    pred_b, gt_b = boundary_map(pred_ohw), boundary_map(gt_ohw)
    pred_dilated, gt_dilated = dilate(pred_b, radius), dilate(gt_b, radius)
    n_pred = pred_b.flatten(1).count_nonzero(1).double()
    n_gt = gt_b.flatten(1).count_nonzero(1).double()
    precision = (pred_b & gt_dilated).flatten(1).count_nonzero(1).double() / n_pred.clamp(min=1)
    recall = (gt_b & pred_dilated).flatten(1).count_nonzero(1).double() / n_gt.clamp(min=1)
    # The official cases: no predicted boundary -> precision 1; no true boundary -> recall 1;
    # recall 0 when only the truth has a boundary, precision 0 when only the prediction has one.
    precision = torch.where(n_pred == 0, torch.ones_like(precision), torch.where(n_gt == 0, 0.0, precision))
    recall = torch.where(n_gt == 0, torch.ones_like(recall), torch.where(n_pred == 0, 0.0, recall))
    total = precision + recall
    return torch.where(total == 0, torch.zeros_like(total), 2 * precision * recall / total.clamp(min=1e-300))


def frame_measures(pred_hw: torch.Tensor, gt_hw: torch.Tensor, *, objects: int) -> tuple[np.ndarray, np.ndarray]:
    """(J, F) of objects 1..`objects` in one frame, from the predicted and true id maps.

    Each object is measured on a crop of the frame: the box around its predicted and true
    pixels with a margin of the tolerance + 2 pixels (clipped to the frame). Outside it both
    masks are empty, every boundary pixel and every dilation reaching one lies inside it, and its
    last row and column are background, so `_seg2bmap`'s rules for the last row and column give
    what they give on the whole frame: the same J and F, at the cost of the object's size."""
    h, w = gt_hw.shape
    radius = boundary_tolerance(h, w)
    gt = torch.where(gt_hw == VOID_LABEL, 0, gt_hw.long())
    pred = pred_hw.long()
    j_of, f_of = np.ones(objects), np.ones(objects)  # both empty: J = F = 1
    for index in range(objects):
        pred_o, gt_o = pred == index + 1, gt == index + 1
        either = pred_o | gt_o
        rows, cols = either.any(1).nonzero().flatten(), either.any(0).nonzero().flatten()
        if rows.numel() == 0:
            continue
        margin = radius + 2
        top, bottom = max(0, int(rows[0]) - margin), min(h, int(rows[-1]) + margin + 1)
        left, right = max(0, int(cols[0]) - margin), min(w, int(cols[-1]) + margin + 1)
        crop_pred, crop_gt = pred_o[None, top:bottom, left:right], gt_o[None, top:bottom, left:right]
        j_of[index] = float(region_similarity(crop_pred, crop_gt)[0])
        f_of[index] = float(boundary_f(crop_pred, crop_gt, radius=radius)[0])
    return j_of, f_of


def statistics(per_frame: np.ndarray) -> dict[str, float]:
    """Mean, recall and decay of one object's per-frame values, as `db_statistics` computes them
    (NaNs ignored; decay over 4 bins of frames whose ends are rounded as numpy rounds them)."""
    values = np.asarray(per_frame, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = float(np.nanmean(values))
        recall = float(np.nanmean(values > 0.5))
        ends = (np.round(np.linspace(1, len(values), DECAY_BINS + 1) + 1e-10) - 1).astype(np.int64)
        bins = [values[ends[i] : ends[i + 1] + 1] for i in range(DECAY_BINS)]
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[-1]))
    return {"mean": mean, "recall": recall, "decay": decay}


def overall(objects: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """The benchmark's global figures over every object of every sequence: J&F mean, J and F
    mean / recall / decay (each a mean over objects), in the units given."""

    def mean_of(measure: str, stat: str) -> float:
        return float(np.mean([obj[measure][stat] for obj in objects]))

    figures = {f"{m}_{s}": mean_of(m, s) for m in ("J", "F") for s in ("mean", "recall", "decay")}
    return {"JF_mean": (figures["J_mean"] + figures["F_mean"]) / 2, **figures}
