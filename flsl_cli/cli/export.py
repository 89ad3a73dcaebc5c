"""`flsl export`: write a trained backbone for timm, ONNX, mmdet/mmseg or detectron2."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from flsl_cli.cli.render import handle_errors, note, out_console


class Format(str, Enum):
    timm = "timm"
    onnx = "onnx"
    mmdet = "mmdet"
    mmseg = "mmseg"
    detectron2 = "detectron2"


class Which(str, Enum):
    teacher = "teacher"
    student = "student"


CheckpointArgument = Annotated[
    Path,
    typer.Argument(
        help="A checkpoint file (RUN_DIR/checkpoints/step-*.pt) or a run directory (its newest valid checkpoint)."
    ),
]
OutOption = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="Where to write: NAME.safetensors or a directory (timm), NAME.onnx (onnx), "
        "NAME.pth (mmdet, mmseg, detectron2).",
    ),
]
FormatOption = Annotated[Format, typer.Option("--format", "-f", help="Target: timm, onnx, mmdet, mmseg or detectron2.")]
WhichOption = Annotated[Which, typer.Option("--which", help="The teacher (EMA, as in the paper) or the student.")]
ForceOption = Annotated[
    bool, typer.Option("--force", help="Replace an existing --out, once the new export has passed its check.")
]


def _say(text: str) -> None:
    out_console.print(text, highlight=False, soft_wrap=True)  # soft_wrap: load lines stay copy-pastable


@handle_errors
def export(
    checkpoint: CheckpointArgument,
    *,
    out: OutOption,
    format_: FormatOption = Format.timm,
    which: WhichOption = Which.teacher,
    force: ForceOption = False,
) -> None:
    """Export a backbone that other tools load as-is; the written file is reloaded and checked first."""
    from flsl_cli.export.api import export_checkpoint

    result = export_checkpoint(checkpoint, fmt=format_.value, out=out, which=which.value, force=force, on_note=note)
    _say(
        f"[green]exported[/] the {result.which} backbone (step {result.step}) of {escape(str(result.source))} "
        f"as [bold]{result.format}[/]"
    )
    for file in result.files:
        _say(f"  file: {escape(str(file))}")
    for check in result.checks:
        _say(f"  max abs difference: {check.max_abs_diff:.3g} ({escape(check.label)}, tolerance {check.tolerance:.3g})")
    _say("load it with (import timm):" if result.format == "timm" else "load it with:")
    for line in result.usage:
        _say(f"  {escape(line)}")
