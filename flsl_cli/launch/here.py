"""`flsl pretrain` and `flsl resume` on this machine: the checks, the run directory, then the
training processes (this one, or one per local GPU / CPU process).

Order matters: the recipe, the device count, the memory the run needs, the data and the run
directory are all checked before anything is written, so a bad input leaves nothing behind; a
run that fails before its first step removes the run directory it created.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flsl_cli import signals, storage
from flsl_cli.config.load import load_recipe, recheck_with, recipe_to_dict
from flsl_cli.config.memory import GB, estimate_memory
from flsl_cli.config.schema import Recipe
from flsl_cli.distributed.env import ProcessEnv, torchrun_process
from flsl_cli.errors import FlslError
from flsl_cli.launch.checks import check_recipe, note_worker_count
from flsl_cli.launch.devices import resolve_devices
from flsl_cli.launch.processes import run_processes
from flsl_cli.launch.rundir_setup import (
    check_resume,
    default_run_dir,
    prepare_new,
    remove_if_never_started,
    save_changed_recipe,
)
from flsl_cli.launch.staging import staged
from flsl_cli.train import remote
from flsl_cli.train.loop import train_process
from flsl_cli.train.metrics import BAD_SAMPLES_NAME
from flsl_cli.train.run_record import Owner, claim, release
from flsl_cli.train.rundir import RECIPE_NAME, truncate_metrics

# PyTorch warns, in every loader of every process, when a DataLoader has more workers than the
# process has CPUs; flsl says it once, naming the recipe key, and keeps torch's warning quiet.
_WORKER_WARNING = "This DataLoader will create"


@contextmanager
def _quiet_worker_warning():
    """Silence torch's worker-count warning here and in the processes this one spawns."""
    option = f"ignore:{_WORKER_WARNING}:UserWarning"
    saved = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = f"{saved},{option}" if saved else option
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_WORKER_WARNING, category=UserWarning)
            yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = saved


def _is_out_of_memory(exc: BaseException) -> bool:
    """Told by type where there is one (MemoryError, torch.OutOfMemoryError on a GPU); torch
    reports a failed CPU allocation, and a spawned process's out-of-memory error reaches here,
    only as a RuntimeError whose words say so, so those are read."""
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return any(sign in str(exc) for sign in ("DefaultCPUAllocator", "out of memory", "can't allocate memory"))


