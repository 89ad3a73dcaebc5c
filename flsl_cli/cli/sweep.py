"""`flsl sweep` (a grid of runs: one SLURM job array, or one after another here), `flsl compare`
(one table, and a plot, of runs and sweeps), and what `flsl status` and `flsl resume` do when
given a sweep dir."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from flsl_cli.cli.options import DevicesOption, SetOption
from flsl_cli.cli.render import demo_progress, handle_errors, note, out_console
from flsl_cli.cli.slurm_options import SLURM_PANEL, slurm_options


def is_sweep(path: str) -> bool:
    from flsl_cli.launch.sweep.record import is_sweep_dir

    return is_sweep_dir(path)


@handle_errors
@slurm_options
def sweep(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file every member starts from, e.g. recipes/demo.yaml.")],
    *,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            "-g",
            metavar="KEY=V1,V2,...",
            help="Values of a recipe key; the members are every combination of the --grid keys (repeatable).",
        ),
    ] = None,
    lists: Annotated[
        list[str] | None,
        typer.Option(
            "--list",
            metavar="KEY=V1,V2,...",
            help="Values that move together: the i-th member takes the i-th value of every --list key (repeatable).",
        ),
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            "--from-file", metavar="GRID.yaml", help="The grid as YAML: `grid:` and `list:` of KEY: [V1, V2]."
        ),
    ] = None,
    set_: SetOption = None,
    sweep_dir: Annotated[
        Path | None,
        typer.Option(
            "--sweep-dir", help="Where sweep.json and one run dir per member go (default: runs/RECIPE-sweep-TIME)."
        ),
    ] = None,
    devices: DevicesOption = None,
    max_parallel: Annotated[
        int | None,
        typer.Option(
            "--max-parallel", min=1, rich_help_panel=SLURM_PANEL, help="Members running at once (default: all)."
        ),
    ] = None,
    slurm: dict | None = None,
    dry_run: bool = False,
) -> None:
    """Train a grid of runs: one SLURM job array (--nodes N ...), or one member after another here."""
    from flsl_cli.launch.sweep.grid import read_grid
    from flsl_cli.launch.sweep.start import default_sweep_dir, start_sweep

    spec = read_grid(grid=grid or [], lists=lists or [], from_file=from_file)
    target = (sweep_dir or default_sweep_dir(recipe)).absolute()
    update, close = demo_progress()
    try:
        record = start_sweep(
            recipe,
            spec=spec,
            overrides=set_ or [],
            sweep_dir=target,
            slurm_options=slurm,
            max_parallel=max_parallel,
            devices=devices,
            dry_run=dry_run,
            on_note=note,
            on_script=typer.echo,
        )
    finally:
        close()
    if record is None or record.scheduler != "slurm":
        return
    out_console.print(
        f"submitted SLURM job array {record.arrays[-1]} of {len(record.members)} member(s): {target}",
        highlight=False,
        markup=False,
    )
    for member in record.members:
        out_console.print(f"  {member.job_ids[-1]:>12}  {member.name}", highlight=False, markup=False)
    out_console.print(f"  status   flsl status {target}", highlight=False, markup=False)


def show_sweep_status(sweep_dir: str, *, as_json: bool) -> None:
    """`flsl status SWEEP_DIR`: one line per member."""
    from rich.table import Table
    from rich.text import Text

    from flsl_cli.launch.sweep.status import read_sweep_status

    result = read_sweep_status(sweep_dir)
    if as_json:
        typer.echo(result.to_json())
        return
    counts = ", ".join(f"{n} {word}" for word, n in result.counts().items())
    arrays = f", job array(s) {', '.join(result.arrays)}" if result.arrays else ""
    table = Table(title=f"flsl status: {sweep_dir} ({counts}{arrays})", title_justify="left")
    for column in ("member", "state", "step", "requeues", "job", "last error"):
        table.add_column(column, overflow="fold")
    for member in result.members:
        table.add_row(
            Text(member.name),
            Text(member.status),
            "-" if member.step is None else str(member.step),
            str(member.requeues),
            Text(member.job_ids[-1] if member.job_ids else "-"),
            Text(member.last_error or ""),
        )
    out_console.print(table)


@handle_errors
def compare(
    paths: Annotated[list[Path], typer.Argument(help="Run dirs and sweep dirs (a sweep counts as its members).")],
    *,
    metric: Annotated[
        str | None,
        typer.Option(
            "--metric", "-m", help="What --out plots (default: the first k-NN top-1 every run logged, else loss)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", metavar="FILE.png", help="Also plot the metric against each swept key, and over steps."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON (for scripts).")] = False,
) -> None:
    """One table of runs: the keys that differ, final losses, newest k-NN/DAVIS figures, speed, time."""
    from flsl_cli.launch.compare import check_metric, compare_runs, plot_compare

    comparison = compare_runs(paths)
    if metric is not None or out is not None:
        check_metric(comparison, metric)
    if as_json:
        typer.echo(comparison.to_json())
    else:
        _print_comparison(comparison)
    if out is not None:
        written = plot_compare(comparison, metric=metric, out=out)
        note(f"wrote {written}")


def _print_comparison(comparison) -> None:
    from rich.table import Table
    from rich.text import Text

    from flsl_cli.launch.compare import SHOWN_KEYS

    extra = [k for k in comparison.keys if k not in comparison.swept]
    keys = [k for k in comparison.keys if k in comparison.swept] + extra[:SHOWN_KEYS]
    figures = [m for m in comparison.metrics if m.startswith(("knn_", "davis_")) and _shown_figure(m)]
    losses = [m for m in ("loss", "intra", "inter", "volume") if m in comparison.metrics]
    table = Table(title="flsl compare", title_justify="left")
    table.add_column("run", overflow="fold")
    for column in [*keys, "step", *losses, *figures, "images/s", "train time"]:
        table.add_column(column, justify="right", overflow="fold")
    for row in comparison.rows:
        cells = [Text(_value(row.values.get(k))) for k in keys]
        cells.append(Text("-" if row.step is None else str(row.step)))
        cells += [Text(_number(row.metrics.get(m))) for m in [*losses, *figures]]
        cells.append(Text(_number(row.images_per_s)))
        cells.append(Text("-" if row.train_seconds is None else _duration(row.train_seconds)))
        table.add_row(Text(row.name), *cells)
    out_console.print(table)
    if len(extra) > SHOWN_KEYS:
        note(f"the recipes also differ in {', '.join(extra[SHOWN_KEYS:])} (all in --json)")
    if extra and comparison.swept:
        note(f"beyond the swept keys, the runs' recipes differ in: {', '.join(extra)}")
    for metric, lacking in comparison.not_shared.items():
        if _shown_figure(metric) or metric in ("loss", "intra", "inter", "volume"):
            note(f"{metric} is left out: not logged by {', '.join(lacking)}")


def _shown_figure(metric: str) -> bool:
    """The figures worth a column: top-1/top-5 and DAVIS J&F means (counts and chance levels are in --json)."""
    return ("_top1_" in metric or "_top5_" in metric or metric.endswith("_mean")) and "chance" not in metric


def _value(value: Any) -> str:
    return "-" if value is None else str(value)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
