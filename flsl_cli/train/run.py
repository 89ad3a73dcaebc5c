"""Starting and resuming runs: everything that must be checked before any process starts.

Order matters: the recipe, the device count (or the SLURM request), the memory the run needs,
the data and the run directory are all checked before anything is written, so a bad input
leaves nothing behind; a run that fails before its first step removes the run directory it
created. Then the run is launched here (`launch`) or submitted as a SLURM job
(`submit_pretrain`, `submit_resume`). `flsl recipe validate` runs the same checks
(`check_recipe`) short of writing anything.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from flsl_cli import signals, storage
from flsl_cli.checkpoint.store import list_checkpoints, newest_valid
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
from flsl_cli.config.memory import GB, check_memory, estimate_memory, host_memory_bytes
from flsl_cli.config.schema import SHAPE_KEYS, Recipe
from flsl_cli.data.shards import resolve_shards
from flsl_cli.data.stream import plan_layout
from flsl_cli.errors import FlslError, RecipeError, RunDirError
from flsl_cli.train import remote
from flsl_cli.train.metrics import BAD_SAMPLES_NAME
from flsl_cli.train.rundir import (
    METRICS_NAME,
    RUN_NAME,
    load_recipe_yaml,
    prepare_new_run,
    read_run,
    truncate_metrics,
)
from flsl_cli.train.tensorboard import check_tensorboard

if TYPE_CHECKING:
    from flsl_cli.launch.slurm import SlurmFlags, SlurmRequest, SubmittedJob


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


def device_memory(*, devices: int, use_cuda: bool) -> tuple[int | None, str, int]:
    """(bytes one process may use, what holds them, processes sharing them): the smallest GPU's
    memory with one process per GPU, or this machine's memory shared by every CPU process."""
    if use_cuda:
        import torch

        smallest = min(torch.cuda.get_device_properties(i).total_memory for i in range(devices))
        return smallest, f"each GPU ({torch.cuda.get_device_name(0)})", 1
    return host_memory_bytes(), f"this machine ({devices} CPU process{'es' if devices > 1 else ''})", devices


def check_recipe(recipe: Recipe, *, source: str, world_size: int, use_cuda: bool) -> None:
    """The recipe against the processes that will train it on this machine: the global batch
    splits evenly, and the model, head and batch fit in memory. Every problem at once."""
    device_bytes, device_name, sharing = device_memory(devices=world_size, use_cuda=use_cuda)
    problems = []
    for check in (lambda: check_for_world(recipe, world_size=world_size, source=source),
                  lambda: check_memory(recipe, world_size=world_size, source=source, device_bytes=device_bytes,
                                       device_name=device_name, processes_per_device=sharing),
                  lambda: check_tensorboard(recipe, source=source)):
        try:
            check()
        except RecipeError as exc:
            problems.extend(exc.problems)
    if problems:
        raise RecipeError(problems, source=source)


# PyTorch warns, in every loader of every process, when a DataLoader has more workers than the
# process has CPUs; flsl says it once, naming the recipe key, and keeps torch's warning quiet.
_WORKER_WARNING = "This DataLoader will create"


def note_worker_count(recipe: Recipe, *, on_note: Callable[[str], None]) -> None:
    import os

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    if recipe.data.num_workers > cpus:
        on_note(f"data.num_workers is {recipe.data.num_workers}, more than the {cpus} CPUs each process may use: "
                "the worker processes will share them")


@contextmanager
def _quiet_worker_warning():
    """Silence torch's worker-count warning here and in the processes this one spawns."""
    import os
    import warnings

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
    text = str(exc)
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or any(sign in text for sign in ("DefaultCPUAllocator", "out of memory", "can't allocate memory")))


