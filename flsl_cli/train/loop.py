"""The training loop of one process: build everything, (re)load state, step, log, checkpoint.

`train_process` is what every process runs, whether it was started in this process, by
`flsl --devices N`, by torchrun or by SLURM. Only rank 0 prints and writes files.
"""

from __future__ import annotations

import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from flsl_cli import storage
from flsl_cli.checkpoint.store import newest_valid, save_checkpoint
from flsl_cli.config.load import validate_recipe
from flsl_cli.config.schema import Recipe
from flsl_cli.data.augment import MultiCropAugment
from flsl_cli.data.health import DataHealth
from flsl_cli.data.shards import resolve_shards
from flsl_cli.data.stream import StreamLayout, TrainStream, build_loader, plan_layout
from flsl_cli.distributed import env as dist_env
from flsl_cli.distributed.ops import barrier, gather_objects
from flsl_cli.errors import DataError, RunStopped, TrainingDiverged
from flsl_cli.models.flsl import build_student_teacher
from flsl_cli.train import remote
from flsl_cli.train.metrics import BAD_SAMPLES_NAME, JsonlWriter
from flsl_cli.train.optim import build_optimizer
from flsl_cli.train.progress import TrainProgress, summary_table
from flsl_cli.train.rundir import truncate_metrics, update_status
from flsl_cli.train.schedules import Schedules
from flsl_cli.train.signals import StopRequest
from flsl_cli.train.step import NonFiniteLoss, StepRunner, StudentObjective, autocast_dtype


