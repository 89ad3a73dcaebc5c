"""Collectives that are no-ops on a single process, so the math never branches on them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all processes (a new tensor, no gradient)."""
    total = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    total = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return total


def gather_objects(items: list) -> list:
    """Every process's list items, concatenated in rank order (pickled between this job's own
    processes only)."""
    if not is_distributed():
        return list(items)
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def barrier_started() -> Callable[[], bool]:
    """Enter a barrier without waiting in it; returns `passed()`: False while other processes
    have not arrived, True once all have; it raises if the barrier failed (a peer died)."""
    if not is_distributed():
        return lambda: True
    work = dist.barrier(async_op=True)

    def passed() -> bool:
        if not work.is_completed():
            return False
        work.wait()  # raises the barrier's error, if any
        return True

    return passed


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` concatenated along dim 0, in rank order; row counts may differ.

    The tensor must live where the backend communicates (CUDA for NCCL, CPU for gloo).
    """
    if not is_distributed():
        return tensor
    count = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    rows = [int(c) for c in counts]
    padded = tensor.new_zeros((max(rows), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    pieces = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:n] for piece, n in zip(pieces, rows)])