def launch(*, recipe: Recipe, source: str, run_dir: Path, resume: bool, devices: int, use_cuda: bool) -> None:
    """Train on this machine: in this process, or in `devices` local processes. The run dir is
    owned by this process meanwhile (RUN_DIR/owner.json), so no second writer starts. Running
    out of memory is reported as a user error with the estimate and what to lower."""
    from flsl_cli.train.loop import train_process
    from flsl_cli.train.rundir import local_owner, release_owner, write_owner

    kwargs = {"recipe_data": recipe_to_dict(recipe), "source": source, "run_dir": str(run_dir), "resume": resume}
    owner = local_owner()
    owned = not remote.is_remote(run_dir)  # owner.json guards shared filesystems
    if owned:
        write_owner(run_dir, owner)
    try:
        with _quiet_worker_warning():
            if devices == 1:
                signals.stop_request()  # a stop from here on ends the run at a step (or before the first)
                if not use_cuda:
                    import os
                    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                        os.environ.pop(name, None)
                train_process(**kwargs)
                return
            from flsl_cli.launch.local import run_local_processes

            run_local_processes(train_process, nprocs=devices, kwargs=kwargs)
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
            release_owner(run_dir, owner)


def _remove_if_never_started(run_dir: Path, *, existed: bool) -> None:
    """After a failed launch: if the run never took a step (run.json still says `created`, no
    checkpoint), take back what `_prepare_new` wrote, so a run that never started leaves nothing."""
    import json

    try:
        status = json.loads((Path(run_dir) / RUN_NAME).read_text()).get("status")
    except (OSError, ValueError):
        return
    if status == "created" and not list_checkpoints(run_dir):
        for name in (METRICS_NAME, BAD_SAMPLES_NAME):
            (Path(run_dir) / name).unlink(missing_ok=True)
        _remove_unsubmitted(Path(run_dir), existed=existed)


def _refuse_second_writer(run_dir: Path) -> None:
    from flsl_cli.launch.slurm import job_state
    from flsl_cli.train.rundir import refuse_if_owned

    refuse_if_owned(run_dir, slurm_state=job_state)


def _prepare_new(recipe: Recipe, *, source: str, run_dir: Path, world_size: int, force: bool,
                 on_demo_progress: Callable[[int, int], None] | None, on_note: Callable[[str], None]) -> None:
    """Check everything a new run needs for `world_size` processes, then create its run dir."""
    check_for_world(recipe, world_size=world_size, source=source)
    if ensure_demo_data(recipe, on_progress=on_demo_progress):
        on_note(f"generated the demo data set in {Path(recipe.data.train).expanduser().parent}")
    for note in check_data(recipe, world_size=world_size):
        on_note(note)
    _refuse_second_writer(run_dir)
    try:
        prepare_new_run(run_dir, recipe_yaml=recipe_to_yaml(recipe), force=force)
    except OSError as exc:
        raise RunDirError(f"cannot create the run directory ({exc.strerror or exc})", where=str(run_dir),
                          fix="Choose a --run-dir in a place this user can write") from None


def start_pretrain(recipe_path: str | Path, *, overrides: list[str], run_dir: str | Path | None, devices: int | None,
                   force: bool, on_demo_progress: Callable[[int, int], None] | None = None,
                   on_note: Callable[[str], None] = lambda _: None) -> str | Path:
    recipe = load_recipe(recipe_path, overrides=overrides)
    nprocs, use_cuda = resolve_devices(devices)
    with recheck_with(recipe_path, overrides, devices=devices):
        check_recipe(recipe, source=str(recipe_path), world_size=nprocs, use_cuda=use_cuda)
    target = str(run_dir) if run_dir else str(default_run_dir(recipe_path))
    existed = not remote.is_remote(target) and Path(target).exists()
    with _staged(target, newest_checkpoint=False) as local:
        _prepare_new(recipe, source=str(recipe_path), run_dir=local, world_size=nprocs, force=force,
                     on_demo_progress=on_demo_progress, on_note=on_note)
    run_dir = storage.normalize(target) if remote.is_remote(target) else Path(target)
    on_note(f"run dir: {run_dir}  ({nprocs} {'GPU' if use_cuda else 'CPU'} process(es))")
    note_worker_count(recipe, on_note=on_note)
    try:
        launch(recipe=recipe, source=str(recipe_path), run_dir=run_dir, resume=False, devices=nprocs,
               use_cuda=use_cuda)
    except BaseException:
        if not remote.is_remote(target):
            _remove_if_never_started(Path(target), existed=existed)
        raise
    return run_dir


