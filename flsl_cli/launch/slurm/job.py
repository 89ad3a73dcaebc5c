"""Inside a SLURM job, every task (under srun): it learns who it is from
`submitit.JobEnvironment` (`rendezvous.py`), agrees on the rendezvous, claims the run directory
(rank 0), and trains, resuming when the run has a checkpoint. The batch step that starts the
tasks is in `batch.py`.

Any stop signal (USR2 before the time limit, TERM on preemption, `scancel`, `scontrol
requeue`, INT, HUP), to any or all processes of the job, stops every rank after one step and
saves that step (see `flsl_cli.signals`). Then rank 0 asks SLURM what became of the job
(`stop_outcome`): SLURM already requeued it (preemption, `scontrol requeue`), it is ending
(plain `scancel`, the time limit), or it still runs and flsl requeues it itself (`scontrol
requeue`). Requeues are counted per job in run.json, however they happened; at
`slurm.max_requeues` the job stops with a message instead.

    python -m flsl_cli.launch.slurm.job prepare RECIPE RUN_DIR [--set K=V ...]
    python -m flsl_cli.launch.slurm.job batch RUN_DIR [--logs DIR] [--cpu]
    python -m flsl_cli.launch.slurm.job task RUN_DIR [--cpu]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from flsl_cli import signals, timestamps
from flsl_cli.config.load import recipe_to_dict, validate_recipe
from flsl_cli.config.schema import SlurmConfig
from flsl_cli.distributed.env import (
    in_slurm_job,
    node_name,
    read_env,
    slurm_job_nodes,
    slurm_node,
    slurm_task,
)
from flsl_cli.errors import FlslError, RunStopped
from flsl_cli.launch.slurm.batch import batch_main, log, saved_slurm_section
from flsl_cli.launch.slurm.errors import SlurmError
from flsl_cli.launch.slurm.executor import JOBS_DIR
from flsl_cli.launch.slurm.queries import (
    info_state,
    job_info,
    job_state,
    requeue,
    requeued_since,
)
from flsl_cli.launch.slurm.rendezvous import RendezvousError, agree_on_port, torch_env
from flsl_cli.train.run_record import JobStates, Owner, RunStatus, load_record, release, update_record

# The batch step and every task take charge of the stop signals before anything heavy loads:
# torch and the training modules take seconds to import, and a stop signal in those seconds
# must be kept, not end the process. So this module imports no torch at its top; the modules
# that do (the run directory, checkpoints, the training loop) are imported inside the
# functions that need them, after `signals.stop_request()` or `signals.held()`.


# --- Every task ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    run_dir: Path
    job_id: str
    restart: int
    rank: int

    @property
    def attempt(self) -> str:
        return f"{self.job_id}.{self.restart}"


def job_main(run_dir: str, *, use_cuda: bool | None = None) -> None:
    """What every task of the job runs. Trains or resumes the run in `run_dir`; after a stop,
    rank 0 settles the job's fate (`_after_stop`)."""

    signals.stop_request()  # from the first instant: a stop during start-up is kept
    if not in_slurm_job():
        print(
            "error: this runs as a task of a SLURM job step (SLURM_JOB_ID and SLURM_PROCID are not set). "
            f"Start it with srun inside a job (see slurm/flsl.sbatch), or train here with `flsl resume {run_dir}`.",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(2)
    slurm = slurm_task()
    assert slurm is not None  # in_slurm_job() above
    task = _Task(run_dir=Path(run_dir), job_id=slurm.job_id, restart=slurm.restart, rank=slurm.rank)
    log(
        f"rank {task.rank} of {slurm.world_size} on node {slurm.node or '?'} "
        f"(host {socket.gethostname()}, pid {os.getpid()}), job {task.job_id} restart {task.restart}"
    )
    max_requeues = None
    try:
        os.environ.update(torch_env())  # a node list that cannot be read is recorded like any error here
        if use_cuda is False:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        process = read_env()
        _check_master_addr(os.environ["MASTER_ADDR"], nodelist=slurm_job_nodes() or "?")
        recipe, resume = _begin(task)
        max_requeues = recipe.slurm.max_requeues
        if "FLSL_MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(
                agree_on_port(
                    task.run_dir / JOBS_DIR, attempt=task.attempt, rank=task.rank, first=int(os.environ["MASTER_PORT"])
                )
            )
        if task.rank == 0:
            log(
                f"job {task.job_id} (restart {task.restart}) on {slurm_job_nodes() or '?'}: "
                f"{process.world_size} process(es), rendezvous {os.environ['MASTER_ADDR']}:"
                f"{os.environ['MASTER_PORT']}, " + ("resuming" if resume else "starting")
            )

        from flsl_cli.train.loop import train_process
        from flsl_cli.train.rundir import RECIPE_NAME

        train_process(
            recipe_data=recipe_to_dict(recipe),
            source=str(task.run_dir / RECIPE_NAME),
            run_dir=str(task.run_dir),
            resume=resume,
        )
    except RunStopped as stopped:
        log(stopped.what)
        if task.rank == 0:
            try:
                _after_stop(task, step=stopped.step, signal_name=stopped.signal_name, max_requeues=max_requeues)
            except FlslError as exc:
                _fail(task, exc, status="stopped")  # resumable: its checkpoint is saved
        return
    except _Refused as refused:  # the run is another job's: its run.json and owner stay as they are
        print(f"error: {refused.error.describe()}", file=sys.stderr, flush=True)
        raise SystemExit(refused.error.exit_code) from None
    except FlslError as exc:
        _fail(task, exc)
    except BaseException as exc:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            _record_error(task, f"{last} (traceback in {_log_path(task)})")  # the batch step releases the run
        raise
    if task.rank == 0:
        _release(task)
        log(f"job {task.job_id} done")


