"""`flsl knn-eval`: k-NN accuracy of a pretrained backbone (bounding-box-aligned or global)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape

from flsl_cli.cli.options import DevicesOption, OldOutputOption, comma_list, renamed_option
from flsl_cli.cli.render import handle_errors, note, out_console
from flsl_cli.config.load import validate_options
from flsl_cli.config.schema import KnnEvalConfig

CheckpointArg = Annotated[
    Path | None,
    typer.Argument(
        help="A flsl checkpoint, a run directory (its newest checkpoint), or a timm export (folder with "
        "config.json, or a .safetensors file). Omit it with --model timm:NAME."
    ),
]
ModeOption = Annotated[
    Literal["bbox", "global"],
    typer.Option(
        "--mode",
        help="bbox: the paper's box-aligned k-NN (grid x grid features per box); "
        "global: mean-pooled tokens (DINO's k-NN).",
    ),
]
WhichOption = Annotated[
    Literal["teacher", "student"] | None,
    typer.Option("--which", help="Network of a flsl checkpoint (default: the teacher)."),
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="timm:NAME: a timm model with its pretrained weights, or the architecture of a .safetensors CHECKPOINT.",
    ),
]
BankOption = Annotated[
    Literal["auto", "device", "host"],
    typer.Option("--bank", help="Where the fp16 memory bank lives: auto (the GPU when it fits), device or host."),
]
OutputOption = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Results JSON (default: RUN_DIR/eval/knn-MODE-step-N-WHICH.json for a run's "
        "checkpoint, else knn-MODE.json).",
    ),
]


# The options that are KnnEvalConfig fields, and their names; defaults and bounds are the schema's.
KNN_OPTIONS = {
    "train": "--train",
    "val": "--val",
    "mode": "--mode",
    "k": "--k",
    "temperature": "--temperature",
    "grid": "--grid",
    "resize": "--resize",
    "crop": "--crop",
    "batch_size": "--batch-size",
    "workers": "--workers",
    "max_train_images": "--max-train-images",
    "max_val_images": "--max-val-images",
    "bank": "--bank",
}
_KNN = KnnEvalConfig.model_fields


@handle_errors
def knn_eval(
    checkpoint: CheckpointArg = None,
    *,
    train: Annotated[
        str, typer.Option("--train", help="Shards of the memory bank (boxes in each json for bbox mode).")
    ],
    val: Annotated[str, typer.Option("--val", help="Shards of the query images.")],
    mode: ModeOption = _KNN["mode"].default,
    k: Annotated[str, typer.Option("--k", help="Neighbour counts, comma-separated; one search serves all.")] = ",".join(
        map(str, _KNN["k"].default)
    ),
    temperature: Annotated[float, typer.Option("--temperature", help="Vote weight exp(similarity / T).")] = _KNN[
        "temperature"
    ].default,
    grid: Annotated[
        int, typer.Option("--grid", help="Box cells per side in bbox mode (grid^2 features per image).")
    ] = _KNN["grid"].default,
    which: WhichOption = None,
    model: ModelOption = None,
    random_init: Annotated[
        bool, typer.Option("--random-init", help="Same architecture, random weights (a baseline).")
    ] = False,
    resize: Annotated[
        int | None,
        typer.Option(
            "--resize", help="Shorter image side after the bicubic resize, in pixels (default: crop x 256 / 224)."
        ),
    ] = None,
    crop: Annotated[
        int | None,
        typer.Option(
            "--crop",
            help="Side of the center crop, a multiple of the patch size (default: the size the model trained at: "
            "a flsl checkpoint's augment.global_size, a timm model's input size).",
        ),
    ] = None,
    devices: DevicesOption = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help=_KNN["batch_size"].description)] = _KNN[
        "batch_size"
    ].default,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Data-loader processes per process (default: up to 4, no more than the CPUs each process has).",
        ),
    ] = _KNN["workers"].default,
    max_train_images: Annotated[
        int | None, typer.Option("--max-train-images", help="Use only the first N train samples (a quick check).")
    ] = _KNN["max_train_images"].default,
    max_val_images: Annotated[
        int | None, typer.Option("--max-val-images", help=_KNN["max_val_images"].description)
    ] = _KNN["max_val_images"].default,
    bank: BankOption = _KNN["bank"].default,
    features_dir: Annotated[
        Path | None,
        typer.Option(
            "--features-dir", help="Cache extracted features here; reused while weights, data and settings match."
        ),
    ] = None,
    output: OutputOption = None,
    old_output: OldOutputOption = None,
) -> None:
    """k-NN accuracy of a pretrained backbone: the paper's bounding-box-aligned k-NN, or DINO's global one."""
    output = renamed_option(output, old_output, name="--out", old_name="--output")
    from flsl_cli.distributed.env import usable_cpus
    from flsl_cli.eval.backbones import ModelSpec
    from flsl_cli.eval.report import results_table, write_json
    from flsl_cli.launch.knn import knn_eval as evaluate

    settings = knn_settings(
        train=train,
        val=val,
        mode=mode,
        k=k,
        temperature=temperature,
        grid=grid,
        resize=resize,
        crop=crop,
        batch_size=batch_size,
        workers=workers,
        max_train_images=max_train_images,
        max_val_images=max_val_images,
        bank=bank,
    )
    spec = ModelSpec(
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        model=model,
        which=which,
        random_init=random_init,
    )
    if workers is not None and workers > usable_cpus():
        note(
            f"--workers {workers} is more than the {usable_cpus()} CPUs this process may use: the data-loader "
            "processes will share them"
        )
    results = evaluate(
        spec=spec, settings=settings, devices=devices, features_dir=str(features_dir) if features_dir else None
    )
    path = output or default_output(results)
    write_json(path, results)
    out_console.print(results_table(results))
    out_console.print(f"[green]wrote[/] {escape(str(path))}", highlight=False)


def knn_settings(*, k: str, **options: Any) -> KnnEvalConfig:
    """The options as a KnnEvalConfig, checked by the schema; problems name the options."""
    values = {**options, "k": comma_list(k)}
    return validate_options(
        values,
        section=("eval", "knn"),
        options=KNN_OPTIONS,
        fix="Change the options named above (see `flsl knn-eval --help`)",
    )


def default_output(results: dict) -> Path:
    """Beside the run for a run's checkpoint (RUN_DIR/eval/), else in the current directory."""
    from flsl_cli.checkpoint.store import CHECKPOINTS_DIR  # torch: imported only when a report is written

    described = results["model"]
    mode = results["settings"]["mode"]
    suffix = "-random" if described.get("random_init") else ""
    source = Path(described.get("source", ""))
    if described.get("kind") == "flsl" and source.parent.name == CHECKPOINTS_DIR:
        which = described.get("which", "teacher")
        return source.parent.parent / "eval" / f"knn-{mode}-step-{described['step']:08d}-{which}{suffix}.json"
    return Path(f"knn-{mode}{suffix}.json")


