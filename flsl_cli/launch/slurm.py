"""SLURM from the submitting side: what to ask for, the job script, submitting it, and asking
SLURM about jobs.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flsl_cli.errors import FlslError

JOBS_DIR = "slurm"  # RUN_DIR/slurm: the job script, the job logs, rendezvous notes
SCRIPT_NAME = "job.sbatch"
STOP_SIGNAL = "USR2"  # what SLURM sends before the time limit


class SlurmError(FlslError):
    """Submitting to SLURM, or requeueing inside a job, did not work."""


# --- What to ask SLURM for --------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmFlags:
    """SLURM options given on the command line; None means "not given" (the recipe decides)."""

    nodes: int | None = None
    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    constraint: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    exclusive: bool | None = None

    def given(self) -> bool:
        return any(value is not None for value in asdict(self).values())


@dataclass(frozen=True)
class SlurmRequest:
    """One job's resources, resolved from the recipe's `slurm` section and the flags."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    signal_seconds: int
    max_requeues: int
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    constraint: str | None = None
    mem: str | None = None
    cpus_per_task: int = 1
    exclusive: bool = False
    extra_sbatch: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    python: str | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def use_cuda(self) -> bool:
        return self.gpus_per_node > 0

    def describe(self) -> str:
        kind = "GPU" if self.use_cuda else "CPU"
        nodes = f"{self.nodes} node{'s' if self.nodes > 1 else ''}"
        return f"{nodes} x {self.tasks_per_node} {kind} process(es) = {self.world_size}"

    def record(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value not in (None, [], {})}


def resolve_request(config, flags: SlurmFlags, *, data_workers: int) -> SlurmRequest:
    """Merge the recipe's `slurm` section (a SlurmConfig) with the flags; check the result. A
    process asks for its data workers + 1 CPUs unless the flags or the recipe say otherwise."""
    from flsl_cli.config.schema import SlurmConfig

    def pick(name: str):
        value = getattr(flags, name)
        return getattr(config, name) if value is None else value

    for name, least in (("nodes", 1), ("gpus_per_node", 0), ("tasks_per_node", 1), ("cpus_per_task", 1)):
        value = getattr(flags, name)
        if value is not None and value < least:
            flag = "--" + name.replace("_", "-")
            remedy = ("; leave out --nodes and the other SLURM options to train on this machine"
                      if name == "nodes" else "")
            raise SlurmError(f"{flag} must be at least {least}, found {value}",
                             fix=f"Use e.g. {flag} {max(least, 1)}{remedy}")
    gpus = pick("gpus_per_node")
    tasks = pick("tasks_per_node")
    if gpus and tasks is not None and tasks != gpus:
        raise SlurmError(
            f"--tasks-per-node {tasks} does not match --gpus-per-node {gpus}: flsl runs one process per GPU",
            fix=f"Leave out --tasks-per-node, or use --gpus-per-node 0 --tasks-per-node {tasks} for CPU processes",
        )
    limit = pick("time")
    signal_seconds = int(round(config.signal_minutes_before_end * 60))
    if limit is not None:
        try:
            seconds = SlurmConfig.time_limit_seconds(limit)
        except ValueError as exc:
            raise SlurmError(f"--time: {exc}",
                             fix="Use SLURM's format, e.g. --time 2-00:00:00 or --time 12:00:00") from None
        if seconds is not None and signal_seconds >= seconds:
            raise SlurmError(
                f"the time limit {limit} is not longer than slurm.signal_minutes_before_end "
                f"({config.signal_minutes_before_end} min), so the job would be told to stop as it starts",
                fix="Ask for more time, or lower slurm.signal_minutes_before_end with --set",
            )
    return SlurmRequest(
        nodes=pick("nodes"), tasks_per_node=gpus or tasks or 1, gpus_per_node=gpus,
        signal_seconds=signal_seconds, max_requeues=config.max_requeues,
        partition=pick("partition"), account=pick("account"), qos=pick("qos"), time=limit,
        constraint=pick("constraint"), mem=pick("mem"), cpus_per_task=pick("cpus_per_task") or data_workers + 1,
        exclusive=bool(pick("exclusive")), extra_sbatch=dict(config.extra_sbatch), setup=list(config.setup),
        python=config.python,
    )


def _python(request: SlurmRequest) -> str:
    return request.python or shlex.quote(sys.executable)


def sbatch_options(request: SlurmRequest, *, run_dir: Path) -> dict[str, Any]:
    """The #SBATCH options of the job, in the order they are written."""
    folder = Path(run_dir) / JOBS_DIR
    options: dict[str, Any] = {
        "job-name": f"flsl-{Path(run_dir).name}",
        "nodes": request.nodes,
        "ntasks-per-node": request.tasks_per_node,
        "gpus-per-node": request.gpus_per_node or None,
        "cpus-per-task": request.cpus_per_task,
        "partition": request.partition,
        "account": request.account,
        "qos": request.qos,
        "constraint": request.constraint,
        "mem": request.mem,
        "time": request.time,
        "exclusive": True if request.exclusive else None,
        "signal": f"{STOP_SIGNAL}@{request.signal_seconds}",
        "requeue": True,
        "open-mode": "append",  # a requeued job appends to its logs
        "output": str(folder / "%j_batch.log"),
        "error": str(folder / "%j_batch.log"),
    }
    options.update({key.replace("_", "-"): value for key, value in request.extra_sbatch.items()})
    return {key: value for key, value in options.items() if value is not None and value is not False}


