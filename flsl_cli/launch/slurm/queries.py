"""Asking SLURM about partitions and jobs (sinfo, squeue, sacct, scontrol), and requeueing a
job. Every question answers None (or leaves the job out) when the command is missing or does
not answer, so a caller can tell "SLURM says no" from "SLURM cannot be asked".

Inside a job these commands often run while SLURM is ending it: a job that requeues itself
gets SIGTERM on every process of the job, the `scontrol requeue` that asked for it included.
So every command starts with the stop signals held (`signals.held`): it ends with its answer,
not killed by that signal."""

from __future__ import annotations

import shutil
import subprocess

from flsl_cli import signals
from flsl_cli.train.run_record import JobStates


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


def slurm_reason(text: str) -> str:
    reasons: list[str] = []
    for line in text.strip().splitlines():
        line = line.strip()
        for prefix in ("sbatch: error: ", "sbatch: fatal: ", "error: "):
            line = line.removeprefix(prefix)
        if line and line not in reasons:
            reasons.append(line)
    return "; ".join(reasons) or "no reason given"


def _ask(command: list[str]) -> subprocess.CompletedProcess | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        with signals.held():  # the command inherits them held: SLURM's SIGTERM to the job does not end it
            return subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None


def job_state(job_id: str) -> str | None:
    """The job's state (RUNNING, PENDING, COMPLETED, ...), "" when SLURM no longer knows the job,
    None when neither squeue nor sacct answers."""
    answer = _ask(["squeue", "-h", "-r", "-t", "all", "-j", str(job_id), "-o", "%T"])
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
        answer = _ask(["squeue", "-h", "-r", "-t", "all", "-j", str(job_id), "-o", "%i|%T|%M|%l|%N|%r"])
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
        accounted = _ask(
            ["sacct", "-n", "-P", "-X", "-j", ",".join(map(str, job_ids)), "-o", "JobID,State,ExitCode,Elapsed"]
        )
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


def max_array_size() -> int | None:
    """The cluster's MaxArraySize (`scontrol show config`): a job array's indices stay below
    it. None when scontrol does not answer."""
    answer = _ask(["scontrol", "show", "config"])
    if answer is None or answer.returncode != 0:
        return None
    for line in answer.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize" and value.strip().isdigit():
            return int(value.strip())
    return None


def requeue(job_id: str, *, restart: int) -> str | None:
    """`scontrol requeue JOB` from the job's attempt `restart` (its SLURM_RESTART_COUNT); None
    when the job is requeued, by this or already by SLURM (as on preemption with
    PreemptMode=REQUEUE), else the reason. Whether it is requeued is SLURM's word, not
    scontrol's exit status: SLURM counts the restart the moment it requeues a job."""
    answer = _ask(["scontrol", "requeue", str(job_id)])
    if answer is not None and answer.returncode == 0:
        return None
    if requeued_since(job_info(job_id), restart=restart):
        return None
    if answer is None:
        return "scontrol was not found on PATH (or did not answer)"
    return slurm_reason(answer.stderr.replace("scontrol: error: ", "")) or f"exit code {answer.returncode}"


def requeued_since(info: dict[str, str] | None, *, restart: int) -> bool:
    """Whether SLURM requeued the job after its attempt `restart`, from `job_info`: it counted
    another restart (at once, while the job is still COMPLETING), or the job waits again."""
    if not info:
        return False
    restarts = info.get("Restarts") or "0"
    # PREEMPTED is an end (PreemptMode=CANCEL); a job SLURM requeued waits again
    return (restarts.isdigit() and int(restarts) > restart) or info_state(info) in JobStates.WAITING_AGAIN


def info_state(info: dict[str, str]) -> str:
    """The job's base state in `job_info` ("COMPLETING+" and flags dropped; "" when not given)."""
    return JobStates.base(info.get("JobState", ""))


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
