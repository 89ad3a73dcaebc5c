"""SLURM: submit a run as one job through submitit, and what every task of that job runs.

Submitting (`submit`, `sbatch_script`): N nodes x G tasks, one process per GPU (or CPU
processes with gloo when G is 0). The job asks SLURM for SIGUSR2 `slurm.signal_minutes_before_end`
before its time limit and is marked requeueable.

Inside the job (`job_main`, the function submitit pickles; `python -m flsl_cli.launch.slurm task`
runs the same under plain sbatch + srun): export the rendezvous variables, claim the run
directory, and train, resuming when the run has a checkpoint. On SIGUSR2 (time limit) or SIGTERM
(preemption) the training loop stops every rank at the same step, saves that step and raises
`RunStopped`; rank 0 then runs `scontrol requeue $SLURM_JOB_ID`, and the requeued job resumes
from that checkpoint. Requeues are counted per job in run.json; at `slurm.max_requeues` the job
stops with a message instead.

submitit is imported only inside functions; torch only inside the job.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flsl_cli.errors import FlslError, RunStopped

JOBS_DIR = "slurm"  # RUN_DIR/slurm: submitit's pickles, sbatch scripts and the job logs
STOP_SIGNAL = "USR2"  # what the loop handles, whatever SUBMITIT_PREEMPT_SIGNAL says


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
    cpus_per_task: int | None = None
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


def resolve_request(config, flags: SlurmFlags) -> SlurmRequest:
    """Merge the recipe's `slurm` section (a SlurmConfig) with the flags; check the result."""
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
        constraint=pick("constraint"), mem=pick("mem"), cpus_per_task=pick("cpus_per_task"),
        exclusive=bool(pick("exclusive")), extra_sbatch=dict(config.extra_sbatch), setup=list(config.setup),
        python=config.python,
    )


def executor_parameters(request: SlurmRequest, *, run_dir: Path) -> dict[str, Any]:
    """Parameters for submitit's SlurmExecutor.update_parameters."""
    additional: dict[str, Any] = {"signal": f"{STOP_SIGNAL}@{request.signal_seconds}", "requeue": True}
    if request.time is not None:
        additional["time"] = request.time
    if request.mem is not None:
        additional["mem"] = request.mem
    additional.update({key.replace("_", "-"): value for key, value in request.extra_sbatch.items()})
    return {
        "job_name": f"flsl-{run_dir.name}",
        "nodes": request.nodes,
        "ntasks_per_node": request.tasks_per_node,
        "gpus_per_node": request.gpus_per_node or None,
        "cpus_per_task": request.cpus_per_task,
        "partition": request.partition,
        "account": request.account,
        "qos": request.qos,
        "constraint": request.constraint,
        "exclusive": True if request.exclusive else None,
        "time": None,  # in `additional`: submitit would turn it into minutes
        "wckey": None,
        "setup": request.setup or None,
        # A rank that dies takes the others down at once instead of leaving them in a collective.
        "srun_args": ["--kill-on-bad-exit=1"],
        "additional_parameters": additional,
    }


def _python(request: SlurmRequest) -> str:
    return request.python or shlex.quote(sys.executable)


