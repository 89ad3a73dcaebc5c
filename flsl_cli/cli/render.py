"""Rendering at the CLI boundary: user errors become one short message and an exit code.

Messages are printed as plain text, never read as rich markup: a message that names
`pip install 'flsl[onnx]'` or a path with brackets prints exactly as written.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.text import Text

from flsl_cli.errors import FlslError, RecipeError, RunStopped
from flsl_cli.progress import make_console

err_console = make_console(stderr=True)
out_console = make_console()

F = TypeVar("F", bound=Callable)


def handle_errors(fn: F) -> F:
    """Run a command; render FlslError / Ctrl-C once, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RunStopped as exc:
            label = Text("interrupted:", style="bold yellow") if exc.exit_code == 130 else Text("flsl:", style="cyan")
            err_console.print(label.append(f" {exc.describe()}"), highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except FlslError as exc:
            err_console.print(error_text(exc), highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print(
                "[bold yellow]interrupted.[/] Every file flsl had finished writing is intact "
                "(each is written whole or not at all); a run with a checkpoint continues with "
                "`flsl resume` and its run dir.",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def error_text(exc: FlslError) -> Text:
    """`error: WHERE: WHAT. FIX.`; for a recipe, one problem per line (each with its own remedy)
    and then the command that checks the recipe again."""
    text = Text("error:", style="bold red")
    if not isinstance(exc, RecipeError):
        return text.append(f" {exc.describe()}")
    count = len(exc.problems)
    text.append(f" {exc.source}: {count} problem{'s' if count != 1 else ''} in the recipe:")
    for problem in exc.problems:
        text.append(f"\n  {problem}")
    if exc.recheck != "":  # "": no command answers this check apart from the one refused
        text.append(f"\nCheck it again with: {exc.recheck or 'flsl recipe validate ' + exc.source}")
    return text


def note(message: str) -> None:
    err_console.print(Text.assemble(("flsl:", "cyan"), f" {message}"), highlight=False)


def warning(message: str) -> None:
    """A problem that does not stop the command (e.g. something it could not check)."""
    err_console.print(Text.assemble(("flsl: warning:", "yellow"), f" {message}"), highlight=False)


def demo_progress() -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A progress callback (done, total) for demo-data generation, and a function to close it.
    The bar closes itself once generation is done: off a terminal rich prints a bar when it
    closes, which must come before what the command prints next, not after its final table."""
    from flsl_cli.progress import ProgressBars

    update, close = ProgressBars(console=err_console).callback("generating demo data")

    def on_progress(done: int, total: int) -> None:
        update(done, total)
        if done >= total:
            close()

    return on_progress, close
