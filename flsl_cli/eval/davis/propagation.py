"""Label propagation on frozen features, the step of DINO's `eval_video_segmentation.py`
(`label_propagation`, `restrict_neighborhood`, `norm_mask` and the loop of
`eval_video_tracking_davis`, github.com/facebookresearch/dino):

For a target frame, every target token's affinity to every token of the context frames (the
first frame and the `n_last_frames` previous ones) is `exp(cos / T)` of the L2-normalised
features, set to 0 outside a window of `size_mask_neighborhood` tokens around the target
token's position; per target token the `topk` largest affinities over all context tokens are
kept (every value not below the k-th, ties included, as DINO's threshold keeps them), the rest
set to 0, the row normalised to sum 1; the target's soft labels are the affinity-weighted sum
of the context frames' soft labels (one-hot for the first frame, propagated for the others).
The soft labels are upsampled bilinearly by the patch size, each channel rescaled to [0, 1],
and the argmax taken.

Differences from DINO's code, none of which changes a result: the window is built with
broadcast comparisons instead of four nested Python loops over token pairs (minutes at 480p),
once per sequence, and target tokens are processed in chunks, so memory is bounded by the
chunk, not by (context frames x tokens^2); the affinities are computed in place, the window
applied as -inf before the exponential (exp(-inf) = 0 is DINO's product with the 0/1 mask).

Tensor legend: t tokens of a frame (h x w grid, row-major), d feature width, n context frames,
s = n x t source tokens, q target tokens of a chunk, k label channels (background + objects).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24  # affinity entries held at once (64 MiB of fp32)


@dataclass(frozen=True)
class PropagationSettings:
    n_last_frames: int = 7
    size_mask_neighborhood: int = 12
    topk: int = 5
    temperature: float = 0.1


def window_mask(grid_hw: tuple[int, int], *, radius: int, targets_q: torch.Tensor) -> torch.Tensor:
    """(q, t) booleans: source token j is within `radius` tokens (in rows and in columns) of
    target token targets_q[i]; DINO's `restrict_neighborhood`, for the rows asked."""
    _, w = grid_hw
    sources = torch.arange(grid_hw[0] * w, device=targets_q.device)
    near_rows = ((targets_q // w)[:, None] - (sources // w)[None, :]).abs() <= radius
    near_cols = ((targets_q % w)[:, None] - (sources % w)[None, :]).abs() <= radius
    return near_rows & near_cols


def propagate(
    target_td: torch.Tensor,
    context_ntd: torch.Tensor,
    labels_ntk: torch.Tensor,
    *,
    grid_hw: tuple[int, int],
    settings: PropagationSettings,
    window_tt: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft labels (t, k) of the target frame from the context frames' features and labels.
    Features need not be normalised; they are compared in fp32. `window_tt` is the window of
    every target token (`window_mask` of all tokens), when the caller keeps it between frames."""
    n, t, _ = context_ntd.shape
    target = F.normalize(target_td.float(), dim=1)
    sources_sd = F.normalize(context_ntd.float(), dim=2).reshape(n * t, -1)
    labels_sk = labels_ntk.float().reshape(n * t, -1)
    topk = min(settings.topk, n * t)
    out_tk = torch.empty((t, labels_sk.shape[1]), dtype=torch.float32, device=target.device)
    chunk = max(1, CHUNK_ELEMENTS // (n * t))
    for start in range(0, t, chunk):
        rows = torch.arange(start, min(t, start + chunk), device=target.device)
        affinity_qs = (target[rows] @ sources_sd.T).div_(settings.temperature)
        if settings.size_mask_neighborhood > 0:
            # exp(-inf) = 0: DINO's product with the 0/1 window, without a pass over the matrix
            mask_qt = (
                window_tt[rows]
                if window_tt is not None
                else window_mask(grid_hw, radius=settings.size_mask_neighborhood, targets_q=rows)
            )
            affinity_qs.view(len(rows), n, t).masked_fill_(~mask_qt[:, None, :], float("-inf"))
        affinity_qs.exp_()
        kth_q1 = affinity_qs.topk(topk, dim=1).values[:, -1:]
        affinity_qs.masked_fill_(affinity_qs < kth_q1, 0.0)
        affinity_qs.div_(affinity_qs.sum(dim=1, keepdim=True))
        out_tk[rows] = affinity_qs @ labels_sk
    return out_tk


class Propagator:
    """The context of one sequence: the first frame's features and one-hot labels, and those of
    the `n_last_frames` previous frames (a bounded queue, as DINO's). `step(features)` gives
    the next frame's soft labels and takes the frame into the queue."""

    def __init__(
        self,
        first_td: torch.Tensor,
        first_labels_tk: torch.Tensor,
        *,
        grid_hw: tuple[int, int],
        settings: PropagationSettings,
    ) -> None:
        self.first = (first_td, first_labels_tk.float())
        self.grid_hw = grid_hw
        self.settings = settings
        self.recent: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=settings.n_last_frames or None)
        self.window_tt = None
        if settings.size_mask_neighborhood > 0:  # the same for every frame: built once
            tokens = torch.arange(grid_hw[0] * grid_hw[1], device=first_td.device)
            self.window_tt = window_mask(grid_hw, radius=settings.size_mask_neighborhood, targets_q=tokens)

    def step(self, target_td: torch.Tensor) -> torch.Tensor:
        frames = [self.first, *self.recent]
        labels_tk = propagate(
            target_td,
            torch.stack([f for f, _ in frames]),
            torch.stack([lab for _, lab in frames]),
            grid_hw=self.grid_hw,
            settings=self.settings,
            window_tt=self.window_tt,
        )
        if self.settings.n_last_frames:
            self.recent.append((target_td, labels_tk))
        return labels_tk


def upsample_labels(labels_tk: torch.Tensor, *, grid_hw: tuple[int, int], patch: int) -> torch.Tensor:
    """(h x patch, w x patch) label ids: the soft labels upsampled bilinearly by the patch size,
    each channel whose maximum is positive shifted and scaled to [0, 1] (DINO's `norm_mask`; a
    constant channel becomes 0 instead of DINO's 0/0), then the argmax."""
    h, w = grid_hw
    maps_k1hw = labels_tk.T.reshape(1, -1, h, w)
    up_khw = F.interpolate(
        maps_k1hw, scale_factor=patch, mode="bilinear", align_corners=False, recompute_scale_factor=False
    )[0]
    flat = up_khw.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    span = (high - low).clamp(min=torch.finfo(flat.dtype).tiny)
    scaled = torch.where((high - low > 0)[:, None], (flat - low[:, None]) / span[:, None], flat - low[:, None])
    flat = torch.where((high > 0)[:, None], scaled, flat)
    return flat.argmax(dim=0).reshape(up_khw.shape[1:])
