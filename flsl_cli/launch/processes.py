"""One function, run in this process or in N spawned local processes: the one rule both
`flsl pretrain`/`flsl resume` (here) and `flsl knn-eval` follow."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from flsl_cli import signals
from flsl_cli.launch.local import run_local_processes

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def run_processes(fn: Callable[..., Any], *, nprocs: int, kwargs: dict[str, Any], stop_at_step: bool) -> Any:
    """fn(**kwargs) in this process when `nprocs` is 1 (its return value is returned), else in
    `nprocs` spawned processes, one per GPU or CPU process (None is returned).

    A single process is a world of one: rank variables inherited from a launcher are dropped.
    With `stop_at_step` a stop signal from here on is a request that the run answers at its next
    step (see `flsl_cli.signals`); spawned processes always treat it so."""
    if nprocs > 1:
        run_local_processes(fn, nprocs=nprocs, kwargs=kwargs)
        return None
    if stop_at_step:
        signals.stop_request()
    for name in _TORCHRUN_VARIABLES:
        os.environ.pop(name, None)
    return fn(**kwargs)
