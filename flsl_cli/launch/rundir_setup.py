"""Creating a run directory, checking one before a resume, and taking back what a start that
never happened wrote: a bad input leaves nothing behind."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from flsl_cli.checkpoint.store import CHECKPOINTS_DIR, list_checkpoints, newest_valid
from flsl_cli.config.load import (
    apply_overrides,
    changed_keys,
    check_for_world,
    load_recipe,
    recheck_with,
    recipe_to_dict,
    recipe_to_yaml,
    validate_recipe,
)
from flsl_cli.config.schema import SHAPE_KEYS, Recipe
from flsl_cli.distributed.env import slurm_tasks
from flsl_cli.errors import FlslError, RecipeError, RunDirError
from flsl_cli.launch.checks import check_data, ensure_demo_data
from flsl_cli.launch.slurm.executor import JOBS_DIR
from flsl_cli.launch.slurm.queries import job_state
from flsl_cli.storage import write_text_atomic
from flsl_cli.train import remote
from flsl_cli.train.metrics import BAD_SAMPLES_NAME
from flsl_cli.train.run_record import LOCK_NAME, RunStatus, load_record
from flsl_cli.train.rundir import (
    METRICS_NAME,
    RECIPE_NAME,
    RUN_NAME,
    load_recipe_yaml,
    prepare_new_run,
    read_run,
    refuse_if_owned,
)


def default_run_dir(recipe_path: str | Path) -> Path:
    return Path("runs") / f"{Path(recipe_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def refuse_second_writer(run_dir: Path) -> None:
    refuse_if_owned(run_dir, slurm_state=job_state)


def prepare_new(
    recipe: Recipe,
    *,
    source: str,
    run_dir: Path,
    world_size: int,
    force: bool,
    on_demo_progress: Callable[[int, int], None] | None,
    on_note: Callable[[str], None],
) -> None:
    """Check everything a new run needs for `world_size` processes, then create its run dir."""
    check_for_world(recipe, world_size=world_size, source=source)
    if ensure_demo_data(recipe, on_progress=on_demo_progress):
        on_note(f"generated the demo data set in {Path(recipe.data.train).expanduser().parent}")
    check_data(recipe, world_size=world_size)  # its notes: the training processes show them as they start
    refuse_second_writer(run_dir)
    try:
        prepare_new_run(run_dir, recipe_yaml=recipe_to_yaml(recipe), force=force)
    except OSError as exc:
        raise RunDirError(
            f"cannot create the run directory ({exc.strerror or exc})",
            where=str(run_dir),
            fix="Choose a --run-dir in a place this user can write",
        ) from None


def remove_unsubmitted(run_dir: Path, *, existed: bool) -> None:
    """Undo `prepare_new` (SLURM refused the job, or the run never started)."""
    if not existed:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in (RECIPE_NAME, RUN_NAME, LOCK_NAME):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / JOBS_DIR, ignore_errors=True)


def remove_if_never_started(run_dir: Path, *, existed: bool) -> None:
    """After a failed launch: if the run never took a step (run.json still says `created`, no
    checkpoint), take back what `prepare_new` wrote, so a run that never started leaves nothing."""
    if not (Path(run_dir) / RUN_NAME).exists():
        return
    try:
        status = load_record(run_dir).status
    except FlslError:
        return
    if status is RunStatus.CREATED and not list_checkpoints(run_dir):
        for name in (METRICS_NAME, BAD_SAMPLES_NAME):
            (Path(run_dir) / name).unlink(missing_ok=True)
        remove_unsubmitted(Path(run_dir), existed=existed)


def refuse_file_as_run_dir(run_dir: str | Path) -> None:
    """A file where a run directory belongs: say so, and name the run directory it may be in."""
    path = Path(run_dir)
    if remote.is_remote(str(run_dir)) or not path.is_file():
        return
    if path.parent.name == CHECKPOINTS_DIR and (path.parent.parent / RECIPE_NAME).exists():
        fix = f"Pass the run directory that holds it: {path.parent.parent}"
    elif path.name == RECIPE_NAME and (path.parent / RUN_NAME).exists():
        fix = f"Pass the run directory that holds it: {path.parent}"
    else:
        fix = f"Pass the run directory (the --run-dir of `flsl pretrain`, holding {RECIPE_NAME} and {CHECKPOINTS_DIR}/)"
    raise RunDirError("this is a file, not a run directory", where=str(run_dir), fix=fix)


def check_resume(
    run_dir: Path,
    *,
    overrides: list[str],
    world_size_of: Callable[[Recipe], int],
    on_note: Callable[[str], None],
    note_skipped: bool,
) -> tuple[Recipe, str, int | None, list[str]]:
    """Everything `flsl resume` checks before it starts: the run, the changed recipe keys, the
    process count, a usable checkpoint, the data. Returns (recipe, source, step, changed keys);
    step is None for a run that has no checkpoint yet (it starts again from step 0). Damaged
    checkpoints that are skipped are noted only with `note_skipped` (a local run's training
    loop says so itself)."""
    refuse_file_as_run_dir(run_dir)
    recipe_text, _ = read_run(run_dir)
    source = str(run_dir / RECIPE_NAME)
    with recheck_with(source, overrides):
        saved = load_recipe_yaml(recipe_text)
        recipe = validate_recipe(apply_overrides(saved, overrides, source=source), source=source)
        changed = changed_keys(saved, recipe_to_dict(recipe))
        blocked = [key for key in changed if any(key == k or key.startswith(k + ".") for k in SHAPE_KEYS)]
        if blocked:
            raise RecipeError(
                [
                    f"{key}: cannot change on resume (it changes the shapes of the saved tensors); drop this --set, "
                    "or start a new run with `flsl pretrain`"
                    for key in blocked
                ],
                source=source,
            )
        world_size = world_size_of(recipe)
        check_for_world(recipe, world_size=world_size, source=source)
    refuse_second_writer(run_dir)
    step = None
    if list_checkpoints(run_dir):

        def on_skip(ref, why: str) -> None:
            if note_skipped:
                on_note(f"skipping damaged checkpoint {ref.path.name}: {why}")

        ref, _ = newest_valid(run_dir, on_skip=on_skip)
        step = ref.step
    check_data(recipe, world_size=world_size)
    return recipe, source, step, changed


def save_changed_recipe(run_dir: Path, recipe: Recipe, changed: list[str], on_note: Callable[[str], None]) -> None:
    if changed:
        write_text_atomic(run_dir / RECIPE_NAME, recipe_to_yaml(recipe))
        on_note(f"recipe changed on resume: {', '.join(changed)}")


def prepare_for_job(
    recipe_path: str | Path, *, overrides: list[str], run_dir: Path, on_note: Callable[[str], None] = lambda _: None
) -> None:
    """In the batch script of slurm/flsl.sbatch: create the run dir for this job's processes
    (SLURM_NTASKS), unless it already holds the run (a requeued job runs the script again)."""
    if (Path(run_dir) / RECIPE_NAME).exists() and (Path(run_dir) / RUN_NAME).exists():
        on_note(f"{run_dir} already holds the run; the job continues it")
        return
    recipe = load_recipe(recipe_path, overrides=overrides)
    world_size = slurm_tasks()
    prepare_new(
        recipe,
        source=str(recipe_path),
        run_dir=Path(run_dir),
        world_size=world_size,
        force=False,
        on_demo_progress=None,
        on_note=on_note,
    )
    on_note(f"created {run_dir} for {world_size} process(es)")