@contextmanager
def _staged(target: str, *, newest_checkpoint: bool):
    """The run dir to check and prepare: itself, or for a remote one a local copy that is pushed
    back when the block succeeds."""
    if not remote.is_remote(target):
        yield Path(target)
        return
    url = storage.normalize(target)
    local = remote.staging_dir(url, role="parent")
    try:
        with _storage_errors(url):
            remote.pull(url, local, newest_checkpoint=newest_checkpoint)
        yield local
        with _storage_errors(url):
            remote.push(local, url)
    finally:
        shutil.rmtree(local, ignore_errors=True)


@contextmanager
def _storage_errors(url: str):
    """A remote run dir that cannot be read or written (credentials, bucket, network) is a user
    error naming the URL, not a traceback from the storage library."""
    try:
        yield
    except FlslError:
        raise
    except Exception as exc:  # noqa: BLE001 - each fsspec backend raises its own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunDirError(f"cannot reach the run directory ({type(exc).__name__}: {first})", where=url,
                          fix="Check the URL, that the bucket exists, and the storage credentials (for S3 the "
                              "AWS_* variables or profile; for GCS gcloud's)") from None


def _refuse_file_as_run_dir(run_dir: str | Path) -> None:
    """A file where a run directory belongs: say so, and name the run directory it may be in."""
    path = Path(run_dir)
    if remote.is_remote(str(run_dir)) or not path.is_file():
        return
    if path.parent.name == "checkpoints" and (path.parent.parent / "recipe.yaml").exists():
        fix = f"Pass the run directory that holds it: {path.parent.parent}"
    elif path.name == "recipe.yaml" and (path.parent / "run.json").exists():
        fix = f"Pass the run directory that holds it: {path.parent}"
    else:
        fix = "Pass the run directory (the --run-dir of `flsl pretrain`, holding recipe.yaml and checkpoints/)"
    raise RunDirError("this is a file, not a run directory", where=str(run_dir), fix=fix)


def _check_resume(run_dir: Path, *, overrides: list[str], world_size_of: Callable[[Recipe], int],
                  on_note: Callable[[str], None],
                  note_skipped: bool) -> tuple[Recipe, str, int | None, list[str]]:
    """Everything `flsl resume` checks before it starts: the run, the changed recipe keys, the
    process count, a usable checkpoint, the data. Returns (recipe, source, step, changed keys);
    step is None for a run that has no checkpoint yet (it starts again from step 0). Damaged
    checkpoints that are skipped are noted only with `note_skipped` (a local run's training
    loop says so itself)."""
    _refuse_file_as_run_dir(run_dir)
    recipe_text, _ = read_run(run_dir)
    source = str(run_dir / "recipe.yaml")
    with recheck_with(source, overrides):
        saved = load_recipe_yaml(recipe_text)
        recipe = validate_recipe(apply_overrides(saved, overrides, source=source), source=source)
        changed = changed_keys(saved, recipe_to_dict(recipe))
        blocked = [key for key in changed if any(key == k or key.startswith(k + ".") for k in SHAPE_KEYS)]
        if blocked:
            raise RecipeError(
                [f"{key}: cannot change on resume (it changes the shapes of the saved tensors); drop this --set, "
                 "or start a new run with `flsl pretrain`" for key in blocked],
                source=source,
            )
        world_size = world_size_of(recipe)
        check_for_world(recipe, world_size=world_size, source=source)
    _refuse_second_writer(run_dir)
    step = None
    if list_checkpoints(run_dir):
        def on_skip(ref, why: str) -> None:
            if note_skipped:
                on_note(f"skipping damaged checkpoint {ref.path.name}: {why}")

        ref, _ = newest_valid(run_dir, on_skip=on_skip)
        step = ref.step
    check_data(recipe, world_size=world_size)
    return recipe, source, step, changed


def _save_changed_recipe(run_dir: Path, recipe: Recipe, changed: list[str], on_note: Callable[[str], None]) -> None:
    if changed:
        from flsl_cli.train.rundir import write_text_atomic

        write_text_atomic(run_dir / "recipe.yaml", recipe_to_yaml(recipe))
        on_note(f"recipe changed on resume: {', '.join(changed)}")


