"""`flsl data demo`: the built-in demo data set; `flsl data shards`: webdataset shards from ImageNet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from flsl_cli.cli.render import demo_progress, err_console, handle_errors, note, out_console
from flsl_cli.config.load import validate_options
from flsl_cli.config.schema import DemoDataConfig

app = typer.Typer(no_args_is_help=True)
_DEMO = DemoDataConfig.model_fields


@app.command("demo")
@handle_errors
def demo(
    out_dir: Annotated[Path, typer.Argument(help="Directory to create (train/ and val/ shards go inside).")],
    *,
    images: Annotated[int, typer.Option("--images", help=_DEMO["images"].description)] = _DEMO["images"].default,
    seed: Annotated[int, typer.Option("--seed", help=_DEMO["seed"].description)] = _DEMO["seed"].default,
    image_size: Annotated[int, typer.Option("--image-size", help=_DEMO["image_size"].description)] = _DEMO[
        "image_size"
    ].default,
) -> None:
    """Write the procedurally generated demo data set (objects with boxes on cluttered backgrounds)."""
    from flsl_cli.data.demo import write_demo_dataset

    settings = validate_options(
        {"images": images, "seed": seed, "image_size": image_size},
        section=("data", "demo"),
        options={"images": "--images", "seed": "--seed", "image_size": "--image-size"},
        fix="Change the options named above (see `flsl data demo --help`)",
    )
    update, close = demo_progress()
    try:
        info = write_demo_dataset(
            out_dir, images=settings.images, seed=settings.seed, image_size=settings.image_size, on_progress=update
        )
    finally:
        close()
    splits = info["splits"]
    out_console.print(
        f"[green]wrote[/] {escape(str(out_dir))}: {splits['train']['num_samples']} train and "
        f"{splits['val']['num_samples']} val images ({splits['train']['num_shards']} + "
        f"{splits['val']['num_shards']} shards), classes: {', '.join(info['classes'])}",
        highlight=False,
    )


@app.command("shards")
@handle_errors
def shards(
    src: Annotated[
        Path,
        typer.Argument(
            help="An ImageFolder tree (one folder per class, like ImageNet's train/), or a flat directory of images "
            "with --labels (like ImageNet's val/)."
        ),
    ],
    dest: Annotated[
        str,
        typer.Argument(
            help="Where the shards go: a directory or an fsspec URL (s3://bucket/prefix, gs://..., memory://...)."
        ),
    ],
    *,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="Labels of a flat SRC: LOC_val_solution.csv, or a text file of 'FILENAME SYNSET' "
            "(or 'FILENAME LABEL', with --class-names) lines.",
        ),
    ] = None,
    boxes: Annotated[
        Path | None,
        typer.Option(
            "--boxes",
            help="Bounding boxes to store in each sample's json: a directory of PASCAL-VOC XML files "
            "(ILSVRC Annotation/) or a LOC_train_solution.csv / LOC_val_solution.csv file.",
        ),
    ] = None,
    class_names: Annotated[
        Path | None,
        typer.Option(
            "--class-names",
            help="Human-readable class names, 'SYNSET NAME' per line (ImageNet's "
            "LOC_synset_mapping.txt); for a flat SRC it also fixes the class list.",
        ),
    ] = None,
    shard_size: Annotated[
        str | None,
        typer.Option(
            "--shard-size",
            help="Target size of a shard (1GB, 500MB, 64MiB). Default 1GB unless --samples-per-shard is given.",
        ),
    ] = None,
    samples_per_shard: Annotated[
        int | None, typer.Option("--samples-per-shard", min=1, help="Cut shards by count instead of size.")
    ] = None,
    prefix: Annotated[
        str | None,
        typer.Option(
            "--prefix", help="Shard names are PREFIX-000000.tar, ... (default: the name of SRC, e.g. 'train')."
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            "-w",
            min=1,
            help="Processes writing shards (default: the number of CPU cores); the shards do not depend on it.",
        ),
    ] = None,
) -> None:
    """Write webdataset tar shards (original image bytes, cls, json with boxes) and an index.json.

    Deterministic and resumable: rerun the same command after an interruption and only the
    missing shards are written.
    """
    from flsl_cli.data.make_shards import make_shards
    from flsl_cli.distributed.env import usable_cpus

    update, close = _shard_progress()
    try:
        note(f"planning the shards of {escape(str(src))}")
        try:
            report = make_shards(
                src,
                dest,
                labels=labels,
                boxes=boxes,
                class_names=class_names,
                shard_size=shard_size,
                samples_per_shard=samples_per_shard,
                prefix=prefix,
                workers=workers or usable_cpus(),
                on_progress=update,
            )
        finally:
            close()
        shard_word = "shard" if report.shards == 1 else "shards"
        skipped = f"[yellow]{report.skipped} skipped[/] (listed in index.json)" if report.skipped else "0 skipped"
        totals = f"{report.samples} samples, {report.classes} classes, {skipped}"
        if report.already_complete:
            out_console.print(
                f"[green]complete:[/] {escape(report.dest)} already holds these {report.shards} "
                f"{shard_word} ({totals}); nothing to do",
                highlight=False,
                soft_wrap=True,
            )
        else:
            kept = f", {report.kept} kept from an earlier run" if report.kept else ""
            out_console.print(
                f"[green]wrote[/] {report.shards} {shard_word}{kept}: {totals} -> {escape(report.dest)}",
                highlight=False,
                soft_wrap=True,
            )
    except KeyboardInterrupt:
        err_console.print(
            "[bold yellow]interrupted.[/] Finished shards are kept; rerun the same command to write the rest."
        )
        raise typer.Exit(130) from None


def _shard_progress():
    """A progress callback (stage, done, total) for `make_shards`, and a function to close it."""
    from flsl_cli.progress import ProgressBars

    bars = ProgressBars(console=err_console)
    labels = {"annotations": "reading box annotations", "shards": "writing shards (samples)"}

    def update(stage: str, done: int, total: int) -> None:
        bars.update(labels.get(stage, stage), done=done, total=total)

    return update, bars.close
