"""What `flsl resume` refuses to do silently: change a run's schedule or data order with
`--set`, start again from step 0 over checkpoint files it cannot trust, or leave behind the
temporary files a killed writer left. Each refusal names the explicit way through it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flsl_cli import storage
from flsl_cli.checkpoint.store import (
    CHECKPOINTS_DIR,
    UNVERIFIED_SUFFIX,
    CheckpointRef,
    checkpoint_dir,
    files_without_manifest,
    list_checkpoints,
    load_file,
    step_of_file,
    verify,
    write_manifest,
)
from flsl_cli.config.load import recipe_to_dict
from flsl_cli.config.schema import SCHEDULE_KEYS, SHAPE_KEYS, Recipe
from flsl_cli.data.shards import resolve_shards
from flsl_cli.data.stream import plan_layout
from flsl_cli.errors import CheckpointError, FlslError
from flsl_cli.train.rundir import LOGS_DIR
from flsl_cli.train.schedules import Schedules


@dataclass(frozen=True)
class ResumeOptions:
    """The ways through `flsl resume`'s refusals, each asked for by name."""

    allow_schedule_change: bool = False  # --allow-schedule-change
    adopt: str | None = None  # --adopt-checkpoint PATH
    force: bool = False  # --force: start over from step 0, setting unverified files aside


def is_schedule_key(key: str) -> bool:
    return any(key == name or key.startswith(name + ".") for name in SCHEDULE_KEYS)


