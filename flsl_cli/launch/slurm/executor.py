"""SLURM from the submitting side: the submitit executor of one job, and submitting it.

A run is one job of N nodes x G tasks, one process per GPU (or CPU processes with gloo when G
is 0), marked requeueable, that asks SLURM for SIGUSR2 `slurm.signal_minutes_before_end`
before its time limit. submitit writes the job script into RUN_DIR/slurm (its own layout:
`%j_submission.sh`, `%j_submitted.pkl`, `%j_%t_log.out/err`), submits it with sbatch and
gives back the `submitit.Job`. With `use_srun=False` the submitted callable (`BatchStep`,
`batch.py`) runs in the batch step itself: it starts the tasks with srun, passes every stop
signal on to them and settles the job's fate after a failure. The batch script `exec`s Python
(submitit's `python` command), so the batch step is the batch shell's own process and a signal
to the batch shell alone (`scancel --batch`) reaches it.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flsl_cli.launch.slurm.errors import SlurmError
from flsl_cli.launch.slurm.queries import partition_nodes, slurm_reason
from flsl_cli.launch.slurm.request import SlurmRequest

if TYPE_CHECKING:
    import submitit

JOBS_DIR = "slurm"  # RUN_DIR/slurm: submitit's job files, the logs, rendezvous notes
STOP_SIGNAL = "USR2"  # what SLURM sends before the time limit (submitit's default too)
PRIVATE = 0o700  # the run dir and its slurm/ folder: nobody else may replace a job's pickle


def python_command(request: SlurmRequest) -> str:
    """submitit's `python`: a shell command that starts Python in the batch script. `exec`
    makes the batch step the batch shell's own process, so signals to the batch shell reach it."""
    return "exec " + (request.slurm.python or shlex.quote(sys.executable))


def executor_parameters(request: SlurmRequest, *, run_dir: Path) -> dict[str, Any]:
    """The keyword arguments of `submitit.SlurmExecutor.update_parameters` for the job (None:
    the option is left out, SLURM's default applies)."""
    slurm = request.slurm
    limit = slurm.time_limit_seconds(slurm.time) if slurm.time is not None else None
    extra = {
        key.replace("_", "-"): value
        for key, value in slurm.extra_sbatch.items()
        if value is not None and value is not False
    }
    return {
        "job_name": f"flsl-{Path(run_dir).name}",
        "nodes": request.nodes,
        "ntasks_per_node": request.tasks_per_node,
        "gpus_per_node": request.gpus_per_node or None,
        "cpus_per_task": request.cpus_per_task,
        "time": math.ceil(limit / 60) if limit else None,  # minutes; None: the partition's default
        "partition": slurm.partition,
        "account": slurm.account,
        "qos": slurm.qos,
        "constraint": slurm.constraint,
        "mem": slurm.mem,
        "exclusive": True if slurm.exclusive else None,
        "signal_delay_s": request.signal_seconds,
        "setup": list(slurm.setup),
        "additional_parameters": {"requeue": True, **extra},
        "use_srun": False,  # the callable runs in the batch step and starts the tasks itself
        "wckey": None,  # submitit would set its own
    }


def sbatch_lines(parameters: dict[str, Any], *, folder: Path, array: int | None = None) -> list[str]:
    """The #SBATCH lines submitit writes for `parameters` (what `--dry-run` shows); `array`: the
    number of tasks of a job array."""
    options = {key: value for key, value in parameters.items() if value is not None and key not in _NOT_SBATCH}
    options["signal"] = f"{STOP_SIGNAL}@{parameters['signal_delay_s']}"
    job = "%j" if array is None else "%A_%a"
    options["output"] = str(folder / f"{job}_0_log.out")
    options["error"] = str(folder / f"{job}_0_log.err")
    if array is not None:
        options["array"] = f"0-{array - 1}%{min(array, parameters.get('array_parallelism') or array)}"
    options["open-mode"] = "append"
    options.update(parameters.get("additional_parameters") or {})
    lines = []
    for key in sorted(options):
        flag = key.replace("_", "-")
        value = options[key]
        lines.append(f"#SBATCH --{flag}" if value is True else f"#SBATCH --{flag}={shlex.quote(str(value))}")
    return lines


_NOT_SBATCH = ("signal_delay_s", "setup", "additional_parameters", "use_srun", "srun_args", "array_parallelism")


def dry_run_text(
    request: SlurmRequest, *, run_dir: Path, array: int | None = None, max_parallel: int | None = None
) -> str:
    """What `--dry-run` prints: the executor and its parameters, the #SBATCH options submitit
    writes from them, and the batch step's command. `array`: the tasks of a job array (a
    sweep's members, `run_dir` its sweep dir), at most `max_parallel` running at once."""
    folder = Path(run_dir) / JOBS_DIR
    parameters = executor_parameters(request, run_dir=run_dir)
    if array is not None:
        parameters["array_parallelism"] = max_parallel or array
    given = {key: value for key, value in parameters.items() if value is not None}
    submitted = (
        ".submit(BatchStep(...))"
        if array is None
        else f"with .batch(): .submit(BatchStep(MEMBER_RUN_DIR)) for each of the {array} members"
    )
    lines = [
        f"# submitit.SlurmExecutor(folder={str(folder)!r}, python={python_command(request)!r})",
        "# .update_parameters(",
        *[f"#     {key}={value!r}," for key, value in given.items()],
        f"# ) then {submitted}: the job script submitit writes to {folder}/JOB_submission.sh holds",
        "#!/bin/bash",
        *sbatch_lines(parameters, folder=folder, array=array),
    ]
    if request.slurm.setup:
        lines += ["", *request.slurm.setup]
    lines += [
        "",
        "export SUBMITIT_EXECUTOR=slurm",
        f"{python_command(request)} -u -m submitit.core._submit {shlex.quote(str(folder))}",
        (
            "# which runs the batch step (flsl_cli/launch/slurm/batch.py): srun --kill-on-bad-exit=1 ... "
            "python -m flsl_cli.launch.slurm.job task RUN_DIR, stop signals passed on"
        ),
        "",
    ]
    return "\n".join(lines)


