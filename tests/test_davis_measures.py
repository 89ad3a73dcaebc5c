"""The DAVIS 2017 measures (J, F, mean / recall / decay) against hand-computed cases and against
the official evaluation code's formulas, and the label propagation against DINO's
`label_propagation`, both written out here as references.

References, transcribed with only what is needed to run them here:
- davis2017-evaluation, davis2017/metrics.py (`db_eval_iou`, `f_measure`, `_seg2bmap`) and
  davis2017/utils.py (`db_statistics`). The official `f_measure` dilates with
  `cv2.dilate(img, disk(r).astype(uint8))`: the maximum over the footprint around each pixel,
  with nothing outside the image (OpenCV's default border for dilation). OpenCV is not
  installed here, so the reference uses scikit-image's `dilation`, the same maximum filter with
  the same (symmetric) footprint; the test of `dilate` checks flsl's dilation against it.
- facebookresearch/dino, eval_video_segmentation.py (`restrict_neighborhood`,
  `label_propagation`, `norm_mask` and the queue of `eval_video_tracking_davis`), with the model
  call replaced by the given features.
"""

from __future__ import annotations

import math
import queue
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flsl_cli.eval.davis.frames import model_size
from flsl_cli.eval.davis.measures import (
    boundary_f,
    boundary_map,
    boundary_tolerance,
    dilate,
    frame_measures,
    overall,
    region_similarity,
    statistics,
)
from flsl_cli.eval.davis.propagation import (
    PropagationSettings,
    Propagator,
    upsample_labels,
    window_mask,
)

skimage_morphology = pytest.importorskip("skimage.morphology")


# ---- the official DAVIS 2017 evaluation code (reference) ----


def official_db_eval_iou(annotation, segmentation):
    annotation, segmentation = annotation.astype(bool), segmentation.astype(bool)
    void_pixels = np.zeros_like(segmentation)
    inters = np.sum((segmentation & annotation) & np.logical_not(void_pixels), axis=(-2, -1))
    union = np.sum((segmentation | annotation) & np.logical_not(void_pixels), axis=(-2, -1))
    with np.errstate(invalid="ignore"):
        j = inters / union
    return 1 if np.isclose(union, 0) else j


def official_seg2bmap(seg):
    seg = seg.astype(bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def official_f_measure(foreground_mask, gt_mask, bound_th=0.008):
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(foreground_mask.shape))
    fg_boundary = official_seg2bmap(foreground_mask)
    gt_boundary = official_seg2bmap(gt_mask)
    footprint = skimage_morphology.disk(bound_pix).astype(bool)
    fg_dil = skimage_morphology.dilation(fg_boundary.astype(np.uint8), footprint) > 0  # cv2.dilate in the original
    gt_dil = skimage_morphology.dilation(gt_boundary.astype(np.uint8), footprint) > 0
    gt_match = gt_boundary * fg_dil
    fg_match = fg_boundary * gt_dil
    n_fg, n_gt = np.sum(fg_boundary), np.sum(gt_boundary)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        precision, recall = np.sum(fg_match) / float(n_fg), np.sum(gt_match) / float(n_gt)
    return 0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def official_db_statistics(per_frame_values):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        M = np.nanmean(per_frame_values)
        O = np.nanmean(per_frame_values > 0.5)  # noqa: E741 - the official code's name for the recall
        N_bins = 4
        ids = np.round(np.linspace(1, len(per_frame_values), N_bins + 1) + 1e-10) - 1
        ids = ids.astype(np.uint8)
        D_bins = [per_frame_values[ids[i] : ids[i + 1] + 1] for i in range(4)]
        D = np.nanmean(D_bins[0]) - np.nanmean(D_bins[3])
    return M, O, D


