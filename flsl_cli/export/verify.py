"""Checks that a written export reproduces the source backbone: the same keys and shapes as
the documented mapping, and the same patch features on random inputs (max abs difference
within a tolerance per format)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from flsl_cli.export import ExportError

# fp32 round trips of the same weights through the same code are exact; ONNX Runtime runs
# other kernels, whose rounding differs in the last bits, so its tolerance also grows with the
# size of the features (times max(1, max |feature|)).
TOLERANCE = {"timm": 1e-5, "mmseg": 1e-5, "mmdet": 1e-5, "detectron2": 1e-5, "onnx": 1e-4}
RELATIVE = {"onnx"}

NOTHING_WRITTEN_FIX = (
    "Nothing was written. Report this with your torch, timm and onnxruntime versions; "
    "a different version of the loader may help meanwhile"
)


@dataclass(frozen=True)
class Check:
    """One reload of the written file compared with the source backbone."""

    label: str
    max_abs_diff: float
    tolerance: float


def random_images(*, batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Normalized-image-like inputs, (batch, 3, size, size), the same on every run."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def _as_array(tokens) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        return tokens.detach().cpu().float().numpy()
    return np.asarray(tokens, dtype=np.float32)


@torch.no_grad()
def compare_features(
    reference: Callable,
    candidate: Callable,
    images: torch.Tensor,
    *,
    label: str,
    tolerance: float,
    where: str,
    relative: bool = False,
) -> Check:
    """Run both on `images`; fail unless the outputs have one shape and differ by <= tolerance
    (times max(1, max |reference|) if `relative`)."""
    expected = _as_array(reference(images))
    found = _as_array(candidate(images))
    if relative and expected.size:
        tolerance *= max(1.0, float(np.abs(expected).max()))
    if expected.shape != found.shape:
        raise ExportError(
            f"verification failed ({label}): features of shape {found.shape}, expected {expected.shape}",
            where=where,
            fix=NOTHING_WRITTEN_FIX,
        )
    difference = float(np.abs(expected - found).max()) if expected.size else 0.0
    if not np.isfinite(difference) or difference > tolerance:
        raise ExportError(
            f"verification failed ({label}): max abs difference {difference:.3g} is above the tolerance {tolerance:g}",
            where=where,
            fix=NOTHING_WRITTEN_FIX,
        )
    return Check(label=label, max_abs_diff=difference, tolerance=tolerance)


def check_keys(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], *, label: str, where: str
) -> None:
    """Fail unless the written keys and shapes are exactly the documented ones."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(key for key in set(found) & set(expected) if tuple(found[key]) != tuple(expected[key]))
    if missing or unexpected or wrong:
        parts = [
            f"{name}: {', '.join(keys[:3])}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        raise ExportError(
            f"verification failed ({label}): the keys differ from the documented mapping ({'; '.join(parts)})",
            where=where,
            fix=NOTHING_WRITTEN_FIX,
        )
