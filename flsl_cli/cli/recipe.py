"""`flsl recipe show` and `flsl recipe validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from flsl_cli.cli.options import SetOption
from flsl_cli.cli.render import handle_errors, note, out_console, warning

app = typer.Typer(no_args_is_help=True)


@app.command("show")
@handle_errors
def show(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    *,
    set_: SetOption = None,
) -> None:
    """Print the fully resolved recipe (defaults filled in, overrides applied)."""
    from flsl_cli.config.load import load_recipe, recipe_to_yaml

    out_console.print(recipe_to_yaml(load_recipe(recipe, overrides=set_ or [])), highlight=False, markup=False, end="")


@app.command("validate")
@handle_errors
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    *,
    set_: SetOption = None,
    devices: Annotated[
        int | None,
        typer.Option(
            "--devices",
            min=1,
            help="Check against this many local processes (default: as `flsl pretrain` would "
            "use: every local GPU, else one CPU process).",
        ),
    ] = None,
) -> None:
    """Check a recipe as `flsl pretrain` would before training: the values, the process count, the
    memory the run needs on this machine, and the data (a location on another machine that cannot
    be reached from here is a warning). Exit 0 if it passes, else list every problem and exit 2."""
    from flsl_cli.config.load import load_recipe, recheck_with
    from flsl_cli.errors import FlslError
    from flsl_cli.launch.checks import check_data, check_recipe, demo_data_pending
    from flsl_cli.launch.devices import resolve_devices

    loaded = load_recipe(recipe, overrides=set_ or [])
    nprocs, use_cuda = resolve_devices(devices)
    with recheck_with(recipe, set_ or [], devices=devices):
        check_recipe(loaded, source=str(recipe), world_size=nprocs, use_cuda=use_cuda)

    def unreachable(key: str, exc: FlslError) -> None:
        warning(
            f"{key} could not be read from this machine, so it was not checked ({exc.where or key}: "
            f"{exc.what}); `flsl pretrain` refuses it unless it can be read where the run trains"
        )

    if demo_data_pending(loaded):
        note(
            f"data.train ({loaded.data.train}) does not exist yet: `flsl pretrain` generates the demo data "
            "there and checks it then"
        )
    else:
        for message in check_data(loaded, world_size=nprocs, on_unreachable=unreachable):
            note(message)
    out_console.print(
        Text.assemble(
            ("ok:", "green"),
            f" {recipe} is a valid recipe for {nprocs} "
            f"{'GPU' if use_cuda else 'CPU'} process{'es' if nprocs > 1 else ''}",
        ),
        highlight=False,
    )