def blobs(rng, shape, count=3):
    """A random binary mask of a few rectangles and discs."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros(shape, bool)
    for _ in range(count):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, max(3, min(h, w) // 3))
        if rng.random() < 0.5:
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        else:
            mask |= (abs(yy - cy) <= r) & (abs(xx - cx) <= r // 2 + 1)
    return mask


def j_and_f(pred, gt):
    pred_t, gt_t = torch.from_numpy(pred)[None], torch.from_numpy(gt)[None]
    return float(region_similarity(pred_t, gt_t)[0]), float(boundary_f(pred_t, gt_t)[0])


# ---- hand-computed cases ----


def square(shape=(40, 60), top=10, left=10, side=10):
    mask = np.zeros(shape, bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_identical_masks_score_one():
    """The same mask as prediction and truth: J = 1 and F = 1."""
    assert j_and_f(square(), square()) == (1.0, 1.0)


def test_disjoint_masks_score_zero():
    """Masks that do not overlap and lie farther apart than the tolerance: J = 0 and F = 0."""
    assert j_and_f(square(left=5), square(left=40)) == (0.0, 0.0)


def test_one_pixel_shift():
    """A 10 x 10 square moved one pixel right: J = 90 / 110; every boundary pixel is within the
    tolerance (1 px at 40 x 60), so F = 1."""
    j, f = j_and_f(square(left=11), square(left=10))
    assert j == pytest.approx(90 / 110)
    assert boundary_tolerance(40, 60) == 1 and f == 1.0


def test_empty_objects():
    """Both empty: J = 1, F = 1 (nothing to find, nothing found); only the truth empty or only
    the prediction empty: J = 0, F = 0."""
    empty = np.zeros((40, 60), bool)
    assert j_and_f(empty, empty) == (1.0, 1.0)
    assert j_and_f(empty, square()) == (0.0, 0.0)
    assert j_and_f(square(), empty) == (0.0, 0.0)


def test_boundary_tolerance_at_the_exact_threshold():
    """At 854 x 480 the tolerance is ceil(0.008 * 979.6) = 8 px. The truth's boundary is one
    vertical line (the edge of the left half); a prediction whose edge is 8 px off is fully
    matched (F = 1), 9 px off not at all (F = 0)."""
    assert boundary_tolerance(480, 854) == 8
    truth = np.zeros((480, 854), bool)
    truth[:, :400] = True
    for shift, expected in ((8, 1.0), (9, 0.0), (-8, 1.0), (-9, 0.0)):
        pred = np.zeros_like(truth)
        pred[:, : 400 + shift] = True
        assert j_and_f(pred, truth)[1] == expected, shift


def test_statistics_by_hand():
    """Mean, recall (share above 0.5) and decay (first quarter minus last) of 8 frames:
    the bins end at frames 0, 2, 4, 5, 7 (round(linspace(1, 8, 5) + 1e-10) - 1 = round([1, 2.75,
    4.5, 6.25, 8]) - 1), each bin running from one end to the next, both included."""
    values = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    stats = statistics(values)
    assert stats["mean"] == pytest.approx(values.mean())
    assert stats["recall"] == pytest.approx(5 / 8)
    assert stats["decay"] == pytest.approx(np.mean([1.0, 0.9, 0.8]) - np.mean([0.5, 0.4, 0.3]))


def test_overall_is_a_mean_over_objects():
    """The global figures average objects, not sequences; J&F is the mean of J mean and F mean."""
    objects = [
        {"J": {"mean": 0.5, "recall": 0.0, "decay": 0.0}, "F": {"mean": 0.7, "recall": 1.0, "decay": 0.1}},
        {"J": {"mean": 0.9, "recall": 1.0, "decay": 0.2}, "F": {"mean": 0.9, "recall": 1.0, "decay": 0.3}},
    ]
    figures = overall(objects)
    assert figures["J_mean"] == pytest.approx(0.7) and figures["F_mean"] == pytest.approx(0.8)
    assert figures["JF_mean"] == pytest.approx(0.75) and figures["F_decay"] == pytest.approx(0.2)


def test_void_pixels_count_as_background():
    """Id 255 in the truth is background, as the official loader makes it; ids are objects 1..N."""
    truth = np.zeros((40, 60), np.uint8)
    truth[10:20, 10:20] = 1
    truth[0:5, 0:5] = 255
    pred = truth.copy()
    pred[0:5, 0:5] = 0
    j, f = frame_measures(torch.from_numpy(pred), torch.from_numpy(truth), objects=1)
    assert j.tolist() == [1.0] and f.tolist() == [1.0]


# ---- against the official formulas ----


@pytest.mark.parametrize("shape", [(480, 854), (75, 100), (37, 53), (64, 128)])
def test_measures_equal_the_official_code(shape):
    """J and F of random masks (shapes, shifts, empty ones) equal `db_eval_iou` and
    `f_measure`, and the tolerance equals its `ceil(0.008 * norm(shape))`."""
    rng = np.random.default_rng(sum(shape))
    assert boundary_tolerance(*shape) == int(np.ceil(0.008 * np.linalg.norm(shape)))
    empty = np.zeros(shape, bool)
    cases = [(blobs(rng, shape), blobs(rng, shape)) for _ in range(6)]
    base = blobs(rng, shape)
    cases += [(np.roll(base, k, axis=1), base) for k in (1, 3, 9)]
    cases += [(empty, base), (base, empty), (empty, empty)]
    for pred, truth in cases:
        j, f = j_and_f(pred, truth)
        assert j == pytest.approx(official_db_eval_iou(truth, pred), abs=1e-12)
        assert f == pytest.approx(official_f_measure(pred, truth), abs=1e-12)


def test_frame_measures_equal_the_official_code_on_whole_frames():
    """`frame_measures` (each object measured on a crop around it) gives, for every object of
    random id maps (objects at the borders and in the middle, objects only predicted, only
    true, or absent), the official J and F computed on the whole frame."""
    rng = np.random.default_rng(5)
    for shape in ((480, 854), (64, 128), (37, 53)):
        for _ in range(3):
            truth, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
            for obj in (1, 2, 3):
                truth[blobs(rng, shape, count=2)] = obj
                shifted = np.roll(truth == obj, (rng.integers(-6, 7), rng.integers(-6, 7)), axis=(0, 1))
                pred[shifted] = obj
            pred[blobs(rng, shape, count=1)] = 4  # predicted only
            truth[:3, :3] = 5  # true only, in the corner
            j, f = frame_measures(torch.from_numpy(pred), torch.from_numpy(truth), objects=6)
            for obj in range(1, 7):
                assert j[obj - 1] == pytest.approx(official_db_eval_iou(truth == obj, pred == obj), abs=1e-12)
                assert f[obj - 1] == pytest.approx(official_f_measure(pred == obj, truth == obj), abs=1e-12)


def test_boundary_map_and_dilation_equal_the_official_ones():
    """`boundary_map` is `_seg2bmap` and `dilate` is a binary dilation by skimage's disk."""
    rng = np.random.default_rng(3)
    for radius in (1, 4, 8):
        mask = blobs(rng, (50, 70), count=4)
        bmap = boundary_map(torch.from_numpy(mask)[None])[0].numpy()
        assert np.array_equal(bmap, official_seg2bmap(mask))
        sparse = rng.random((50, 70)) < 0.02
        expected = skimage_morphology.dilation(sparse.astype(np.uint8), skimage_morphology.disk(radius)) > 0
        assert np.array_equal(dilate(torch.from_numpy(sparse)[None], radius)[0].numpy(), expected)


