"""What every `flsl bench` command shows the same way: the model and views it measured, the
machine the figures belong to, and the figures written to a file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from flsl_cli.cli.render import out_console

if TYPE_CHECKING:
    from rich.table import Table


def write_figures(output: str | Path, results: dict) -> None:
    """The figures as JSON, written atomically (a local path or any fsspec URL), and where."""
    from flsl_cli import storage

    storage.write_json_atomic(str(output), results)
    out_console.print(f"[green]wrote[/] {escape(str(output))}", highlight=False)


def measured_shape(settings: dict) -> str:
    """The model and the views of a training-step benchmark, e.g. "vit_small/16 (12 blocks),
    64 images, 224 px + 10 x 96 px"."""
    return (
        f"{settings['arch']}/{settings['patch_size']} ({settings['depth']} blocks), {settings['images']} "
        f"images, {settings['global_size']} px + {settings['local_crops']} x {settings['local_size']} px"
    )


def training_machine(machine: dict) -> str:
    """The device (its GPU, else its CPUs and torch threads), the load and the library versions."""
    where = machine.get("gpu") or (
        f"{machine['cpus']} CPUs ({machine['usable_cpus']} usable, {machine['torch_threads']} torch threads)"
    )
    return f"{where}, load {machine['load_average_1min']}, torch {machine['torch']}, timm {machine['timm']}"


def add_columns(table: Table, headers: tuple[str, ...], *, left: tuple[str, ...] = ()) -> None:
    """Columns that never cut their header: a header may wrap between words, and no column gets
    narrower than its header's longest word (so `step ms` can become two lines on an 80-column
    terminal or a pipe, but never `step…`); cells wrap instead."""
    for header in headers:
        table.add_column(
            header,
            justify="left" if header in left else "right",
            min_width=max(len(word) for word in header.split()),
        )
