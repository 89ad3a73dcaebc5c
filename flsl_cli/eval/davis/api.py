"""Entry points of the DAVIS evaluation: `run_davis_eval` (one process of a job, started in one
or N local processes by `flsl_cli.launch.davis`) and `evaluate_davis_during_training` (called
by the training loop with the live teacher backbone).

Flow of one process: check the DAVIS folder (before the slow model load); take this rank's
share of the sequences (balanced by frame count); per sequence, compute every frame's features
once (in batches, the next frames read and decoded in threads meanwhile), propagate the first
frame's labels frame by frame, write the predicted PNGs when asked and score each frame against
its annotation at once; the per-sequence results are gathered on every rank and summarised.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flsl_cli import storage
from flsl_cli.config.schema import DavisEvalConfig
from flsl_cli.distributed.ops import barrier_started, gather_objects, rank, world_size
from flsl_cli.errors import DataError, FlslError
from flsl_cli.eval.backbones import EvalModel, ModelSpec, live_backbone, load_eval_model
from flsl_cli.eval.davis.frames import (
    first_mask_palette,
    frame_tensor,
    grid_labels,
    mask_ids,
    model_size,
    read_image,
    to_original_size,
    write_palette_png,
)
from flsl_cli.eval.davis.layout import Sequence, read_layout
from flsl_cli.eval.davis.measures import (
    VOID_LABEL,
    boundary_tolerance,
    frame_measures,
    overall,
    statistics,
)
from flsl_cli.eval.davis.progress import SequenceLog
from flsl_cli.eval.davis.propagation import (
    PropagationSettings,
    Propagator,
    upsample_labels,
)
from flsl_cli.eval.report import Reporter

RESULTS_FORMAT = "flsl-davis-eval/1"
READ_AHEAD_THREADS = 4


def run_davis_eval(
    *,
    spec: ModelSpec,
    settings: DavisEvalConfig,
    device: torch.device,
    staging: str | None = None,
    reporter: Reporter | None = None,
    progress_dir: str | None = None,
) -> dict[str, Any]:
    """One process's part of the evaluation (every rank of a job calls it); the results dict,
    the same on every rank. Predicted PNGs go to `staging`/SEQ/ when given."""
    sequences = read_layout(
        settings.davis, split=settings.split, sequences=settings.sequences, max_sequences=settings.max_sequences
    )
    model = load_eval_model(spec)
    model.module.to(device)
    return evaluate_model(
        model,
        settings=settings,
        device=device,
        sequences=sequences,
        staging=staging,
        reporter=reporter or Reporter(enabled=False),
        progress_dir=progress_dir,
    )


def evaluate_davis_during_training(
    *, backbone: torch.nn.Module, settings: DavisEvalConfig, device: torch.device, show_progress: bool = False
) -> dict[str, float]:
    """J&F of a live flsl backbone (the teacher's) on the recipe's DAVIS sequences, for
    metrics.jsonl: {"davis_JF_mean": ..., "davis_J_mean": ..., "davis_F_mean": ..., "davis_sequences": ...}
    on every rank (every rank must call it). The backbone's train/eval mode is restored."""
    with live_backbone(backbone) as model:
        results = evaluate_model(
            model, settings=settings, device=device, reporter=Reporter(enabled=show_progress and rank() == 0)
        )
    figures = results["overall"]
    return {
        "davis_JF_mean": figures["JF_mean"],
        "davis_J_mean": figures["J_mean"],
        "davis_F_mean": figures["F_mean"],
        "davis_sequences": float(figures["sequences"]),
    }


def evaluate_model(
    model: EvalModel,
    *,
    settings: DavisEvalConfig,
    device: torch.device,
    reporter: Reporter,
    sequences: list[Sequence] | None = None,
    staging: str | None = None,
    progress_dir: str | None = None,
) -> dict[str, Any]:
    """The evaluation of a loaded model (on `device`, eval mode): see `run_davis_eval`. With
    `progress_dir` (a folder every process of the job sees) the main process shows every
    process's sequences as they finish."""
    started = time.monotonic()
    if sequences is None:
        sequences = read_layout(
            settings.davis, split=settings.split, sequences=settings.sequences, max_sequences=settings.max_sequences
        )
    patch = model.patch_size
    if settings.short_side % patch:
        reporter.note(
            f"the patch size {patch} does not divide --short-side {settings.short_side}: frames are "
            f"resized to a short side of {settings.short_side // patch * patch} px so that whole tokens "
            "cover them"
        )
    if settings.short_side < patch:
        raise FlslError(
            f"--short-side {settings.short_side} is smaller than the model's patch size ({patch})",
            fix=f"Use --short-side {patch} or more (the protocol uses 480)",
        )
    propagation = PropagationSettings(
        n_last_frames=settings.n_last_frames,
        size_mask_neighborhood=settings.size_mask_neighborhood,
        topk=settings.topk,
        temperature=settings.temperature,
    )
    mine = share(sequences, slot=rank(), slots=world_size())
    shared = progress_dir is not None and world_size() > 1
    shown = sequences if shared else mine
    done: list[dict[str, Any]] = []
    with reporter.stage(f"DAVIS {settings.split}", total=sum(len(s.frames) for s in shown), unit="frames") as stage:
        log = SequenceLog(
            progress_dir if shared else None, is_main=rank() == 0, on_line=reporter.note, on_frames=stage.advance
        )

        def on_frame() -> None:
            stage.advance(1)
            log.poll()

        for sequence in mine:
            result = evaluate_sequence(
                model,
                sequence,
                settings=settings,
                propagation=propagation,
                device=device,
                staging=staging,
                on_frame=on_frame,
            )
            done.append(result)
            line = (
                f"{sequence.name}: J&F {result['JF_mean']:.1f} (J {result['J_mean']:.1f}, "
                f"F {result['F_mean']:.1f}), {result['frames']} frames, {result['objects']} object(s), "
                f"{result['seconds']:.1f} s"
            )
            log.finished(sequence.name, frames=result["frames"], lines=[line, *result["notes"]])
        if shared:
            log.wait_for(barrier_started())
    by_name = {result["name"]: result for result in gather_objects(done)}
    ordered = [by_name[s.name] for s in sequences]
    return summarize(model, ordered, settings=settings, device=device, seconds=time.monotonic() - started)


def share(sequences: list[Sequence], *, slot: int, slots: int) -> list[Sequence]:
    """This rank's sequences: longest first to the least-loaded rank (the same on every rank),
    in the split's order."""
    loads = [0] * slots
    owner = {}
    for sequence in sorted(sequences, key=lambda s: (-len(s.frames), s.name)):
        least = loads.index(min(loads))
        owner[sequence.name] = least
        loads[least] += len(sequence.frames)
    return [s for s in sequences if owner[s.name] == slot]


@torch.no_grad()
def evaluate_sequence(
    model: EvalModel,
    sequence: Sequence,
    *,
    settings: DavisEvalConfig,
    propagation: PropagationSettings,
    device: torch.device,
    staging: str | None,
    on_frame: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Propagate the first annotation through `sequence`, score every frame but the first and
    the last, and write the predicted PNGs into `staging`/NAME/ when given."""
    started = time.monotonic()
    first_mask = read_image(sequence.masks[0])
    palette = first_mask_palette(first_mask, url=sequence.masks[0])
    first_ids = mask_ids(first_mask, url=sequence.masks[0])
    labelled = first_ids[first_ids != VOID_LABEL]
    objects = int(labelled.max()) if labelled.size else 0
    if objects == 0:
        raise DataError(
            f"sequence {sequence.name}: the first frame's annotation has no object (all background)",
            where=sequence.masks[0],
            fix="Semi-supervised propagation starts from the objects of the "
            "first annotation: use the DAVIS 2017 annotations",
        )
    original_hw = first_ids.shape
    size_hw = model_size(*original_hw, short_side=settings.short_side, patch=model.patch_size)
    grid_hw = (size_hw[0] // model.patch_size, size_hw[1] // model.patch_size)
    labels_tk = grid_labels(first_ids, grid_hw=grid_hw, channels=objects + 1).to(device)
    notes = []
    present = set(np.unique(first_ids).tolist()) - {0, VOID_LABEL}
    absent = sorted(set(range(1, objects + 1)) - present)
    if absent:
        notes.append(
            f"{sequence.name}: object id(s) {_ids(absent)} are not in the first frame; the benchmark scores "
            "them as objects that cannot be propagated"
        )
    lost = sorted(present - set(labels_tk[:, 1:].sum(0).nonzero().add(1).flatten().tolist()))
    if lost:
        notes.append(
            f"{sequence.name}: object id(s) {_ids(lost)} cover no token centre of the first frame at "
            f"{size_hw[1]} x {size_hw[0]} px, so nothing carries their label"
        )
    out_dir = Path(staging, sequence.name) if staging else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / sequence.frame_name(0)).write_bytes(storage.read_bytes(sequence.masks[0]))  # unchanged
    scored = range(1, len(sequence.frames) - 1)
    j_of, f_of = np.zeros((objects, len(scored))), np.zeros((objects, len(scored)))
    later_ids: set[int] = set()
    propagator = None
    frames = _frames(sequence, model=model, size_hw=size_hw, original_hw=original_hw)
    for index, features_td, truth in _features(
        frames, model=model, grid_hw=grid_hw, device=device, batch_size=settings.batch_size, name=sequence.name
    ):
        if propagator is None:
            propagator = Propagator(features_td, labels_tk, grid_hw=grid_hw, settings=propagation)
            on_frame()
            continue
        soft_tk = propagator.step(features_td)
        predicted = to_original_size(
            upsample_labels(soft_tk, grid_hw=grid_hw, patch=model.patch_size), size_hw=original_hw
        )
        if out_dir is not None:
            (out_dir / sequence.frame_name(index)).write_bytes(write_palette_png(predicted, palette=palette))
        later_ids.update(int(i) for i in np.unique(truth) if i > objects and i != VOID_LABEL)
        if index in scored:
            j, f = frame_measures(torch.from_numpy(predicted), torch.from_numpy(truth), objects=objects)
            j_of[:, index - 1], f_of[:, index - 1] = j, f
        on_frame()
    if later_ids:
        notes.append(
            f"{sequence.name}: object id(s) {_ids(sorted(later_ids))} appear after the first frame but not "
            "in it; the benchmark ignores them"
        )
    per_object = {
        str(o + 1): {"J": _percent(statistics(j_of[o])), "F": _percent(statistics(f_of[o]))} for o in range(objects)
    }
    j_mean = float(np.mean([m["J"]["mean"] for m in per_object.values()]))
    f_mean = float(np.mean([m["F"]["mean"] for m in per_object.values()]))
    return {
        "name": sequence.name,
        "frames": len(sequence.frames),
        "scored_frames": len(scored),
        "objects": objects,
        "size": [int(original_hw[1]), int(original_hw[0])],
        "model_size": [size_hw[1], size_hw[0]],
        "JF_mean": round((j_mean + f_mean) / 2, 4),
        "J_mean": round(j_mean, 4),
        "F_mean": round(f_mean, 4),
        "per_object": per_object,
        "notes": notes,
        "seconds": round(time.monotonic() - started, 3),
    }


def summarize(
    model: EvalModel,
    per_sequence: list[dict[str, Any]],
    *,
    settings: DavisEvalConfig,
    device: torch.device,
    seconds: float,
) -> dict[str, Any]:
    """The results dict: model, every setting, the overall figures (means over all objects, as
    the official evaluation), per sequence figures and per object statistics, notes."""
    objects = [obj for result in per_sequence for obj in result["per_object"].values()]
    figures = {key: round(value, 4) for key, value in overall(objects).items()}
    first = per_sequence[0]
    return {
        "format": RESULTS_FORMAT,
        "model": model.description,
        "settings": {
            "davis": settings.davis,
            "split": settings.split,
            "sequences": settings.sequences,
            "max_sequences": settings.max_sequences,
            "short_side": settings.short_side,
            "n_last_frames": settings.n_last_frames,
            "size_mask_neighborhood": settings.size_mask_neighborhood,
            "topk": settings.topk,
            "temperature": settings.temperature,
            "batch_size": settings.batch_size,
            "patch_size": model.patch_size,
            "mean": list(model.mean),
            "std": list(model.std),
            "features": "last layer, after the final norm, L2-normalised",
            "precision": "float32",
            "resize": "bilinear (frames), nearest (masks)",
            "long_side_multiple": 64,
            "boundary_tolerance_px": boundary_tolerance(first["size"][1], first["size"][0]),
            "scored_frames": "all but the first and the last of each sequence",
            "units": "percent",
            "world_size": world_size(),
            "device": device.type,
        },
        "overall": {
            **figures,
            "sequences": len(per_sequence),
            "objects": len(objects),
            "frames": sum(r["frames"] for r in per_sequence),
        },
        "sequences": {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in per_sequence},
        "notes": [line for r in per_sequence for line in r["notes"]],
        "seconds": {"total": round(seconds, 3), "sequences": round(sum(r["seconds"] for r in per_sequence), 3)},
    }


def _frames(
    sequence: Sequence, *, model: EvalModel, size_hw: tuple[int, int], original_hw: tuple[int, int]
) -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
    """(index, frame tensor, annotation ids) for every frame, read and decoded in threads a few
    frames ahead (PIL and fsspec release the GIL while they read and decode)."""

    def load(index: int) -> tuple[int, torch.Tensor, np.ndarray]:
        image = read_image(sequence.frames[index])
        truth_image = read_image(sequence.masks[index])
        truth = mask_ids(truth_image, url=sequence.masks[index])
        image_hw = (image.height, image.width)
        for what, shape, url in (
            ("frame", image_hw, sequence.frames[index]),
            ("annotation", truth.shape, sequence.masks[index]),
        ):
            if tuple(shape) != tuple(original_hw):
                raise DataError(
                    f"sequence {sequence.name}: the {what} is {shape[1]} x {shape[0]} px but the first "
                    f"annotation is {original_hw[1]} x {original_hw[0]}",
                    where=url,
                    fix="Frames and annotations of a sequence must all have one size: use the DAVIS 2017 480p files",
                )
        return index, frame_tensor(image, size_hw=size_hw, mean=model.mean, std=model.std), truth

    ahead = READ_AHEAD_THREADS * 2
    with ThreadPoolExecutor(max_workers=READ_AHEAD_THREADS) as pool:
        pending = [pool.submit(load, i) for i in range(min(ahead, len(sequence.frames)))]
        submitted = len(pending)
        while pending:
            item = pending.pop(0).result()
            if submitted < len(sequence.frames):
                pending.append(pool.submit(load, submitted))
                submitted += 1
            yield item


def _features(
    frames: Iterator[tuple[int, torch.Tensor, np.ndarray]],
    *,
    model: EvalModel,
    grid_hw: tuple[int, int],
    device: torch.device,
    batch_size: int,
    name: str,
) -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
    """(index, token features (t, d) on `device`, annotation ids) per frame, each frame through
    the model once, `batch_size` frames per forward pass."""
    batch: list[tuple[int, torch.Tensor, np.ndarray]] = []

    def run() -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
        images = torch.stack([image for _, image, _ in batch]).to(device)
        try:
            tokens_btd = model.tokens(images).float()
        except (RuntimeError, AssertionError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise FlslError(
                f"the model cannot take frames of {images.shape[-1]} x {images.shape[-2]} px ({reason})",
                where=name,
                fix="Evaluate a ViT that takes any input size (flsl checkpoints and "
                "exports, timm ViTs do); or change --short-side",
            ) from None
        if tokens_btd.shape[1] != grid_hw[0] * grid_hw[1]:
            raise FlslError(
                f"the model gives {tokens_btd.shape[1]} tokens for a {images.shape[-1]} x "
                f"{images.shape[-2]} px frame, not {grid_hw[1]} x {grid_hw[0]}",
                fix="Evaluate a ViT-like model whose token grid follows its patch size",
            )
        for (index, _, truth), features_td in zip(batch, tokens_btd):
            yield index, features_td, truth
        batch.clear()

    for item in frames:
        batch.append(item)
        if len(batch) == batch_size:
            yield from run()
    if batch:
        yield from run()


def _percent(stats: dict[str, float]) -> dict[str, float]:
    return {key: round(100.0 * value, 4) for key, value in stats.items()}


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids))