def test_statistics_equal_db_statistics():
    """Mean, recall and decay equal `db_statistics` for sequence lengths 1..100, NaNs included."""
    rng = np.random.default_rng(4)
    for length in list(range(1, 12)) + [47, 100]:
        values = rng.random(length)
        if length > 4:
            values[rng.integers(0, length)] = np.nan
        mean, recall, decay = official_db_statistics(values)
        stats = statistics(values)
        assert stats["mean"] == pytest.approx(mean, nan_ok=True)
        assert stats["recall"] == pytest.approx(recall, nan_ok=True)
        assert stats["decay"] == pytest.approx(decay, nan_ok=True)


# ---- DINO's label propagation (reference) ----


def dino_restrict_neighborhood(h, w, size_mask_neighborhood):
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * size_mask_neighborhood + 1):
                for q in range(2 * size_mask_neighborhood + 1):
                    if i - size_mask_neighborhood + p < 0 or i - size_mask_neighborhood + p >= h:
                        continue
                    if j - size_mask_neighborhood + q < 0 or j - size_mask_neighborhood + q >= w:
                        continue
                    mask[i, j, i - size_mask_neighborhood + p, j - size_mask_neighborhood + q] = 1
    return mask.reshape(h * w, h * w)


def dino_label_propagation(args, feat_tar, h, w, list_frame_feats, list_segs, mask_neighborhood=None):
    """DINO's `label_propagation`, the target's features given instead of computed (hw x dim)."""
    return_feat_tar = feat_tar.T
    ncontext = len(list_frame_feats)
    feat_sources = torch.stack(list_frame_feats)
    feat_tar = F.normalize(feat_tar, dim=1, p=2)
    feat_sources = F.normalize(feat_sources, dim=1, p=2)
    feat_tar = feat_tar.unsqueeze(0).repeat(ncontext, 1, 1)
    aff = torch.exp(torch.bmm(feat_tar, feat_sources) / 0.1)
    if args["size_mask_neighborhood"] > 0:
        if mask_neighborhood is None:
            mask_neighborhood = dino_restrict_neighborhood(h, w, args["size_mask_neighborhood"])
            mask_neighborhood = mask_neighborhood.unsqueeze(0).repeat(ncontext, 1, 1)
        aff *= mask_neighborhood
    aff = aff.transpose(2, 1).reshape(-1, h * w)
    tk_val, _ = torch.topk(aff, dim=0, k=args["topk"])
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, axis=0)
    segs = torch.cat(list_segs)
    nmb_context, C, h, w = segs.shape
    segs = segs.reshape(nmb_context, C, -1).transpose(2, 1).reshape(-1, C).T
    seg_tar = torch.mm(segs, aff)
    seg_tar = seg_tar.reshape(1, C, h, w)
    return seg_tar, return_feat_tar, mask_neighborhood


