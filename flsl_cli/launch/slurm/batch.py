"""Inside a SLURM job, the batch step (once per attempt of the job): it starts every task with
srun and passes every stop signal it gets on to them as SIGUSR2, so a signal to the batch shell
alone (`scancel --batch`) stops the run like one to the tasks, and the batch step lives until
the tasks have saved and ended. When a task dies (killed, crashed), srun ends the others
(--kill-on-bad-exit) and the batch step records which task, on which node, by which signal, in
run.json; it requeues the job up to `slurm.requeue_on_failure` times (default 0).

`BatchStep` is the callable `flsl pretrain --nodes` submits through submitit (`use_srun=False`:
it runs in the batch step itself); `slurm/flsl.sbatch` runs the same `batch_main` with
`python -m flsl_cli.launch.slurm.job batch`.

Like the tasks, this module imports no torch at its top: the stop signals are taken in charge
before anything heavy loads.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from flsl_cli import signals, timestamps
from flsl_cli.config.schema import SlurmConfig
from flsl_cli.distributed.env import slurm_job_id, slurm_restarts
from flsl_cli.errors import FlslError
from flsl_cli.launch.slurm.queries import requeue
from flsl_cli.train.run_record import Owner, RunStatus, release, update_record


def log(message: str) -> None:
    print(f"flsl: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BatchStep:
    """What submitit runs in the batch step: every task of this attempt, with srun. Ends the
    batch step with srun's exit status (a failed srun: a failed job), without a traceback."""

    run_dir: str
    cpu: bool

    def __call__(self) -> None:
        code = batch_main(self.run_dir, logs=str(Path(self.run_dir) / "slurm"), cpu=self.cpu)
        if code != 0:
            raise SystemExit(code)


def batch_main(run_dir: str, *, logs: str | None, cpu: bool) -> int:
    """Run every task of this job attempt with srun and wait for them; stop signals are passed
    on to the tasks (srun hands SIGUSR2 to each of them; SIGTERM would make srun kill them)."""
    command = ["srun", "--unbuffered", "--kill-on-bad-exit=1"]
    if logs:
        job = slurm_job_id() or "%j"  # a task of a job array: ARRAY_INDEX, as submitit names its files
        command += ["--open-mode=append", f"--output={logs}/{job}_%t_log.out", f"--error={logs}/{job}_%t_log.err"]
    command += [sys.executable, "-u", "-m", "flsl_cli.launch.slurm.job", "task", run_dir] + (["--cpu"] if cpu else [])
    with signals.held():
        step = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace")

    def pass_on(signum, _frame) -> None:
        log(f"the batch step got {signal.Signals(signum).name}: asking every task to stop (SIGUSR2)")
        try:
            os.kill(step.pid, signal.SIGUSR2)
        except OSError:
            pass

    for signum in signals.STOP_SIGNALS:
        signal.signal(signum, pass_on)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.STOP_SIGNALS)
    failures: list[TaskFailure] = []
    assert step.stderr is not None  # stderr=PIPE
    for line in step.stderr:  # srun's own messages (and the tasks' stderr without --logs): passed on
        sys.stderr.write(line)
        sys.stderr.flush()
        failure = parse_task_failure(line)
        if failure is not None:
            failures.append(failure)
    code = step.wait()
    if code != 0:
        _after_failure(Path(run_dir), failures, code=code)
    return code


@dataclass(frozen=True)
class TaskFailure:
    """One task srun saw end badly: `srun: error: n2: task 1: Killed`."""

    node: str
    ranks: str
    how: str

    @property
    def signal_name(self) -> str | None:
        for number in signal.valid_signals():
            if isinstance(number, signal.Signals) and signal.strsignal(number) == self.how:
                return number.name
        return None

    def describe(self) -> str:
        tasks = f"task {self.ranks}" if self.ranks.isdigit() else f"tasks {self.ranks}"
        if self.signal_name:
            return f"{tasks} (rank {self.ranks}) on node {self.node} was killed by {self.signal_name}"
        return f"{tasks} (rank {self.ranks}) on node {self.node} ended: {self.how.lower()}"


_SRUN_FAILURE = re.compile(r"^srun: error: (\S+): tasks? ([\d,\-]+): (.+?)\s*$")


