"""`flsl sweep RECIPE --grid KEY=V1,V2 ...` and `flsl resume SWEEP_DIR` from Python: every member
of the grid checked as `flsl pretrain` checks a run, before anything is written; then one run
dir per member under the sweep dir and SWEEP_DIR/sweep.json, and either one SLURM job array
through submitit (one task per member, each the batch step of a single job on its own run dir:
it saves on every stop, requeues and resumes by itself) or, on this machine, the members one
after another.

    from flsl_cli.launch.sweep.start import start_sweep
    from flsl_cli.launch.sweep.grid import read_grid

    record = start_sweep("recipes/vits16_300ep.yaml", spec=read_grid(grid=["optim.base_lr=5e-4,1e-3"],
                         lists=[], from_file=None), overrides=["data.train=/data/in1k/train"],
                         sweep_dir="/shared/sweeps/lr", slurm_options={"nodes": 2, "partition": "gpu"})
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flsl_cli.config.load import check_for_world, read_recipe_file, recheck_with
from flsl_cli.config.schema import Recipe
from flsl_cli.errors import FlslError, RunStopped
from flsl_cli.launch.checks import check_data
from flsl_cli.launch.resume_guards import ResumeOptions
from flsl_cli.launch.rundir_setup import check_resume, prepare_new
from flsl_cli.launch.slurm.executor import dry_run_text, require_sbatch, submit_array
from flsl_cli.launch.slurm.queries import job_state, max_array_size
from flsl_cli.launch.slurm.request import SLURM_OPTIONS, SlurmRequest
from flsl_cli.launch.slurm.submit import mark_submitted, mark_submitting
from flsl_cli.launch.sweep.grid import (
    CheckedMember,
    GridSpec,
    SweepError,
    check_members,
    member_overrides,
    refuse_set_of_swept_keys,
    typed_spec,
)
from flsl_cli.launch.sweep.record import SweepMember, SweepRecord, read_sweep, write_sweep
from flsl_cli.train.run_record import JobStates, RunStatus, load_record, write_record
from flsl_cli.train.rundir import RUN_NAME

Note = Callable[[str], None]


def default_sweep_dir(recipe_path: str | Path) -> Path:
    return Path("runs") / f"{Path(recipe_path).stem}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"


def start_sweep(
    recipe_path: str | Path,
    *,
    spec: GridSpec,
    overrides: list[str] | None = None,
    sweep_dir: str | Path | None = None,
    slurm_options: Mapping[str, Any] | None = None,
    max_parallel: int | None = None,
    devices: int | None = None,
    dry_run: bool = False,
    on_note: Note = lambda _: None,
    on_script: Note = print,
) -> SweepRecord | None:
    """Check every member, create the sweep, and submit it as one job array (`slurm_options`
    given: SlurmConfig fields) or train its members here one after another. Returns the sweep's
    record (None after a dry run). Bad input raises a FlslError and leaves nothing behind."""
    overrides = list(overrides or [])
    refuse_set_of_swept_keys(spec, overrides)
    target = (Path(sweep_dir) if sweep_dir else default_sweep_dir(recipe_path)).absolute()
    if target.exists():
        raise SweepError(
            "the sweep dir already exists",
            where=str(target),
            fix=f"Choose a new --sweep-dir; to continue the members of that sweep, `flsl resume {target}`",
        )
    if slurm_options is not None:
        _refuse_too_big_an_array(spec.size())
    elif max_parallel is not None:
        raise SweepError(
            "--max-parallel limits the tasks of a SLURM job array; on this machine the members run one at a time",
            fix="Leave out --max-parallel, or submit the sweep with --nodes N",
        )
    source = str(recipe_path)
    with recheck_with(recipe_path, overrides):
        members = check_members(read_recipe_file(recipe_path), spec=spec, overrides=overrides, source=source)
    spec = typed_spec(spec, members)
    if slurm_options is None:
        return _sweep_here(
            recipe_path, spec=spec, members=members, overrides=overrides, sweep_dir=target, devices=devices,
            dry_run=dry_run, on_note=on_note,
        )  # fmt: skip
    request = _one_request(members, slurm_options)
    _check_for_processes(members, world_size=request.world_size, source=source)
    record = SweepRecord(
        recipe=source,
        grid=spec.grid,
        together=spec.together,
        overrides=overrides,
        scheduler="slurm",
        members=[SweepMember(name=m.name, values=m.values, run_dir=m.name) for m in members],
        slurm=request.record(),
        max_parallel=max_parallel,
    )
    if dry_run:
        on_note(
            f"dry run: nothing written, nothing submitted; the sweep would train {len(members)} member(s) under "
            f"{target} as one job array, each task {request.describe()}"
            + (f", at most {max_parallel} at once" if max_parallel else "")
        )
        _note_members(members, on_note)
        on_script(dry_run_text(request, run_dir=target, array=len(members), max_parallel=max_parallel))
        return None
    require_sbatch()
    try:
        for member in members:
            prepare_new(
                member.recipe,
                source=source,
                run_dir=target / member.name,
                world_size=request.world_size,
                force=False,
                on_demo_progress=None,
                on_note=lambda _: None,
            )
        write_sweep(target, record)
        _submit_members(record, sweep_dir=target, names=[m.name for m in members], request=request)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return record


def _note_members(members: list[CheckedMember], on_note: Note) -> None:
    for member in members:
        on_note(f"  {member.name}: " + ", ".join(f"{key}={value!r}" for key, value in member.values.items()))


def _refuse_too_big_an_array(members: int) -> None:
    limit = max_array_size()
    if limit is not None and members > limit:
        raise SweepError(
            f"the grid has {members} members, more than this cluster's job arrays may hold (MaxArraySize={limit}, "
            "from `scontrol show config`)",
            fix="Sweep fewer values, or split the grid into several sweeps",
        )


def _one_request(members: list[CheckedMember], slurm_options: Mapping[str, Any]) -> SlurmRequest:
    """What every task of the array asks for: one job array asks for one thing."""
    requests = {
        m.name: SlurmRequest.of(m.recipe.slurm, slurm_options, data_workers=m.recipe.data.num_workers) for m in members
    }
    first = next(iter(requests.values()))
    differ = [name for name, request in requests.items() if request != first]
    if differ:
        raise SweepError(
            f"members {', '.join(differ)} ask SLURM for other resources than member {members[0].name} "
            "(a swept slurm.* key or data.num_workers), and one job array asks for one",
            fix="Sweep those keys in separate sweeps, or set them with --set (or the SLURM options) for every member",
        )
    return first


def _check_for_processes(members: list[CheckedMember], *, world_size: int, source: str) -> None:
    """The checks of `flsl pretrain --nodes` for each member, every problem at once, each naming
    its member: the batch splits over the processes, the data can be read."""
    data_checked: dict[str, str | None] = {}
    _check_members(
        members,
        lambda recipe: check_for_world(recipe, world_size=world_size, source=source),
        lambda recipe: _check_data_once(recipe, world_size=world_size, seen=data_checked),
    )


def _check_members(members: list[CheckedMember], *checks: Callable[[Recipe], Any]) -> None:
    """Every check on every member; one SweepError with every problem, each naming the members it
    concerns (or none, when it concerns them all)."""
    problems: dict[str, list[str]] = {}
    for member in members:
        for check in checks:
            try:
                check(member.recipe)
            except FlslError as exc:
                for text in getattr(exc, "problems", None) or [exc.describe()]:
                    problems.setdefault(text, []).append(member.name)
    if problems:
        listing = "\n".join(
            f"  - {text}" if len(who) == len(members) else f"  - member {', '.join(who)}: {text}"
            for text, who in problems.items()
        )
        raise SweepError(f"{len(problems)} problem(s) in the sweep's members:\n{listing}\n")


def _check_data_once(recipe: Recipe, *, world_size: int, seen: dict[str, str | None]) -> None:
    """check_data, once for each distinct data and eval sections (the demo data, generated when
    the first run dir is created, is checked then)."""
    key = recipe.data.model_dump_json() + recipe.eval.model_dump_json() + recipe.optim.model_dump_json()
    if key in seen:
        if seen[key]:
            raise FlslError(seen[key] or "")
        return
    if recipe.data.demo is not None and not Path(recipe.data.train).expanduser().exists():
        seen[key] = None
        return
    try:
        check_data(recipe, world_size=world_size)
    except FlslError as exc:
        seen[key] = exc.describe()
        raise
    seen[key] = None


def _submit_members(record: SweepRecord, *, sweep_dir: Path, names: list[str], request: SlurmRequest) -> list[str]:
    """One job array of the members `names`; their run.json and sweep.json record the jobs.
    When SLURM refuses, each run.json is written back as it was."""
    run_dirs = [sweep_dir / record.member(name).run_dir for name in names]
    before = [mark_submitting(run_dir, request) for run_dir in run_dirs]
    try:
        jobs = submit_array(request, folder_of=sweep_dir, run_dirs=run_dirs, max_parallel=record.max_parallel)
    except FlslError:
        for run_dir, saved in zip(run_dirs, before):
            write_record(run_dir, saved)
        raise
    for run_dir, job in zip(run_dirs, jobs):
        mark_submitted(run_dir, job_id=job.job_id)
    record.submitted(array=jobs[0].job_id.split("_")[0], jobs={n: j.job_id for n, j in zip(names, jobs)})
    write_sweep(sweep_dir, record)
    return [job.job_id for job in jobs]


# --- Here, one member after another ------------------------------------------------------------


def _sweep_here(
    recipe_path: str | Path,
    *,
    spec: GridSpec,
    members: list[CheckedMember],
    overrides: list[str],
    sweep_dir: Path,
    devices: int | None,
    dry_run: bool,
    on_note: Note,
) -> SweepRecord | None:
    from flsl_cli.launch.checks import check_recipe
    from flsl_cli.launch.devices import resolve_devices

    nprocs, use_cuda = resolve_devices(devices)
    _check_members(
        members, lambda recipe: check_recipe(recipe, source=str(recipe_path), world_size=nprocs, use_cuda=use_cuda)
    )
    record = SweepRecord(
        recipe=str(recipe_path),
        grid=spec.grid,
        together=spec.together,
        overrides=overrides,
        scheduler="local",
        members=[SweepMember(name=m.name, values=m.values, run_dir=m.name) for m in members],
        devices=devices,
    )
    if dry_run:
        on_note(
            f"dry run: nothing written; the sweep would train its {len(members)} member(s) here one after another "
            f"under {sweep_dir}"
        )
        _note_members(members, on_note)
        return None
    sweep_dir.mkdir(parents=True)
    write_sweep(sweep_dir, record)
    _train_here(record, sweep_dir=sweep_dir, names=[m.name for m in members], devices=devices, on_note=on_note)
    return record


def _train_here(record: SweepRecord, *, sweep_dir: Path, names: list[str], devices: int | None, on_note: Note) -> None:
    """Each member in turn (started, or resumed when its run dir holds a run); a member that
    fails is reported and the next one starts; a stop (Ctrl-C, a stop signal) ends the sweep."""
    from flsl_cli.launch.here import resume_run, start_pretrain

    failed = []
    for index, name in enumerate(names, start=1):
        member = record.member(name)
        run_dir = record.run_dir(sweep_dir, member)
        on_note(f"member {index} of {len(names)}: {name}")
        try:
            if (run_dir / RUN_NAME).exists():
                resume_run(run_dir, overrides=[], devices=devices, on_note=on_note)
            else:
                start_pretrain(
                    record.recipe,
                    overrides=record.overrides + member_overrides(member.values),
                    run_dir=run_dir,
                    devices=devices,
                    force=False,
                    on_note=on_note,
                )
        except RunStopped:
            raise
        except FlslError as exc:
            on_note(f"member {name} failed: {exc.describe()}")
            failed.append(name)
    if failed:
        raise SweepError(
            f"{len(failed)} of {len(names)} member(s) failed: {', '.join(failed)} (their messages are above)",
            where=str(sweep_dir),
            fix=f"Fix what they report, then `flsl resume {sweep_dir}` trains the members that did not finish",
        )


# --- Resume ------------------------------------------------------------------------------------


def unfinished_members(record: SweepRecord, *, sweep_dir: Path, on_note: Note) -> list[str]:
    """The members to train again: not finished, and (SLURM) no job of theirs still queued or
    running."""
    names = []
    for member in record.members:
        run_dir = record.run_dir(sweep_dir, member)
        status = load_record(run_dir).status if (run_dir / RUN_NAME).exists() else None
        if status is RunStatus.FINISHED:
            continue
        if record.scheduler == "slurm" and member.job_ids:
            state = job_state(member.job_ids[-1])
            if state and JobStates.holds_run(state):
                on_note(f"member {member.name}: its job {member.job_ids[-1]} is {state.lower()}: left as it is")
                continue
        names.append(member.name)
    return names


def resume_sweep(
    sweep_dir: str | Path,
    *,
    overrides: list[str] | None = None,
    slurm_options: Mapping[str, Any] | None = None,
    devices: int | None = None,
    dry_run: bool = False,
    options: ResumeOptions | None = None,
    on_note: Note = lambda _: None,
    on_script: Note = print,
) -> list[str]:
    """Train again the members of the sweep that did not finish (SLURM sweeps: one new job
    array of them, asking for what the sweep's array asked for, `slurm_options` over it); returns their
    names. No member is changed: `overrides` and the ways through a run's refusals (`options`)
    are refused; they are for one member's run dir."""
    target = Path(sweep_dir).absolute()
    record = read_sweep(target)
    if overrides:
        raise SweepError(
            "--set cannot change the members of a sweep on resume (they would no longer be the grid's members)",
            where=str(target),
            fix="Leave out --set; to change one member, `flsl resume RUN_DIR --set ...` on its run dir",
        )
    given = [
        flag
        for flag, value in (
            ("--allow-schedule-change", options and options.allow_schedule_change),
            ("--adopt-checkpoint", options and options.adopt),
            ("--force", options and options.force),
        )
        if value
    ]
    if given:
        raise SweepError(
            f"{', '.join(given)} is for one run dir, not a sweep dir",
            where=str(target),
            fix=f"Give the member's run dir: `flsl resume {target}/MEMBER {' '.join(given)}` "
            f"(`flsl status {target}` lists the members)",
        )
    names = unfinished_members(record, sweep_dir=target, on_note=on_note)
    if not names:
        on_note(f"every member of {target} has finished or is still queued or running: nothing to resume")
        return []
    if record.scheduler == "local":
        if slurm_options:
            raise SweepError(
                "this sweep trains on this machine: it cannot be resumed as a SLURM job array",
                where=str(target),
                fix="Leave out the SLURM options",
            )
        if dry_run:
            on_note(f"dry run: would train {', '.join(names)} here, one after another")
            return names
        _train_here(record, sweep_dir=target, names=names, devices=devices, on_note=on_note)
        return names
    requests: dict[str, SlurmRequest] = {}
    # what the sweep's array asked for, with the SLURM options given now over it
    asked = {key: value for key, value in record.slurm.items() if key in SLURM_OPTIONS}
    asked.update({key: value for key, value in (slurm_options or {}).items() if value is not None})

    def world_size_of(recipe: Recipe) -> int:
        request = SlurmRequest.of(recipe.slurm, asked, data_workers=recipe.data.num_workers)
        requests.setdefault(request_key(request), request)
        return request.world_size

    for name in names:
        check_resume(
            record.run_dir(target, record.member(name)),
            overrides=[],
            world_size_of=world_size_of,
            on_note=on_note,
            note_skipped=True,
        )
    if len(requests) > 1:
        raise SweepError(
            "the members to resume ask SLURM for different resources, and one job array asks for one",
            where=str(target),
            fix="Resume them one by one with `flsl resume RUN_DIR --nodes N ...`",
        )
    request = next(iter(requests.values()))
    if dry_run:
        on_note(f"dry run: nothing submitted; one job array would resume {', '.join(names)}")
        on_script(dry_run_text(request, run_dir=target, array=len(names), max_parallel=record.max_parallel))
        return names
    require_sbatch()
    jobs = _submit_members(record, sweep_dir=target, names=names, request=request)
    on_note(
        f"submitted SLURM job array {record.arrays[-1]}: it resumes "
        + ", ".join(f"{name} (job {job})" for name, job in zip(names, jobs))
    )
    return names


def request_key(request: SlurmRequest) -> str:
    return repr(sorted(request.record().items()))