@handle_errors
def diagnose(
    checkpoint: Annotated[
        Path,
        typer.Argument(help="A flsl checkpoint or a run directory (its newest checkpoint): the network and its head."),
    ],
    *,
    val: Annotated[str, typer.Option("--val", help="Shards of the images to look at (e.g. the demo val split).")],
    images: Annotated[
        int, typer.Option("--images", min=2, max=100_000, help="How many images (the first of the split).")
    ] = 256,
    which: Annotated[
        Literal["teacher", "student"], typer.Option("--which", help="Network of the checkpoint.")
    ] = "teacher",
    resize: Annotated[
        int | None, typer.Option("--resize", min=1, help="Shorter side after the resize (default: crop x 256 / 224).")
    ] = None,
    crop: Annotated[
        int | None,
        typer.Option("--crop", min=1, help="Center crop side (default: the checkpoint's augment.global_size)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the figures as JSON instead of a table.")] = False,
) -> None:
    """Signs of feature collapse: effective rank of the tokens, similarity within and between images,
    the teacher head's entropy and prototype use; beside a random init of the same architecture."""
    import json

    from flsl_cli.eval.diagnose import diagnose as run_diagnose
    from flsl_cli.eval.report import diagnostics_table

    results = run_diagnose(str(checkpoint), val=val, images=images, which=which, resize=resize, crop=crop)
    if json_out:
        out_console.print_json(json.dumps(results))
    else:
        out_console.print(diagnostics_table(results))
