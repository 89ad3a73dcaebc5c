"""Weighted k-NN classification over a memory bank, in bounded memory (pure functions).

One search finds the top-max(k) neighbours of every query once; every k is then scored from
those neighbours. Votes follow DINO: each of the k nearest bank features adds exp(sim / T) to its
class; the five best-scored classes are the top-5 guesses, except that a class that got no vote
is never a guess (DINO's sort may pick one among the zero-score ties: harmless with 1000
classes, but it would inflate top-5 on a 7-class demo set). With several features per image
(the 3 x 3 box cells), an image counts as correct at top-1 if any of its features' top-1 class
is its label, and at top-5 likewise. Each feature's own top-1 is counted as well ("feature
top-1"): with few classes the any-of-g rule is generous (see `chance_level`).

The search walks the bank in chunks and, for each, the queries in chunks, so the similarity
block never exceeds `block_bytes`; a running top-k is merged across bank chunks, and the bank is
streamed once. The bank is one chunk when it already lives on the compute device in the compute
dtype (fp16 on a GPU); otherwise (host memory, or fp16 to fp32 on a CPU) it is copied over in
chunks of DEFAULT_HOST_CHUNK_BYTES.

Legend: q = query features, n = bank features, d = feature dim, k = neighbours, c = classes,
i = images, g = features per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

DEFAULT_BLOCK_BYTES = 1 << 30
DEFAULT_HOST_CHUNK_BYTES = 1 << 30  # one bank chunk copied from the host at a time


def compute_dtype(device: torch.device) -> torch.dtype:
    """fp16 matmuls on GPUs; fp32 on CPUs, where fp16 matmuls are slow."""
    return torch.float16 if device.type == "cuda" else torch.float32


def search_topk(
    queries_qd: torch.Tensor,
    bank_nd: torch.Tensor,
    *,
    k: int,
    device: torch.device,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    bank_chunk_rows: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities (q, k) float32, descending, and bank indices (q, k) of the k nearest
    bank rows of each query. Rows must already be L2-normalized."""
    bank_rows, dim = bank_nd.shape
    query_rows = queries_qd.shape[0]
    assert 1 <= k <= bank_rows, (k, bank_rows)
    dtype = compute_dtype(device)
    elem = torch.finfo(dtype).bits // 8
    if bank_chunk_rows is None:  # the whole bank when it is usable as it is, else copies of bounded size
        ready = bank_nd.device == device and bank_nd.dtype == dtype
        bank_chunk_rows = bank_rows if ready else max(1, DEFAULT_HOST_CHUNK_BYTES // (dim * elem))
    bank_chunk_rows = max(1, min(bank_chunk_rows, bank_rows))
    query_chunk_rows = max(1, min(query_rows, block_bytes // (bank_chunk_rows * elem)))
    bank_chunks = math.ceil(bank_rows / bank_chunk_rows)
    query_chunks = math.ceil(query_rows / query_chunk_rows) if query_rows else 0

    best_sims = torch.full((query_rows, k), -math.inf, dtype=torch.float32, device=device)
    best_index = torch.zeros((query_rows, k), dtype=torch.int64, device=device)
    done = 0
    for bank_start in range(0, bank_rows, bank_chunk_rows):
        chunk_nd = bank_nd[bank_start : bank_start + bank_chunk_rows].to(device=device, dtype=dtype, non_blocking=True)
        chunk_k = min(k, chunk_nd.shape[0])
        for query_start in range(0, query_rows, query_chunk_rows):
            rows = slice(query_start, query_start + query_chunk_rows)
            sims_qn = queries_qd[rows].to(device=device, dtype=dtype, non_blocking=True) @ chunk_nd.T
            sims, index = sims_qn.topk(chunk_k, dim=1)
            sims, index = sims.float(), index + bank_start
            if bank_chunks == 1:
                best_sims[rows], best_index[rows] = sims, index
            else:
                merged_sims = torch.cat([best_sims[rows], sims], dim=1)
                merged_index = torch.cat([best_index[rows], index], dim=1)
                top_sims, position = merged_sims.topk(k, dim=1)
                best_sims[rows], best_index[rows] = top_sims, merged_index.gather(1, position)
            done += 1
            if on_progress is not None:
                on_progress(done, bank_chunks * query_chunks)
    return best_sims, best_index


def vote_scores(
    sims_qk: torch.Tensor, labels_qk: torch.Tensor, *, k: int, temperature: float, num_classes: int
) -> torch.Tensor:
    """Class scores (q, c): the sum of exp(sim / T) over each query's k nearest neighbours."""
    weights_qk = (sims_qk[:, :k].float() / temperature).exp()
    scores_qc = torch.zeros((sims_qk.shape[0], num_classes), dtype=torch.float32, device=sims_qk.device)
    return scores_qc.scatter_add_(1, labels_qk[:, :k], weights_qk)


def image_hits(predictions_igt: torch.Tensor, labels_i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 hit, top-5 hit) per image: predictions (i, g, t) hold each feature's classes, best
    first; an image is a hit if any of its g features' top-1 (top-t) classes is its label."""
    top1_i = (predictions_igt[:, :, 0] == labels_i[:, None]).any(dim=1)
    top5_i = (predictions_igt == labels_i[:, None, None]).flatten(1).any(dim=1)
    return top1_i, top5_i


class Correct(NamedTuple):
    """Counts for one k: images right at top-1 and top-5 (any-of-g rule), and single features
    whose own top-1 class is their image's label."""

    top1: int
    top5: int
    feature_top1: int


def chance_level(*, num_classes: int, features_per_image: int) -> tuple[float, float]:
    """(top-1, top-5) image accuracy of uniformly random guesses under the any-of-g rule, in [0, 1].

    Each feature's top-1 guess hits with chance 1/c and its top-5 guesses with min(5, c)/c; an
    image is a hit if any of its g features is: 1 - (1 - p)^g. With 1000 classes and g = 9 this
    is 0.9% top-1; with 7 classes it is 75% top-1 and 100% top-5.
    """
    hit1 = 1.0 / num_classes
    hit5 = min(5, num_classes) / num_classes
    g = features_per_image
    return 1.0 - (1.0 - hit1) ** g, 1.0 - (1.0 - hit5) ** g


def count_correct(
    sims_qk: torch.Tensor,
    index_qk: torch.Tensor,
    *,
    bank_labels_n: torch.Tensor,
    query_labels_i: torch.Tensor,
    features_per_image: int,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    chunk_images: int = 4096,
) -> dict[int, Correct]:
    """{k: Correct} from one top-max(k) search.

    Queries are grouped by image: rows i*g .. i*g+g-1 belong to image i.
    """
    g = features_per_image
    images = query_labels_i.shape[0]
    assert sims_qk.shape[0] == images * g, (sims_qk.shape, images, g)
    top = min(5, num_classes)
    bank_labels_n = bank_labels_n.to(index_qk.device)
    query_labels_i = query_labels_i.to(index_qk.device)
    counts = {k: [0, 0, 0] for k in ks}
    for start in range(0, images, chunk_images):
        stop = min(start + chunk_images, images)
        sims = sims_qk[start * g : stop * g]
        labels_qk = bank_labels_n[index_qk[start * g : stop * g]]
        for k in ks:
            scores_qc = vote_scores(sims, labels_qk, k=k, temperature=temperature, num_classes=num_classes)
            best_scores, predictions = scores_qc.topk(top, dim=1)
            predictions = predictions.masked_fill(best_scores <= 0, -1)  # a class without votes is no guess
            predictions_igt = predictions.view(stop - start, g, top)
            top1, top5 = image_hits(predictions_igt, query_labels_i[start:stop])
            counts[k][0] += int(top1.sum())
            counts[k][1] += int(top5.sum())
            counts[k][2] += int((predictions_igt[:, :, 0] == query_labels_i[start:stop, None]).sum())
    return {k: Correct(*values) for k, values in counts.items()}
