"""`flsl pretrain` and `flsl resume`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flsl_cli.cli.render import demo_progress, handle_errors, note

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", metavar="KEY=VALUE",
                 help="Override a recipe value, typed like the schema (repeatable), e.g. --set optim.epochs=10."),
]
DevicesOption = Annotated[
    Optional[int],
    typer.Option("--devices", "-d", min=1,
                 help="Local processes: one per GPU (default: all local GPUs), or N CPU processes (default 1)."),
]


@handle_errors
def pretrain(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file, e.g. recipes/demo.yaml.")],
    *,
    set_: SetOption = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Where the run's files go (default: runs/RECIPE-TIME).")] = None,
    devices: DevicesOption = None,
    force: Annotated[bool, typer.Option("--force", help="Start over in a run dir that holds a run with no checkpoint.")] = False,
) -> None:
    """Pretrain a ViT with FLSL from a recipe."""
    from flsl_cli.train.run import start_pretrain

    update, close = demo_progress()
    try:
        start_pretrain(recipe, overrides=set_ or [], run_dir=run_dir, devices=devices, force=force,
                       on_demo_progress=update, on_note=note)
    finally:
        close()


@handle_errors
def resume(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `flsl pretrain`.")],
    *,
    set_: SetOption = None,
    devices: DevicesOption = None,
) -> None:
    """Continue a run from its newest complete checkpoint."""
    from flsl_cli.train.run import resume_run

    resume_run(run_dir, overrides=set_ or [], devices=devices, on_note=note)
