"""What the user sees while training: a rich progress bar on a terminal, plain log lines
otherwise (CI, SLURM logs), and a summary table at the end. Only rank 0 shows anything."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from flsl_cli.progress import ProgressBars


def epoch_number(step: int, *, steps_per_epoch: int, total_steps: int | None = None) -> int:
    """The epoch (1-based) that step `step` (1-based) belongs to, as training shows it; the
    last step of the run counts in the last epoch. Step 0 is in epoch 1."""
    last = step - 1 if total_steps is None else min(step - 1, total_steps - 1)
    return max(last, 0) // steps_per_epoch + 1


class TrainProgress:
    def __init__(
        self,
        *,
        total_steps: int,
        start_step: int,
        epochs: int,
        steps_per_epoch: int,
        enabled: bool,
        log_every: int,
        console: Console | None = None,
    ) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.log_every = log_every
        self.total_steps = total_steps
        self._live = enabled and self.console.is_terminal
        self._progress = None
        if self._live:  # the bar on one line and the loss terms on the next: both fit 80 columns
            self._progress = ProgressBars(
                console=self.console,
                columns=(
                    TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]:.1f} img/s"),
                    TimeElapsedColumn(),
                    TextColumn("eta"),
                    TimeRemainingColumn(),
                ),
            )
            self._progress.update(
                "train",
                done=start_step,
                total=total_steps,
                epoch=start_step // steps_per_epoch + 1,
                epochs=epochs,
                rate=0.0,
            )
        self._started = time.monotonic()

    def update(self, *, step: int, values: dict[str, float], images_per_s: float) -> None:
        if not self.enabled:
            return
        terms = (
            f"loss {values['loss']:.4f}  L1 {values['intra']:.4f}  L2 {values['inter']:.4f}  L3 {values['volume']:.4f}"
        )
        epoch = epoch_number(step, steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps)
        if self._progress is not None:
            self._progress.set_footer(terms)
            self._progress.update("train", done=step, total=self.total_steps, epoch=epoch, rate=images_per_s)
        elif step % self.log_every == 0 or step == self.total_steps:
            self.console.print(
                f"epoch {epoch}/{self.epochs}  step {step}/{self.total_steps}  "
                f"{images_per_s:.1f} img/s  {terms}  lr {values['lr']:.2e}",
                highlight=False,
                soft_wrap=True,
            )  # one line per log entry, whatever the console width

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None


def summary_table(rows: list[tuple[str, str]], *, title: str) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table