def parse_task_failure(line: str) -> TaskFailure | None:
    match = _SRUN_FAILURE.match(line.strip())
    return TaskFailure(*match.groups()) if match else None


def _after_failure(run_dir: Path, failures: list[TaskFailure], *, code: int) -> None:
    """The batch step, after srun ended badly while the run was training: name the task that
    failed first (its node, rank and signal) in run.json, then requeue the job when
    `slurm.requeue_on_failure` allows, else end it as failed (owner released)."""
    from flsl_cli.checkpoint.store import newest_step
    from flsl_cli.train import rundir

    job_id = slurm_job_id() or "?"
    restart = slurm_restarts()
    attempt = f"{job_id}.{restart}"
    try:
        recipe_text, _ = rundir.read_run(run_dir)
        saved_step = newest_step(run_dir)
        saved = (
            f"the checkpoint of step {saved_step} is saved"
            if saved_step is not None
            else "no checkpoint was written yet"
        )
        allowed = saved_slurm_section(recipe_text).requeue_on_failure
        with update_record(run_dir) as record:  # decided and written at once: rank 0 may write beside us
            if record.job_id != job_id:
                return  # another job's run now
            began = record.job_restarts.get(job_id) == restart  # else run.json tells of an earlier attempt
            if began and record.status not in (RunStatus.STARTING, RunStatus.RUNNING, RunStatus.FAILED):
                return  # stopped, requeued or finished on purpose
            error = _failure_error(
                failures,
                own=record.last_error if (record.last_error or {}).get("attempt") == attempt else None,
                attempt=attempt,
                job_id=job_id,
                saved=saved,
                code=code,
            )
            done = record.failure_requeues.get(job_id, 0)
            before = record.requeue_counts()
            if done < allowed:
                record.requeued(
                    job_id=job_id,
                    restart=restart,
                    by="flsl",
                    cause="failure",
                    step=saved_step,
                    signal=error.get("signal"),
                    after_failure=True,
                )
                record.error_noted(error, failed=False)
            else:
                record.failed(error)
    except (OSError, FlslError):
        return
    if done < allowed:
        log(
            f"{error['message'].rstrip('.')}; requeueing job {job_id} after a failure "
            f"({done + 1} of at most {allowed}: slurm.requeue_on_failure)"
        )
        reason = requeue(job_id, restart=restart)
        if reason is None:
            return
        log(f"could not requeue job {job_id}: {reason}")
        with update_record(run_dir) as record:
            record.requeue_undone(before)
            record.failed(error)
    release(run_dir, Owner.slurm_job(job_id))
    then = (
        "" if allowed == 0 else f" (requeued {done} time(s) after failures, the limit set by slurm.requeue_on_failure)"
    )
    log(f"{error['message'].rstrip('.')}; the job ends{then}. Continue with `flsl resume {run_dir} --nodes N ...`")


def _failure_error(
    failures: list[TaskFailure], *, own: dict | None, attempt: str, job_id: str, saved: str, code: int
) -> dict:
    """The error the run records: the task srun saw die first (its node, rank and signal),
    unless a rank of this attempt already recorded its own error and no task was killed."""
    first = failures[0] if failures else None
    if first is not None and (first.signal_name or not own):
        rank = int(first.ranks) if first.ranks.isdigit() else first.ranks
        return {
            "job_id": job_id,
            "attempt": attempt,
            "rank": rank,
            "node": first.node,
            "signal": first.signal_name,
            "time": timestamps.now(),
            "message": f"{first.describe()}; srun ended the other tasks; {saved}",
        }
    if own:
        return own
    return {
        "job_id": job_id,
        "attempt": attempt,
        "time": timestamps.now(),
        "message": f"the tasks ended with exit code {code}; {saved}",
    }


def saved_slurm_section(recipe_text: str) -> SlurmConfig:
    """The run's `slurm` section as saved (the schema's defaults where it is missing or invalid:
    this is read after a failure, when the run may not be readable as a whole)."""
    from flsl_cli.train import rundir

    try:
        return SlurmConfig.model_validate(rundir.load_recipe_yaml(recipe_text).get("slurm") or {})
    except (ValueError, FlslError):
        return SlurmConfig.model_validate({})
