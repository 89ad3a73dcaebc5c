"""SLURM from the submitting side: the job script and submitting it (what the job asks for is
in `slurm_request.py`, questions to SLURM in `slurm_queries.py`).

A run is one job of N nodes x G tasks, one process per GPU (or CPU processes with gloo when G
is 0), marked requeueable, that asks SLURM for SIGUSR2 `slurm.signal_minutes_before_end`
before its time limit. flsl writes the job script itself (`sbatch_script`): its batch step
runs `python -m flsl_cli.launch.slurm_job batch`, which starts the tasks with srun and passes
every stop signal it gets on to them, so a signal to the batch shell (`scancel --batch`) stops
the run cleanly instead of ending the job. What the tasks do is in `slurm_job.py`.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flsl_cli import storage
from flsl_cli.launch.slurm_errors import SlurmError
from flsl_cli.launch.slurm_queries import partition_nodes, slurm_reason
from flsl_cli.launch.slurm_request import SlurmRequest

JOBS_DIR = "slurm"  # RUN_DIR/slurm: the job script, the job logs, rendezvous notes
SCRIPT_NAME = "job.sbatch"
STOP_SIGNAL = "USR2"  # what SLURM sends before the time limit


def _python(request: SlurmRequest) -> str:
    return request.slurm.python or shlex.quote(sys.executable)


def sbatch_options(request: SlurmRequest, *, run_dir: Path) -> dict[str, Any]:
    """The #SBATCH options of the job, in the order they are written."""
    folder = Path(run_dir) / JOBS_DIR
    options: dict[str, Any] = {
        "job-name": f"flsl-{Path(run_dir).name}",
        "nodes": request.nodes,
        "ntasks-per-node": request.tasks_per_node,
        "gpus-per-node": request.gpus_per_node or None,
        "cpus-per-task": request.cpus_per_task,
        "partition": request.slurm.partition,
        "account": request.slurm.account,
        "qos": request.slurm.qos,
        "constraint": request.slurm.constraint,
        "mem": request.slurm.mem,
        "time": request.slurm.time,
        "exclusive": True if request.slurm.exclusive else None,
        "signal": f"{STOP_SIGNAL}@{request.signal_seconds}",
        "requeue": True,
        "open-mode": "append",  # a requeued job appends to its logs
        "output": str(folder / "%j_batch.log"),
        "error": str(folder / "%j_batch.log"),
    }
    options.update({key.replace("_", "-"): value for key, value in request.slurm.extra_sbatch.items()})
    return {key: value for key, value in options.items() if value is not None and value is not False}


def sbatch_script(request: SlurmRequest, *, run_dir: Path) -> str:
    """The job script `submit` hands to sbatch (what `--dry-run` prints)."""
    lines = ["#!/bin/bash"]
    for key, value in sbatch_options(request, run_dir=run_dir).items():
        lines.append(f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={value}")
    lines += ["", *request.slurm.setup] if request.slurm.setup else []
    batch = [_python(request), "-u", "-m", "flsl_cli.launch.slurm_job", "batch", shlex.quote(str(run_dir)),
             "--logs", shlex.quote(str(Path(run_dir) / JOBS_DIR))]
    if not request.use_cuda:
        batch.append("--cpu")
    lines += ["", "# Starts the tasks with srun and passes stop signals on to them (flsl_cli/launch/slurm_job.py).",
              "exec " + " ".join(batch), ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    run_dir: Path
    stdout: Path
    stderr: Path


def task_logs(run_dir: Path, job_id: str, rank: int = 0) -> tuple[Path, Path]:
    folder = Path(run_dir) / JOBS_DIR
    return folder / f"{job_id}_{rank}_log.out", folder / f"{job_id}_{rank}_log.err"


def require_sbatch() -> None:
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        missing = "sbatch" if shutil.which("sbatch") is None else "srun"
        raise SlurmError(
            f"{missing} was not found on PATH, so the run cannot be submitted to SLURM",
            fix="Run it on this machine instead by leaving out --nodes and the other SLURM options "
                "(e.g. `flsl pretrain RECIPE --devices N`), or run the command on a SLURM login node "
                "(`module load slurm` on some clusters); --dry-run prints the job script without sbatch",
        )


def submit(request: SlurmRequest, *, run_dir: Path) -> SubmittedJob:
    """Write the job script into RUN_DIR/slurm and submit it; returns once SLURM accepted it."""
    require_sbatch()
    run_dir = Path(run_dir).absolute()
    folder = run_dir / JOBS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / SCRIPT_NAME
    storage.write_text_atomic(str(script), sbatch_script(request, run_dir=run_dir))
    try:
        answer = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60,
                                cwd=run_dir)
    except (OSError, subprocess.TimeoutExpired) as exc:
        answer = subprocess.CompletedProcess([], 1, "", str(exc))
    job_id = answer.stdout.strip().split(";")[0]
    if answer.returncode != 0 or not job_id.isdigit():
        script.unlink(missing_ok=True)
        reason = slurm_reason(answer.stderr)
        if any(words in reason.lower() for words in _NODE_COUNT_REFUSALS):
            known = partition_nodes(request.slurm.partition)
            if known is not None:
                raise SlurmError(
                    f"sbatch refused the job: {reason}: partition {known[0]} has {known[1]} node(s), "
                    f"the job asks for {request.nodes}",
                    fix=f"Use --nodes {known[1]} or fewer, or another --partition (see `sinfo`)",
                )
        raise SlurmError(
            f"sbatch refused the job: {reason}",
            fix="Check the SLURM options (--partition, --account, --qos, --time, --constraint, --mem) "
                "against `sinfo` and your cluster's rules; --dry-run prints the job script",
        )
    stdout, stderr = task_logs(run_dir, job_id)
    return SubmittedJob(job_id=job_id, run_dir=run_dir, stdout=stdout, stderr=stderr)


_NODE_COUNT_REFUSALS = ("node count specification invalid", "requested node configuration is not available")
