"""RUN_DIR/run.json: the run record. One typed owner of its fields, its status values, the
transitions that change them, and the lock every writer takes.

Several processes write run.json: the command that creates or submits the run, rank 0 of the
training processes, and, in a SLURM job, the batch step (after a task failed) beside rank 0.
Each change is a read-modify-write under an exclusive lock (`update_record`), so no writer
loses another's fields. Readers that only look use `load_record`. Nothing here imports torch.

    with update_record(run_dir) as record:
        record.requeued(job_id="42", restart=0, by="flsl", cause="SIGUSR2", step=120, signal="SIGUSR2")

The SLURM job states flsl reasons about are listed here once (`JobStates`): which states still
hold a run directory, which mean the job is ending, which mean SLURM requeued it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from flsl_cli import timestamps
from flsl_cli.errors import RunDirError
from flsl_cli.storage import write_json_atomic

RUN_NAME = "run.json"
LOCK_NAME = "run.json.lock"


class RunStatus(str, Enum):
    """What run.json's `status` says."""

    CREATED = "created"  # the run dir exists, nothing trained yet
    SUBMITTING = "submitting"  # a SLURM job is being submitted
    STARTING = "starting"  # a SLURM job attempt claimed the run and starts training
    RUNNING = "running"
    STOPPED = "stopped"  # stopped on request at a saved step; `flsl resume` continues it
    REQUEUED = "requeued"  # the SLURM job was requeued and resumes by itself
    FAILED = "failed"
    FINISHED = "finished"

    @property
    def ended(self) -> bool:
        """Whether nothing writes the run any more (until someone resumes it)."""
        return self in (RunStatus.STOPPED, RunStatus.FAILED, RunStatus.FINISHED)


class JobStates:
    """SLURM job states (squeue/scontrol names), in the groups flsl uses."""

    ENDED = (
        "COMPLETED",
        "CANCELLED",
        "FAILED",
        "TIMEOUT",
        "PREEMPTED",
        "NODE_FAIL",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
        "REVOKED",
        "SPECIAL_EXIT",
    )
    ENDING = ("COMPLETING", *ENDED)  # the job is on its way out (a requeued job passes COMPLETING too)
    WAITING_AGAIN = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED")  # queued (again, after a requeue)
    ACTIVE = ("RUNNING", "CONFIGURING", "COMPLETING")  # its processes run (or end)

    @staticmethod
    def base(state: str) -> str:
        """ "COMPLETING+" or "CANCELLED by 0" -> the state's name."""
        words = state.split()
        return words[0].rstrip("+") if words else ""

    @classmethod
    def holds_run(cls, state: str) -> bool:
        """Whether a job in `state` may still write its run directory."""
        return cls.base(state) not in cls.ENDED


