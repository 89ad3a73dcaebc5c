"""`flsl pretrain` and `flsl resume`: on this machine, or as a SLURM job when any SLURM option
is given."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flsl_cli.cli.options import DevicesOption, SetOption
from flsl_cli.cli.render import demo_progress, handle_errors, note, out_console
from flsl_cli.cli.slurm_options import slurm_options


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
@slurm_options
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
    slurm: dict | None = None,
    dry_run: bool = False,
) -> None:
    """Pretrain a ViT with FLSL from a recipe, here or as a SLURM job (--nodes N ...)."""
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
@slurm_options
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
    slurm: dict | None = None,
    dry_run: bool = False,
) -> None:
    """Continue a run from its newest complete checkpoint, here or as a SLURM job (--nodes N ...);
    given a sweep dir, the members that did not finish."""
    from flsl_cli.launch.resume_guards import ResumeOptions

    options = ResumeOptions(allow_schedule_change=allow_schedule_change, adopt=adopt_checkpoint, force=force)
    from flsl_cli.launch.sweep.record import is_sweep_dir

    if is_sweep_dir(run_dir):  # a sweep dir: the members that did not finish
        from flsl_cli.launch.sweep.start import resume_sweep

        resume_sweep(
            run_dir, overrides=set_ or [], slurm_options=slurm, devices=devices, dry_run=dry_run, options=options,
            on_note=note, on_script=_print_script,
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
