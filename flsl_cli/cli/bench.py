"""`flsl bench data`: decode + augmentation throughput of the shard pipeline against an
ImageFolder read with PIL, measured side by side in one run."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from flsl_cli.cli.bench_render import add_columns, write_figures
from flsl_cli.cli.options import OldOutputOption, OutOption, SetOption, renamed_option
from flsl_cli.cli.render import err_console, handle_errors, note, out_console

if TYPE_CHECKING:
    from rich.console import Group
    from rich.table import Table

app = typer.Typer(no_args_is_help=True)


class ViewDevice(str, Enum):
    """Where the training process makes the views (augment.device other than cpu)."""

    tensor_cpu = "tensor-cpu"
    cuda = "cuda"


@app.command("data")
@handle_errors
def data(
    url: Annotated[
        str,
        typer.Argument(
            metavar="URL",
            help="Shards as data.train takes them: a directory with index.json, a .tar, a brace pattern, "
            "s3://..., http(s)://...",
        ),
    ],
    *,
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, help="Data-loader workers of each pipeline.")] = 2,
    seconds: Annotated[
        float, typer.Option("--seconds", min=0.1, help="Measured time per pipeline, after the workers' first batches.")
    ] = 20.0,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            metavar="RECIPE",
            help="Recipe whose augmentation and batch size to use (default: the paper's pipeline, "
            "224 px global / 96 px local views, patch 16, as in recipes/vits16_300ep.yaml).",
        ),
    ] = None,
    set_: SetOption = None,
    imagefolder: Annotated[
        Path | None,
        typer.Option(
            "--imagefolder",
            metavar="DIR",
            help="ImageFolder copy of the images for the reference pipeline: reused when DIR holds "
            "files, else written there and kept (default: a temporary copy, removed after).",
        ),
    ] = None,
    max_images: Annotated[
        int, typer.Option("--max-images", min=1, help="Samples read from the shards (and copied for the reference).")
    ] = 2000,
    out: OutOption = None,
    old_out: OldOutputOption = None,
    device: Annotated[
        ViewDevice | None,
        typer.Option(
            "--device",
            help="Also measure the CPU time a data worker spends per image when the training process makes the views "
            "(augment.device) against views made in the workers with PIL, and the ratio.",
        ),
    ] = None,
) -> None:
    """Images/s of decode + FLSL multi-crop augmentation: flsl's shard stream against torchvision's
    ImageFolder with PIL's loader (the released FLSL code), same workers, batch and augmentation."""
    output = renamed_option(out, old_out, name="--out", old_name="--output")
    from flsl_cli.bench.data import DataBenchSettings, run_data_bench

    settings = DataBenchSettings(
        url=url,
        workers=workers,
        seconds=seconds,
        max_images=max_images,
        imagefolder=imagefolder,
        device=device.value if device else None,
    )
    update, close = _copy_progress()

    def on_stage(message: str) -> None:
        close()
        note(escape(message))

    try:
        results = run_data_bench(
            _load_recipe(recipe, url=url, overrides=set_ or []), settings, on_extract=update, on_stage=on_stage
        )
    except KeyboardInterrupt:
        err_console.print("[bold yellow]interrupted.[/] No figures were written.")
        raise typer.Exit(130) from None
    finally:
        close()
    out_console.print(results_table(results))
    if results.get("view_cost"):
        out_console.print(view_cost_table(results["view_cost"]))
    if output is not None:
        write_figures(output, results)


def _load_recipe(path: Path | None, *, url: str, overrides: list[str]):
    from flsl_cli.config.load import apply_overrides, load_recipe, validate_recipe

    if path is not None:
        return load_recipe(path, overrides=overrides)
    source = "the default recipe (--set)"
    return validate_recipe(apply_overrides({"data": {"train": url}}, overrides, source=source), source=source)


def results_table(results: dict) -> Group:
    """Both pipelines, their ratio, and the machine the figures belong to."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    settings, machine = results["settings"], results["machine"]
    table = Table(
        title=f"decode + FLSL augmentation ({settings['global_size']} px global, "
        f"{settings['local_crops']} x {settings['local_size']} px local, batch "
        f"{settings['batch_size']}, {settings['samples']} images)"
    )
    add_columns(
        table, ("pipeline", "workers", "images/s", "images/s per worker", "flsl / reference"), left=("pipeline",)
    )
    labels = {"flsl": "flsl (shards, TrainStream)", "reference": "reference (ImageFolder + PIL)"}
    for name, figures in results["pipelines"].items():
        table.add_row(
            labels[name],
            str(figures["workers"]),
            f"{figures['images_per_second']:.1f}",
            f"{figures['images_per_second_per_worker']:.1f}",
            f"{results['ratio']:.2f}" if name == "flsl" else "1.00",
        )
    simd = "installed" if machine["pillow_simd"] else "not installed"
    turbo = ", libjpeg-turbo" if machine["libjpeg_turbo"] else ""
    footer = Text(
        f"{machine['cpus']} CPUs ({machine['usable_cpus']} usable, load {machine['load_average_1min']}), "
        f"Pillow {machine['pillow']}{turbo}, pillow-simd {simd}\n{results['note']}",
        style="dim",
    )
    return Group(table, footer)


def view_cost_table(cost: dict) -> Table:
    """Data-worker CPU time per image of both view paths, their ratio, and the training process's share."""
    from rich.table import Table

    device = cost["device"]
    table = Table(title=f"data-worker CPU time per image ({cost['images']} images, one worker, one torch thread)")
    add_columns(
        table,
        ("views made", "worker CPU ms/image", f"{device} / cpu", "training process ms/image (CPU, wall)"),
        left=("views made",),
    )
    per_image = cost["worker_cpu_ms_per_image"]
    table.add_row("cpu: in the workers with PIL", f"{per_image['cpu']:.2f}", "1.00", "-")
    process = cost["training_process_ms_per_image"]
    table.add_row(
        f"{device}: in the training process",
        f"{per_image[device]:.2f}",
        f"{cost['worker_cpu_ratio']:.3f}",
        f"{process['cpu']:.2f}, {process['wall']:.2f} ({cost['training_process_threads']} thread(s))",
    )
    return table


def _copy_progress():
    """A progress callback (done, total) for the ImageFolder copy, and a function to close it."""
    from flsl_cli.progress import ProgressBars

    return ProgressBars(console=err_console).callback("copying images for the reference")


from flsl_cli.cli.bench_step import step as _step  # noqa: E402 - registered after the data command

app.command("step")(_step)

from flsl_cli.cli.bench_e2e import e2e as _e2e  # noqa: E402 - registered after the step command

app.command("e2e")(_e2e)