def require_sbatch() -> None:
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        missing = "sbatch" if shutil.which("sbatch") is None else "srun"
        raise SlurmError(
            f"{missing} was not found on PATH, so the run cannot be submitted to SLURM",
            fix="Run it on this machine instead by leaving out --nodes and the other SLURM options "
            "(e.g. `flsl pretrain RECIPE --devices N`), or run the command on a SLURM login node "
            "(`module load slurm` on some clusters); --dry-run shows the job without sbatch",
        )


def make_private(path: Path) -> None:
    """Create `path` if needed and let only its owner in (submitit runs the pickle it finds there)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, PRIVATE)


def make_executor(request: SlurmRequest, *, run_dir: Path) -> submitit.SlurmExecutor:
    """The executor of the job, its parameters set; a submitit without one of them is named."""
    import submitit

    executor = submitit.SlurmExecutor(folder=Path(run_dir) / JOBS_DIR, python=python_command(request))
    try:
        executor.update_parameters(**executor_parameters(request, run_dir=run_dir))
    except ValueError as exc:
        missing = str(exc).splitlines()[0]
        raise SlurmError(
            f"submitit {submitit.__version__} does not take a parameter flsl needs ({missing})",
            fix="Install submitit 1.5 or newer in this environment (`pip install -U 'submitit>=1.5'`)",
        ) from None
    return executor


def submit(request: SlurmRequest, *, run_dir: Path) -> submitit.Job:
    """Submit the job through submitit (its files in RUN_DIR/slurm); returns once SLURM accepted
    it. When sbatch refuses, the files of the attempt are removed and SLURM's reason is raised."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    from flsl_cli.launch.slurm.batch import BatchStep

    require_sbatch()
    run_dir = Path(run_dir).absolute()
    folder = run_dir / JOBS_DIR
    make_private(run_dir)
    make_private(folder)
    before = set(folder.iterdir())
    executor = make_executor(request, run_dir=run_dir)
    refused = io.StringIO()
    try:
        with contextlib.redirect_stderr(refused):  # submitit prints sbatch's stderr: it is in the error
            job: submitit.Job = executor.submit(BatchStep(run_dir=str(run_dir), cpu=not request.use_cuda))
    except (FailedJobError, FailedSubmissionError, OSError) as exc:
        for path in set(folder.iterdir()) - before:
            path.unlink(missing_ok=True)
        raise _refusal(request, str(exc) or refused.getvalue()) from None
    return job


def submit_array(
    request: SlurmRequest, *, folder_of: Path, run_dirs: list[Path], max_parallel: int | None
) -> list[submitit.Job]:
    """Submit one job array through submitit, one task per run dir (`with executor.batch()`,
    at most `max_parallel` tasks running at once); its job files in FOLDER_OF/slurm, each
    task's own logs in its RUN_DIR/slurm. Every task runs the batch step of a single job on its
    own run dir. Returns the tasks' jobs in the order of `run_dirs` (ids ARRAY_INDEX). When
    sbatch refuses, the files of the attempt are removed and SLURM's reason is raised."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    from flsl_cli.launch.slurm.batch import BatchStep

    require_sbatch()
    folder_of = Path(folder_of).absolute()
    folder = folder_of / JOBS_DIR
    make_private(folder_of)
    make_private(folder)
    for run_dir in run_dirs:
        make_private(Path(run_dir).absolute())
        make_private(Path(run_dir).absolute() / JOBS_DIR)
    before = set(folder.iterdir())
    executor = make_executor(request, run_dir=folder_of)
    executor.update_parameters(array_parallelism=max_parallel or len(run_dirs))
    refused = io.StringIO()
    try:
        with contextlib.redirect_stderr(refused), executor.batch():
            jobs = [
                executor.submit(BatchStep(run_dir=str(Path(run_dir).absolute()), cpu=not request.use_cuda))
                for run_dir in run_dirs
            ]
    except (FailedJobError, FailedSubmissionError, OSError) as exc:
        for path in set(folder.iterdir()) - before:
            path.unlink(missing_ok=True)
        raise _refusal(request, str(exc) or refused.getvalue()) from None
    return jobs


def _refusal(request: SlurmRequest, stderr: str) -> SlurmError:
    reason = slurm_reason(stderr)
    if any(words in reason.lower() for words in _NODE_COUNT_REFUSALS):
        known = partition_nodes(request.slurm.partition)
        if known is not None:
            return SlurmError(
                f"sbatch refused the job: {reason}: partition {known[0]} has {known[1]} node(s), "
                f"the job asks for {request.nodes}",
                fix=f"Use --nodes {known[1]} or fewer, or another --partition (see `sinfo`)",
            )
    return SlurmError(
        f"sbatch refused the job: {reason}",
        fix="Check the SLURM options (--partition, --account, --qos, --time, --constraint, --mem) "
        "against `sinfo` and your cluster's rules; --dry-run shows the job",
    )


_NODE_COUNT_REFUSALS = ("node count specification invalid", "requested node configuration is not available")