@dataclass
class RunRecord:
    """run.json's fields. Keys this version does not know are kept as they were (`extra`)."""

    status: RunStatus = RunStatus.CREATED
    flsl_version: str | None = None
    created: str | None = None
    recipe_fingerprint: str | None = None
    scheduler: str = "local"
    slurm: dict[str, Any] = field(default_factory=dict)  # what the job asked for (SlurmRequest.record)
    world_size: int | None = None
    step: int | None = None  # the step the run ended at
    stopped_at_step: int | None = None
    resumable_from: int | None = None
    stop_signal: str | None = None
    stop_reason: str | None = None  # "cancelled", "time limit"
    last_error: dict[str, Any] | None = None  # {job_id, attempt, rank, node, signal, time, message}
    resumes: list[dict[str, Any]] = field(default_factory=list)
    # SLURM: every job of the run, its newest attempt, its nodes, and how often it was requeued
    job_ids: list[str] = field(default_factory=list)
    job_id: str | None = None
    nodes: str | None = None
    job_nodes: dict[str, str] = field(default_factory=dict)
    job_restarts: dict[str, int] = field(default_factory=dict)  # SLURM_RESTART_COUNT of each job's newest attempt
    job_requeues: dict[str, int] = field(default_factory=dict)  # flsl's count of each job's requeues
    failure_requeues: dict[str, int] = field(default_factory=dict)  # of those, after a task failure
    requeues: int = 0
    last_requeue: dict[str, Any] | None = None  # {job_id, step, signal, by, cause, time}
    extra: dict[str, Any] = field(default_factory=dict)

    # --- Reading and writing ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = RUN_NAME) -> RunRecord:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {key: value for key, value in data.items() if key in known}
        try:
            values["status"] = RunStatus(values.get("status", RunStatus.CREATED))
        except ValueError:
            raise RunDirError(
                f"{RUN_NAME} has an unknown status {data.get('status')!r}",
                where=where,
                fix="Check the file; flsl writes it atomically, so it was changed by hand",
            ) from None
        for name in ("job_restarts", "job_requeues", "failure_requeues"):
            values[name] = {str(k): int(v) for k, v in (values.get(name) or {}).items()}
        values["job_nodes"] = {str(k): str(v) for k, v in (values.get("job_nodes") or {}).items()}
        values["job_ids"] = [str(j) for j in values.get("job_ids") or []]
        for name in ("slurm", "resumes"):
            if values.get(name) is None:
                values.pop(name, None)
        values["requeues"] = int(values.get("requeues") or 0)
        return cls(**values, extra={key: value for key, value in data.items() if key not in known})

    def to_dict(self) -> dict[str, Any]:
        """run.json's content: the status, and every other field that differs from its default."""
        data: dict[str, Any] = {"status": self.status.value}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
            if item.name not in ("extra", "status") and value != default:
                data[item.name] = value
        data.update(self.extra)
        return data

    def set(self, **fields: Any) -> None:
        """Set fields by name (a status as its value); a name this version does not know is kept in `extra`."""
        known = {f.name for f in dataclasses.fields(self)} - {"extra"}
        for name, value in fields.items():
            if name == "status":
                value = RunStatus(value)
            if name in known:
                setattr(self, name, value)
            else:
                self.extra[name] = value

    # --- Transitions ----------------------------------------------------------------------------

    def submitting(self, *, slurm: dict[str, Any]) -> None:
        self.scheduler, self.slurm, self.status = "slurm", dict(slurm), RunStatus.SUBMITTING

    def submitted(self, *, job_id: str) -> None:
        if job_id not in self.job_ids:
            self.job_ids.append(job_id)

    def attempt_started(self, *, job_id: str, restart: int, nodes: str | None) -> None:
        """A SLURM job attempt (its `restart`) claimed the run."""
        self.scheduler = "slurm"
        self.submitted(job_id=job_id)
        self.job_id = job_id
        self.job_restarts[job_id] = restart
        self.nodes = nodes
        self.job_nodes[job_id] = nodes or "?"
        self.status = RunStatus.STARTING

    def running(self, *, world_size: int) -> None:
        self.status, self.world_size, self.last_error = RunStatus.RUNNING, world_size, None

    def resumed(self, *, step: int, job_id: str | None = None, restart: int | None = None) -> None:
        event: dict[str, Any] = {"step": int(step), "time": timestamps.now()}
        if job_id is not None:
            event.update(job_id=job_id, restart=restart)
        self.resumes.append(event)

    def stopped(self, *, step: int | None = None, reason: str | None = None, **details: Any) -> None:
        """Stopped on request, its step saved (`details`: resumable_from, stop_signal)."""
        self.status = RunStatus.STOPPED
        if step is not None:
            self.stopped_at_step = step
        if reason is not None:
            self.stop_reason = reason
        for name, value in details.items():
            setattr(self, name, value)

    def requeue_counts(self) -> tuple[dict[str, int], dict[str, int], int, dict[str, Any] | None]:
        """What `requeued` changes, to put back with `requeue_undone` when the requeue did not happen."""
        return dict(self.job_requeues), dict(self.failure_requeues), self.requeues, self.last_requeue

    def requeued(
        self,
        *,
        job_id: str,
        restart: int,
        by: str,
        cause: str | None,
        step: int | None,
        signal: str | None,
        after_failure: bool = False,
    ) -> int:
        """The job was requeued (by SLURM, or flsl asks for it next): counted once per requeue,
        however it happened. Returns the job's requeue count."""
        count = max(self.job_requeues.get(job_id, 0), restart) + 1
        self.job_requeues[job_id] = count
        if after_failure:
            self.failure_requeues[job_id] = self.failure_requeues.get(job_id, 0) + 1
        self.requeues = sum(self.requeues_per_job().values())
        self.last_requeue = {
            "job_id": job_id,
            "step": step,
            "signal": signal,
            "by": by,
            "cause": cause,
            "time": timestamps.now(),
        }
        self.status = RunStatus.REQUEUED
        return count

    def requeue_undone(self, counts: tuple[dict[str, int], dict[str, int], int, dict[str, Any] | None]) -> None:
        self.job_requeues, self.failure_requeues, self.requeues, self.last_requeue = counts

    def error_noted(self, error: dict[str, Any], *, failed: bool) -> None:
        """An error of a job attempt; `failed`: the run failed with it (else another rank only adds it)."""
        self.last_error = error
        if failed:
            self.status = RunStatus.FAILED

    def failed(self, error: dict[str, Any] | None = None, *, step: int | None = None) -> None:
        self.status = RunStatus.FAILED
        if error is not None:
            self.last_error = error
        if step is not None:
            self.stopped_at_step = step

    def finished(self, *, step: int) -> None:
        self.status, self.step = RunStatus.FINISHED, step

    # --- Questions ------------------------------------------------------------------------------

    def requeues_per_job(self) -> dict[str, int]:
        """Requeues of each job however they happened: flsl's own count or SLURM's restart
        count, the larger; jobs never requeued are left out."""
        jobs = sorted({*self.job_requeues, *self.job_restarts})
        both = {job: max(self.job_requeues.get(job, 0), self.job_restarts.get(job, 0)) for job in jobs}
        return {job: count for job, count in both.items() if count > 0}


