"""`flsl bench step`: flsl's training step against an eager baseline of the same step, measured
side by side in one run on a synthetic batch resident on the device."""

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
def step(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe whose model, views and batch to use.")],
    *,
    steps: Annotated[int, typer.Option("--steps", "-n", min=1, help="Timed steps per variant.")] = 20,
    warmup: Annotated[
        int, typer.Option("--warmup", min=0, help="Untimed steps per variant first (compilation happens there).")
    ] = 3,
    batch: Annotated[
        int | None,
        typer.Option("--batch", min=1, help="Images per step (default: the recipe's global batch, at most 64)."),
    ] = None,
    compile_: Annotated[
        bool, typer.Option("--compile", help="torch.compile flsl's backbones (as optim.compile: true).")
    ] = False,
    device: Annotated[
        Literal["cpu", "cuda"] | None,
        typer.Option("--device", help="Where both variants run (default: cuda when torch sees a GPU, else cpu)."),
    ] = None,
    peak_tflops: Annotated[
        float | None,
        typer.Option(
            "--peak-tflops",
            min=0.001,
            help="Peak TFLOP/s that utilisation divides by (default: the data-sheet dense "
            "bf16/fp16 figure of known GPUs; none on CPU).",
        ),
    ] = None,
    set_: SetOption = None,
    out: OutOption = None,
    old_out: OldJsonFileOption = None,
) -> None:
    """Images/s, step time, model-FLOPs utilisation and peak memory of one training step: flsl's
    against an eager baseline run the way the released FLSL code runs it, and their ratio."""
    output = renamed_option(out, old_out, name="--out", old_name="--json")
    from flsl_cli.bench.step import (
        StepBenchSettings,
        resolve_device,
        run_step_bench,
        threads_reason,
        training_threads,
    )
    from flsl_cli.config.load import load_recipe

    settings = StepBenchSettings(
        steps=steps, warmup=warmup, batch=batch, device=device, compile=compile_, peak_tflops=peak_tflops
    )
    loaded = load_recipe(recipe, overrides=set_ or [])
    target = resolve_device(device)
    threads = training_threads(loaded, target)
    computing = f", {threads} torch thread(s) {threads_reason(loaded, target)}" if threads else f" on {target}"
    note(escape(f"measuring {steps} steps per variant (after {warmup} untimed){computing}"))
    results = run_step_bench(loaded, settings, on_stage=lambda message: note(escape(message)))
    out_console.print(results_table(results))
    if output is not None:
        write_figures(output, results)


def results_table(results: dict) -> Group:
    """Both variants, their ratio, the FLOPs and peak used for utilisation, and the machine."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    settings, machine = results["settings"], results["machine"]
    table = Table(title=f"training step, {measured_shape(settings)}")
    # A CPU has no stated peak and no device memory: those columns only where there are figures
    variants = results["variants"].values()
    show_mfu = any(figures["mfu"] is not None for figures in variants)
    show_memory = any(figures["peak_memory_bytes"] is not None for figures in variants)
    headers: tuple[str, ...] = ("variant", "precision", "step ms", "images/s", "TFLOP/s")
    headers += ("MFU",) * show_mfu + ("peak memory",) * show_memory + ("flsl / baseline",)
    add_columns(table, headers, left=("variant", "precision"))
    labels = {"baseline": "eager baseline (release-style)", "flsl": "flsl"}
    for name, figures in results["variants"].items():
        label = (
            labels[name]
            + (" + compile" if figures["compile"] else "")
            + (" + fused modes" if figures["fused_modes"] else "")
        )
        memory = figures["peak_memory_bytes"]
        cells = [
            label,
            figures["precision"],
            f"{figures['step_seconds'] * 1000:.1f}",
            f"{figures['images_per_second']:.1f}",
            f"{figures['tflops_per_second']:.3f}",
        ]
        if show_mfu:
            cells.append("-" if figures["mfu"] is None else f"{figures['mfu']:.1%}")
        if show_memory:
            cells.append("-" if memory is None else f"{memory / 2**30:.2f} GiB")
        cells.append(f"{results['speedup']:.2f}" if name == "flsl" else "1.00")
        table.add_row(*cells)
    peak = "none" if results["peak_tflops"] is None else f"{results['peak_tflops']:g} TFLOP/s"
    footer = Text(
        f"{results['flops_per_image'] / 1e9:.2f} GFLOP per image counted by torch; peak {peak} "
        f"({results['peak_source']}); process peak RSS {results['process_peak_rss_bytes'] / 2**30:.2f} GiB\n"
        f"{training_machine(machine)}\n"
        f"{results['note']}",
        style="dim",
    )
    return Group(table, footer)