def _value(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None  # type: ignore[assignment]
    return data


def describe_change(saved: dict[str, Any], recipe: Recipe, key: str) -> str:
    return f"{_value(saved, key)} -> {_value(recipe_to_dict(recipe), key)}"


def _steps_per_epoch(recipe: Recipe, *, world_size: int) -> int | None:
    """Steps per epoch of `recipe` on `world_size` processes; None when its data cannot be read."""
    try:
        layout, _ = plan_layout(
            resolve_shards(recipe.data.train),
            world_size=world_size,
            num_workers=recipe.data.num_workers,
            local_batch=recipe.optim.global_batch_size // world_size,
        )
    except FlslError:
        return None
    return layout.steps_per_epoch


def schedule_change(saved: dict[str, Any], recipe: Recipe, *, keys: list[str], world_size: int) -> str:
    """What the changed `keys` do to the run: each value before and after, then its length in
    steps, its learning-rate warm-up and peak learning rate before and after."""
    parts = [f"{key} {describe_change(saved, recipe, key)}" for key in keys]
    try:
        before_recipe = Recipe.model_validate(saved)
    except ValueError:
        return "; ".join(parts)
    plans = []
    for which in (before_recipe, recipe):
        per_epoch = _steps_per_epoch(which, world_size=world_size)
        plans.append(None if per_epoch is None else Schedules(recipe=which, steps_per_epoch=per_epoch))
    before, after = plans
    if before is not None and after is not None:
        parts.append(
            f"total steps {before.total_steps} -> {after.total_steps} "
            f"({before.recipe.optim.epochs} x {before.steps_per_epoch} -> {after.recipe.optim.epochs} x "
            f"{after.steps_per_epoch} steps per epoch)"
        )
        parts.append(f"learning-rate warm-up {before.lr_warmup_steps} -> {after.lr_warmup_steps} steps")
        parts.append(f"peak learning rate {before.peak_lr():.3g} -> {after.peak_lr():.3g}")
    return "; ".join(parts)


def remove_leftovers(run_dir: Path) -> list[str]:
    """Remove the temporary files (`.NAME.tmp-PID`) that killed writers left in a run dir (its
    top level, checkpoints/ and logs/); the caller owns the run dir, so nothing else writes
    there. Returns their paths relative to the run dir."""
    removed = []
    for folder in (Path(run_dir), checkpoint_dir(run_dir), Path(run_dir) / LOGS_DIR):
        for leftover in storage.leftover_temp_files(folder):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(str(leftover.relative_to(run_dir)))
    return removed


def check_unverified(run_dir: Path, *, shown: str | Path, force: bool, on_note: Callable[[str], None]) -> None:
    """Checkpoint files without a manifest are never taken for no checkpoint. With committed
    checkpoints beside them, the run resumes from those and says which files it does not trust;
    with none, it is refused (the files named, and the two ways on) unless `force` sets them
    aside as `*.unverified` for a start from step 0."""
    files = files_without_manifest(run_dir)
    if not files:
        return
    names = ", ".join(path.name for path in files)
    adopt = f"flsl resume {shown} --adopt-checkpoint {files[-1].name}"
    if list_checkpoints(run_dir):
        on_note(
            f"not trusted, left as they are: {names} (no manifest); the run resumes from its newest committed "
            f"checkpoint, and to resume from one of them instead: `{adopt}`"
        )
        return
    if force:
        for path in files:
            path.replace(path.with_name(path.name + UNVERIFIED_SUFFIX))
        on_note(f"--force: set aside {names} as *{UNVERIFIED_SUFFIX} (kept, never loaded); starting from step 0")
        return
    raise CheckpointError(
        f"the run has checkpoint files but no manifest for any of them, so none is trusted: {names}. A manifest "
        "(step-N.json: size and sha256) is written after its checkpoint and commits it; without one flsl cannot "
        "tell a whole file from one that was cut off, changed or only partly copied (were the step-*.json files "
        "left out of a copy?). flsl does not start the run again over them",
        where=str(shown),
        fix=f"Check one and adopt it: `{adopt}` (it is loaded safely, checked against this run's model, and "
        f"given its manifest), or start over from step 0: `flsl resume {shown} --force` (the files are kept as "
        f"*{UNVERIFIED_SUFFIX})",
    )


def check_unverified_remote(url: str, *, force: bool) -> None:
    """The same refusal for a remote run dir, whose staging copy holds committed checkpoints only:
    checkpoint files there and no manifest at all are refused, unless `force` (a start from step
    0, whose checkpoints then replace them). Adopting one is done on a local copy."""
    listed = storage.listdir(storage.join(url, CHECKPOINTS_DIR))
    files = [name for name in listed if step_of_file(Path(name)) is not None]
    if force or not files or any(name.endswith(".json") for name in listed):
        return
    raise CheckpointError(
        f"the run has checkpoint files but no manifest for any of them, so none is trusted: {', '.join(files)}",
        where=url,
        fix=f"Copy the run dir to a local path, adopt one there with `flsl resume LOCAL_COPY --adopt-checkpoint "
        f"{files[-1]}` and copy it back, or start over from step 0: `flsl resume {url} --force`",
    )


def adopt_checkpoint(run_dir: Path, name: str, *, recipe: Recipe, shown: str | Path) -> CheckpointRef:
    """Verify a checkpoint file of this run that has no manifest, and commit it (write its
    manifest): it must be a `step-N.pt` in RUN_DIR/checkpoints/, load with
    `torch.load(weights_only=True)` as a flsl checkpoint of step N, and carry a recipe with this
    run's model shapes."""
    directory = checkpoint_dir(run_dir)
    path = directory / Path(name).name
    fix = f"Name a step-NNNNNNNN.pt file in {storage.join(str(shown), 'checkpoints')} (copy it there first)"
    if Path(name).name != name and Path(name).expanduser().resolve().parent != directory.resolve():
        raise CheckpointError("--adopt-checkpoint takes a checkpoint file of this run dir", where=name, fix=fix)
    step = step_of_file(path)
    if step is None or not path.is_file():
        raise CheckpointError("there is no checkpoint file of this name in the run dir", where=str(path), fix=fix)
    manifest = path.with_suffix(".json")
    if manifest.exists():
        ref = next((ref for ref in list_checkpoints(run_dir) if ref.path == path), None)
        if ref is not None and verify(ref) is None:
            return ref
        raise CheckpointError(
            "this checkpoint already has a manifest, and the file does not match it",
            where=str(path),
            fix="Restore the file from a backup, or adopt another one; flsl never rewrites a manifest",
        )
    payload = load_file(path)  # weights_only=True; names what the file is if it is no checkpoint
    if payload.get("step") != step:
        raise CheckpointError(
            f"the file holds step {payload.get('step')}, but its name says step {step}",
            where=str(path),
            fix="Adopt a file under its own name (step-NNNNNNNN.pt of the step it holds)",
        )
    theirs = yaml.safe_load(payload.get("recipe_yaml") or "") or {}
    ours = recipe_to_dict(recipe)
    differ = [
        f"{key} {_value(theirs, key)} (run: {_value(ours, key)})"
        for key in SHAPE_KEYS
        if _value(theirs, key) != _value(ours, key)
    ]
    if differ:
        raise CheckpointError(
            "this checkpoint belongs to another model than this run's: " + ", ".join(differ),
            where=str(path),
            fix="Adopt a checkpoint of this run, or start a new run for it",
        )
    return write_manifest(path, step=step)
