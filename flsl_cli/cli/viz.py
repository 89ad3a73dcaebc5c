"""`flsl visualize` (what a backbone's features follow) and `flsl plot` (how a run goes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.markup import escape

from flsl_cli.cli.options import comma_list
from flsl_cli.cli.render import err_console, handle_errors, out_console
from flsl_cli.errors import FlslError


@handle_errors
def visualize(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(
            help="A flsl checkpoint, a run directory (its newest checkpoint), or a timm export (folder with "
            "config.json, or a .safetensors file). Omit it with --model timm:NAME.",
            show_default=False,
        ),
    ] = None,
    images: Annotated[list[Path] | None, typer.Argument(help="Image files (any size).", show_default=False)] = None,
    *,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for one grid PNG per image and index.html.")],
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            help="Blocks to draw, 1-based and comma-separated, e.g. 4,8,12 (default: three spread over "
            "the depth, the last included).",
        ),
    ] = None,
    points: Annotated[
        list[str] | None,
        typer.Option(
            "--points",
            help="A query point X,Y in pixels of the original image; repeat for more (default: three "
            "points spread over each image).",
        ),
    ] = None,
    size: Annotated[
        int,
        typer.Option(
            "--size",
            min=16,
            max=4096,
            help="Short side of the image in pixels; both sides are rounded to whole patches.",
        ),
    ] = 448,
    compare: Annotated[
        Path | None,
        typer.Option(
            "--compare",
            help="A second model drawn as a second row: a checkpoint or run dir (with CHECKPOINT's "
            "--which), an export, or timm:NAME.",
        ),
    ] = None,
    compare_random_init: Annotated[
        bool,
        typer.Option(
            "--compare-random-init", help="Draw CHECKPOINT's architecture with random weights as the second row."
        ),
    ] = False,
    which: Annotated[
        Literal["teacher", "student"] | None,
        typer.Option("--which", help="Network of a flsl checkpoint (default: the teacher)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="timm:NAME: a timm model with its pretrained weights, or the architecture of a "
            ".safetensors CHECKPOINT.",
        ),
    ] = None,
    random_init: Annotated[
        bool, typer.Option("--random-init", help="Same architecture, random weights (a baseline).")
    ] = False,
    opacity: Annotated[
        float,
        typer.Option(
            "--opacity",
            min=0.0,
            max=1.0,
            help="Opacity of the similarity and cluster maps over the image: 0 shows the image alone, "
            "1 the maps alone.",
        ),
    ] = 0.8,
) -> None:
    """Similarity maps of a backbone's features (ASS per layer, probes at query points) and the FLSL
    head's clusters, one grid PNG per image."""
    from flsl_cli.eval.backbones import EXPORT_CONFIG, ModelSpec
    from flsl_cli.viz.api import VisualizeSettings
    from flsl_cli.viz.api import visualize as draw
    from flsl_cli.viz.images import parse_points

    source, image_paths = _split_sources(checkpoint, images or [], model=model)
    spec = ModelSpec(checkpoint=source, model=model, which=which, random_init=random_init)
    if compare is not None and compare_random_init:
        raise FlslError("--compare and --compare-random-init both name the second row", fix="Pass one of them")
    second = None
    if compare is not None and str(compare).startswith("timm:"):
        second = ModelSpec(model=str(compare))
    elif compare is not None:  # --which is for flsl checkpoints: an export holds one backbone
        export = compare.suffix == ".safetensors" or (compare / EXPORT_CONFIG).exists()
        second = ModelSpec(checkpoint=str(compare), which=None if export else which)
    elif compare_random_init:
        second = ModelSpec(checkpoint=source, model=model, which=which, random_init=True)
    settings = VisualizeSettings(
        layers=_parse_layers(layers), points=tuple(parse_points(points or [])), size=size, opacity=opacity
    )
    from flsl_cli.progress import ProgressBars

    update, close = ProgressBars(console=err_console).callback("drawing")
    try:
        written = draw(spec=spec, images=image_paths, out=out, settings=settings, compare=second, on_progress=update)
    finally:
        close()
    out_console.print(f"[green]wrote[/] {len(written) - 1} grid(s) and {escape(str(written[-1]))}", highlight=False)


def _split_sources(checkpoint: Path | None, images: list[Path], *, model: str | None) -> tuple[str | None, list[str]]:
    """With --model timm:NAME and no checkpoint, the first argument is an image."""
    paths = ([checkpoint] if checkpoint is not None else []) + list(images)
    if model is not None and paths and _looks_like_image(paths[0]):
        checkpoint_str, rest = None, paths
    else:
        checkpoint_str, rest = (str(paths[0]) if paths else None), paths[1:]
    if not rest:
        raise FlslError("no image to draw", fix="Pass one or more image files after CHECKPOINT")
    return checkpoint_str, [str(p) for p in rest]


def _looks_like_image(path: Path) -> bool:
    return path.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _parse_layers(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        layers = tuple(int(part) for part in comma_list(value))
    except ValueError:
        raise FlslError(
            f"--layers {value!r} is not a comma-separated list of block numbers", fix="Pass e.g. --layers 4,8,12"
        ) from None
    if not layers:
        raise FlslError("--layers is empty", fix="Pass e.g. --layers 4,8,12")
    return layers


@handle_errors
def plot(
    run_dir: Annotated[str, typer.Argument(help="The run directory (a local path or a remote URL).")],
    *,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="The PNG to write (default: RUN_DIR/plot.png; for a remote run dir, NAME-plot.png here).",
        ),
    ] = None,
) -> None:
    """The curves of a run in one PNG: losses, schedules, speed, data health, k-NN, resumes."""
    from flsl_cli.viz.plot import plot_run

    written = plot_run(run_dir, out=out)
    out_console.print(f"[green]wrote[/] {escape(str(written))}", highlight=False)
