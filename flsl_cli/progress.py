"""The consoles flsl prints to, and its one progress-bar helper: rich bars on a console (stderr),
one per stage, started at the first update and stopped together, with an optional line of text
below them. Callers decide whether to show bars at all (off a terminal they print plain lines
instead)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

# Off a terminal (and with no COLUMNS set), tables are laid out as wide as their contents need,
# up to this, so a path in a summary table is neither cut nor folded.
UNWRAPPED_WIDTH = 1000


def make_console(*, stderr: bool = False) -> Console:
    """A rich console on stdout or stderr. Written to a file or pipe (a SLURM task log, `| tee`,
    CI) nothing is wrapped or cut: each log line stays one line and every path stays whole, for
    grep; a table is as wide as its contents (unless COLUMNS sets a width)."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.soft_wrap = True
        if not os.environ.get("COLUMNS"):
            console.width = UNWRAPPED_WIDTH
    return console


def default_columns() -> tuple[ProgressColumn, ...]:
    """Label, bar, done/total, time left."""
    return TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()


class _BarsWithFooter(Progress):
    footer = ""

    def get_renderables(self) -> Iterator[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.footer:
            yield Text(self.footer)


class ProgressBars:
    """Bars keyed by their label. `update(label, done=, total=)` adds a bar on first use; extra
    keyword fields are what the columns show (`{task.fields[NAME]}`)."""

    def __init__(self, *, console: Console, columns: tuple[ProgressColumn, ...] | None = None) -> None:
        self._progress = _BarsWithFooter(*(columns or default_columns()), console=console, transient=False)
        self._tasks: dict[str, Any] = {}
        self._running = False

    def update(self, label: str, *, done: int, total: int | None = None, **fields: Any) -> None:
        if not self._running:
            self._progress.start()
            self._running = True
        if label not in self._tasks:
            self._tasks[label] = self._progress.add_task(label, total=total, completed=done, **fields)
        else:
            self._progress.update(self._tasks[label], completed=done, total=total, **fields)

    def set_footer(self, text: str) -> None:
        """A line of text under the bars (the loss terms, while training)."""
        self._progress.footer = text

    def close(self) -> None:
        if self._running:
            self._progress.stop()
            self._running = False

    def callback(self, label: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
        """A (done, total) callback that moves the bar `label`, and a function that closes the bars."""
        return (lambda done, total: self.update(label, done=done, total=total)), self.close
