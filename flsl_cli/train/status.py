"""`flsl status RUN_DIR`: where a run stands, read from its run directory and, for SLURM runs,
from squeue/sacct when they answer.

Reads run.json, the tail of metrics.jsonl and the checkpoint manifests directly (no torch, no
checkpoint is loaded), so it answers at once even while the run trains.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flsl_cli.errors import RunDirError

_MANIFEST = re.compile(r"^step-(\d{8,})\.json$")


@dataclass
class RunStatus:
    run_dir: str
    status: str                      # run.json's status, or the SLURM state of the newest job
    recorded_status: str | None      # run.json's status as written by the run
    scheduler: str                   # "slurm" or "local"
    job_ids: list[str] = field(default_factory=list)
    jobs: dict[str, dict[str, str]] = field(default_factory=dict)  # what squeue/sacct say
    slurm_answered: bool = False
    step: int | None = None          # newest step in metrics.jsonl
    epoch: float | None = None
    newest_checkpoint: dict[str, Any] | None = None  # {"step", "path", "age_s"}
    checkpoints: int = 0
    requeues: int = 0
    job_requeues: dict[str, int] = field(default_factory=dict)
    stopped: dict[str, Any] | None = None  # {"step", "signal"} of the last stop on request
    last_error: dict[str, Any] | None = None
    owner: dict[str, Any] | None = None
    logs: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def read_status(run_dir: Path, *, ask_slurm: bool = True) -> RunStatus:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError("the run directory does not exist", where=str(run_dir),
                          fix="Pass the --run-dir of a run started with `flsl pretrain`")
    try:
        record = json.loads((run_dir / "run.json").read_text())
    except FileNotFoundError:
        raise RunDirError("this is not a flsl run directory (no run.json)", where=str(run_dir),
                          fix="Pass the --run-dir of a run started with `flsl pretrain`") from None
    except (OSError, ValueError) as exc:
        raise RunDirError(f"run.json cannot be read: {exc}", where=str(run_dir),
                          fix="Check the file; flsl writes it atomically, so it was changed by hand") from None

    job_ids = [str(j) for j in record.get("job_ids", [])]
    recorded = record.get("status")
    result = RunStatus(
        run_dir=str(run_dir), status=recorded or "unknown", recorded_status=recorded,
        scheduler=record.get("scheduler", "local"), job_ids=job_ids,
        requeues=int(record.get("requeues", 0)),
        job_requeues={str(k): int(v) for k, v in (record.get("job_requeues") or {}).items()},
        last_error=_error(record.get("last_error")),
    )
    if record.get("stop_signal"):
        result.stopped = {"step": record.get("stopped_at_step"), "signal": record.get("stop_signal")}
    result.step, result.epoch = _last_metrics(run_dir / "metrics.jsonl")
    result.newest_checkpoint, result.checkpoints = _newest_checkpoint(run_dir / "checkpoints")
    try:
        result.owner = json.loads((run_dir / "owner.json").read_text())
    except (OSError, ValueError):
        result.owner = None
    if job_ids:
        newest = job_ids[-1]
        jobs_dir = run_dir / "slurm"
        result.logs = [str(jobs_dir / f"{newest}_0_log.out"), str(jobs_dir / f"{newest}_0_log.err")]
        if ask_slurm:
            from flsl_cli.launch.slurm import job_details

            result.jobs = job_details(job_ids[-5:])
            result.slurm_answered = bool(result.jobs)
            state = result.jobs.get(newest, {}).get("state")
            if state:
                result.status = _combine(recorded, state)
    return result


def _combine(recorded: str | None, state: str) -> str:
    """One word for the user: SLURM's view while the job is queued or running, else the run's."""
    state = state.split()[0].rstrip("+")
    if state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
        return "requeued (pending)" if recorded == "requeued" else "pending"
    if state in ("RUNNING", "CONFIGURING", "COMPLETING"):
        return recorded if recorded in ("running", "starting", "requeued") else "running"
    if state.lower() == recorded or (state == "COMPLETED" and recorded in ("finished", "stopped", "failed")):
        return recorded
    if recorded == "finished":
        return "finished"
    return f"{(recorded or 'unknown')} (job {state.lower()})"


def _error(value: Any) -> dict[str, Any] | None:
    if not value:
        return None
    if isinstance(value, dict):
        return value
    return {"message": str(value)}


def _last_metrics(path: Path) -> tuple[int | None, float | None]:
    """The step and epoch of the last complete line of metrics.jsonl (read from its end)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            handle.seek(max(0, size - 65536))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None, None
    for line in reversed(tail.splitlines()):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "step" in entry:
            epoch = entry.get("epoch")
            return int(entry["step"]), (round(float(epoch), 3) if epoch is not None else None)
    return None, None


def _newest_checkpoint(directory: Path) -> tuple[dict[str, Any] | None, int]:
    """The newest committed checkpoint (one with a manifest; not verified here) and how many."""
    if not directory.is_dir():
        return None, 0
    found = sorted((int(m.group(1)), entry) for entry in directory.iterdir()
                   if (m := _MANIFEST.match(entry.name)))
    if not found:
        return None, 0
    step, manifest = found[-1]
    checkpoint = manifest.with_suffix(".pt")
    try:
        age = round(time.time() - os.stat(manifest).st_mtime)
    except OSError:
        age = None
    return {"step": step, "path": str(checkpoint), "age_s": age}, len(found)
