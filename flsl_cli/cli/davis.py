"""`flsl eval davis`: DAVIS 2017 video object segmentation by label propagation on frozen
features (DINO's protocol), scored with the official J&F measures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from flsl_cli.cli.eval import CheckpointArg, ModelOption, WhichOption
from flsl_cli.cli.options import DevicesOption, comma_list
from flsl_cli.cli.render import handle_errors, out_console
from flsl_cli.config.load import validate_options
from flsl_cli.config.schema import DavisEvalConfig
from flsl_cli.errors import FlslError

# The options that are DavisEvalConfig fields, and their names; defaults and bounds are the schema's.
DAVIS_OPTIONS = {
    "davis": "--davis",
    "split": "--split",
    "sequences": "--sequences",
    "max_sequences": "--max-sequences",
    "short_side": "--short-side",
    "n_last_frames": "--n-last-frames",
    "size_mask_neighborhood": "--size-mask-neighborhood",
    "topk": "--topk",
    "temperature": "--temperature",
    "batch_size": "--batch-size",
}
_DAVIS = DavisEvalConfig.model_fields


@handle_errors
def davis_eval(
    checkpoint: CheckpointArg = None,
    *,
    davis: Annotated[
        str,
        typer.Option(
            "--davis", help="DAVIS 2017 folder (JPEGImages/480p, Annotations/480p, ImageSets/2017), local or remote."
        ),
    ],
    split: Annotated[str, typer.Option("--split", help="Sequence list ImageSets/2017/SPLIT.txt.")] = _DAVIS[
        "split"
    ].default,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for the predicted masks (one folder of palette PNGs per sequence, DAVIS's layout); "
            "written only when the evaluation has finished.",
        ),
    ] = None,
    sequences: Annotated[str | None, typer.Option("--sequences", help="Only these sequences, comma-separated.")] = None,
    max_sequences: Annotated[
        int | None, typer.Option("--max-sequences", help="Only the first N sequences of the list (a quick check).")
    ] = None,
    which: WhichOption = None,
    model: ModelOption = None,
    random_init: Annotated[
        bool, typer.Option("--random-init", help="Same architecture, random weights (a baseline).")
    ] = False,
    short_side: Annotated[
        int, typer.Option("--short-side", help="Short side of the frames the model sees, in pixels.")
    ] = _DAVIS["short_side"].default,
    n_last_frames: Annotated[
        int, typer.Option("--n-last-frames", help="Previous frames used as context besides the first.")
    ] = _DAVIS["n_last_frames"].default,
    size_mask_neighborhood: Annotated[
        int,
        typer.Option(
            "--size-mask-neighborhood",
            help="Radius in tokens of the window each target token looks at (0: the whole frame).",
        ),
    ] = _DAVIS["size_mask_neighborhood"].default,
    topk: Annotated[int, typer.Option("--topk", help="Context tokens whose labels each target token takes.")] = _DAVIS[
        "topk"
    ].default,
    temperature: Annotated[float, typer.Option("--temperature", help="Affinity exp(cosine / T).")] = _DAVIS[
        "temperature"
    ].default,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Frames per forward pass and process.")] = _DAVIS[
        "batch_size"
    ].default,
    devices: DevicesOption = None,
    draw: Annotated[
        bool,
        typer.Option(
            "--draw",
            help="Also draw one PNG per sequence into OUT/pictures/ (first frame, four propagated frames, "
            "their annotations).",
        ),
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Results JSON (default: OUT/results.json with --out, else "
            "RUN_DIR/eval/davis-SPLIT-step-N-WHICH.json for a run's checkpoint, else "
            "davis-SPLIT.json).",
        ),
    ] = None,
) -> None:
    """DAVIS 2017 video object segmentation by label propagation on frozen features, with the official J&F."""
    from flsl_cli.eval.backbones import ModelSpec
    from flsl_cli.eval.davis.report import results_table
    from flsl_cli.eval.report import write_json
    from flsl_cli.launch.davis import davis_eval as evaluate

    if draw and out is None:
        raise FlslError(
            "--draw needs --out (the pictures are drawn from the predicted masks)", fix="Add --out DIR, or drop --draw"
        )
    settings = davis_settings(
        davis=davis,
        split=split,
        sequences=comma_list(sequences) if sequences else None,
        max_sequences=max_sequences,
        short_side=short_side,
        n_last_frames=n_last_frames,
        size_mask_neighborhood=size_mask_neighborhood,
        topk=topk,
        temperature=temperature,
        batch_size=batch_size,
    )
    spec = ModelSpec(
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        model=model,
        which=which,
        random_init=random_init,
    )
    results = evaluate(spec=spec, settings=settings, devices=devices, out=out, draw=draw)
    path = output or default_output(results, out=out)
    write_json(path, results)
    out_console.print(results_table(results))
    if out is not None:
        out_console.print(f"[green]masks in[/] {escape(str(out))}", highlight=False)
    out_console.print(f"[green]wrote[/] {escape(str(path))}", highlight=False)


def davis_settings(**options: Any) -> DavisEvalConfig:
    """The options as a DavisEvalConfig, checked by the schema; problems name the options."""
    return validate_options(
        options,
        section=("eval", "davis"),
        options=DAVIS_OPTIONS,
        fix="Change the options named above (see `flsl eval davis --help`)",
    )


def default_output(results: dict, *, out: Path | None) -> Path:
    """OUT/results.json; else beside the run for a run's checkpoint; else in the current directory."""
    split = results["settings"]["split"]
    if out is not None:
        return Path(out) / "results.json"
    from flsl_cli.checkpoint.store import (
        CHECKPOINTS_DIR,  # torch: imported only when a report is written
    )

    described = results["model"]
    suffix = "-random" if described.get("random_init") else ""
    source = Path(described.get("source", ""))
    if described.get("kind") == "flsl" and source.parent.name == CHECKPOINTS_DIR:
        which = described.get("which", "teacher")
        return source.parent.parent / "eval" / f"davis-{split}-step-{described['step']:08d}-{which}{suffix}.json"
    return Path(f"davis-{split}{suffix}.json")
