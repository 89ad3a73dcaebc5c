"""`flsl visualize`: for each image, one grid PNG with a row per model (the image, the ASS map per
chosen layer, the probing maps of the query points, the FLSL head's clusters) and an index.html.

Every input is checked (models, layers, images, points) before anything is drawn, and the files
are drawn in a temporary folder beside `--out` and moved in only when all of them are done.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flsl_cli.errors import FlslError
from flsl_cli.eval.backbones import EvalModel, ModelSpec, load_eval_model
from flsl_cli.models.head import ProjectionHead
from flsl_cli.viz.clusters import cluster_map, load_head
from flsl_cli.viz.extras import require_matplotlib
from flsl_cli.viz.features import check_layers, default_layers, depth_of, layer_tokens
from flsl_cli.viz.grid import DEFAULT_OPACITY, Panel, render_grid, write_index
from flsl_cli.viz.images import PreparedImage, point_token, prepare_image
from flsl_cli.viz.similarity import ass_map, probe_map

PAGE_NAME = "index.html"  # the page that shows every grid


@dataclass(frozen=True)
class VisualizeSettings:
    layers: tuple[int, ...] | None = None  # 1-based; None: three spread over the depth
    points: tuple[tuple[int, int], ...] = ()  # (x, y) in original pixels; empty: a few spread points
    size: int = 448  # short side after the resize
    opacity: float = DEFAULT_OPACITY  # of the maps over the image


@dataclass
class Subject:
    """A model to draw, with its name in titles and its head (flsl checkpoints)."""

    model: EvalModel
    name: str
    head: ProjectionHead | None = None


def visualize(
    *,
    spec: ModelSpec,
    images: list[str],
    out: Path,
    settings: VisualizeSettings,
    compare: ModelSpec | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Draw one grid per image into `out` (created if needed); returns the files written."""
    require_matplotlib()
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FlslError("--out is a file, not a folder", where=str(out), fix="Pass a folder for the pictures")
    subjects = [Subject(load_eval_model(spec), name="")]
    if compare is not None:
        subjects.append(Subject(load_eval_model(compare), name=""))
    layers = _check_models(subjects, layers=list(settings.layers) if settings.layers else None)
    patch = subjects[0].model.patch_size
    prepared = [prepare_image(path, size=settings.size, patch=patch, points=list(settings.points)) for path in images]
    for subject in subjects:
        subject.name = model_name(subject.model)
        subject.head = load_head(subject.model)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        entries: list[tuple[str, str]] = []
        for index, image in enumerate(prepared):
            name = _png_name(image.source, taken={n for n, _ in entries})
            rows = [model_row(subject, image=image, layers=layers) for subject in subjects]
            heading = (
                f"{Path(image.source).name}  ({image.original_size[0]} x {image.original_size[1]}, drawn at "
                f"{image.pixels_hw3.shape[1]} x {image.pixels_hw3.shape[0]})"
            )
            render_grid(
                rows, image_hw3=image.pixels_hw3, heading=heading, path=staging / name, opacity=settings.opacity
            )
            entries.append((name, f"{image.source}: " + " | ".join(s.name for s in subjects)))
            if on_progress:
                on_progress(index + 1, len(prepared))
        write_index(staging / PAGE_NAME, entries=entries, heading="flsl visualize")
        return _publish(staging, out, names=[n for n, _ in entries] + [PAGE_NAME])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_models(subjects: list[Subject], *, layers: list[int] | None) -> list[int]:
    """The layers to draw, valid for every model; a --compare model must share the patch size."""
    first = subjects[0].model
    depth = depth_of(first)
    layers = sorted(set(layers)) if layers else default_layers(depth)
    for index, subject in enumerate(subjects):
        role = "CHECKPOINT" if index == 0 else "--compare"
        model = subject.model
        if model.patch_size != first.patch_size:
            raise FlslError(
                f"the --compare model ({_arch(model)}, patch {model.patch_size}) does not match CHECKPOINT "
                f"({_arch(first)}, patch {first.patch_size}): the two rows need the same patch grid",
                where=str(model.description.get("source", "")),
                fix="Compare models of the same patch size (e.g. a checkpoint and its --random-init)",
            )
        check_layers(layers, depth=depth_of(model), model=f"{role} ({_arch(model)})")
    return layers


def _arch(model: EvalModel) -> str:
    return str(model.description.get("arch", "model"))


def model_name(model: EvalModel) -> str:
    """How titles name a model: its kind, architecture, network and step."""
    d = model.description
    if d.get("random_init"):
        return f"{d['arch']}/{d['patch_size']} random init"
    if d.get("kind") == "flsl":
        name = f"flsl {d['arch']}/{d['patch_size']} {d.get('which', 'teacher')} step {d.get('step')}"
    elif d.get("kind") == "timm-export":
        name = f"export {d['arch']}" + (f" step {d['step']}" if d.get("step") is not None else "")
    else:
        name = str(d.get("source", d.get("arch", "model")))
    return name


def model_row(subject: Subject, *, image: PreparedImage, layers: list[int]) -> list[Panel]:
    """The panels of one model for one image."""
    model = subject.model
    depth = depth_of(model)
    probe_layers = sorted(set(layers) | {depth})
    grids = layer_tokens(model, image.pixels_hw3, layers=probe_layers)
    h, w = image.pixels_hw3.shape[:2]
    sx, sy = w / image.original_size[0], h / image.original_size[1]
    marks = [((x + 0.5) * sx, (y + 0.5) * sy) for x, y in image.points]
    panels = [Panel(f"{subject.name}\nimage", marks=marks)]
    for layer in layers:  # ASS is drawn from its smallest value (coldest) to its maximum, 1 (hottest)
        ass = ass_map(grids[layer]).numpy()
        panels.append(Panel(f"ASS\nlayer {layer}", kind="heat", values_hw=ass, low=min(float(ass.min()), 0.999)))
    for point, mark in zip(image.points, marks):
        for layer in probe_layers:
            row, col = point_token(image, point, grid_hw=(grids[layer].shape[0], grids[layer].shape[1]))
            panels.append(
                Panel(
                    f"probe ({point[0]},{point[1]})\nlayer {layer}",
                    kind="heat",
                    marks=[mark],
                    values_hw=probe_map(grids[layer], row=row, col=col).numpy(),
                )
            )
    if subject.head is not None:
        clusters = cluster_map(subject.head, grids[depth]).numpy()
        panels.append(
            Panel(
                f"clusters (argmax of K={subject.head.prototypes.shape[0]})\nlayer {depth}",
                kind="clusters",
                values_hw=clusters,
            )
        )
    return panels


def _png_name(source: str, *, taken: set[str]) -> str:
    stem = Path(source).stem or "image"
    name, count = f"{stem}.png", 1
    while name in taken or name == PAGE_NAME:
        count += 1
        name = f"{stem}-{count}.png"
    return name


def _publish(staging: Path, out: Path, *, names: list[str]) -> list[Path]:
    """Move the finished files into `out`, each whole (an atomic rename)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        os.replace(staging / name, out / name)
        written.append(out / name)
    return written
