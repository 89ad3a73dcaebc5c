"""`flsl bench e2e`: training throughput from shards against the step alone on a batch resident
on the device, as a fraction, and the CPU time the data workers spend per image."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.markup import escape

from flsl_cli.cli.bench_render import add_columns, measured_shape, training_machine, write_figures
from flsl_cli.cli.options import OldJsonFileOption, OutOption, SetOption, renamed_option
from flsl_cli.cli.render import handle_errors, note, out_console

if TYPE_CHECKING:
    from rich.console import Group


@handle_errors
def e2e(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe whose model, views, step and batch to use.")],
    *,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            metavar="URL",
            help="Shards to train from, as data.train takes them: a directory with index.json, "
            "a .tar, a brace pattern, s3://..., http(s)://...",
        ),
    ],
    steps: Annotated[int, typer.Option("--steps", "-n", min=1, help="Timed steps of each measurement.")] = 20,
    warmup: Annotated[
        int,
        typer.Option("--warmup", min=0, help="Untimed steps of each measurement first (the data workers start there)."),
    ] = 3,
    batch: Annotated[
        int | None,
        typer.Option("--batch", min=1, help="Images per step (default: the recipe's global batch, at most 64)."),
    ] = None,
    device: Annotated[
        Literal["cpu", "tensor-cpu", "cuda"] | None,
        typer.Option(
            "--device",
            help="Where the views are made (augment.device) and the step runs: cpu (views with PIL in the "
            "data workers, step on the CPU), tensor-cpu (views made by the training process on the CPU) "
            "or cuda (views and step on the GPU). Default: cuda when torch sees a GPU, else the "
            "recipe's augment.device.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-w", min=0, help="Data-loader workers (default: the recipe's data.num_workers)."),
    ] = None,
    worker_images: Annotated[
        int, typer.Option("--worker-images", min=1, help="Samples read to measure a data worker's CPU time per image.")
    ] = 256,
    set_: SetOption = None,
    out: OutOption = None,
    old_out: OldJsonFileOption = None,
) -> None:
    """Images/s of training from shards (data workers, views, step) against the same step on a
    synthetic batch already on the device, as a percentage, and the data workers' CPU time per image."""
    output = renamed_option(out, old_out, name="--out", old_name="--json")
    from flsl_cli.bench.e2e import E2EBenchSettings, run_e2e_bench
    from flsl_cli.config.load import load_recipe

    settings = E2EBenchSettings(
        data=data, steps=steps, warmup=warmup, batch=batch, device=device, workers=workers, worker_images=worker_images
    )
    loaded = load_recipe(recipe, overrides=set_ or [])
    results = run_e2e_bench(loaded, settings, on_stage=lambda message: note(escape(message)))
    out_console.print(results_table(results))
    if output is not None:
        write_figures(output, results)


def results_table(results: dict) -> Group:
    """The step alone and from the shards, their ratio, the workers' CPU time per image, and the machine."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    settings, machine = results["settings"], results["machine"]
    view_device = settings["view_device"]
    table = Table(title=f"training from shards, {measured_shape(settings)}, views made on {view_device}")
    add_columns(table, ("measured", "steps", "step ms", "images/s", "% of the step alone"), left=("measured",))
    step, e2e = results["step"], results["e2e"]
    table.add_row(
        "step alone (synthetic batch on the device)",
        str(step["steps"]),
        f"{step['step_seconds'] * 1000:.1f}",
        f"{step['images_per_second']:.1f}",
        "100.0%",
    )
    reading = f"{settings['workers']} data worker(s)" if settings["workers"] else "read in the training process"
    table.add_row(
        f"from the shards ({reading})",
        str(e2e["steps"]),
        f"{e2e['step_seconds'] * 1000:.1f}",
        f"{e2e['images_per_second']:.1f}",
        f"{results['e2e_fraction_of_step']:.1%}",
    )
    workers = Table(
        title=f"data-worker CPU time per image ({settings['worker_images']} images, one worker, one torch thread)"
    )
    add_columns(workers, ("views made", "worker CPU ms/image", "/ cpu"), left=("views made",))
    labels = {
        "cpu": "cpu: in the workers with PIL",
        "tensor-cpu": "tensor-cpu: in the training process",
        "cuda": "cuda: in the training process",
    }
    per_image = results["worker_cpu_ms_per_image"]
    for path, value in per_image.items():
        ratio = "1.00" if path == "cpu" else f"{results['worker_cpu_ratio']:.3f}"
        workers.add_row(labels[path], f"{value:.2f}", ratio)
    lines = [
        *(f"note: {text}" for text in results["notes"]),
        f"{training_machine(machine)}; {e2e['epochs']} epoch(s) in the timed steps, {e2e['bad_samples']} bad sample(s)",
        results["note"],
    ]
    return Group(table, workers, Text("\n".join(lines), style="dim"))
