"""`flsl status RUN_DIR`: where a run stands, read from its run directory and, for SLURM runs,
from squeue/sacct when they answer.

Reads run.json, the tail of metrics.jsonl and the checkpoint manifests directly (no torch, no
checkpoint is loaded), so it answers at once even while the run trains.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flsl_cli import storage
from flsl_cli.checkpoint.store import CHECKPOINTS_DIR, MANIFEST_PATTERN, checkpoint_dir
from flsl_cli.errors import FlslError
from flsl_cli.launch.slurm.queries import UNKNOWN_TO_SLURM, job_details
from flsl_cli.train.progress import epoch_number
from flsl_cli.train.run_record import JobStates, RunRecord
from flsl_cli.train.run_record import RunStatus as RecordStatus
from flsl_cli.train.rundir import METRICS_NAME, RECIPE_NAME, read_run_record


@dataclass
class RunStatus:
    run_dir: str
    status: str  # run.json's status, or the SLURM state of the newest job
    recorded_status: str | None  # run.json's status as written by the run
    scheduler: str  # "slurm" or "local"
    job_ids: list[str] = field(default_factory=list)
    jobs: dict[str, dict[str, str]] = field(default_factory=dict)  # what squeue/sacct say
    slurm_answered: bool = False
    step: int | None = None  # the newest step reached: in metrics.jsonl or the newest checkpoint
    epoch: int | None = None  # its epoch, 1-based, as training shows it
    epochs: int | None = None  # the recipe's optim.epochs
    newest_checkpoint: dict[str, Any] | None = None  # {"step", "path", "age_s"}
    checkpoints: int = 0
    requeues: int = 0
    job_requeues: dict[str, int] = field(default_factory=dict)  # per job: flsl's or SLURM's count
    nodes: str | None = None  # the newest job's node list
    job_nodes: dict[str, str] = field(default_factory=dict)  # per job: its node list
    stopped: dict[str, Any] | None = None  # {"step", "signal"} of the last stop on request
    last_error: dict[str, Any] | None = None
    owner: dict[str, Any] | None = None
    leftovers: list[str] = field(default_factory=list)  # temporary files of cut-off writes
    logs: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def read_status(run_dir: str | Path, *, ask_slurm: bool = True) -> RunStatus:
    """Where the run in `run_dir` (a local path or a URL such as s3://bucket/runs/x) stands."""
    url = storage.normalize(run_dir)
    record = read_run_record(url)
    if not storage.is_local(url):
        return _remote_status(url, record)
    run_dir = storage.local_path(url)

    result = _recorded(str(run_dir), record)
    job_ids, recorded = result.job_ids, result.recorded_status
    result.newest_checkpoint, result.checkpoints = _newest_checkpoint(checkpoint_dir(run_dir))
    _place(result, _last_metrics(run_dir / METRICS_NAME), recipe=_read_text(run_dir / RECIPE_NAME))
    owner = record.owner
    result.owner = owner.to_dict() if owner else None
    live = recorded in ("running", "starting") and owner is not None and owner.alive()
    if not live:  # while a run writes, its temporary files are writes in progress
        result.leftovers = [str(p) for p in storage.leftover_temp_files(checkpoint_dir(run_dir))]
    if result.scheduler == "local" and recorded in ("running", "starting") and not live:
        result.status = "stopped (process gone)"
    if job_ids:
        newest = job_ids[-1]
        jobs_dir = run_dir / "slurm"
        result.logs = [str(jobs_dir / f"{newest}_0_log.out"), str(jobs_dir / f"{newest}_0_log.err")]
        if ask_slurm:
            result.jobs = job_details(job_ids[-5:])
            for job, details in result.jobs.items():  # what SLURM says, for jobs that never reached flsl
                if details.get("nodes") and job not in result.job_nodes:
                    result.job_nodes[job] = details["nodes"]
            result.slurm_answered = bool(result.jobs)
            state = result.jobs.get(newest, {}).get("state")
            if state:
                result.status = _combine(recorded, state, unknown=UNKNOWN_TO_SLURM)
    return result


def _recorded(where: str, record: RunRecord) -> RunStatus:
    """What run.json says of the run."""
    recorded = record.status.value
    requeues = record.requeues_per_job()
    result = RunStatus(
        run_dir=where,
        status=recorded,
        recorded_status=recorded,
        scheduler=record.scheduler,
        job_ids=list(record.job_ids),
        requeues=sum(requeues.values()),
        job_requeues=requeues,
        nodes=record.nodes,
        job_nodes=dict(record.job_nodes),
        # an error of an earlier attempt is history once the run finished
        last_error=None if record.status is RecordStatus.FINISHED else _error(record.last_error),
    )
    if record.stop_signal:
        result.stopped = {"step": record.stopped_at_step, "signal": record.stop_signal}
    return result


def _remote_status(url: str, record: RunRecord) -> RunStatus:
    """A run dir on an object store or other remote filesystem: run.json, the tail of
    metrics.jsonl and the checkpoint manifests, read through fsspec (remote runs are local
    processes: no SLURM job to ask about)."""
    result = _recorded(url, record)
    try:
        metrics = storage.read_bytes(storage.join(url, METRICS_NAME)).decode("utf-8", errors="replace")
    except (FileNotFoundError, FlslError):
        metrics = ""
    folder = storage.join(url, CHECKPOINTS_DIR)
    try:
        names = storage.listdir(folder) if storage.exists(folder) else []
    except (OSError, FlslError):
        names = []
    steps = sorted(int(m.group(1)) for name in names if (m := MANIFEST_PATTERN.match(storage.basename(name))))
    if steps:
        path = storage.join(folder, f"step-{steps[-1]:08d}.pt")
        result.newest_checkpoint, result.checkpoints = {"step": steps[-1], "path": path, "age_s": None}, len(steps)
    try:
        recipe = storage.read_bytes(storage.join(url, RECIPE_NAME)).decode("utf-8", errors="replace")
    except (FileNotFoundError, OSError, FlslError):
        recipe = ""
    _place(result, _metrics_tail(metrics), recipe=recipe)
    result.owner = record.owner.to_dict() if record.owner else None
    return result


def _combine(recorded: str | None, state: str, *, unknown: str) -> str:
    """One word for the user: SLURM's view while the job is queued or running, else the run's."""
    state = JobStates.base(state)
    if state == unknown:
        if recorded in ("finished", "stopped", "failed"):
            return recorded
        return f"{recorded or 'unknown'} (its job is unknown to SLURM: it ended without a word from flsl)"
    if state in JobStates.WAITING_AGAIN:
        return "requeued (pending)" if recorded == "requeued" else "pending"
    if state in JobStates.ACTIVE:
        return recorded if recorded in ("running", "starting", "requeued") else "running"
    if state.lower() == recorded or (state == "COMPLETED" and recorded in ("finished", "stopped", "failed")):
        return recorded
    if recorded in ("finished", "stopped", "failed"):
        return recorded
    # The job ended while run.json still says it was starting or running: it died.
    return f"failed (job {state.lower()})"


def _error(value: Any) -> dict[str, Any] | None:
    if not value:
        return None
    if isinstance(value, dict):
        return value
    return {"message": str(value)}


def _place(result: RunStatus, logged: tuple[int | None, int | None], *, recipe: str) -> None:
    """Set the step the run reached (the last logged step, or the newest checkpoint's when that
    is newer) and its epoch as training numbers them."""
    step, steps_per_epoch = logged
    saved = result.newest_checkpoint["step"] if result.newest_checkpoint else None
    result.step = max((s for s in (step, saved) if s is not None), default=None)
    if result.step is not None and steps_per_epoch:
        result.epoch = epoch_number(result.step, steps_per_epoch=steps_per_epoch)
    try:
        epochs = (yaml.safe_load(recipe) or {}).get("optim", {}).get("epochs")
    except (yaml.YAMLError, AttributeError):
        epochs = None
    result.epochs = epochs if isinstance(epochs, int) else None
    if result.epoch is not None and result.epochs is not None:
        result.epoch = min(result.epoch, result.epochs)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _last_metrics(path: Path) -> tuple[int | None, int | None]:
    """The step of the last complete line of metrics.jsonl (read from its end) and the run's
    steps per epoch (that line's step over its fractional epoch)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            handle.seek(max(0, size - 65536))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None, None
    return _metrics_tail(tail)


def _metrics_tail(tail: str) -> tuple[int | None, int | None]:
    for line in reversed(tail.splitlines()):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "step" in entry:
            step, epoch = int(entry["step"]), entry.get("epoch")
            per_epoch = round(step / float(epoch)) if isinstance(epoch, (int, float)) and epoch > 0 else None
            return step, per_epoch or None
    return None, None


def _newest_checkpoint(directory: Path) -> tuple[dict[str, Any] | None, int]:
    """The newest committed checkpoint (one with a manifest; not verified here) and how many."""
    if not directory.is_dir():
        return None, 0
    found = sorted(
        (int(m.group(1)), entry) for entry in directory.iterdir() if (m := MANIFEST_PATTERN.match(entry.name))
    )
    if not found:
        return None, 0
    step, manifest = found[-1]
    checkpoint = manifest.with_suffix(".pt")
    try:
        age = round(time.time() - os.stat(manifest).st_mtime)
    except OSError:
        age = None
    return {"step": step, "path": str(checkpoint), "age_s": age}, len(found)
