"""`flsl pretrain` and `flsl resume`: on this machine, or as a SLURM job when any SLURM option
is given."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flsl_cli.cli.options import DevicesOption
from flsl_cli.cli.render import demo_progress, handle_errors, note, out_console

SLURM_PANEL = "SLURM (any of these submits a job instead of training here)"

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a recipe value, typed like the schema (repeatable), e.g. --set optim.epochs=10.",
    ),
]
NodesOption = Annotated[
    int | None,
    typer.Option(
        "--nodes",
        "-N",
        rich_help_panel=SLURM_PANEL,
        help="Submit one SLURM job on N nodes (default: recipe slurm.nodes).",
    ),
]
GpusOption = Annotated[
    int | None,
    typer.Option(
        "--gpus-per-node",
        rich_help_panel=SLURM_PANEL,
        help="GPUs per node, one process each (default: slurm.gpus_per_node); 0: CPU processes with gloo.",
    ),
]
TasksOption = Annotated[
    int | None,
    typer.Option(
        "--tasks-per-node",
        rich_help_panel=SLURM_PANEL,
        help="CPU processes per node with --gpus-per-node 0 (default: slurm.tasks_per_node, else 1).",
    ),
]
PartitionOption = Annotated[
    str | None,
    typer.Option("--partition", "-p", rich_help_panel=SLURM_PANEL, help="SLURM partition (default: slurm.partition)."),
]
AccountOption = Annotated[
    str | None,
    typer.Option(
        "--account", "-A", rich_help_panel=SLURM_PANEL, help="SLURM account to charge (default: slurm.account)."
    ),
]
QosOption = Annotated[
    str | None,
    typer.Option("--qos", rich_help_panel=SLURM_PANEL, help="SLURM quality of service (default: slurm.qos)."),
]
TimeOption = Annotated[
    str | None,
    typer.Option(
        "--time",
        "-t",
        metavar="D-HH:MM:SS",
        rich_help_panel=SLURM_PANEL,
        help="Time limit of each job attempt; the job checkpoints and requeues itself before it "
        "(default: slurm.time, else the partition's).",
    ),
]
ConstraintOption = Annotated[
    str | None,
    typer.Option(
        "--constraint", "-C", rich_help_panel=SLURM_PANEL, help="Node features, e.g. a100 (default: slurm.constraint)."
    ),
]
MemOption = Annotated[
    str | None,
    typer.Option("--mem", rich_help_panel=SLURM_PANEL, help="Memory per node, e.g. 200G (default: slurm.mem)."),
]
CpusOption = Annotated[
    int | None,
    typer.Option(
        "--cpus-per-task",
        "-c",
        rich_help_panel=SLURM_PANEL,
        help="CPUs per process, for its data workers (default: slurm.cpus_per_task).",
    ),
]
ExclusiveOption = Annotated[
    bool | None,
    typer.Option(
        "--exclusive/--shared",
        rich_help_panel=SLURM_PANEL,
        help="Ask for whole nodes (default: slurm.exclusive).",
        show_default=False,
    ),
]
DryRunOption = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        rich_help_panel=SLURM_PANEL,
        help="Check the recipe and options, show the submitit parameters and #SBATCH options of the job "
        "that would be submitted, and exit.",
    ),
]


def _slurm_job(*, devices: int | None, dry_run: bool, **values) -> dict | None:
    """The SLURM options as SlurmConfig fields (None: not given, the recipe decides) when a SLURM
    job is asked for (any of them, or --dry-run); None to train on this machine. --devices is
    refused with a SLURM job."""
    if all(value is None for value in values.values()) and not dry_run:
        return None
    if devices is not None:
        from flsl_cli.errors import FlslError

        raise FlslError(
            "--devices is for runs on this machine and cannot be combined with SLURM options",
            fix="Use --gpus-per-node (or --gpus-per-node 0 --tasks-per-node N for CPU "
            "processes) with --nodes, or leave out the SLURM options",
        )
    return values


def _print_submitted(job, *, resumed: bool) -> None:
    what = "continues" if resumed else "trains"
    run_dir = job.paths.folder.parent  # submitit's folder is RUN_DIR/slurm
    for line in (
        f"submitted SLURM job {job.job_id}: it {what} {run_dir}",
        f"  run dir  {run_dir}",
        f"  logs     {job.paths.stdout}",
        f"           {job.paths.stderr}",
        f"  status   flsl status {run_dir}",
    ):
        out_console.print(line, highlight=False, markup=False)


def _print_script(script: str) -> None:
    typer.echo(script)


@handle_errors
def pretrain(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file, e.g. recipes/demo.yaml.")],
    *,
    set_: SetOption = None,
    run_dir: Annotated[
        str | None,
        typer.Option(
            "--run-dir",
            help="Where the run's files go, a path or a URL such as s3://bucket/runs/x (default: runs/RECIPE-TIME).",
        ),
    ] = None,
    devices: DevicesOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Start over in a run dir that holds a run with no checkpoint.")
    ] = False,
    nodes: NodesOption = None,
    gpus_per_node: GpusOption = None,
    tasks_per_node: TasksOption = None,
    partition: PartitionOption = None,
    account: AccountOption = None,
    qos: QosOption = None,
    time: TimeOption = None,
    constraint: ConstraintOption = None,
    mem: MemOption = None,
    cpus_per_task: CpusOption = None,
    exclusive: ExclusiveOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Pretrain a ViT with FLSL from a recipe, here or as a SLURM job (--nodes N ...)."""
    slurm = _slurm_job(
        devices=devices,
        dry_run=dry_run,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        tasks_per_node=tasks_per_node,
        partition=partition,
        account=account,
        qos=qos,
        time=time,
        constraint=constraint,
        mem=mem,
        cpus_per_task=cpus_per_task,
        exclusive=exclusive,
    )
    if slurm is not None:
        from flsl_cli.launch.slurm.submit import submit_pretrain

        update, close = demo_progress()
        try:
            job = submit_pretrain(
                recipe,
                overrides=set_ or [],
                run_dir=run_dir,
                force=force,
                slurm_options=slurm,
                dry_run=dry_run,
                on_demo_progress=update,
                on_note=note,
                on_script=_print_script,
            )
        finally:
            close()
        if job is not None:
            _print_submitted(job, resumed=False)
        return
    from flsl_cli.launch.here import start_pretrain

    update, close = demo_progress()
    try:
        start_pretrain(
            recipe,
            overrides=set_ or [],
            run_dir=run_dir,
            devices=devices,
            force=force,
            on_demo_progress=update,
            on_note=note,
        )
    finally:
        close()


