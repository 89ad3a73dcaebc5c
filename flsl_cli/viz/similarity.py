"""Similarity maps of a token grid (h, w, d), as numbers in [0, 1] or [-1, 1] per token.

- ASS (Aggregated Similarity Score): each token's cosine-similarity map to all tokens of the
  image, the maps summed, then divided by the largest sum. Tokens of large regions whose
  features agree score high; FLSL's features make it follow objects and stuff.
- Probe: the cosine similarity of one query token to every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_matrix(tokens_nd: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(tokens_nd.float(), dim=-1)
    return unit @ unit.T


def ass_map(tokens_hwd: torch.Tensor) -> torch.Tensor:
    """(h, w): the summed cosine-similarity maps of all tokens, normalised by their maximum."""
    h, w, d = tokens_hwd.shape
    summed = cosine_matrix(tokens_hwd.reshape(h * w, d)).sum(dim=0)
    return (summed / summed.max().clamp_min(1e-12)).reshape(h, w)


def probe_map(tokens_hwd: torch.Tensor, *, row: int, col: int) -> torch.Tensor:
    """(h, w): the cosine similarity of the token at (row, col) to every token."""
    unit = F.normalize(tokens_hwd.float(), dim=-1)
    return (unit * unit[row, col]).sum(dim=-1)
