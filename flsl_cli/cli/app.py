"""`flsl`: the top-level Typer app. Command modules are small; torch is imported only when a
command runs, so `flsl --help` is instant."""

from __future__ import annotations

import typer

from flsl_cli.cli import data, recipe, train

app = typer.Typer(
    name="flsl",
    help="Pretrain Vision Transformers with FLSL (Feature-Level Self-Supervised Learning).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("pretrain")(train.pretrain)
app.command("resume")(train.resume)
app.add_typer(recipe.app, name="recipe", help="Show or validate recipes.")
app.add_typer(data.app, name="data", help="Make data sets.")


def main() -> None:
    app()