def load_record(run_dir: str | Path) -> RunRecord:
    """The record of a local run dir. A missing run.json is a new record; one that cannot be
    read is a RunDirError saying so."""
    path = Path(run_dir) / RUN_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return RunRecord()
    except OSError as exc:
        raise RunDirError(
            f"cannot read {RUN_NAME} ({exc.strerror or exc})",
            where=str(run_dir),
            fix="Check the run directory's permissions",
        ) from None
    return parse_record(text, where=str(path))


def parse_record(text: str, *, where: str) -> RunRecord:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RunDirError(
            f"{RUN_NAME} cannot be read ({exc})",
            where=where,
            fix="Check the file; flsl writes it atomically, so it was cut or changed by hand",
        ) from None
    if not isinstance(data, dict):
        raise RunDirError(
            f"{RUN_NAME} does not hold a record (a JSON object)",
            where=where,
            fix="Check the file; flsl writes it atomically, so it was changed by hand",
        )
    return RunRecord.from_dict(data, where=where)


@contextlib.contextmanager
def record_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold run.json's lock (an exclusive flock on RUN_DIR/run.json.lock) for the block."""
    with open(Path(run_dir) / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def update_record(run_dir: str | Path) -> Iterator[RunRecord]:
    """Read run.json under its lock, let the block change the record, write it back atomically
    (not when the block raises). A run.json that cannot be read is a RunDirError."""
    with record_lock(run_dir):
        record = load_record(run_dir)
        yield record
        write_json_atomic(Path(run_dir) / RUN_NAME, record.to_dict())


def write_record(run_dir: str | Path, record: RunRecord) -> None:
    """Replace run.json with `record` (a new run, or putting back one read before), under the lock."""
    with record_lock(run_dir):
        write_json_atomic(Path(run_dir) / RUN_NAME, record.to_dict())
