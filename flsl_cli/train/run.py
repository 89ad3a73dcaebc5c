"""Starting and resuming runs: everything that must be checked before any process starts.

Order matters: the recipe, the device count, the data and the run directory are all checked
before anything is written, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from flsl_cli.checkpoint.store import newest_valid
from flsl_cli.config.load import (
    apply_overrides,
    changed_keys,
    check_for_world,
    load_recipe,
    recipe_to_dict,
    recipe_to_yaml,
    validate_recipe,
)
from flsl_cli.config.schema import SHAPE_KEYS, Recipe
from flsl_cli.data.shards import resolve_shards
from flsl_cli.data.stream import plan_layout
from flsl_cli.errors import FlslError, RecipeError
from flsl_cli.train.rundir import load_recipe_yaml, prepare_new_run, read_run


def resolve_devices(requested: int | None) -> tuple[int, bool]:
    """(number of processes, use CUDA). Default: every local GPU, else one CPU process."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested is None:
        return (gpus, True) if gpus else (1, False)
    if requested < 1:
        raise FlslError(f"--devices must be at least 1, found {requested}", fix="Use e.g. --devices 1")
    if gpus and requested > gpus:
        raise FlslError(f"--devices {requested} asks for more GPUs than this machine has ({gpus})",
                        fix=f"Use --devices {gpus} or fewer")
    return requested, bool(gpus)


def default_run_dir(recipe_path: str | Path) -> Path:
    return Path("runs") / f"{Path(recipe_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def ensure_demo_data(recipe: Recipe, *, on_progress: Callable[[int, int], None] | None = None) -> bool:
    """Generate the demo data set at data.train's parent if the recipe asks for it and it is missing."""
    demo = recipe.data.demo
    train = Path(recipe.data.train).expanduser()
    if demo is None or train.exists():
        return False
    from flsl_cli.data.demo import write_demo_dataset

    write_demo_dataset(train.parent, images=demo.images, seed=demo.seed, image_size=demo.image_size,
                       on_progress=on_progress)
    return True


def check_data(recipe: Recipe, *, world_size: int) -> list[str]:
    shards = resolve_shards(recipe.data.train)
    _, notes = plan_layout(shards, world_size=world_size, num_workers=recipe.data.num_workers,
                           local_batch=recipe.optim.global_batch_size // world_size)
    return notes


def launch(*, recipe: Recipe, source: str, run_dir: Path, resume: bool, devices: int, use_cuda: bool) -> None:
    from flsl_cli.train.loop import train_process

    kwargs = {"recipe_data": recipe_to_dict(recipe), "source": source, "run_dir": str(run_dir), "resume": resume}
    if devices == 1:
        if not use_cuda:
            import os
            for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                os.environ.pop(name, None)
        train_process(**kwargs)
        return
    from flsl_cli.launch.local import run_local_processes

    run_local_processes(train_process, nprocs=devices, kwargs=kwargs)


def start_pretrain(recipe_path: str | Path, *, overrides: list[str], run_dir: Path | None, devices: int | None,
                   force: bool, on_demo_progress: Callable[[int, int], None] | None = None,
                   on_note: Callable[[str], None] = lambda _: None) -> Path:
    recipe = load_recipe(recipe_path, overrides=overrides)
    nprocs, use_cuda = resolve_devices(devices)
    check_for_world(recipe, world_size=nprocs, source=str(recipe_path))
    if ensure_demo_data(recipe, on_progress=on_demo_progress):
        on_note(f"generated the demo data set in {Path(recipe.data.train).expanduser().parent}")
    for note in check_data(recipe, world_size=nprocs):
        on_note(note)
    run_dir = Path(run_dir) if run_dir else default_run_dir(recipe_path)
    prepare_new_run(run_dir, recipe_yaml=recipe_to_yaml(recipe), force=force)
    on_note(f"run dir: {run_dir}  ({nprocs} {'GPU' if use_cuda else 'CPU'} process(es))")
    launch(recipe=recipe, source=str(recipe_path), run_dir=run_dir, resume=False, devices=nprocs, use_cuda=use_cuda)
    return run_dir


def resume_run(run_dir: Path, *, overrides: list[str], devices: int | None,
               on_note: Callable[[str], None] = lambda _: None) -> Path:
    run_dir = Path(run_dir)
    recipe_text, _ = read_run(run_dir)
    source = str(run_dir / "recipe.yaml")
    saved = load_recipe_yaml(recipe_text)
    recipe = validate_recipe(apply_overrides(saved, overrides, source=source), source=source)
    changed = changed_keys(saved, recipe_to_dict(recipe))
    blocked = [key for key in changed if any(key == k or key.startswith(k + ".") for k in SHAPE_KEYS)]
    if blocked:
        raise RecipeError(
            [f"{key}: cannot change on resume (it changes the shapes of the saved tensors)" for key in blocked],
            source=source,
        )
    nprocs, use_cuda = resolve_devices(devices)
    check_for_world(recipe, world_size=nprocs, source=source)
    ref, _ = newest_valid(run_dir, on_skip=lambda r, why: on_note(f"skipping damaged checkpoint {r.path.name}: {why}"))
    check_data(recipe, world_size=nprocs)
    if changed:
        from flsl_cli.train.rundir import write_text_atomic

        write_text_atomic(run_dir / "recipe.yaml", recipe_to_yaml(recipe))
        on_note(f"recipe changed on resume: {', '.join(changed)}")
    on_note(f"resuming {run_dir} from step {ref.step}  ({nprocs} {'GPU' if use_cuda else 'CPU'} process(es))")
    launch(recipe=recipe, source=source, run_dir=run_dir, resume=True, devices=nprocs, use_cuda=use_cuda)
    return run_dir