def train_here(
    *, recipe: Recipe, source: str, run_dir: str | Path, resume: bool, devices: int, launch: ProcessEnv | None = None
) -> None:
    """Train in this process, or in `devices` local processes; under torchrun (`launch`), this
    process is one rank of the run. The run dir is owned by this process (rank 0 under torchrun)
    meanwhile (run.json's `owner`), so no second writer starts. Running out of memory is
    reported as a user error with the estimate and what to lower."""
    kwargs: dict[str, Any] = {
        "recipe_data": recipe_to_dict(recipe),
        "source": source,
        "run_dir": str(run_dir),
        "resume": resume,
    }
    owner = Owner.this_process()
    # the owner guards shared filesystems
    owned = not remote.is_remote(str(run_dir)) and (launch is None or launch.rank == 0)
    if owned:
        claim(Path(run_dir), owner)
    try:
        with _quiet_worker_warning():
            # a stop from here on ends the run at a step (or before the first)
            if launch is not None:
                signals.stop_request()
                train_process(**kwargs)
            else:
                run_processes(train_process, nprocs=devices, kwargs=kwargs, stop_at_step=True)
    except (MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        estimate = estimate_memory(recipe, world_size=devices)
        raise FlslError(
            f"the run ran out of memory (estimated beforehand at {estimate.total / GB:.3g} GB per process)",
            where=str(run_dir),
            fix="Lower optim.global_batch_size, model.head_out_dim or the view sizes (augment.*), use more GPUs, "
            "or free memory taken by other programs",
        ) from None
    finally:
        if owned:
            release(Path(run_dir), owner)


def _shown(target: str) -> str | Path:
    return storage.normalize(target) if remote.is_remote(target) else Path(target)


def _processes(nprocs: int, use_cuda: bool) -> str:
    return f"({nprocs} {'GPU' if use_cuda else 'CPU'} process(es))"


def start_pretrain(
    recipe_path: str | Path,
    *,
    overrides: list[str],
    run_dir: str | Path | None,
    devices: int | None,
    force: bool,
    on_demo_progress: Callable[[int, int], None] | None = None,
    on_note: Callable[[str], None] = lambda _: None,
) -> str | Path:
    """`flsl pretrain RECIPE`: check everything, create the run dir, train here.

    Under torchrun (`torchrun --nproc-per-node N -m flsl_cli pretrain RECIPE --run-dir DIR`),
    every process checks the recipe, rank 0 alone creates the run dir (and any demo data) and
    prints, and all of them then train as the ranks of one run."""
    recipe = load_recipe(recipe_path, overrides=overrides)
    launch = torchrun_process()
    if launch is not None:
        nprocs, use_cuda = _torchrun_devices(launch, devices)
        if launch.rank != 0:
            on_note, on_demo_progress = (lambda _: None), None
    else:
        nprocs, use_cuda = resolve_devices(devices)
    with recheck_with(recipe_path, overrides, devices=devices):
        check_recipe(recipe, source=str(recipe_path), world_size=nprocs, use_cuda=use_cuda)
    target = str(run_dir) if run_dir else str(default_run_dir(recipe_path))
    existed = not remote.is_remote(target) and Path(target).exists()
    preparing = launch is None or launch.rank == 0

    def prepare() -> None:
        with staged(target, newest_checkpoint=False) as local:
            prepare_new(
                recipe,
                source=str(recipe_path),
                run_dir=local,
                world_size=nprocs,
                force=force,
                on_demo_progress=on_demo_progress,
                on_note=on_note,
            )

    if launch is None:
        prepare()
    else:
        _on_rank_zero_first(prepare, launch=launch, use_cuda=use_cuda)
    shown = _shown(target)
    on_note(f"run dir: {shown}  {_processes(nprocs, use_cuda)}" + (" under torchrun" if launch else ""))
    note_worker_count(recipe, on_note=on_note)
    try:
        train_here(recipe=recipe, source=str(recipe_path), run_dir=shown, resume=False, devices=nprocs, launch=launch)
    except BaseException:
        if preparing and not remote.is_remote(target):
            remove_if_never_started(Path(target), existed=existed)
        raise
    return shown


def _torchrun_devices(launch: ProcessEnv, devices: int | None) -> tuple[int, bool]:
    """(processes, use CUDA) of a torchrun launch: torchrun's WORLD_SIZE, one GPU per local
    rank where there are GPUs."""
    if devices is not None and devices != launch.world_size:
        raise FlslError(
            f"--devices {devices} does not match torchrun's {launch.world_size} processes",
            fix="Leave out --devices under torchrun: its --nproc-per-node and --nnodes decide",
        )
    import torch

    return launch.world_size, torch.cuda.is_available()


def _on_rank_zero_first(action: Callable[[], None], *, launch: ProcessEnv, use_cuda: bool) -> None:
    """`action` on rank 0 alone, while the other ranks wait; all of them then go on, or all stop:
    rank 0 with its own error, the others with one that points to it."""
    import torch

    from flsl_cli.distributed import group
    from flsl_cli.distributed.ops import all_reduce_sum

    env = group.setup(use_cuda=use_cuda)
    failure: BaseException | None = None
    if launch.rank == 0:
        try:
            action()
        except BaseException as exc:  # noqa: BLE001 - raised below, once every rank has heard of it
            failure = exc
    failed = all_reduce_sum(torch.tensor([float(failure is not None)], device=env.device)).item()
    if failure is not None:
        raise failure
    if failed:
        group.teardown()
        raise FlslError(
            "process 0 of the torchrun launch could not set up the run dir (its message says why)",
            fix="Fix what process 0 reports, then launch again",
        )


def resume_run(
    run_dir: str | Path, *, overrides: list[str], devices: int | None, on_note: Callable[[str], None] = lambda _: None
) -> str | Path:
    """`flsl resume RUN_DIR`: the run's checks, then train it on from its newest checkpoint here."""
    target = str(run_dir)
    resolved: dict[str, tuple[int, bool]] = {}

    def world_size_of(recipe: Recipe) -> int:
        nprocs, use_cuda = resolved["devices"] = resolve_devices(devices)
        check_recipe(recipe, source=f"{target}/{RECIPE_NAME}", world_size=nprocs, use_cuda=use_cuda)
        return nprocs

    with staged(target, newest_checkpoint=True) as local:
        recipe, source, step, changed = check_resume(
            local, overrides=overrides, world_size_of=world_size_of, on_note=on_note, note_skipped=False
        )
        save_changed_recipe(local, recipe, changed, on_note)
        if step is None:  # killed before its first checkpoint: its partial logs describe steps run again
            truncate_metrics(local, after_step=0)
            truncate_metrics(local, after_step=0, name=BAD_SAMPLES_NAME)
    shown = _shown(target)
    nprocs, use_cuda = resolved["devices"]
    if step is None:
        on_note(
            f"{shown} has no checkpoint yet: starting it again from step 0 with its saved recipe  "
            f"{_processes(nprocs, use_cuda)}"
        )
    else:
        on_note(f"resuming {shown} from step {step}  {_processes(nprocs, use_cuda)}")
    note_worker_count(recipe, on_note=on_note)
    train_here(recipe=recipe, source=source, run_dir=shown, resume=step is not None, devices=nprocs)
    return shown