class _Refused(Exception):
    """Rank 0 may not take the run directory: another live job or process writes it."""

    def __init__(self, error: FlslError) -> None:
        super().__init__(error.what)
        self.error = error


def _check_master_addr(address: str, *, nodelist: str) -> None:
    """Every rank meets at the first node of the job: its name must resolve here."""

    try:
        socket.getaddrinfo(address, None)
    except OSError as exc:
        raise RendezvousError(
            f"the rendezvous host {address} (the first node of {nodelist}) does not resolve to an address "
            f"on {node_name()} ({exc.strerror or exc})",
            fix="Make the node names resolve on every node (DNS or /etc/hosts), or export FLSL_MASTER_ADDR "
            "with the first node's address before submitting",
        ) from None


def _begin(task: _Task):
    """Read the run; rank 0 claims the run directory and records this attempt. Returns
    (recipe, resume?)."""
    from flsl_cli.checkpoint.store import list_checkpoints
    from flsl_cli.train import rundir

    recipe_text, _ = rundir.read_run(task.run_dir)
    recipe = validate_recipe(rundir.load_recipe_yaml(recipe_text), source=str(task.run_dir / rundir.RECIPE_NAME))
    resume = bool(list_checkpoints(task.run_dir))
    if task.rank == 0:
        me = Owner.slurm_job(task.job_id)
        try:
            rundir.refuse_if_owned(task.run_dir, slurm_state=job_state, me=me)
        except FlslError as exc:
            raise _Refused(exc) from None
        with update_record(task.run_dir) as record:
            record.claimed(me)
            record.attempt_started(job_id=task.job_id, restart=task.restart, nodes=slurm_job_nodes())
        if not resume:  # a restarted attempt that never reached a checkpoint starts over
            rundir.truncate_metrics(task.run_dir, after_step=0)
    return recipe, resume


def stop_outcome(info: dict[str, str] | None, *, restart: int) -> str:
    """What became of the job after a stop, from `scontrol show job` (`job_info`):
    "requeued" (SLURM requeued it: preemption, `scontrol requeue`), "time limit" or
    "cancelled" (the job is ending), or "running" (nobody ended it: flsl requeues it itself;
    also when SLURM cannot be asked)."""
    if not info:
        return "running"
    if requeued_since(info, restart=restart):
        return "requeued"
    state = info_state(info)
    if state in JobStates.ENDING:
        try:
            limit = SlurmConfig.time_limit_seconds(info.get("TimeLimit", "UNLIMITED"))
            ran_for = info.get("RunTime")
            ran = SlurmConfig.time_limit_seconds(ran_for) if ran_for not in (None, "00:00:00") else 0
        except ValueError:
            limit, ran = None, 0
        return "time limit" if state == "TIMEOUT" or (limit and ran and ran >= limit) else "cancelled"
    return "running"


