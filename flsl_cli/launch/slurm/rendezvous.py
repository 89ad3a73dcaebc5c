"""Rendezvous for a task of a SLURM job: the torchrun-style variables that
`flsl_cli.distributed.group.setup()` reads, derived from what `submitit.JobEnvironment` makes
of SLURM's variables.

    MASTER_ADDR   first host of the job (`job_hosts`: submitit expands SLURM_JOB_NODELIST of
                  every form, `n[1-2]-ib`, `r[1-2]n[01-03]`, `node[01-03,07],gpu5`)
    MASTER_PORT   first candidate derived from the job id and restart count: concurrent jobs
                  get different ports, and each restart of a job another one. Rank 0 takes the
                  first candidate it can bind (a port in use is skipped) and notes it in the
                  run directory, which every node sees; the other ranks read it there
                  (`agree_on_port`), so all use the same port
    RANK, LOCAL_RANK, WORLD_SIZE   from SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS

Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from flsl_cli import storage
from flsl_cli.distributed.env import slurm_task
from flsl_cli.errors import FlslError

PORT_BASE = 20000
PORT_SPAN = 20000


class RendezvousError(FlslError):
    """The processes of a job could not agree where to meet."""


def job_hosts() -> list[str]:
    """The hosts of this SLURM job, in order, as `submitit.JobEnvironment` expands
    SLURM_JOB_NODELIST (this host alone outside a job). A node list submitit cannot read is a
    RendezvousError naming it."""
    from submitit.slurm.slurm import SlurmJobEnvironment, SlurmParseException

    try:
        return list(SlurmJobEnvironment().hostnames)
    except SlurmParseException as exc:
        reason = exc.args[0] if exc.args else exc
        raise RendezvousError(
            f"cannot read the SLURM node list {os.environ.get('SLURM_JOB_NODELIST')!r} ({reason})",
            fix="Export FLSL_MASTER_ADDR with the first node's address before submitting",
        ) from None


RESTART_SLOTS = 4


def master_port(job_id: str, restart_count: int = 0) -> int:
    """The first candidate port of one job attempt, in [20000, 40000): jobs whose ids differ by
    less than 5000 never share it, and consecutive restarts of a job differ, so a restart never
    meets a socket its previous attempt left in TIME_WAIT."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    slot = int(digits) % (PORT_SPAN // RESTART_SLOTS)
    return PORT_BASE + slot * RESTART_SLOTS + restart_count % RESTART_SLOTS


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def agree_on_port(folder: Path, *, attempt: str, rank: int, first: int, timeout: float = 300.0) -> int:
    """The rendezvous port of this job attempt, the same on every rank: rank 0 (on the first
    node) takes the first of `first`, `first + RESTART_SLOTS`, ... that it can bind and writes
    it to `folder/rendezvous-ATTEMPT.json`; the others wait for that file."""
    note = Path(folder) / f"rendezvous-{attempt}.json"
    if rank == 0:
        for old in Path(folder).glob("rendezvous-*.json"):
            if old != note:
                old.unlink(missing_ok=True)
        candidates = [PORT_BASE + (first - PORT_BASE + i * RESTART_SLOTS) % PORT_SPAN for i in range(64)]
        port = next((p for p in candidates if _bindable(p)), first)
        storage.replace_local(note, lambda handle: handle.write(json.dumps({"port": port}).encode()))
        return port
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(json.loads(note.read_text())["port"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    raise RendezvousError(
        f"rank {rank} waited {timeout:.0f} s for rank 0 to note the rendezvous port in {note}",
        where=str(folder),
        fix="The run directory must be on a filesystem every node sees; check rank 0's log for an error",
    )


def torch_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables a task of this SLURM job must export before `setup()`; they replace any
    torchrun-style values inherited from the submitting shell. Rank, local rank and task count
    come from `environ` (default: this process's), the hosts from `job_hosts`."""
    environ = os.environ if environ is None else environ
    task = slurm_task(environ)
    if task is None:
        raise KeyError("SLURM_JOB_ID / SLURM_PROCID are not set: this is not a task of a SLURM job step")
    return {
        "MASTER_ADDR": environ.get("FLSL_MASTER_ADDR") or job_hosts()[0],
        "MASTER_PORT": environ.get("FLSL_MASTER_PORT") or str(master_port(environ["SLURM_JOB_ID"], task.restart)),
        "RANK": str(task.rank),
        "LOCAL_RANK": str(task.local_rank),
        "WORLD_SIZE": str(task.world_size),
    }
