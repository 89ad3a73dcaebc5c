"""RUN_DIR/run.json: the run record. One typed owner of its fields, its status values, the
transitions that change them, the writer that holds the run dir (`Owner`), and the lock every
writer takes.

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
import os
import socket
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


@dataclass(frozen=True)
class Owner:
    """The one process or SLURM job that writes a run dir; a second writer is refused while it
    is alive (`launch/rundir_setup.py`), a dead one is simply replaced."""

    kind: str  # "local": `flsl pretrain/resume` on a machine; "slurm": a SLURM job (and its requeues)
    since: str
    host: str | None = None
    pid: int | None = None
    started: int | None = None  # the process's start time in clock ticks (Linux), to tell a reused pid apart
    job_id: str | None = None

    @classmethod
    def this_process(cls) -> Owner:
        pid = os.getpid()
        return cls(
            kind="local", since=timestamps.now(), host=socket.gethostname(), pid=pid, started=_process_start(pid)
        )

    @classmethod
    def slurm_job(cls, job_id: str) -> Owner:
        return cls(kind="slurm", since=timestamps.now(), job_id=str(job_id))

    @classmethod
    def from_dict(cls, data: Any) -> Owner | None:
        if not isinstance(data, dict) or data.get("kind") not in ("local", "slurm"):
            return None
        pid, started = data.get("pid"), data.get("started")
        return cls(
            kind=data["kind"],
            since=str(data.get("since") or ""),
            host=data.get("host"),
            pid=pid if isinstance(pid, int) else None,
            started=started if isinstance(started, int) else None,
            job_id=None if data.get("job_id") is None else str(data["job_id"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    def same_as(self, other: Owner) -> bool:
        if self.kind != other.kind:
            return False
        if self.kind == "slurm":
            return self.job_id == other.job_id
        return self.host == other.host and self.pid == other.pid

    @property
    def on_this_machine(self) -> bool:
        return self.kind == "local" and self.host == socket.gethostname()

    def process_alive(self) -> bool:
        """Whether a local owner's process (on this machine) still runs: same pid and start time."""
        pid = self.pid
        return pid is not None and _pid_alive(pid) and self.started in (None, _process_start(pid))

    def alive(self) -> bool:
        """Whether the owner may still write: a local process on this machine that still runs
        (a reused pid does not count); an owner on another machine, or a SLURM job, counts as alive."""
        return self.process_alive() if self.on_this_machine else True


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    owner: Owner | None = None  # who writes the run dir now (None: nobody)
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
        values["owner"] = Owner.from_dict(values.get("owner"))
        return cls(**values, extra={key: value for key, value in data.items() if key not in known})

    def to_dict(self) -> dict[str, Any]:
        """run.json's content: the status, and every other field that differs from its default."""
        data: dict[str, Any] = {"status": self.status.value}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
            if item.name not in ("extra", "status") and value != default:
                data[item.name] = value.to_dict() if isinstance(value, Owner) else value
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

    def claimed(self, owner: Owner) -> None:
        """`owner` writes the run dir from now on."""
        self.owner = owner

    def released(self, owner: Owner) -> None:
        """`owner` no longer writes the run dir (a newer owner is left as it is)."""
        if self.owner is not None and self.owner.same_as(owner):
            self.owner = None

    def running(self, *, world_size: int) -> None:
        """Training (again): an earlier stop or error is history."""
        self.status, self.world_size, self.last_error = RunStatus.RUNNING, world_size, None
        self.stop_signal = self.stop_reason = None
        self.stopped_at_step = self.resumable_from = None

    def resumed(self, *, step: int, job_id: str | None = None, restart: int | None = None) -> None:
        event: dict[str, Any] = {"step": int(step), "time": timestamps.now()}
        if job_id is not None:
            event.update(job_id=job_id, restart=restart)
        self.resumes.append(event)

    def stopped(
        self,
        *,
        step: int | None = None,
        reason: str | None = None,
        resumable_from: int | None = None,
        signal: str | None = None,
    ) -> None:
        """Stopped on request (by `signal`, for `reason`), at `step`, resumable from a saved step."""
        self.status = RunStatus.STOPPED
        if step is not None:
            self.stopped_at_step = step
        if reason is not None:
            self.stop_reason = reason
        if resumable_from is not None:
            self.resumable_from = resumable_from
        if signal is not None:
            self.stop_signal = signal

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

    def failed(
        self, error: dict[str, Any] | None = None, *, step: int | None = None, resumable_from: int | None = None
    ) -> None:
        self.status = RunStatus.FAILED
        if error is not None:
            self.last_error = error
        if step is not None:
            self.stopped_at_step = step
        if resumable_from is not None:
            self.resumable_from = resumable_from

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


def read_owner(run_dir: str | Path) -> Owner | None:
    """Who writes the run dir now, if anyone; None also where run.json cannot be read."""
    try:
        return load_record(run_dir).owner
    except RunDirError:
        return None


def claim(run_dir: str | Path, owner: Owner) -> None:
    """Record `owner` as the run dir's one writer."""
    with update_record(run_dir) as record:
        record.claimed(owner)


def release(run_dir: str | Path, owner: Owner) -> None:
    """Take `owner` off the run dir (when it still names it). Does nothing where the run dir or
    its run.json is gone or unreadable: a writer that ends must not fail on its way out."""
    if not (Path(run_dir) / RUN_NAME).is_file():
        return
    with contextlib.suppress(RunDirError, OSError), update_record(run_dir) as record:
        record.released(owner)


def write_record(run_dir: str | Path, record: RunRecord) -> None:
    """Replace run.json with `record` (a new run, or putting back one read before), under the lock."""
    with record_lock(run_dir):
        write_json_atomic(Path(run_dir) / RUN_NAME, record.to_dict())
