"""The run directory: resolved recipe, run record, metrics and checkpoints.

RUN_DIR/recipe.yaml      the fully resolved recipe this run trains with
RUN_DIR/run.json         the run record (`run_record.py`): status, its SLURM jobs, stops, errors
RUN_DIR/metrics.jsonl    one JSON object per logged step
RUN_DIR/checkpoints/     step-NNNNNNNN.pt + .json manifests
RUN_DIR/logs/rank-N.log  what process N logged (storage retries, ...)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from flsl_cli import __version__, storage, timestamps
from flsl_cli.checkpoint.store import CHECKPOINTS_DIR, list_checkpoints
from flsl_cli.distributed import env
from flsl_cli.errors import FlslError, RunDirError
from flsl_cli.storage import write_text_atomic
from flsl_cli.train.run_record import (
    LOCK_NAME,
    RUN_NAME,
    JobStates,
    Owner,
    RunRecord,
    load_record,
    parse_record,
    read_owner,
    update_record,
    write_record,
)

RECIPE_NAME = "recipe.yaml"
METRICS_NAME = "metrics.jsonl"
LOGS_DIR = "logs"


def rank_log_path(run_dir: Path, *, rank: int) -> Path:
    """The log file of process `rank` of a run."""
    return Path(run_dir) / LOGS_DIR / f"rank-{rank}.log"


def fingerprint(recipe_yaml: str) -> str:
    return hashlib.sha256(recipe_yaml.encode()).hexdigest()[:16]


def prepare_new_run(run_dir: Path, *, recipe_yaml: str, force: bool) -> None:
    """Create a run directory for a new run, refusing to mix it with another run's files."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError("the run directory is a file", where=str(run_dir), fix="Choose another --run-dir")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        _refuse_or_clear(run_dir, recipe_yaml=recipe_yaml, force=force)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / RECIPE_NAME, recipe_yaml)
    write_record(
        run_dir,
        RunRecord(flsl_version=__version__, created=timestamps.now(), recipe_fingerprint=fingerprint(recipe_yaml)),
    )