def sbatch_script(request: SlurmRequest, *, run_dir: Path) -> str:
    """The sbatch script `submit` hands to SLURM (what `--dry-run` prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(run_dir) / JOBS_DIR
    command = " ".join([_python(request), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **executor_parameters(request, run_dir=run_dir))


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    run_dir: Path
    stdout: Path
    stderr: Path


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
    """Submit `job_main(run_dir)` as one SLURM job; returns as soon as SLURM accepted it."""
    require_sbatch()
    import submitit
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    run_dir = Path(run_dir).absolute()
    folder = run_dir / JOBS_DIR
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0, python=_python(request))
    executor.update_parameters(**executor_parameters(request, run_dir=run_dir))
    captured = io.StringIO()  # submitit prints sbatch's stderr itself; it is shown once, below
    earlier = set(folder.iterdir()) if folder.is_dir() else set()
    try:
        with contextlib.redirect_stderr(captured):
            job = executor.submit(job_main, str(run_dir), use_cuda=request.use_cuda)
    except (FailedJobError, FailedSubmissionError) as exc:
        for leftover in set(folder.iterdir()) - earlier:  # the pickle and script of the refused job
            leftover.unlink(missing_ok=True)
        raise SlurmError(
            f"sbatch refused the job: {_sbatch_reason(str(exc))}",
            fix="Check the SLURM options (--partition, --account, --qos, --time, --constraint, --mem) "
                "against `sinfo` and your cluster's rules; --dry-run prints the job script",
        ) from None
    paths = job.paths
    return SubmittedJob(job_id=str(job.job_id), run_dir=run_dir, stdout=paths.stdout, stderr=paths.stderr)


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


def job_details(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """{job id: {state, elapsed, time_limit, nodes, reason, exit_code}} from squeue (and sacct
    when it answers); jobs neither knows are left out."""
    details: dict[str, dict[str, str]] = {}
    for job_id in job_ids:
        answer = _ask(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%i|%T|%M|%l|%N|%r"])
        if answer is not None and answer.returncode == 0:
            for line in answer.stdout.splitlines():
                parts = line.split("|")
                if len(parts) == 6 and parts[0] == str(job_id):
                    details[job_id] = dict(zip(("state", "elapsed", "time_limit", "nodes", "reason"), parts[1:]))
    if job_ids:
        accounted = _ask(["sacct", "-n", "-P", "-X", "-j", ",".join(map(str, job_ids)),
                          "-o", "JobID,State,ExitCode,Elapsed"])
        if accounted is not None and accounted.returncode == 0:
            for line in accounted.stdout.splitlines():
                parts = line.split("|")
                if len(parts) == 4 and parts[0] in job_ids:
                    entry = details.setdefault(parts[0], {})
                    entry.setdefault("state", parts[1])
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


# --- Inside the job ---------------------------------------------------------------------------


class _StopBeforeTraining(Exception):
    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class _SignalGuard:
    """Replaces submitit's SIGUSR2/SIGTERM handlers (which would requeue and exit from wherever
    the process is) for the parts of the job outside the training loop, which installs its own.

    Before training: a stop signal ends the start-up at once (nothing is lost) and the job is
    requeued. After training (while the job winds down): stop signals are only noted."""

    def __init__(self) -> None:
        self.armed = True
        self.signal_name: str | None = None

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        if self.armed:
            self.armed = False
            raise _StopBeforeTraining(self.signal_name)

    def install(self) -> "_SignalGuard":
        for signum in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(signum, self._handle)
        return self


@dataclass(frozen=True)
class _Task:
    run_dir: Path
    job_id: str
    restart: int
    rank: int

    @property
    def attempt(self) -> str:
        return f"{self.job_id}.{self.restart}"


def _log(message: str) -> None:
    print(f"flsl: {message}", file=sys.stderr, flush=True)


def _limit_threads() -> None:
    """One share of the node's CPUs per task, unless the user chose OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    per_task = os.environ.get("SLURM_CPUS_PER_TASK")
    if not per_task:
        cpus = int(os.environ.get("SLURM_CPUS_ON_NODE") or os.cpu_count() or 1)
        tasks = int((os.environ.get("SLURM_NTASKS_PER_NODE") or "1").split("(")[0].split(",")[0] or 1)
        per_task = str(max(1, cpus // max(1, tasks)))
    os.environ["OMP_NUM_THREADS"] = per_task


def job_main(run_dir: str, *, use_cuda: bool | None = None) -> None:
    """What every task of the job runs (submitit calls it; so does `python -m flsl_cli.launch.slurm
    task RUN_DIR` under srun). Trains or resumes the run in `run_dir`; on a stop signal, rank 0
    requeues the job."""
    from flsl_cli.launch.rendezvous import in_slurm_job, torch_env

    if not in_slurm_job(os.environ):
        print("error: this runs as a task of a SLURM job step (SLURM_JOB_ID and SLURM_PROCID are not set). "
              f"Start it with srun inside a job (see slurm/flsl.sbatch), or train here with `flsl resume {run_dir}`.",
              file=sys.stderr, flush=True)
        raise SystemExit(2)
    guard = _SignalGuard().install()
    os.environ.update(torch_env(os.environ))
    if use_cuda is False:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    _limit_threads()
    task = _Task(run_dir=Path(run_dir), job_id=os.environ["SLURM_JOB_ID"],
                 restart=int(os.environ.get("SLURM_RESTART_COUNT") or 0), rank=int(os.environ["RANK"]))
    max_requeues = None
    try:
        try:
            recipe, resume = _begin(task)
            max_requeues = recipe.slurm.max_requeues
            import torch

            threads = os.environ["OMP_NUM_THREADS"].split(",")[0]
            if threads.isdigit() and int(threads) > 0:
                torch.set_num_threads(int(threads))
            from flsl_cli.config.load import recipe_to_dict
            from flsl_cli.train.loop import train_process
            from flsl_cli.train.rundir import RECIPE_NAME

            train_process(recipe_data=recipe_to_dict(recipe), source=str(task.run_dir / RECIPE_NAME),
                          run_dir=str(task.run_dir), resume=resume)
        finally:
            guard.armed = False
    except (RunStopped, _StopBeforeTraining) as stop:
        step = getattr(stop, "step", None)
        _log(f"stopped by {stop.signal_name}" + (f" after step {step}" if step is not None else " before training"))
        if task.rank == 0:
            try:
                _requeue_or_stop(task, step=step, signal_name=stop.signal_name, max_requeues=max_requeues)
            except FlslError as exc:
                _fail(task, exc, status="stopped")  # resumable: its checkpoint is saved
        return
    except FlslError as exc:
        _fail(task, exc)
    except BaseException as exc:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            _record_error(task, f"{last} (traceback in {_log_path(task)})")
            if task.rank == 0:
                _release(task)
        raise
    if task.rank == 0:
        _release(task)
        _log(f"job {task.job_id} done")


def _begin(task: _Task):
    """Read the run; rank 0 claims the run directory. Returns (recipe, resume?)."""
    from flsl_cli.checkpoint.store import list_checkpoints
    from flsl_cli.config.load import validate_recipe
    from flsl_cli.train import rundir

    recipe_text, record = rundir.read_run(task.run_dir)
    recipe = validate_recipe(rundir.load_recipe_yaml(recipe_text), source=str(task.run_dir / rundir.RECIPE_NAME))
    resume = bool(list_checkpoints(task.run_dir))
    if task.rank == 0:
        me = rundir.slurm_owner(task.job_id)
        rundir.refuse_if_owned(task.run_dir, slurm_state=job_state, me=me)
        rundir.write_owner(task.run_dir, me)
        job_ids = [str(j) for j in record.get("job_ids", [])]
        if task.job_id not in job_ids:
            job_ids.append(task.job_id)
        rundir.update_status(task.run_dir, scheduler="slurm", job_ids=job_ids, job_id=task.job_id,
                             job_restarts=task.restart, status="starting")
        if not resume:  # a restarted attempt that never reached a checkpoint starts over
            rundir.truncate_metrics(task.run_dir, after_step=0)
        _log(f"job {task.job_id} (restart {task.restart}) on {os.environ.get('SLURM_JOB_NODELIST', '?')}: "
             f"{os.environ['WORLD_SIZE']} process(es), rendezvous {os.environ['MASTER_ADDR']}:"
             f"{os.environ['MASTER_PORT']}, " + ("resuming" if resume else "starting"))
    return recipe, resume


def _requeue_or_stop(task: _Task, *, step: int | None, signal_name: str, max_requeues: int | None) -> None:
    """Rank 0, after every rank stopped: requeue the job, or stop for good at the limit."""
    from flsl_cli.checkpoint.store import newest_step
    from flsl_cli.train import rundir

    _, record = rundir.read_run(task.run_dir)
    if record.get("status") == "finished":
        _release(task)
        return
    if max_requeues is None:
        recipe_text, _ = rundir.read_run(task.run_dir)
        max_requeues = int((rundir.load_recipe_yaml(recipe_text).get("slurm") or {}).get("max_requeues", 20))
    if step is None:
        step = newest_step(task.run_dir)
    saved = (f"the checkpoint of step {step} is saved" if step is not None else "no checkpoint was written yet")
    counts = {str(k): int(v) for k, v in (record.get("job_requeues") or {}).items()}
    done = counts.get(task.job_id, 0)
    if done >= max_requeues:
        raise SlurmError(
            f"job {task.job_id} was stopped by {signal_name} and not requeued: it has been requeued "
            f"{done} time(s), the limit set by slurm.max_requeues ({max_requeues}); {saved}",
            where=str(task.run_dir),
            fix=f"Continue with `flsl resume {task.run_dir} --nodes N ...` (a new job), or raise the limit "
                "with --set slurm.max_requeues=...",
        )
    counts[task.job_id] = done + 1
    total = int(record.get("requeues", 0)) + 1
    rundir.update_status(task.run_dir, status="requeued", job_requeues=counts, requeues=total,
                         last_requeue={"job_id": task.job_id, "step": step, "signal": signal_name,
                                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    reason = requeue(task.job_id)
    if reason is not None:
        counts[task.job_id] = done
        rundir.update_status(task.run_dir, job_requeues=counts, requeues=total - 1)
        raise SlurmError(
            f"job {task.job_id} stopped by {signal_name} but could not requeue itself: {reason}; {saved}",
            where=str(task.run_dir), fix=f"Continue with `flsl resume {task.run_dir} --nodes N ...`",
        )
    then = f"it resumes from step {step}" if step is not None else "it starts the run over"
    _log(f"requeued job {task.job_id} ({done + 1} of at most {max_requeues}); {then}")


def _log_path(task: _Task) -> Path:
    return task.run_dir / JOBS_DIR / f"{task.job_id}_{task.rank}_log.err"


def _record_error(task: _Task, message: str, *, status: str = "failed") -> None:
    """Note the first error of this job attempt in run.json (a later one on another rank is
    usually a consequence of it)."""
    from flsl_cli.train import rundir

    try:
        _, record = rundir.read_run(task.run_dir)
        previous = record.get("last_error") or {}
        if previous.get("attempt") == task.attempt:
            return
        rundir.update_status(task.run_dir, status=status if task.rank == 0 else record.get("status"),
                             last_error={"job_id": task.job_id, "attempt": task.attempt, "rank": task.rank,
                                         "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "message": message})
    except (OSError, FlslError):
        pass


def _fail(task: _Task, exc: FlslError, *, status: str = "failed") -> None:
    print(f"error: {exc.describe()}", file=sys.stderr, flush=True)
    # run.json lives in the run dir: its record need not name it again.
    shown = FlslError(exc.what, fix=exc.fix) if exc.where == str(task.run_dir) else exc
    _record_error(task, shown.describe(), status=status)
    if task.rank == 0:
        _release(task)
    raise SystemExit(exc.exit_code)


def _release(task: _Task) -> None:
    from flsl_cli.train import rundir

    rundir.release_owner(task.run_dir, rundir.slurm_owner(task.job_id))


# --- Plain sbatch + srun (slurm/flsl.sbatch) --------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m flsl_cli.launch.slurm prepare RECIPE RUN_DIR [--set K=V ...]` (in the batch
    script, once: check and create the run dir unless it exists) and `... task RUN_DIR [--cpu]`
    (under srun, in every task)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flsl_cli.launch.slurm")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="check the recipe and data, create RUN_DIR (once)")
    prepare.add_argument("recipe")
    prepare.add_argument("run_dir")
    prepare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    task = commands.add_parser("task", help="train or resume RUN_DIR as one task of the job")
    task.add_argument("run_dir")
    task.add_argument("--cpu", action="store_true", help="CPU processes (gloo), even where GPUs are visible")
    args = parser.parse_args(argv)
    if args.command == "task":
        job_main(args.run_dir, use_cuda=False if args.cpu else None)
        return 0
    try:
        from flsl_cli.train.run import prepare_for_job

        prepare_for_job(args.recipe, overrides=args.overrides, run_dir=Path(args.run_dir), on_note=_log)
    except FlslError as exc:
        print(f"error: {exc.describe()}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
