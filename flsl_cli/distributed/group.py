"""The process group of a run: set up from what `env` reads, torn down at the end, and the
error shown when a peer of a collective is lost."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from flsl_cli.distributed.env import node_name, read_env
from flsl_cli.errors import FlslError

DEFAULT_TIMEOUT_MINUTES = 5.0  # recipe slurm.collective_timeout_minutes
# What gloo and NCCL say when the process at the other end of a collective is gone or silent.
# torch.distributed.DistError covers most such failures by type; some backends and versions still
# raise a plain RuntimeError whose words are all there is, so these are read as well.
_PEER_LOST = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out waiting",
    "connection refused",
    "socket closed",
    "nccl communicator was aborted",
    "caught collective operation timeout",
)


class PeerLost(FlslError):
    """Another process of the run died or stopped answering in the middle of a collective."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(*, use_cuda: bool | None = None, timeout_minutes: float = 30.0) -> DistEnv:
    """Initialise the default process group when there is more than one process; a collective
    that waits longer than `timeout_minutes` for a peer fails (see `peer_lost`). Training passes
    the recipe's slurm.collective_timeout_minutes; evaluation keeps a long wait, since one rank
    may work alone for a while there."""
    process = read_env()
    rank, local_rank, world_size = process.rank, process.local_rank, process.world_size
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def peer_lost(exc: BaseException, *, rank: int, timeout_minutes: float) -> PeerLost | None:
    """The error to show when `exc` says another process of the group died or timed out, else
    None. Names this process's rank and host; what the dead process saw is in its own log."""
    if not dist.is_initialized():
        return None
    text = str(exc).lower()
    if not (isinstance(exc, getattr(dist, "DistError", ())) or any(token in text for token in _PEER_LOST)):
        return None
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    first = first.split(". This is typically")[0][:300]  # gloo's advice: the fix below says it
    return PeerLost(
        f"rank {rank} on {node_name()} lost contact with another "
        f"process of the run (it died, or did not answer within slurm.collective_timeout_minutes = "
        f"{timeout_minutes:g}): {first}",
        fix="Look for the first error in the logs of the other ranks; then `flsl resume` continues from the "
        "newest checkpoint",
    )


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