def _after_stop(task: _Task, *, step: int, signal_name: str, max_requeues: int | None) -> None:
    """Rank 0, after every rank stopped and the step is saved: record the requeue SLURM made,
    stop for good when the job is ending, or requeue the job (up to slurm.max_requeues)."""
    from flsl_cli.checkpoint.store import newest_step
    from flsl_cli.train import rundir

    if load_record(task.run_dir).status is RunStatus.FINISHED:
        _release(task)
        return
    if max_requeues is None:
        recipe_text, _ = rundir.read_run(task.run_dir)
        max_requeues = saved_slurm_section(recipe_text).max_requeues
    saved_step = newest_step(task.run_dir)
    saved = (
        f"the checkpoint of step {saved_step} is saved" if saved_step is not None else "no checkpoint was written yet"
    )
    info = job_info(task.job_id)
    outcome = stop_outcome(info, restart=task.restart)
    preempted = bool(info and info.get("PreemptTime") not in (None, "None"))
    cause = "preemption" if preempted else signal_name
    if outcome in ("cancelled", "time limit"):
        why = (
            "the job was cancelled"
            if outcome == "cancelled"
            else "the job reached its time limit (the SIGUSR2 warning came too late to requeue it: "
            "raise --time or slurm.signal_minutes_before_end)"
        )
        with update_record(task.run_dir) as record:
            record.stopped(reason=outcome)
        _release(task)
        log(f"{why}; {saved}; not requeued. Continue with `flsl resume {task.run_dir} --nodes N ...`")
        return
    if outcome == "requeued":
        with update_record(task.run_dir) as record:
            record.requeued(
                job_id=task.job_id, restart=task.restart, by="slurm", cause=cause, step=saved_step, signal=signal_name
            )
        log(f"SLURM requeued job {task.job_id} ({cause}); {saved} and the job resumes from it")
        return
    with update_record(task.run_dir) as record:
        done = max(record.job_requeues.get(task.job_id, 0), task.restart)
        if done < max_requeues:
            before = record.requeue_counts()
            record.requeued(
                job_id=task.job_id, restart=task.restart, by="flsl", cause=cause, step=saved_step, signal=signal_name
            )
    if done >= max_requeues:
        raise SlurmError(
            f"job {task.job_id} was stopped by {signal_name} and not requeued: it has been requeued "
            f"{done} time(s), the limit set by slurm.max_requeues ({max_requeues}); {saved}",
            where=str(task.run_dir),
            fix=f"Continue with `flsl resume {task.run_dir} --nodes N ...` (a new job), or raise the limit "
            "with --set slurm.max_requeues=...",
        )
    reason = requeue(task.job_id, restart=task.restart)
    if reason is not None:
        with update_record(task.run_dir) as record:
            record.requeue_undone(before)
        raise SlurmError(
            f"job {task.job_id} stopped by {signal_name} but could not requeue itself: {reason}; {saved}",
            where=str(task.run_dir),
            fix=f"Continue with `flsl resume {task.run_dir} --nodes N ...`",
        )
    then = f"it resumes from step {saved_step}" if saved_step is not None else "it starts the run over"
    log(f"requeued job {task.job_id} ({done + 1} of at most {max_requeues}); {then}")


def _log_path(task: _Task) -> Path:
    return task.run_dir / JOBS_DIR / f"{task.job_id}_{task.rank}_log.err"


def _record_error(task: _Task, message: str, *, status: str = "failed") -> None:
    """Note the first error of this job attempt in run.json (a later one on another rank is
    usually a consequence of it). A run dir that vanished is left alone."""
    from flsl_cli.train import rundir

    if not (task.run_dir / rundir.RUN_NAME).exists():
        return
    try:
        with update_record(task.run_dir) as record:
            if (record.last_error or {}).get("attempt") == task.attempt:
                return
            error = {
                "job_id": task.job_id,
                "attempt": task.attempt,
                "rank": task.rank,
                "node": slurm_node(),
                "time": timestamps.now(),
                "message": message,
            }
            # Only rank 0 sets the status; another rank adds its error to the record.
            record.error_noted(error, failed=task.rank == 0 and status == "failed")
            if task.rank == 0 and status == "stopped":
                record.stopped()
    except (OSError, FlslError):
        pass


def _fail(task: _Task, exc: FlslError, *, status: str = "failed") -> None:
    print(f"error: {exc.describe()}", file=sys.stderr, flush=True)
    # run.json lives in the run dir: its record need not name it again.
    shown = FlslError(exc.what, fix=exc.fix) if exc.where == str(task.run_dir) else exc
    _record_error(task, shown.describe(), status=status)
    if task.rank == 0 and status != "failed":  # after a failure the batch step requeues the job or releases the run
        _release(task)
    raise SystemExit(exc.exit_code)


def _release(task: _Task) -> None:
    release(task.run_dir, Owner.slurm_job(task.job_id))


# --- Command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="python -m flsl_cli.launch.slurm.job")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="check the recipe and data, create RUN_DIR (once)")
    prepare.add_argument("recipe")
    prepare.add_argument("run_dir")
    prepare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    batch = commands.add_parser("batch", help="run every task of this job with srun, passing stop signals on")
    batch.add_argument("run_dir")
    batch.add_argument("--logs", help="folder for one log per task (default: the job's output)")
    batch.add_argument("--cpu", action="store_true", help="CPU processes (gloo), even where GPUs are visible")
    task = commands.add_parser("task", help="train or resume RUN_DIR as one task of the job")
    task.add_argument("run_dir")
    task.add_argument("--cpu", action="store_true", help="CPU processes (gloo), even where GPUs are visible")
    args = parser.parse_args(argv)
    if args.command == "batch":
        return batch_main(args.run_dir, logs=args.logs, cpu=args.cpu)
    if args.command == "task":
        job_main(args.run_dir, use_cuda=False if args.cpu else None)
        return 0
    try:
        from flsl_cli.launch.rundir_setup import prepare_for_job

        prepare_for_job(args.recipe, overrides=args.overrides, run_dir=Path(args.run_dir), on_note=log)
    except FlslError as exc:
        print(f"error: {exc.describe()}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
