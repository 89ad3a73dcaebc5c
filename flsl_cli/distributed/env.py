"""The one place that reads the process environment: which process of a run this is (torchrun,
`flsl --devices`, SLURM, or a single plain process), whether torchrun started it, its local
rank, the SLURM job it runs in, and the CPUs it may use. Pure reads of a mapping (`os.environ`
by default); torch is not imported.

One local-rank rule: LOCAL_RANK when a launcher set it, else SLURM_LOCALID, except that a task
to which SLURM binds exactly one GPU (CUDA_VISIBLE_DEVICES names one) uses device 0.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    local_rank: int
    world_size: int


@dataclass(frozen=True)
class SlurmTask:
    """A task of a SLURM job step, as SLURM describes it."""

    job_id: str
    rank: int  # SLURM_PROCID
    local_rank: int  # by the one local-rank rule
    world_size: int  # SLURM_NTASKS (or SLURM_NPROCS)
    nodelist: str  # the step's nodes, else the job's
    restart: int  # SLURM_RESTART_COUNT: how often the job was requeued
    node: str | None  # SLURMD_NODENAME


def read_env(environ: Mapping[str, str] | None = None) -> ProcessEnv:
    """This process's rank, local rank and world size: torchrun-style variables (set by torchrun,
    `flsl --devices` and flsl's SLURM tasks), else SLURM's, else a single process."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return ProcessEnv(
            rank=int(environ["RANK"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            world_size=int(environ["WORLD_SIZE"]),
        )
    task = slurm_task(environ)
    if task is not None and "SLURM_NTASKS" in environ:
        return ProcessEnv(rank=task.rank, local_rank=task.local_rank, world_size=task.world_size)
    return ProcessEnv(rank=0, local_rank=0, world_size=1)


def torchrun_process(environ: Mapping[str, str] | None = None) -> ProcessEnv | None:
    """This process's place in a launch by torchrun (which sets TORCHELASTIC_RUN_ID beside RANK,
    LOCAL_RANK and WORLD_SIZE; flsl's own processes do not), or None."""
    environ = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in environ or "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    return read_env(environ)


def in_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a task of a SLURM job step."""
    environ = os.environ if environ is None else environ
    return "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ


def slurm_task(environ: Mapping[str, str] | None = None) -> SlurmTask | None:
    """The SLURM task this process is, or None outside a SLURM job step."""
    environ = os.environ if environ is None else environ
    if not in_slurm_job(environ):
        return None
    local_rank = int(environ.get("SLURM_LOCALID", 0))
    if visible_gpus(environ) == 1:  # SLURM bound one GPU to this task: its only device is index 0
        local_rank = 0
    return SlurmTask(
        job_id=slurm_job_id(environ) or environ["SLURM_JOB_ID"],
        rank=int(environ["SLURM_PROCID"]),
        local_rank=local_rank,
        world_size=slurm_tasks(environ),
        nodelist=environ.get("SLURM_STEP_NODELIST") or slurm_job_nodes(environ) or "127.0.0.1",
        restart=slurm_restarts(environ),
        node=slurm_node(environ),
    )


def slurm_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The SLURM job this process runs in (the batch step too), or None outside a job. A task
    of a job array is named as SLURM's commands and submitit name it, ARRAY_INDEX (`104_3`),
    not by its own SLURM_JOB_ID."""
    environ = os.environ if environ is None else environ
    array, index = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array and index:
        return f"{array}_{index}"
    return environ.get("SLURM_JOB_ID")


def slurm_restarts(environ: Mapping[str, str] | None = None) -> int:
    """How often SLURM requeued this job (SLURM_RESTART_COUNT); 0 outside a job."""
    environ = os.environ if environ is None else environ
    return int(environ.get("SLURM_RESTART_COUNT") or 0)


def slurm_job_nodes(environ: Mapping[str, str] | None = None) -> str | None:
    """The nodes of this SLURM job (SLURM_JOB_NODELIST), or None outside a job."""
    environ = os.environ if environ is None else environ
    return environ.get("SLURM_JOB_NODELIST") or None


def slurm_tasks(environ: Mapping[str, str] | None = None) -> int:
    """The tasks of this SLURM job (SLURM_NTASKS, or SLURM_NPROCS); 1 when neither is set."""
    environ = os.environ if environ is None else environ
    return int(environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS") or 1)


def slurm_node(environ: Mapping[str, str] | None = None) -> str | None:
    """This machine's name as SLURM knows it (SLURMD_NODENAME), or None outside a job."""
    environ = os.environ if environ is None else environ
    return environ.get("SLURMD_NODENAME") or None


def visible_gpus(environ: Mapping[str, str] | None = None) -> int | None:
    """How many GPUs CUDA_VISIBLE_DEVICES names, or None when it is not set."""
    environ = os.environ if environ is None else environ
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return len([item for item in value.split(",") if item.strip()])


def node_name(environ: Mapping[str, str] | None = None) -> str:
    """This machine's name as SLURM knows it, else its host name."""
    return slurm_node(environ) or socket.gethostname()


def local_processes(environ: Mapping[str, str] | None = None) -> int:
    """Training processes on this machine: torchrun's/`flsl --devices`'s LOCAL_WORLD_SIZE, or
    SLURM's tasks per node ("2(x3)" counts 2), else 1."""
    environ = os.environ if environ is None else environ
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = environ.get(name, "").split("(")[0].split(",")[0]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (as PyTorch's DataLoader counts them),
    else every CPU of the machine where there is no mask (not Linux)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_threads(*, data_workers: int, environ: Mapping[str, str] | None = None) -> int:
    """Threads of a training process on CPU: its share of the CPUs it may run on, less one per
    data worker (they compute too: more threads than CPUs slows every step several times over
    as soon as anything else runs). OMP_NUM_THREADS, when set, decides."""
    environ = os.environ if environ is None else environ
    chosen = environ.get("OMP_NUM_THREADS", "").split(",")[0]
    if chosen.isdigit() and int(chosen) > 0:
        return int(chosen)
    return max(1, usable_cpus() // local_processes(environ) - data_workers)
