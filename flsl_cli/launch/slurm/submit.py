"""`flsl pretrain RECIPE --nodes N ...` and `flsl resume RUN_DIR --nodes N ...` from Python: the
checks of a run on this machine, against the job's process count, then one SLURM job submitted
through submitit (or, with `dry_run`, what would be submitted).

    from flsl_cli.launch.slurm.submit import submit_pretrain

    job = submit_pretrain("recipes/vits16_300ep.yaml", overrides=["data.train=/data/in1k/train"],
                          slurm_options={"nodes": 4, "partition": "gpu", "time": "2-00:00:00"},
                          run_dir="/shared/runs/vits16")
    print(job.job_id, job.paths.stderr)   # a submitit.Job

The command line (`flsl pretrain --nodes`) is a thin caller of `submit_pretrain` and
`submit_resume`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flsl_cli.config.load import (
    apply_overrides,
    check_for_world,
    load_recipe,
    recipe_to_dict,
    validate_recipe,
)
from flsl_cli.config.schema import Recipe
from flsl_cli.errors import FlslError
from flsl_cli.launch.checks import check_data
from flsl_cli.launch.resume_guards import ResumeOptions
from flsl_cli.launch.rundir_setup import (
    check_resume,
    default_run_dir,
    prepare_new,
    refuse_file_as_run_dir,
    remove_unsubmitted,
    save_changed_recipe,
)
from flsl_cli.launch.slurm.executor import dry_run_text, require_sbatch, submit
from flsl_cli.launch.slurm.request import SlurmRequest
from flsl_cli.storage import write_text_atomic
from flsl_cli.train import remote
from flsl_cli.train.run_record import Owner, RunRecord, load_record, update_record, write_record
from flsl_cli.train.rundir import (
    RECIPE_NAME,
    read_run,
)

if TYPE_CHECKING:
    import submitit


def _refuse_remote_for_slurm(run_dir) -> None:
    if run_dir is not None and remote.is_remote(str(run_dir)):
        raise FlslError(
            "SLURM jobs need their run directory on a filesystem shared by the nodes",
            where=str(run_dir),
            fix="Use a path on the cluster's shared filesystem for --run-dir (remote run dirs work for local runs)",
        )


# Filesystems that live on one machine: a multi-node job's other nodes do not see them.
_LOCAL_FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "vfat", "ramfs")


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem `path` (or its nearest existing parent) is on, from
    /proc/mounts; None where that cannot be told."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = Path(path).absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    where = str(target.resolve())
    best: tuple[str, str] | None = None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (where == point or where.startswith(point.rstrip("/") + "/")) and (
            best is None or len(point) > len(best[0])
        ):
            best = (point, parts[2])
    return best[1] if best else None


def _warn_if_local(run_dir: Path, request: SlurmRequest, on_note: Callable[[str], None]) -> None:
    """A job of several nodes needs its run dir on a filesystem they all see: warn when it is on
    one that usually lives on this machine alone (it may still be shared, e.g. in a container)."""
    kind = filesystem_type(run_dir) if request.nodes > 1 else None
    if kind in _LOCAL_FILESYSTEMS:
        on_note(
            f"warning: the run dir {run_dir} is on a filesystem of type {kind}, which is usually local to one "
            f"machine; the {request.nodes} nodes of the job must all see it (the ranks meet through it and "
            "rank 0 writes the checkpoints there). Use a path on the cluster's shared filesystem "
            "(NFS, Lustre, GPFS, ...) for --run-dir"
        )


def submit_pretrain(
    recipe: str | Path | Recipe,
    *,
    overrides: list[str] | None = None,
    slurm_options: Mapping[str, Any] | None = None,
    run_dir: str | Path | None = None,
    force: bool = False,
    dry_run: bool = False,
    on_demo_progress: Callable[[int, int], None] | None = None,
    on_note: Callable[[str], None] = lambda _: None,
    on_script: Callable[[str], None] = print,
) -> submitit.Job | None:
    """Train `recipe` (a recipe file, or a `Recipe`) with `overrides` (`KEY=VALUE`, as `--set`
    takes them) as one SLURM job asking for what the recipe's `slurm` section says, with
    `slurm_options` (SlurmConfig fields: nodes, gpus_per_node, partition, time, ...) applied.
    Checks everything, creates the run dir (default runs/RECIPE-TIME) and returns the submitted
    `submitit.Job`. With `dry_run`, checks what can be checked without writing, hands what
    would be submitted to `on_script` and returns None. Bad input raises a FlslError."""
    source = str(recipe) if not isinstance(recipe, Recipe) else "<recipe object>"
    if isinstance(recipe, Recipe):
        recipe_path: str | Path = "recipe.yaml"  # names the default run dir: runs/recipe-TIME
        recipe = validate_recipe(apply_overrides(recipe_to_dict(recipe), overrides or [], source=source), source=source)
    else:
        recipe_path = recipe
        recipe = load_recipe(recipe_path, overrides=overrides or [])
    slurm_options = slurm_options or {}
    request = SlurmRequest.of(recipe.slurm, slurm_options, data_workers=recipe.data.num_workers)
    _refuse_remote_for_slurm(run_dir)
    run_dir = (Path(run_dir) if run_dir else default_run_dir(recipe_path)).absolute()
    _warn_if_local(run_dir, request, on_note)
    if dry_run:
        check_for_world(recipe, world_size=request.world_size, source=source)
        if recipe.data.demo is None or Path(recipe.data.train).expanduser().exists():
            try:
                for note in check_data(recipe, world_size=request.world_size):
                    on_note(note)
            except FlslError as exc:  # the data may only exist on the cluster: say so, still show the job
                on_note(f"warning: a real submission would stop here: {exc.describe()}")
        on_note(f"dry run: nothing written, nothing submitted; the job would train {run_dir} with {request.describe()}")
        on_script(dry_run_text(request, run_dir=run_dir))
        return None
    require_sbatch()
    existed = run_dir.exists()
    prepare_new(
        recipe,
        source=source,
        run_dir=run_dir,
        world_size=request.world_size,
        force=force,
        on_demo_progress=on_demo_progress,
        on_note=on_note,
    )
    try:
        return _submit(request, run_dir=run_dir)
    except FlslError:
        remove_unsubmitted(run_dir, existed=existed)
        raise


def submit_resume(
    run_dir: str | Path,
    *,
    overrides: list[str] | None = None,
    slurm_options: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    options: ResumeOptions | None = None,
    on_note: Callable[[str], None] = lambda _: None,
    on_script: Callable[[str], None] = print,
) -> submitit.Job | None:
    """The checks of `flsl resume`, then one job that continues the run."""
    _refuse_remote_for_slurm(run_dir)
    run_dir = Path(run_dir).absolute()
    slurm_options = slurm_options or {}
    requests: dict[str, SlurmRequest] = {}

    def world_size_of(recipe: Recipe) -> int:
        requests["slurm"] = SlurmRequest.of(recipe.slurm, slurm_options, data_workers=recipe.data.num_workers)
        return requests["slurm"].world_size

    refuse_file_as_run_dir(run_dir)
    if not dry_run:
        read_run(run_dir)
        require_sbatch()
    recipe, _, step, changed = check_resume(
        run_dir,
        overrides=overrides or [],
        world_size_of=world_size_of,
        on_note=on_note,
        note_skipped=True,
        options=options,
        dry_run=dry_run,
    )
    request = requests["slurm"]
    _warn_if_local(run_dir, request, on_note)
    start = "from step 0 (it has no checkpoint yet)" if step is None else f"from step {step}"
    if dry_run:
        on_note(
            f"dry run: nothing written, nothing submitted; the job would resume {run_dir} {start} "
            f"with {request.describe()}"
        )
        on_script(dry_run_text(request, run_dir=run_dir))
        return None
    saved_text, _ = read_run(run_dir)
    save_changed_recipe(run_dir, recipe, changed, on_note)  # before submitting: the job reads it
    try:
        job = _submit(request, run_dir=run_dir)
    except FlslError:
        if changed:
            write_text_atomic(run_dir / RECIPE_NAME, saved_text)
        raise
    on_note(f"the job resumes {run_dir} {start}")
    return job


def _submit(request: SlurmRequest, *, run_dir: Path) -> submitit.Job:
    """Submit the job and record it in run.json; run.json is left as it was when SLURM refuses."""
    before = mark_submitting(run_dir, request)
    try:
        job = submit(request, run_dir=run_dir)
    except FlslError:
        write_record(run_dir, before)
        raise
    mark_submitted(run_dir, job_id=job.job_id)
    return job


def mark_submitting(run_dir: Path, request: SlurmRequest) -> RunRecord:
    """run.json says a job is being submitted for the run; returns the record as it was, to
    write back (`write_record`) when SLURM refuses the job."""
    before = load_record(run_dir)
    with update_record(run_dir) as record:
        record.submitting(slurm=request.record())
    return before


def mark_submitted(run_dir: Path, *, job_id: str) -> None:
    """The job SLURM accepted owns the run and is its newest in run.json."""
    with update_record(run_dir) as record:
        record.claimed(Owner.slurm_job(job_id))
        record.submitted(job_id=job_id)