def resume_run(run_dir: str | Path, *, overrides: list[str], devices: int | None,
               on_note: Callable[[str], None] = lambda _: None) -> str | Path:
    devices_of: dict[str, tuple[int, bool]] = {}

    def world_size_of(recipe: Recipe) -> int:
        nprocs, use_cuda = devices_of["local"] = resolve_devices(devices)
        check_recipe(recipe, source=f"{target}/recipe.yaml", world_size=nprocs, use_cuda=use_cuda)
        return nprocs

    target = str(run_dir)
    _refuse_file_as_run_dir(target)
    with _staged(target, newest_checkpoint=True) as local:
        recipe, source, step, changed = _check_resume(local, overrides=overrides, world_size_of=world_size_of,
                                                      on_note=on_note, note_skipped=False)
        _save_changed_recipe(local, recipe, changed, on_note)
        if step is None:  # killed before its first checkpoint: its partial logs describe steps run again
            truncate_metrics(local, after_step=0)
            truncate_metrics(local, after_step=0, name=BAD_SAMPLES_NAME)
    run_dir = storage.normalize(target) if remote.is_remote(target) else Path(target)
    nprocs, use_cuda = devices_of["local"]
    processes = f"({nprocs} {'GPU' if use_cuda else 'CPU'} process(es))"
    if step is None:
        on_note(f"{run_dir} has no checkpoint yet: starting it again from step 0 with its saved recipe  {processes}")
    else:
        on_note(f"resuming {run_dir} from step {step}  {processes}")
    note_worker_count(recipe, on_note=on_note)
    launch(recipe=recipe, source=source, run_dir=run_dir, resume=step is not None, devices=nprocs, use_cuda=use_cuda)
    return run_dir


# --- SLURM ------------------------------------------------------------------------------------


def _refuse_remote_for_slurm(run_dir) -> None:
    if run_dir is not None and remote.is_remote(str(run_dir)):
        raise FlslError(
            "SLURM jobs need their run directory on a filesystem shared by the nodes", where=str(run_dir),
            fix="Use a path on the cluster's shared filesystem for --run-dir (remote run dirs work for local runs)",
        )


def submit_pretrain(recipe_path: str | Path, *, overrides: list[str], run_dir: Path | None, force: bool,
                    flags: SlurmFlags, dry_run: bool = False,
                    on_demo_progress: Callable[[int, int], None] | None = None,
                    on_note: Callable[[str], None] = lambda _: None,
                    on_script: Callable[[str], None] = print) -> SubmittedJob | None:
    """`flsl pretrain RECIPE --nodes N ...`: check everything, create the run dir, submit one job.
    With `dry_run`, check what can be checked without writing and hand the sbatch script to
    `on_script` instead."""
    from flsl_cli.launch.slurm import require_sbatch, resolve_request, sbatch_script

    source = str(recipe_path)
    recipe = load_recipe(recipe_path, overrides=overrides)
    request = resolve_request(recipe.slurm, flags, data_workers=recipe.data.num_workers)
    _refuse_remote_for_slurm(run_dir)
    run_dir = (Path(run_dir) if run_dir else default_run_dir(recipe_path)).absolute()
    if dry_run:
        check_for_world(recipe, world_size=request.world_size, source=source)
        if recipe.data.demo is None or Path(recipe.data.train).expanduser().exists():
            try:
                for note in check_data(recipe, world_size=request.world_size):
                    on_note(note)
            except FlslError as exc:  # the data may only exist on the cluster: say so, still show the job
                on_note(f"warning: a real submission would stop here: {exc.describe()}")
        on_note(f"dry run: nothing written, nothing submitted; the job would train {run_dir} with "
                f"{request.describe()}")
        on_script(sbatch_script(request, run_dir=run_dir))
        return None
    require_sbatch()
    existed = run_dir.exists()
    _prepare_new(recipe, source=source, run_dir=run_dir, world_size=request.world_size, force=force,
                 on_demo_progress=on_demo_progress, on_note=on_note)
    try:
        return _submit(request, run_dir=run_dir)
    except FlslError:
        _remove_unsubmitted(run_dir, existed=existed)
        raise


