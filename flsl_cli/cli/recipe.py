"""`flsl recipe show` and `flsl recipe validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flsl_cli.cli.render import handle_errors, out_console
from flsl_cli.cli.train import SetOption

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

    out_console.print(recipe_to_yaml(load_recipe(recipe, overrides=set_ or [])), highlight=False, end="")


@app.command("validate")
@handle_errors
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    *,
    set_: SetOption = None,
    devices: Annotated[Optional[int], typer.Option("--devices", min=1, help="Also check against this many processes.")] = None,
) -> None:
    """Check a recipe; exit 0 if it is valid, else list every problem and exit non-zero."""
    from flsl_cli.config.load import check_for_world, load_recipe

    loaded = load_recipe(recipe, overrides=set_ or [])
    if devices:
        check_for_world(loaded, world_size=devices, source=str(recipe))
    out_console.print(f"[green]ok:[/] {recipe} is a valid recipe", highlight=False)