def dino_norm_mask(mask):
    c, _h, _w = mask.size()
    for cnt in range(c):
        mask_cnt = mask[cnt, :, :]
        if mask_cnt.max() > 0:
            mask_cnt = mask_cnt - mask_cnt.min()
            mask_cnt = mask_cnt / mask_cnt.max()
            mask[cnt, :, :] = mask_cnt
    return mask


def dino_track(args, features, first_seg, patch):
    """The loop of `eval_video_tracking_davis` over given features ((hw, dim) per frame):
    the soft labels and the upsampled argmax of every frame after the first."""
    h, w = first_seg.shape[-2:]
    que = queue.Queue(args["n_last_frames"])
    frame1_feat = features[0].T
    mask_neighborhood = None
    soft, ids = [], []
    for cnt in range(1, len(features)):
        used_frame_feats = [frame1_feat] + [pair[0] for pair in list(que.queue)]
        used_segs = [first_seg] + [pair[1] for pair in list(que.queue)]
        frame_tar_avg, feat_tar, mask_neighborhood = dino_label_propagation(
            args, features[cnt], h, w, used_frame_feats, used_segs, mask_neighborhood
        )
        if que.qsize() == args["n_last_frames"]:
            que.get()
        que.put([feat_tar, frame_tar_avg.clone()])
        soft.append(frame_tar_avg[0].reshape(frame_tar_avg.shape[1], -1).T.clone())
        up = F.interpolate(
            frame_tar_avg, scale_factor=patch, mode="bilinear", align_corners=False, recompute_scale_factor=False
        )[0]
        up = dino_norm_mask(up)
        _, seg = torch.max(up, dim=0)
        ids.append(seg)
    return soft, ids


@pytest.mark.parametrize("n_last_frames,size_mask_neighborhood,topk", [(1, 2, 3), (3, 2, 5), (7, 12, 5), (2, 0, 4)])
def test_propagation_equals_dinos(n_last_frames, size_mask_neighborhood, topk):
    """On random features (6 x 7 tokens, 8 frames, 3 objects), flsl's propagation gives DINO's
    soft labels and label maps for every frame, with one context frame (the first), with
    several (the first and the previous ones, the queue full or not), with and without the
    window, chunked or not."""
    torch.manual_seed(n_last_frames * 10 + topk)
    h, w, dim, frames, channels, patch = 6, 7, 16, 8, 4, 4
    features = [torch.randn(h * w, dim) for _ in range(frames)]
    first_ids = torch.randint(0, channels, (h, w))
    first_seg = F.one_hot(first_ids, channels).permute(2, 0, 1)[None].float()
    args = {"n_last_frames": n_last_frames, "size_mask_neighborhood": size_mask_neighborhood, "topk": topk}
    expected_soft, expected_ids = dino_track(args, features, first_seg, patch)
    settings = PropagationSettings(
        n_last_frames=n_last_frames, size_mask_neighborhood=size_mask_neighborhood, topk=topk, temperature=0.1
    )
    for chunked in (False, True):
        if chunked:
            from flsl_cli.eval.davis import propagation

            previous, propagation.CHUNK_ELEMENTS = propagation.CHUNK_ELEMENTS, 5 * h * w
        try:
            propagator = Propagator(
                features[0], F.one_hot(first_ids.reshape(-1), channels), grid_hw=(h, w), settings=settings
            )
            for index in range(1, frames):
                soft = propagator.step(features[index])
                torch.testing.assert_close(soft, expected_soft[index - 1], rtol=1e-5, atol=1e-6)
                assert torch.equal(upsample_labels(soft, grid_hw=(h, w), patch=patch), expected_ids[index - 1])
        finally:
            if chunked:
                propagation.CHUNK_ELEMENTS = previous


def test_window_mask_equals_restrict_neighborhood():
    """The broadcast window is DINO's four-loop `restrict_neighborhood`, row by row."""
    for h, w, radius in ((5, 8, 1), (6, 4, 2), (7, 7, 12)):
        expected = dino_restrict_neighborhood(h, w, radius).bool()
        assert torch.equal(window_mask((h, w), radius=radius, targets_q=torch.arange(h * w)), expected)


def test_model_size_follows_dino_and_fixes_its_defects():
    """854 x 480 -> 832 x 480 (DINO's sizes for patch 8 and 16); portrait the same turned; a
    square frame stays square (DINO gives the frame 480 x 448 and its mask 448 x 480); patch 14
    floors both sides to whole tokens."""
    assert model_size(480, 854, short_side=480, patch=16) == (480, 832)
    assert model_size(480, 854, short_side=480, patch=8) == (480, 832)
    assert model_size(854, 480, short_side=480, patch=16) == (832, 480)
    assert model_size(480, 480, short_side=480, patch=16) == (480, 480)
    assert model_size(480, 854, short_side=480, patch=14) == (476, 826)
    assert math.floor(480 * 854 / 480 / 64) * 64 == 832
