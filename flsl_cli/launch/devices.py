"""Which devices the processes of a run on this machine use, and how much memory each has."""

from __future__ import annotations

import torch

from flsl_cli.config.memory import host_memory_bytes
from flsl_cli.errors import FlslError


def resolve_devices(requested: int | None) -> tuple[int, bool]:
    """(number of processes, use CUDA). Default: every local GPU, else one CPU process."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested is None:
        return (gpus, True) if gpus else (1, False)
    if requested < 1:
        raise FlslError(f"--devices must be at least 1, found {requested}", fix="Use e.g. --devices 1")
    if gpus and requested > gpus:
        raise FlslError(
            f"--devices {requested} asks for more GPUs than this machine has ({gpus})",
            fix=f"Use --devices {gpus} or fewer",
        )
    return requested, bool(gpus)


def device_memory(*, devices: int, use_cuda: bool) -> tuple[int | None, str, int]:
    """(bytes one process may use, what holds them, processes sharing them): the smallest GPU's
    memory with one process per GPU, or this machine's memory shared by every CPU process."""
    if use_cuda:
        smallest = min(torch.cuda.get_device_properties(i).total_memory for i in range(devices))
        return smallest, f"each GPU ({torch.cuda.get_device_name(0)})", 1
    return host_memory_bytes(), f"this machine ({devices} CPU process{'es' if devices > 1 else ''})", devices
