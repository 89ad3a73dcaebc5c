"""The one rule for the dtype a model runs in under autocast, for training and evaluation alike."""

from __future__ import annotations

import torch


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None (fp32) on CPU and for fp32; bf16 for auto on GPUs that have it (no gradient scaler
    then), fp16 otherwise (with one when training)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16