def build_runner(recipe: Recipe, *, device: torch.device, rank: int, world_size: int,
                 steps_per_epoch: int) -> StepRunner:
    """Networks, optimizer and scaler for a run, with DDP applied from outside when needed."""
    torch.manual_seed(recipe.optim.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (EMA, loss)
        torch.backends.cudnn.allow_tf32 = True
    student, teacher = build_student_teacher(recipe)
    student.to(device)
    teacher.to(device)
    objective: torch.nn.Module = StudentObjective(student, recipe=recipe)
    if world_size > 1:
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(student, config=recipe.optim, device=device)
    fp16 = autocast_dtype(recipe.optim.precision, device) == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    return StepRunner(recipe=recipe, schedules=Schedules(recipe=recipe, steps_per_epoch=steps_per_epoch),
                      student=student, teacher=teacher, objective=objective, optimizer=optimizer,
                      scaler=scaler, device=device, rank=rank)


def checkpoint_payload(runner: StepRunner, *, step: int, layout: StreamLayout, recipe_yaml: str,
                       health: DataHealth) -> dict[str, Any]:
    return {
        "step": step,
        "epoch": step // layout.steps_per_epoch,
        "student": runner.student.state_dict(),
        "teacher": runner.teacher.state_dict(),
        "optimizer": runner.optimizer.state_dict(),
        "scaler": runner.scaler.state_dict(),
        "recipe_yaml": recipe_yaml,
        "layout": {"world_size": layout.world_size, "workers": layout.workers,
                   "local_batch": layout.local_batch, "steps_per_epoch": layout.steps_per_epoch},
        "rng": capture_rng(),
        "data_health": health.state(),
    }


def capture_rng() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": torch.tensor(state, dtype=torch.int64), "python_version": version,
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"].tolist()), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])


def restore(runner: StepRunner, payload: dict[str, Any]) -> None:
    runner.student.load_state_dict(payload["student"])
    runner.teacher.load_state_dict(payload["teacher"])
    runner.optimizer.load_state_dict(payload["optimizer"])
    if payload.get("scaler"):
        runner.scaler.load_state_dict(payload["scaler"])
    restore_rng(payload["rng"])


def train_process(*, recipe_data: dict, source: str, run_dir: str, resume: bool, show_progress: bool = True) -> None:
    """Train (or continue) the run in `run_dir`; every process of the job calls this."""
    env = dist_env.setup()
    mirror = None
    try:
        if remote.is_remote(run_dir):
            mirror, run_dir = run_dir, remote.staging_dir(run_dir, role=f"rank{env.rank}")
            remote.pull(mirror, run_dir, newest_checkpoint=resume)
        _train(env, recipe_data=recipe_data, source=source, run_dir=Path(run_dir), resume=resume,
               show_progress=show_progress, mirror=mirror)
        if mirror:  # everything is pushed; on failure the staging copy stays for inspection
            shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        dist_env.teardown()


def _train(env: dist_env.DistEnv, *, recipe_data: dict, source: str, run_dir: Path, resume: bool,
           show_progress: bool, mirror: str | None = None) -> None:
    recipe = validate_recipe(recipe_data, source=source)
    recipe_yaml = (run_dir / "recipe.yaml").read_text()
    shards = resolve_shards(recipe.data.train)
    layout, notes = plan_layout(shards, world_size=env.world_size, num_workers=recipe.data.num_workers,
                                local_batch=recipe.optim.global_batch_size // env.world_size)
    runner = build_runner(recipe, device=env.device, rank=env.rank, world_size=env.world_size,
                          steps_per_epoch=layout.steps_per_epoch)
    schedules = runner.schedules
    total_steps = schedules.total_steps
    stop_at = min(total_steps, recipe.optim.max_steps or total_steps)

    progress_notes = list(notes)
    health = DataHealth(max_bad_fraction=recipe.data.max_bad_fraction)
    start_step = 0
    if resume:
        ref, payload = newest_valid(run_dir, on_skip=lambda r, why: progress_notes.append(
            f"skipping damaged checkpoint {r.path.name}: {why}"))
        restore(runner, payload)
        start_step = int(payload["step"])
        health.add(**payload.get("data_health", {"seen": 0, "bad": 0}))
        saved = payload.get("layout", {})
        if saved.get("world_size") != layout.world_size or saved.get("workers") != layout.workers:
            progress_notes.append(
                f"resuming with {layout.world_size} process(es) x {layout.workers} worker(s) instead of "
                f"{saved.get('world_size')} x {saved.get('workers')}: the data order from here on differs "
                "from an uninterrupted run")
        progress_notes.append(f"resumed from {ref.path} (step {start_step})")
        if env.is_main:
            truncate_metrics(run_dir, after_step=start_step)
            truncate_metrics(run_dir, after_step=start_step, name=BAD_SAMPLES_NAME)

    stream = TrainStream(shards, layout=layout, rank=env.rank, seed=recipe.optim.seed,
                         shuffle_buffer=recipe.data.shuffle_buffer, augment=MultiCropAugment(recipe))
    loader = build_loader(stream, pin_memory=env.device.type == "cuda")

    progress = TrainProgress(total_steps=stop_at, start_step=start_step, epochs=recipe.optim.epochs,
                             steps_per_epoch=layout.steps_per_epoch, enabled=env.is_main and show_progress,
                             log_every=recipe.logging.every_steps)
    for note in progress_notes:
        progress.note(f"[yellow]note:[/] {note}")
    metrics = JsonlWriter(run_dir) if env.is_main else None
    bad_log = JsonlWriter(run_dir, name=BAD_SAMPLES_NAME) if env.is_main else None
    if env.is_main:
        update_status(run_dir, status="running", world_size=env.world_size)

    runner.stop_request = StopRequest().install([signal.SIGTERM, signal.SIGUSR2])
    step = start_step
    last_saved = start_step if resume else None
    last_save_time = time.monotonic()
    started = time.monotonic()
    window_start, window_images = time.monotonic(), 0
    values: dict[str, float] = {}

    def save(at: int) -> None:
        nonlocal last_saved, last_save_time
        if env.is_main:
            save_checkpoint(run_dir, step=at, keep_last=recipe.checkpoint.keep_last,
                            payload=checkpoint_payload(runner, step=at, layout=layout, recipe_yaml=recipe_yaml,
                                                       health=health))
            sync()
        last_saved, last_save_time = at, time.monotonic()

    def sync() -> None:
        if mirror and env.is_main:
            for log in (metrics, bad_log):
                if log:
                    log.flush()
            remote.push(run_dir, mirror)

    try:
        while step < stop_at:
            epoch, in_epoch = divmod(step, layout.steps_per_epoch)
            stream.set_epoch(epoch, skip_batches=in_epoch)
            for batch in _batches(loader):
                reports = batch.pop("bad", [])
                lost = sum(r["samples"] for r in reports if r["kind"] == "shard")
                counters = {"seen": layout.local_batch + lost, "bad": sum(r["samples"] for r in reports)}
                try:
                    values = runner.run(batch, step=step, counters=counters)
                except NonFiniteLoss as exc:
                    raise _diverged(step, exc.values, last_saved=last_saved, run_dir=run_dir) from None
                step += 1
                try:
                    _account_bad_samples(reports, step=step, totals=runner.totals, health=health, log=bad_log,
                                         run_dir=run_dir)
                except DataError:
                    save(step)  # the step itself trained fine: keep it
                    raise
                window_images += recipe.optim.global_batch_size
                elapsed = time.monotonic() - window_start
                rate = window_images / elapsed if elapsed > 0 else 0.0
                progress.update(step=step, values=values, images_per_s=rate)
                if metrics and (step % recipe.logging.every_steps == 0 or step == stop_at):
                    metrics.write({"step": step, "epoch": step / layout.steps_per_epoch,
                                   **{k: round(v, 8) for k, v in values.items()},
                                   "images_per_s": round(rate, 2)})
                    window_start, window_images = time.monotonic(), 0
                if runner.stop_agreed:
                    raise _stopped(step, runner.stop_request, save=save, last_saved=last_saved, run_dir=run_dir)
                if step % layout.steps_per_epoch == 0 and _eval_due(recipe, epoch=step // layout.steps_per_epoch):
                    _evaluate(runner, recipe=recipe, env=env, step=step, epoch=step / layout.steps_per_epoch,
                              metrics=metrics, progress=progress)
                if _due(recipe, step=step, last_save_time=last_save_time) and step < stop_at:
                    save(step)
                if step >= stop_at or step % layout.steps_per_epoch == 0:
                    break
        if last_saved != step:
            save(step)
        barrier()
    except RunStopped as exc:
        progress.close()
        if env.is_main:
            update_status(run_dir, status="stopped", stopped_at_step=step, resumable_from=step,
                          stop_signal=exc.signal_name)
            sync()
        raise
    except BaseException:
        progress.close()
        if env.is_main:
            update_status(run_dir, status="stopped", stopped_at_step=step, resumable_from=last_saved)
            _try(sync)
        raise
    finally:
        runner.stop_request.uninstall()
        for log in (metrics, bad_log):
            if log:
                log.close()
    progress.close()
    if env.is_main:
        update_status(run_dir, status="finished" if step >= total_steps else "stopped", step=step)
        sync()
        if show_progress:
            _print_summary(progress, run_dir=run_dir, shown_as=mirror or str(run_dir), step=step, total=total_steps,
                           values=values, seconds=time.monotonic() - started, start_step=start_step)


def _try(action) -> None:
    """Best effort while another error is already on its way to the user."""
    try:
        action()
    except Exception:  # noqa: BLE001
        pass


def _batches(loader):
    """Iterate the loader, turning errors raised in its worker processes back into user errors."""
    try:
        yield from loader
    except Exception as exc:  # noqa: BLE001 - a worker's error arrives with its traceback as text
        text = str(exc).strip().splitlines()
        last = text[-1] if text else ""
        if "flsl_cli.errors." in last:
            raise DataError(last.split(": ", 1)[-1]) from None
        raise


def _account_bad_samples(reports: list[dict], *, step: int, totals: dict[str, float], health: DataHealth,
                         log: JsonlWriter | None, run_dir: Path) -> None:
    """Log every rank's bad samples (rank 0 writes) and stop when there were too many."""
    health.add(seen=totals["seen"], bad=totals["bad"])
    if totals["bad"] > 0:
        everything = gather_objects(reports)
        if log:
            for report in everything:
                log.write({"step": step, **report})
    if health.exceeded():
        raise DataError(
            f"{health.bad} of {health.seen} samples seen so far were bad ({health.fraction:.2%}), more than "
            f"data.max_bad_fraction ({health.max_bad_fraction:.2%}); see {run_dir}/{BAD_SAMPLES_NAME} "
            "for each shard, key and reason",
            where=str(run_dir),
            fix="Repair or regenerate the listed shards, or raise data.max_bad_fraction, then `flsl resume`",
        )


def _stopped(step: int, request: StopRequest, *, save, last_saved: int | None, run_dir: Path) -> RunStopped:
    """Save the step every rank has just finished, then report the stop."""
    if last_saved != step:
        save(step)
    barrier()
    name = request.signal_name or "a stop request on another process"
    return RunStopped(
        f"stopped by {name} after step {step}; its checkpoint is saved in {run_dir}/checkpoints",
        step=step, signal_name=name, fix=f"Continue with `flsl resume {run_dir}`",
    )


def _eval_due(recipe: Recipe, *, epoch: int) -> bool:
    every = recipe.eval.every_epochs
    return bool(every) and recipe.eval.knn is not None and epoch % every == 0


def _evaluate(runner: StepRunner, *, recipe: Recipe, env: dist_env.DistEnv, step: int, epoch: float,
              metrics: JsonlWriter | None, progress: TrainProgress) -> None:
    """The k-NN evaluation of the teacher's backbone on every rank; rank 0 logs it."""
    from flsl_cli.eval.api import evaluate_during_training

    results = evaluate_during_training(backbone=runner.teacher.backbone, settings=recipe.eval.knn.model_dump(),
                                       device=env.device)
    if metrics:
        metrics.write({"step": step, "epoch": epoch, **{k: round(v, 4) for k, v in results.items()}})
    shown = ", ".join(f"{k} {v:.1f}" for k, v in results.items() if "top1" in k)
    progress.note(f"[cyan]k-NN at epoch {epoch:.0f}:[/] {shown}")


def _due(recipe: Recipe, *, step: int, last_save_time: float) -> bool:
    every_steps = recipe.checkpoint.every_steps
    every_minutes = recipe.checkpoint.every_minutes
    if every_steps and step % every_steps == 0:
        return True
    return bool(every_minutes) and time.monotonic() - last_save_time >= every_minutes * 60


def _diverged(step: int, values: dict[str, float], *, last_saved: int | None, run_dir: Path) -> TrainingDiverged:
    terms = ", ".join(f"{name} = {value}" for name, value in values.items())
    kept = (f"The last good checkpoint (step {last_saved}) in {run_dir}/checkpoints is intact"
            if last_saved is not None else "No checkpoint had been written yet")
    return TrainingDiverged(
        f"the loss became non-finite at step {step + 1} ({terms}); training stopped. {kept}",
        fix="Lower optim.base_lr or optim.clip_grad, check loss.sa_scale/ca_scale, "
            "then `flsl resume` (or start again)",
    )


def _print_summary(progress: TrainProgress, *, run_dir: Path, shown_as: str, step: int, total: int,
                   values: dict[str, float], seconds: float, start_step: int) -> None:
    from flsl_cli.checkpoint.store import list_checkpoints

    checkpoints = list_checkpoints(run_dir)
    rows = [
        ("steps", f"{step} of {total}" + (f" (resumed at {start_step})" if start_step else "")),
        ("time", f"{seconds:.0f} s"),
    ]
    if values:
        rows += [("final loss", f"{values['loss']:.4f}"),
                 ("terms", f"L1 {values['intra']:.4f}  L2 {values['inter']:.4f}  L3 {values['volume']:.4f}")]
    rows += [
        ("run dir", shown_as),
        ("metrics", storage.join(shown_as, "metrics.jsonl")),
        ("checkpoints", ", ".join(ref.path.name for ref in checkpoints) or "none"),
        ("newest", storage.join(shown_as, "checkpoints", checkpoints[-1].path.name) if checkpoints else "none"),
    ]
    progress.console.print(summary_table(rows, title="flsl pretrain: done" if step >= total else "flsl pretrain: stopped"))
