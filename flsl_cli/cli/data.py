"""`flsl data demo`: the built-in demo data set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flsl_cli.cli.render import demo_progress, handle_errors, out_console

app = typer.Typer(no_args_is_help=True)


@app.command("demo")
@handle_errors
def demo(
    out_dir: Annotated[Path, typer.Argument(help="Directory to create (train/ and val/ shards go inside).")],
    *,
    images: Annotated[int, typer.Option("--images", min=20, help="Number of images.")] = 2000,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Generator seed.")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", min=32, max=1024, help="Image side in pixels.")] = 96,
) -> None:
    """Write the procedurally generated demo data set (objects with boxes on cluttered backgrounds)."""
    from flsl_cli.data.demo import write_demo_dataset

    update, close = demo_progress()
    try:
        info = write_demo_dataset(out_dir, images=images, seed=seed, image_size=image_size, on_progress=update)
    finally:
        close()
    splits = info["splits"]
    out_console.print(f"[green]wrote[/] {out_dir}: {splits['train']['num_samples']} train and "
                      f"{splits['val']['num_samples']} val images ({splits['train']['num_shards']} + "
                      f"{splits['val']['num_shards']} shards), classes: {', '.join(info['classes'])}",
                      highlight=False)
