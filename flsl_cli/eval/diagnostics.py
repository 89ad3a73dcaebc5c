"""Diagnostics of what a network's dense features look like: the signs of collapse that a k-NN
figure alone does not explain.

- effective rank of the tokens: exp of the entropy of the normalised squared singular values of
  the centred (tokens x dims) matrix; 1 when every token lies on one line, dims when they fill
  every direction equally.
- similarity within and between images: mean cosine of two tokens of one image, and of two
  tokens of different images. Tokens that all point the same way (within and between near 1)
  have collapsed; within near between means the tokens carry nothing of their image.
- the head's view (flsl networks only): mean entropy of the teacher's prototype distribution
  per token at the teacher temperature, the share of prototypes that are some token's first
  choice, and the perplexity of the mean distribution as a share of K (1: every prototype used
  equally, 1/K: one prototype takes all).

Tensor legend: b = images, n = tokens per image, d = embed dim, k = prototypes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DIAGNOSTICS = (
    "effective_rank",
    "within_image_cosine",
    "between_image_cosine",
    "teacher_entropy",
    "prototypes_in_use",
    "mean_perplexity_share",
)


def effective_rank(features_nd: torch.Tensor) -> float:
    """exp(entropy) of the normalised squared singular values of the centred rows."""
    centred = features_nd.double() - features_nd.double().mean(dim=0, keepdim=True)
    energy = torch.linalg.svdvals(centred) ** 2
    total = energy.sum()
    if total <= 0:
        return 1.0
    share = energy / total
    share = share[share > 0]
    return float(torch.exp(-(share * share.log()).sum()))


def image_similarity(tokens_bnd: torch.Tensor) -> tuple[float, float]:
    """(mean cosine of two different tokens of one image, mean cosine of two tokens of different
    images); the second is nan for a single image."""
    images, tokens = tokens_bnd.shape[:2]
    unit = F.normalize(tokens_bnd.double(), dim=-1)
    sum_unit_bd = unit.sum(dim=1)
    # the sum over pairs (i in image a, j in image b) of cos(i, j) is sum_a . sum_b
    pair_sums_bb = sum_unit_bd @ sum_unit_bd.T
    own = pair_sums_bb.diagonal()
    within = float(((own - tokens) / max(1, tokens * tokens - tokens)).mean())
    if images < 2:
        return within, math.nan
    between = float((pair_sums_bb.sum() - own.sum()) / (tokens * tokens * (images * images - images)))
    return within, between


def prototype_usage(probs_nk: torch.Tensor) -> dict[str, float]:
    """Mean entropy of each row (nats), share of prototypes that are some row's argmax, and the
    perplexity of the mean row as a share of K."""
    probs = probs_nk.double()
    k = probs.shape[1]
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1).mean()
    mean = probs.mean(dim=0)
    perplexity = torch.exp(-(mean * mean.clamp_min(1e-12).log()).sum())
    return {
        "teacher_entropy": float(entropy.detach()),
        "prototypes_in_use": probs.argmax(dim=1).unique().numel() / k,
        "mean_perplexity_share": float(perplexity) / k,
    }


@torch.no_grad()
def feature_diagnostics(
    tokens_bnd: torch.Tensor, *, head: nn.Module | None = None, teacher_temp: float | None = None
) -> dict[str, float]:
    """Every diagnostic of one batch of token maps; the head's figures when a head and its
    temperature are given."""
    flat_nd = tokens_bnd.reshape(-1, tokens_bnd.shape[-1]).float()
    within, between = image_similarity(tokens_bnd)
    results = {
        "effective_rank": effective_rank(flat_nd),
        "within_image_cosine": within,
        "between_image_cosine": between,
    }
    if head is not None and teacher_temp is not None:
        probs_nk = F.softmax(head(flat_nd).float() / teacher_temp, dim=-1)
        results.update(prototype_usage(probs_nk))
    return results