def sbatch_script(request: SlurmRequest, *, run_dir: Path) -> str:
    """The job script `submit` hands to sbatch (what `--dry-run` prints)."""
    lines = ["#!/bin/bash"]
    for key, value in sbatch_options(request, run_dir=run_dir).items():
        lines.append(f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={value}")
    lines += ["", *request.setup] if request.setup else []
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
    from flsl_cli.train.rundir import write_text_atomic

    require_sbatch()
    run_dir = Path(run_dir).absolute()
    folder = run_dir / JOBS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / SCRIPT_NAME
    write_text_atomic(script, sbatch_script(request, run_dir=run_dir))
    try:
        answer = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60,
                                cwd=run_dir)
    except (OSError, subprocess.TimeoutExpired) as exc:
        answer = subprocess.CompletedProcess([], 1, "", str(exc))
    job_id = answer.stdout.strip().split(";")[0]
    if answer.returncode != 0 or not job_id.isdigit():
        script.unlink(missing_ok=True)
        reason = _sbatch_reason(answer.stderr)
        if any(words in reason.lower() for words in _NODE_COUNT_REFUSALS):
            known = partition_nodes(request.partition)
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


def partition_nodes(partition: str | None) -> tuple[str, int] | None:
    """(name, node count) of `partition`, or of the default partition when None; None when
    sinfo does not answer or knows no such partition."""
    answer = _ask(["sinfo", "-h", "-o", "%P|%D"])
    if answer is None or answer.returncode != 0:
        return None
    counts: dict[str, int] = {}
    default = None
    for line in answer.stdout.splitlines():
        name, _, count = line.strip().partition("|")
        if name.endswith("*"):
            name = default = name[:-1]
        if count.isdigit():
            counts[name] = counts.get(name, 0) + int(count)
    name = partition or default
    return (name, counts[name]) if name in counts else None


def _sbatch_reason(text: str) -> str:
    reasons: list[str] = []
    for line in text.strip().splitlines():
        line = line.strip()
        for prefix in ("sbatch: error: ", "sbatch: fatal: ", "error: "):
            if line.startswith(prefix):
                line = line[len(prefix):]
        if line and line not in reasons:
            reasons.append(line)
    return "; ".join(reasons) or "no reason given"


# --- Asking SLURM about jobs ------------------------------------------------------------------


def _ask(command: list[str]) -> subprocess.CompletedProcess | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None


def job_state(job_id: str) -> str | None:
    """The job's state (RUNNING, PENDING, COMPLETED, ...), "" when SLURM no longer knows the job,
    None when neither squeue nor sacct answers."""
    answer = _ask(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T"])
    if answer is not None:
        if answer.returncode == 0:
            states = answer.stdout.split()
            if states:
                return states[0]
        elif "invalid job id" not in answer.stderr.lower():
            answer = None
    accounted = _ask(["sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", "State"])
    if accounted is not None and accounted.returncode == 0 and accounted.stdout.strip():
        return accounted.stdout.split()[0]
    return "" if answer is not None else None


UNKNOWN_TO_SLURM = "UNKNOWN_TO_SLURM"  # job_details' state of a job squeue no longer knows


def job_details(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """{job id: {state, elapsed, time_limit, nodes, reason, exit_code}} from squeue (and sacct
    when it answers); a job squeue answers for but no longer knows gets the state
    UNKNOWN_TO_SLURM; jobs nothing answers for are left out."""
    details: dict[str, dict[str, str]] = {}
    for job_id in job_ids:
        answer = _ask(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%i|%T|%M|%l|%N|%r"])
        if answer is None:
            continue
        if answer.returncode == 0:
            for line in answer.stdout.splitlines():
                parts = line.split("|")
                if len(parts) == 6 and parts[0] == str(job_id):
                    details[job_id] = dict(zip(("state", "elapsed", "time_limit", "nodes", "reason"), parts[1:]))
        if job_id not in details and (answer.returncode == 0 or "invalid job id" in answer.stderr.lower()):
            details[job_id] = {"state": UNKNOWN_TO_SLURM}
    if job_ids:
        accounted = _ask(["sacct", "-n", "-P", "-X", "-j", ",".join(map(str, job_ids)),
                          "-o", "JobID,State,ExitCode,Elapsed"])
        if accounted is not None and accounted.returncode == 0:
            for line in accounted.stdout.splitlines():
                parts = line.split("|")
                if len(parts) == 4 and parts[0] in job_ids:
                    entry = details.setdefault(parts[0], {})
                    if entry.get("state") in (None, UNKNOWN_TO_SLURM):
                        entry["state"] = parts[1]
                    entry.setdefault("elapsed", parts[3])
                    entry["exit_code"] = parts[2]
    return details


def requeue(job_id: str) -> str | None:
    """`scontrol requeue JOB`; None when it worked (or SLURM had already requeued the job, as it
    does itself on preemption with PreemptMode=REQUEUE), else the reason."""
    answer = _ask(["scontrol", "requeue", str(job_id)])
    if answer is None:
        return "scontrol was not found on PATH (or did not answer)"
    if answer.returncode == 0:
        return None
    reason = _sbatch_reason(answer.stderr.replace("scontrol: error: ", "")) or f"exit code {answer.returncode}"
    state = job_state(job_id) or ""
    if state.startswith(("PENDING", "REQUEUE")):
        return None
    return reason


def job_info(job_id: str) -> dict[str, str] | None:
    """`scontrol show job JOB` as {field: value} (JobState, Restarts, PreemptTime, RunTime,
    TimeLimit, NodeList, ...); None when scontrol does not answer."""
    answer = _ask(["scontrol", "show", "job", "--oneliner", str(job_id)])
    if answer is None or answer.returncode != 0:
        return None
    fields = {}
    for word in answer.stdout.split():
        key, equals, value = word.partition("=")
        if equals and key not in fields:
            fields[key] = value
    return fields