def _refuse_or_clear(run_dir: Path, *, recipe_yaml: str, force: bool) -> None:
    is_run = (run_dir / RUN_NAME).exists() or (run_dir / RECIPE_NAME).exists()
    checkpoints = list_checkpoints(run_dir)
    if not is_run:
        raise RunDirError(
            "the run directory is not empty and does not hold a flsl run",
            where=str(run_dir),
            fix="Choose a new or empty --run-dir; flsl never deletes files it did not write",
        )
    same = (run_dir / RECIPE_NAME).exists() and (run_dir / RECIPE_NAME).read_text() == recipe_yaml
    if checkpoints:
        what = (
            "the run directory already holds this run with checkpoints"
            if same
            else "the run directory holds a different run, with checkpoints"
        )
        raise RunDirError(
            f"{what} (newest: step {checkpoints[-1].step})",
            where=str(run_dir),
            fix=(
                f"Continue it with `flsl resume {run_dir}`, or choose another --run-dir "
                "(--force never deletes checkpoints)"
            ),
        )
    if not force:
        raise RunDirError(
            "the run directory holds "
            + ("this run, with no checkpoint yet" if same else "another run (with no checkpoint yet)"),
            where=str(run_dir),
            fix=(
                f"Start it again with `flsl resume {run_dir}`, choose another --run-dir, or pass --force"
                if same
                else "Choose another --run-dir, or pass --force to start over in it"
            ),
        )
    for name in (RECIPE_NAME, RUN_NAME, LOCK_NAME, METRICS_NAME, LOGS_DIR, CHECKPOINTS_DIR):
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def read_run(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """(recipe YAML text, run record) of an existing run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(
            "the run directory does not exist",
            where=str(run_dir),
            fix="Pass the --run-dir of a run started with `flsl pretrain`",
        )
    recipe_path = run_dir / RECIPE_NAME
    if not recipe_path.exists():
        raise RunDirError(
            f"this is not a flsl run directory (no {RECIPE_NAME})",
            where=str(run_dir),
            fix="Pass the --run-dir of a run started with `flsl pretrain`",
        )
    try:
        record = json.loads((run_dir / RUN_NAME).read_text())
    except (OSError, ValueError):
        record = {}
    return recipe_path.read_text(), record


def read_run_record(run_dir: str | Path) -> RunRecord:
    """The run record (run.json) of an existing run, a local path or a URL, for readers that
    only look (status, plots); every problem is a RunDirError saying what the path is instead."""
    url = storage.normalize(run_dir)
    path = storage.local_path(url) if storage.is_local(url) else None
    if path is not None and path.is_file():
        holder = f": {path.parent}" if path.name in (RUN_NAME, RECIPE_NAME) else ""
        raise RunDirError(
            "this is a file, not a run directory",
            where=url,
            fix=f"Pass the run directory that holds it{holder} (the --run-dir of `flsl pretrain`)",
        )
    if path is not None and not path.is_dir():
        raise RunDirError(
            "the run directory does not exist",
            where=url,
            fix="Pass the --run-dir of a run started with `flsl pretrain`",
        )
    try:
        text = storage.read_bytes(storage.join(url, RUN_NAME)).decode("utf-8", errors="replace")
        return parse_record(text, where=storage.join(url, RUN_NAME))
    except FileNotFoundError:
        raise RunDirError(
            f"this is not a flsl run directory (no {RUN_NAME})",
            where=url,
            fix="Pass the --run-dir of a run started with `flsl pretrain`",
        ) from None
    except ValueError as exc:
        raise RunDirError(
            f"{RUN_NAME} cannot be read ({exc})",
            where=url,
            fix="Check the file; flsl writes it atomically, so it was changed by hand",
        ) from None
    except FlslError:
        raise
    except OSError as exc:
        raise RunDirError(
            f"cannot read the run directory ({exc})", where=url, fix="Check the path or URL and your access to it"
        ) from None


def record_resume(run_dir: Path, *, step: int) -> None:
    """Add a resume to run.json's `resumes` (step, time, and for SLURM the job and its restart
    count), so plots can mark where a run was resumed or requeued."""
    task = env.slurm_task()
    with update_record(run_dir) as record:
        record.resumed(step=step, job_id=task.job_id if task else None, restart=task.restart if task else None)


def truncate_metrics(run_dir: Path, *, after_step: int, name: str = METRICS_NAME) -> None:
    """Drop log lines written after `after_step` (steps that a resume will run again)."""
    path = Path(run_dir) / name
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= after_step:
                kept.append(line)
        except ValueError:
            continue
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def load_recipe_yaml(text: str) -> dict[str, Any]:
    return yaml.safe_load(text) or {}


# --- One writer per run directory ---------------------------------------------------------------
#
# run.json's `owner` (`run_record.Owner`) names the process or SLURM job that writes the run. A
# second writer is refused while the owner is alive; a dead owner is simply replaced.


def refuse_if_owned(run_dir: Path, *, slurm_state: Callable[[str], str | None], me: Owner | None = None) -> None:
    """Raise RunDirError when another live process or SLURM job writes this run directory.

    `slurm_state(job_id)` returns the job's state as squeue/sacct name it ("" when SLURM no longer
    knows the job) or None when SLURM cannot be asked. `me` is the caller's own owner record.
    """
    owner = read_owner(run_dir)
    if owner is None or (me is not None and owner.same_as(me)):
        return
    run_dir = Path(run_dir)
    release = f"if it is not, remove `owner` from {run_dir / RUN_NAME}"
    if owner.kind == "slurm":
        job_id = str(owner.job_id)
        state = slurm_state(job_id)
        if state is None:
            if _recorded_status(run_dir) in ("finished", "stopped", "failed"):
                return
            raise RunDirError(
                f"the run directory belongs to SLURM job {job_id}, and SLURM cannot be asked here "
                "whether that job still runs",
                where=str(run_dir),
                fix=f"Check with `squeue -j {job_id}` on the cluster; {release}",
            )
        if state and JobStates.holds_run(state):
            raise RunDirError(
                f"the run directory is being written by SLURM job {job_id} ({state}); a second writer would corrupt it",
                where=str(run_dir),
                fix=f"Wait for the job, or stop it with `scancel {job_id}` (send `scancel --signal=USR2 "
                f"{job_id}` to checkpoint first), then run the command again",
            )
        return
    if owner.on_this_machine:
        if owner.process_alive():
            raise RunDirError(
                f"the run directory is being written by flsl process {owner.pid} on this machine; a second "
                "writer would corrupt it",
                where=str(run_dir),
                fix=f"Wait for it to finish or stop it (Ctrl-C, or `kill {owner.pid}`); {release}",
            )
        return
    if _recorded_status(run_dir) == "running":
        raise RunDirError(
            f"the run directory is being written by flsl process {owner.pid} on {owner.host} ({RUN_NAME} says running)",
            where=str(run_dir),
            fix=f"Check whether that process still runs on {owner.host}; {release}",
        )


def _recorded_status(run_dir: Path) -> str | None:
    try:
        return load_record(run_dir).status.value
    except FlslError:
        return None