@handle_errors
def resume(
    run_dir: Annotated[str, typer.Argument(help="Run directory written by `flsl pretrain` (a path or a URL).")],
    *,
    set_: SetOption = None,
    allow_schedule_change: Annotated[
        bool,
        typer.Option(
            "--allow-schedule-change",
            help="Let --set change the run's schedule or data order (optim.epochs, optim.global_batch_size, "
            "warm-ups, optim.seed, data.*); the note says what changes.",
        ),
    ] = False,
    adopt_checkpoint: Annotated[
        str | None,
        typer.Option(
            "--adopt-checkpoint",
            metavar="STEP_FILE",
            help="Commit a checkpoint file of the run that has no manifest (step-NNNNNNNN.pt in RUN_DIR/checkpoints/) "
            "after checking it loads safely and fits the run's model, then resume.",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Start over from step 0 when the run's checkpoint files have no manifests (they are set aside "
            "as *.unverified, never deleted).",
        ),
    ] = False,
    devices: DevicesOption = None,
    nodes: NodesOption = None,
    gpus_per_node: GpusOption = None,
    tasks_per_node: TasksOption = None,
    partition: PartitionOption = None,
    account: AccountOption = None,
    qos: QosOption = None,
    time: TimeOption = None,
    constraint: ConstraintOption = None,
    mem: MemOption = None,
    cpus_per_task: CpusOption = None,
    exclusive: ExclusiveOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Continue a run from its newest complete checkpoint, here or as a SLURM job (--nodes N ...);
    given a sweep dir, the members that did not finish."""
    from flsl_cli.launch.resume_guards import ResumeOptions

    options = ResumeOptions(allow_schedule_change=allow_schedule_change, adopt=adopt_checkpoint, force=force)
    slurm = _slurm_job(
        devices=devices,
        dry_run=dry_run,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        tasks_per_node=tasks_per_node,
        partition=partition,
        account=account,
        qos=qos,
        time=time,
        constraint=constraint,
        mem=mem,
        cpus_per_task=cpus_per_task,
        exclusive=exclusive,
    )
    from flsl_cli.launch.sweep_record import is_sweep_dir

    if is_sweep_dir(run_dir):  # a sweep dir: the members that did not finish
        from flsl_cli.launch.sweep import resume_sweep

        resume_sweep(
            run_dir, overrides=set_ or [], slurm_options=slurm, devices=devices, dry_run=dry_run, on_note=note,
            on_script=_print_script,
        )  # fmt: skip
        return
    if slurm is not None:
        from flsl_cli.launch.slurm.submit import submit_resume

        job = submit_resume(
            run_dir,
            overrides=set_ or [],
            slurm_options=slurm,
            dry_run=dry_run,
            options=options,
            on_note=note,
            on_script=_print_script,
        )
        if job is not None:
            _print_submitted(job, resumed=True)
        return
    from flsl_cli.launch.here import resume_run

    resume_run(run_dir, overrides=set_ or [], devices=devices, options=options, on_note=note)
