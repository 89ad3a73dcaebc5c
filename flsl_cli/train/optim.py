"""AdamW with weight decay only on weights (not on biases, norms or other 1-d parameters)."""

from __future__ import annotations

import torch
from torch import nn

from flsl_cli.config.schema import OptimConfig


def parameter_groups(model: nn.Module) -> list[dict]:
    decayed: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (plain if parameter.ndim <= 1 or name.endswith(".bias") else decayed).append(parameter)
    return [{"params": decayed, "apply_wd": True}, {"params": plain, "apply_wd": False, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, *, config: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; the fused CUDA kernel on GPUs (one launch for all parameters)."""
    return torch.optim.AdamW(
        parameter_groups(model), lr=0.0, betas=config.betas, weight_decay=0.0, fused=device.type == "cuda"
    )


def set_schedule(optimizer: torch.optim.Optimizer, *, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay if group["apply_wd"] else 0.0
