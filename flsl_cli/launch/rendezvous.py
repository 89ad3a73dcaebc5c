"""Rendezvous for a process started by SLURM (submitit or `srun`): the torchrun-style variables
that `flsl_cli.distributed.group.setup()` reads, derived from SLURM's own.

    MASTER_ADDR   first host of SLURM_JOB_NODELIST
    MASTER_PORT   first candidate derived from the job id and restart count: concurrent jobs
                  get different ports, and each restart of a job another one. Rank 0 takes the
                  first candidate it can bind (a port in use is skipped) and notes it in the
                  run directory, which every node sees; the other ranks read it there
                  (`agree_on_port`), so all use the same port
    RANK, LOCAL_RANK, WORLD_SIZE   from SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS

Apart from `agree_on_port`, pure functions of an environment mapping; nothing here imports torch.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from flsl_cli import storage
from flsl_cli.distributed.env import slurm_task
from flsl_cli.errors import FlslError

PORT_BASE = 20000
PORT_SPAN = 20000
_GROUP = re.compile(r"([^,\[]+)(?:\[([^\]]+)\])?")


class NodeListError(ValueError):
    """SLURM_JOB_NODELIST has a form this parser does not know."""


class RendezvousError(FlslError):
    """The processes of a job could not agree where to meet."""


def expand_nodelist(nodelist: str) -> list[str]:
    """`node[01-03,07],gpu5` -> [node01, node02, node03, node07, gpu5] (what `scontrol show
    hostnames` prints). Zero padding of ranges is kept."""
    hosts: list[str] = []
    pos = 0
    text = nodelist.strip()
    while pos < len(text):
        match = _GROUP.match(text, pos)
        if not match or match.end() == pos:
            raise NodeListError(f"cannot parse the SLURM node list {nodelist!r}")
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
        else:
            for part in ranges.split(","):
                first, _, last = part.partition("-")
                if not first.isdigit() or (last and not last.isdigit()):
                    raise NodeListError(f"cannot parse the SLURM node list {nodelist!r}")
                width = len(first)
                for number in range(int(first), int(last or first) + 1):
                    hosts.append(f"{prefix}{number:0{width}d}")
        pos = match.end()
        if pos < len(text):
            if text[pos] != ",":
                raise NodeListError(f"cannot parse the SLURM node list {nodelist!r}")
            pos += 1
    return hosts


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


def torch_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables a task of this SLURM job must export before `setup()`; they replace any
    torchrun-style values inherited from the submitting shell."""
    task = slurm_task(environ)
    if task is None:
        raise KeyError("SLURM_JOB_ID / SLURM_PROCID are not set: this is not a task of a SLURM job step")
    return {
        "MASTER_ADDR": environ.get("FLSL_MASTER_ADDR") or expand_nodelist(task.nodelist)[0],
        "MASTER_PORT": environ.get("FLSL_MASTER_PORT") or str(master_port(task.job_id, task.restart)),
        "RANK": str(task.rank),
        "LOCAL_RANK": str(task.local_rank),
        "WORLD_SIZE": str(task.world_size),
    }
