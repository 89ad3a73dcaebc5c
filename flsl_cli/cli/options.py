"""Values of command-line options that several commands read the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, TypeVar

import typer

from flsl_cli.errors import FlslError

T = TypeVar("T")

# --devices of every command that starts local processes (pretrain, resume, knn-eval, eval davis)
DevicesOption = Annotated[
    int | None,
    typer.Option(
        "--devices",
        "-d",
        min=1,
        help="Local processes: one per GPU (default: all local GPUs), or N CPU processes (default 1).",
    ),
]

# --set of every command that reads a recipe
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a recipe value, typed like the schema (repeatable), e.g. --set optim.epochs=10.",
    ),
]

# What a command writes is `--out PATH`; `--json` prints JSON instead of a table.
OutOption = Annotated[
    Path | None, typer.Option("--out", "-o", metavar="FILE.json", help="Also write the figures to this JSON file.")
]
# The spellings --out replaced: accepted for one release, with a note.
OldOutputOption = Annotated[Path | None, typer.Option("--output", hidden=True)]
OldJsonFileOption = Annotated[Path | None, typer.Option("--json", hidden=True)]


def comma_list(value: str) -> list[str]:
    """The items of a comma-separated option value, e.g. "10, 20,,100" -> ["10", "20", "100"]."""
    return [part.strip() for part in value.split(",") if part.strip()]


def renamed_option(value: T | None, old_value: T | None, *, name: str, old_name: str) -> T | None:
    """The value of an option given under its name or, for one release, its old spelling (with a
    note that says so). Both at once is an error."""
    if old_value is None:
        return value
    if value is not None:
        raise FlslError(f"{old_name} is the old spelling of {name}; both were given", fix=f"Pass {name} only")
    from flsl_cli.cli.render import note

    note(f"{old_name} is now {name}; the old spelling goes away in the next release")
    return old_value