def submit_resume(run_dir: Path, *, overrides: list[str], flags: SlurmFlags, dry_run: bool = False,
                  on_note: Callable[[str], None] = lambda _: None,
                  on_script: Callable[[str], None] = print) -> SubmittedJob | None:
    """`flsl resume RUN_DIR --nodes N ...`: the checks of `flsl resume`, then one job that
    continues the run."""
    from flsl_cli.launch.slurm import require_sbatch, resolve_request, sbatch_script

    _refuse_remote_for_slurm(run_dir)
    run_dir = Path(run_dir).absolute()
    requests = {}

    def world_size_of(recipe: Recipe) -> int:
        requests["slurm"] = resolve_request(recipe.slurm, flags, data_workers=recipe.data.num_workers)
        return requests["slurm"].world_size

    _refuse_file_as_run_dir(run_dir)
    if not dry_run:
        read_run(run_dir)
        require_sbatch()
    recipe, _, step, changed = _check_resume(run_dir, overrides=overrides, world_size_of=world_size_of,
                                             on_note=on_note, note_skipped=True)
    request = requests["slurm"]
    start = "from step 0 (it has no checkpoint yet)" if step is None else f"from step {step}"
    if dry_run:
        on_note(f"dry run: nothing written, nothing submitted; the job would resume {run_dir} {start} "
                f"with {request.describe()}")
        on_script(sbatch_script(request, run_dir=run_dir))
        return None
    saved_text, _ = read_run(run_dir)
    _save_changed_recipe(run_dir, recipe, changed, on_note)  # before submitting: the job reads it
    try:
        job = _submit(request, run_dir=run_dir)
    except FlslError:
        if changed:
            from flsl_cli.train.rundir import write_text_atomic

            write_text_atomic(run_dir / "recipe.yaml", saved_text)
        raise
    on_note(f"the job resumes {run_dir} {start}")
    return job


def _submit(request: SlurmRequest, *, run_dir: Path) -> SubmittedJob:
    from flsl_cli.launch.slurm import submit
    from flsl_cli.train.rundir import slurm_owner, update_status, write_owner

    _, before = read_run(run_dir)
    update_status(run_dir, scheduler="slurm", slurm=request.record(), status="submitting")
    try:
        job = submit(request, run_dir=run_dir)
    except FlslError:
        import json

        from flsl_cli.train.rundir import write_text_atomic

        write_text_atomic(run_dir / "run.json", json.dumps(before, indent=1) + "\n")
        raise
    write_owner(run_dir, slurm_owner(job.job_id))
    _, record = read_run(run_dir)
    job_ids = [str(j) for j in record.get("job_ids", [])]
    if job.job_id not in job_ids:
        update_status(run_dir, job_ids=job_ids + [job.job_id])
    return job


def _remove_unsubmitted(run_dir: Path, *, existed: bool) -> None:
    """Undo `_prepare_new` when SLURM refused the job: a bad input leaves nothing behind."""
    import shutil

    from flsl_cli.launch.slurm import JOBS_DIR
    from flsl_cli.train.rundir import OWNER_NAME, RECIPE_NAME, RUN_NAME

    if not existed:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in (RECIPE_NAME, RUN_NAME, OWNER_NAME):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / JOBS_DIR, ignore_errors=True)


def prepare_for_job(recipe_path: str | Path, *, overrides: list[str], run_dir: Path,
                    on_note: Callable[[str], None] = lambda _: None) -> None:
    """In the batch script of slurm/flsl.sbatch: create the run dir for this job's processes
    (SLURM_NTASKS), unless it already holds the run (a requeued job runs the script again)."""
    import os

    if (Path(run_dir) / "recipe.yaml").exists() and (Path(run_dir) / "run.json").exists():
        on_note(f"{run_dir} already holds the run; the job continues it")
        return
    recipe = load_recipe(recipe_path, overrides=overrides)
    world_size = int(os.environ.get("SLURM_NTASKS") or 1)
    _prepare_new(recipe, source=str(recipe_path), run_dir=Path(run_dir), world_size=world_size, force=False,
                 on_demo_progress=None, on_note=on_note)
    on_note(f"created {run_dir} for {world_size} process(es)")
