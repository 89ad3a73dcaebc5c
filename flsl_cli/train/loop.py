"""The training loop of one process: build everything, (re)load state, step, log, checkpoint.

`train_process` is what every process runs, whether it was started in this process, by
`flsl --devices N`, by torchrun or by SLURM. Only rank 0 prints and writes files.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from rich.markup import escape
from torch.nn.parallel import DistributedDataParallel

from flsl_cli import signals, storage
from flsl_cli.checkpoint.store import (
    CHECKPOINTS_DIR,
    DAMAGED_SUFFIX,
    checkpoint_dir,
    list_checkpoints,
    newest_valid,
    save_checkpoint,
    set_aside_newer,
)
from flsl_cli.config.load import validate_recipe
from flsl_cli.config.schema import Recipe
from flsl_cli.data.augment import MultiCropAugment
from flsl_cli.data.device_views import device_views_for
from flsl_cli.data.health import DataHealth
from flsl_cli.data.shards import resolve_shards
from flsl_cli.data.stream import TrainStream, build_loader, iterate, plan_layout, worker_failure
from flsl_cli.distributed import env as dist_env
from flsl_cli.distributed import group
from flsl_cli.distributed.ops import all_reduce_sum, barrier, gather_objects
from flsl_cli.errors import DataError, FlslError, RunStopped, TrainingDiverged
from flsl_cli.eval.api import evaluate_during_training
from flsl_cli.eval.backbones import random_init_backbone
from flsl_cli.eval.davis.api import evaluate_davis_during_training
from flsl_cli.eval.report import comparison_table
from flsl_cli.models.flsl import build_student_teacher
from flsl_cli.train import remote
from flsl_cli.train.metrics import BAD_SAMPLES_NAME, JsonlWriter
from flsl_cli.train.optim import build_optimizer
from flsl_cli.train.progress import TrainProgress, summary_table
from flsl_cli.train.run_record import update_record
from flsl_cli.train.rundir import METRICS_NAME, RECIPE_NAME, record_resume, truncate_metrics
from flsl_cli.train.runlog import run_logging
from flsl_cli.train.schedules import Schedules
from flsl_cli.train.state import checkpoint_payload, restore
from flsl_cli.train.step import NonFiniteLoss, StepRunner, StudentObjective, autocast_dtype, compile_backbones
from flsl_cli.train.tensorboard import MetricsLog, open_metrics_log


def build_runner(
    recipe: Recipe, *, device: torch.device, rank: int, world_size: int, steps_per_epoch: int
) -> StepRunner:
    """Networks, optimizer and scaler for a run, with DDP applied from outside when needed."""
    torch.manual_seed(recipe.optim.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (EMA, loss)
        torch.backends.cudnn.allow_tf32 = True
    student, teacher = build_student_teacher(recipe)
    student.to(device)
    teacher.to(device)
    if recipe.optim.compile:
        compile_backbones(student, teacher)
    objective: torch.nn.Module = StudentObjective(student, recipe=recipe)
    if world_size > 1:
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(student, config=recipe.optim, device=device)
    fp16 = autocast_dtype(recipe.optim.precision, device) == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    return StepRunner(
        recipe=recipe,
        schedules=Schedules(recipe=recipe, steps_per_epoch=steps_per_epoch),
        student=student,
        teacher=teacher,
        objective=objective,
        optimizer=optimizer,
        scaler=scaler,
        device=device,
        rank=rank,
    )


def train_process(*, recipe_data: dict, source: str, run_dir: str, resume: bool, show_progress: bool = True) -> None:
    """Train (or continue) the run in `run_dir`; every process of the job calls this. Stop
    signals are taken from the start: one that arrives before the first step stops the run
    there (see `flsl_cli.signals`)."""
    signals.stop_request()
    timeout = float((recipe_data.get("slurm") or {}).get("collective_timeout_minutes") or group.DEFAULT_TIMEOUT_MINUTES)
    env = group.setup(timeout_minutes=timeout)
    mirror = None
    try:
        if remote.is_remote(run_dir):
            staging = remote.staging_dir(run_dir, role=f"rank{env.rank}")
            mirror, run_dir = run_dir, str(staging)
            remote.pull(mirror, staging, rank=env.rank, newest_checkpoint=resume)
            if env.is_main:
                remote.remove_cut_uploads(mirror)
        try:
            with run_logging(Path(run_dir), rank=env.rank):
                session = TrainSession(
                    env,
                    recipe_data=recipe_data,
                    source=source,
                    run_dir=Path(run_dir),
                    resume=resume,
                    show_progress=show_progress,
                    mirror=mirror,
                )
                session.run()
        except BaseException:
            if mirror:  # the log tells what went wrong: pushed if the storage lets it
                _try(lambda: remote.push_log(Path(run_dir), mirror, rank=env.rank))
            raise
        if mirror:  # everything is pushed; on failure the staging copy stays for inspection
            remote.push_log(Path(run_dir), mirror, rank=env.rank)
            shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        group.teardown()


class TrainSession:
    """One process's share of a run: its networks, data stream and logs, and the step it is at.

    `run` trains to the stop step: after every step it accounts for bad samples, logs, honours
    an agreed stop request (save, then raise RunStopped), evaluates at epoch ends when the
    recipe asks, and checkpoints on schedule. Whatever ends the run, run.json says where it
    stands (and the error that ended it) and, for a remote run dir, everything written is
    pushed to the mirror.
    """

    def __init__(
        self,
        env: group.DistEnv,
        *,
        recipe_data: dict,
        source: str,
        run_dir: Path,
        resume: bool,
        show_progress: bool,
        mirror: str | None = None,
    ) -> None:
        self.env, self.run_dir, self.mirror, self.show_progress = env, run_dir, mirror, show_progress
        self.recipe = recipe = validate_recipe(recipe_data, source=source)
        self.recipe_yaml = (run_dir / RECIPE_NAME).read_text()
        shards = resolve_shards(recipe.data.train)
        self.layout, notes = plan_layout(
            shards,
            world_size=env.world_size,
            num_workers=recipe.data.num_workers,
            local_batch=recipe.optim.global_batch_size // env.world_size,
        )
        if env.device.type == "cpu":
            torch.set_num_threads(dist_env.cpu_threads(data_workers=self.layout.loader_workers))
        self.device_views = device_views_for(recipe, device=env.device, source=source)
        self.runner = build_runner(
            recipe,
            device=env.device,
            rank=env.rank,
            world_size=env.world_size,
            steps_per_epoch=self.layout.steps_per_epoch,
        )
        self.total_steps = self.runner.schedules.total_steps
        self.stop_at = min(self.total_steps, recipe.optim.max_steps or self.total_steps)
        self.health = DataHealth(max_bad_fraction=recipe.data.max_bad_fraction)
        self.notes = list(notes)
        self.step = self.start_step = 0
        self.last_saved: int | None = None
        if resume:
            self._restore_newest()

        self.stream = TrainStream(
            shards,
            layout=self.layout,
            rank=env.rank,
            seed=recipe.optim.seed,
            shuffle_buffer=recipe.data.shuffle_buffer,
            augment=MultiCropAugment(recipe),
        )
        self.loader = build_loader(self.stream, pin_memory=env.device.type == "cuda")
        self.progress = TrainProgress(
            total_steps=self.stop_at,
            start_step=self.start_step,
            epochs=recipe.optim.epochs,
            steps_per_epoch=self.layout.steps_per_epoch,
            enabled=env.is_main and show_progress,
            log_every=recipe.logging.every_steps,
        )
        for note in self.notes:
            self.progress.note(f"[yellow]note:[/] {escape(note)}")
        self.metrics = open_metrics_log(run_dir, recipe=recipe, start_step=self.start_step) if env.is_main else None
        self.bad_log = JsonlWriter(run_dir, name=BAD_SAMPLES_NAME) if env.is_main else None
        self.values: dict[str, float] = {}
        self.last_save_time = self.window_start = time.monotonic()
        self.window_images = 0

    def _restore_newest(self) -> None:
        ref, payload = newest_valid(
            self.run_dir, on_skip=lambda r, why: self.notes.append(f"skipping damaged checkpoint {r.path.name}: {why}")
        )
        restore(self.runner, payload)
        self.step = self.start_step = self.last_saved = int(payload["step"])
        self.health.add(**payload.get("data_health", {"seen": 0, "bad": 0}))
        saved, layout = payload.get("layout", {}), self.layout
        if saved.get("world_size") != layout.world_size or saved.get("workers") != layout.workers:
            self.notes.append(
                f"resuming with {layout.world_size} process(es) x {layout.workers} worker(s) instead of "
                f"{saved.get('world_size')} x {saved.get('workers')}: the data order from here on differs "
                "from an uninterrupted run"
            )
        self.notes.append(f"resumed from {ref.path} (step {self.start_step})")
        if self.env.is_main:
            # This process owns the run dir: a temporary file there is what a killed writer left.
            for leftover in storage.leftover_temp_files(checkpoint_dir(self.run_dir)):
                leftover.unlink(missing_ok=True)
                self.notes.append(f"removed {leftover.name}, left by a checkpoint write that was cut off")
            for name in set_aside_newer(self.run_dir, step=self.start_step):
                remote = " (the remote copy is removed)" if self.mirror else ""
                self.notes.append(
                    f"set the damaged {name} aside as {name}{DAMAGED_SUFFIX}: "
                    f"it no longer counts among checkpoint.keep_last{remote}"
                )
            truncate_metrics(self.run_dir, after_step=self.start_step)
            truncate_metrics(self.run_dir, after_step=self.start_step, name=BAD_SAMPLES_NAME)
            record_resume(self.run_dir, step=self.start_step)

    def run(self) -> None:
        env, run_dir = self.env, self.run_dir
        if env.is_main:
            with update_record(run_dir) as record:
                record.running(world_size=env.world_size)
        self.runner.stop_request = signals.stop_request()
        started = time.monotonic()
        comparison = None
        try:
            try:
                self._stop_if_asked_before_training()
                while self.step < self.stop_at:
                    self._run_epoch()
                if self.last_saved != self.step:
                    self.save()
                barrier()
                seconds = time.monotonic() - started
                if self.recipe.eval.at_end:
                    comparison = self._compare_with_random_init()
            except RuntimeError as exc:  # torch reports a data worker that died at any moment
                failure = worker_failure(exc, run_dir=self.shown_as) or group.peer_lost(
                    exc, rank=env.rank, timeout_minutes=self.recipe.slurm.collective_timeout_minutes
                )
                if failure is None:
                    raise
                raise failure from None
        except RunStopped as exc:
            self.progress.close()
            if env.is_main:
                with update_record(run_dir) as record:
                    record.stopped(step=self.step, resumable_from=self.last_saved, signal=exc.signal_name)
                self.sync()
            raise
        except BaseException as exc:
            self.progress.close()
            if env.is_main:
                failed = isinstance(exc, FlslError) or not isinstance(exc, (KeyboardInterrupt, SystemExit))
                message = exc.describe() if isinstance(exc, FlslError) else f"{type(exc).__name__}: {exc}"
                with update_record(run_dir) as record:
                    if failed:
                        error = {"step": self.step, "message": message}
                        record.failed(error, step=self.step, resumable_from=self.last_saved)
                    else:
                        record.stopped(step=self.step, resumable_from=self.last_saved)
                _try(self.sync)
            raise
        finally:
            for log in (self.metrics, self.bad_log):
                if log:
                    log.close()
        self.progress.close()
        if env.is_main:
            with update_record(run_dir) as record:  # the end of the schedule, or optim.max_steps
                record.finished(step=self.step)
            self.sync()
            if self.show_progress:
                _print_summary(
                    self.progress,
                    run_dir=run_dir,
                    shown_as=self.shown_as,
                    step=self.step,
                    total=self.total_steps,
                    values=self.values,
                    seconds=seconds,
                    start_step=self.start_step,
                )
                if comparison and self.recipe.eval.knn is not None:
                    self.progress.console.print(
                        comparison_table(comparison, step=self.step, settings=self.recipe.eval.knn)
                    )

    def _compare_with_random_init(self) -> dict[str, dict[str, float]]:
        """The k-NN figures of the teacher and of a random init (every rank takes part); rank 0
        logs them to metrics.jsonl (and so to `flsl plot`) as the step's `final` row."""
        settings = self.recipe.eval.knn
        assert settings is not None, "eval.at_end is validated to come with eval.knn"
        teacher = evaluate_during_training(
            backbone=self.runner.teacher.backbone, settings=settings, device=self.env.device
        )
        random_backbone = random_init_backbone(self.recipe).to(self.env.device)
        baseline = evaluate_during_training(backbone=random_backbone, settings=settings, device=self.env.device)
        if self.metrics:
            self.metrics.write(
                {
                    "step": self.step,
                    "epoch": self.step / self.layout.steps_per_epoch,
                    "final": True,
                    **teacher,
                    **{f"random_init_{key}": value for key, value in baseline.items()},
                }
            )
        return {"teacher": teacher, "random_init": baseline}

    @property
    def shown_as(self) -> str:
        """The run dir as the user named it (the mirror URL for a remote one)."""
        return self.mirror or str(self.run_dir)

    def _stop_if_asked_before_training(self) -> None:
        """A stop signal that came while the run was starting (before the loop, and while the
        data workers start and fetch the first batch) ends it here, on every rank alike: there is
        nothing new to save."""
        assert self.runner.stop_request is not None, "the session installs the stop request"
        asked = float(self.runner.stop_request.requested)
        if self.env.world_size > 1:
            asked = float(all_reduce_sum(torch.tensor([asked], device=self.env.device)).item())
        if asked:
            kept = (
                f"the run stays resumable from step {self.last_saved}"
                if self.last_saved is not None
                else "nothing was trained, so there is nothing to save"
            )
            raise self._stop_error(f"before its first step; {kept}")

    def _stop_error(self, when: str) -> RunStopped:
        """A run without a checkpoint resumes too: from step 0, with its saved recipe."""
        assert self.runner.stop_request is not None, "the session installs the stop request"
        name = self.runner.stop_request.signal_name or "a stop request on another process"
        return RunStopped(
            f"stopped by {name} {when}",
            step=self.step,
            signal_name=name,
            fix=f"Continue with `flsl resume {self.shown_as}`",
        )

    def _run_epoch(self) -> None:
        """The rest of the current epoch, or up to the stop step."""
        steps_per_epoch = self.layout.steps_per_epoch
        epoch, in_epoch = divmod(self.step, steps_per_epoch)
        self.stream.set_epoch(epoch, skip_batches=in_epoch)
        for batch in iterate(self.loader):
            if self.step == self.start_step:  # the data workers have just started: a stop meanwhile ends it here
                self._stop_if_asked_before_training()
            self._train_step(batch)
            if self.step >= self.stop_at or self.step % steps_per_epoch == 0:
                break

    def _train_step(self, batch: dict) -> None:
        recipe, layout, runner = self.recipe, self.layout, self.runner
        if self.device_views:
            batch = self.device_views(batch)
        reports = batch.pop("bad", [])
        lost = sum(r["samples"] for r in reports if r["kind"] == "shard")
        counters = {"seen": layout.local_batch + lost, "bad": sum(r["samples"] for r in reports)}
        try:
            self.values = runner.run(batch, step=self.step, counters=counters)
        except NonFiniteLoss as exc:
            raise _diverged(self.step, exc.values, last_saved=self.last_saved, run_dir=self.run_dir) from None
        self.step += 1
        try:
            self._account_bad_samples(reports)
        except DataError:
            self.save()  # the step itself trained fine: keep it
            barrier()  # no rank ends (and has the others ended) before rank 0 has written it
            raise
        self._log()
        if runner.stop_agreed and self.step < self.stop_at:  # on the last step the run just ends
            raise self._stopped()
        if self.step % layout.steps_per_epoch == 0 and _eval_due(recipe, epoch=self.step // layout.steps_per_epoch):
            _evaluate(
                runner,
                recipe=recipe,
                env=self.env,
                step=self.step,
                epoch=self.step / layout.steps_per_epoch,
                metrics=self.metrics,
                progress=self.progress,
            )
        if _due(recipe, step=self.step, last_save_time=self.last_save_time) and self.step < self.stop_at:
            self.save()

    def _log(self) -> None:
        """The progress line every step; a metrics.jsonl row every logging.every_steps and at the end."""
        self.window_images += self.recipe.optim.global_batch_size
        elapsed = time.monotonic() - self.window_start
        rate = self.window_images / elapsed if elapsed > 0 else 0.0
        self.progress.update(step=self.step, values=self.values, images_per_s=rate)
        if self.metrics and (self.step % self.recipe.logging.every_steps == 0 or self.step == self.stop_at):
            self.metrics.write(
                {
                    "step": self.step,
                    "epoch": self.step / self.layout.steps_per_epoch,
                    **{k: round(v, 8) for k, v in self.values.items()},
                    "images_per_s": round(rate, 2),
                    "seen": self.health.seen,
                    "bad": self.health.bad,
                }
            )
            self.window_start, self.window_images = time.monotonic(), 0

    def _account_bad_samples(self, reports: list[dict]) -> None:
        """Log every rank's bad samples (rank 0 writes) and stop when there were too many."""
        health, totals = self.health, self.runner.totals
        assert totals is not None, "set by the step just taken"
        health.add(seen=totals["seen"], bad=totals["bad"])
        if totals["bad"] > 0:
            everything = gather_objects(reports)
            if self.bad_log:
                for report in everything:
                    self.bad_log.write({"step": self.step, **report})
        if health.exceeded():
            raise DataError(
                f"{health.bad} of {health.seen} samples seen so far were bad ({health.fraction:.2%}), more than "
                f"data.max_bad_fraction ({health.max_bad_fraction:.2%}); see {self.run_dir}/{BAD_SAMPLES_NAME} "
                "for each shard, key and reason",
                where=str(self.run_dir),
                fix="Repair or regenerate the listed shards, or raise data.max_bad_fraction, then `flsl resume`",
            )

    def _stopped(self) -> RunStopped:
        """Save the step every rank has just finished, then report the stop."""
        if self.last_saved != self.step:
            self.save()
        barrier()
        return self._stop_error(
            f"after step {self.step}; its checkpoint is saved in {storage.join(self.shown_as, CHECKPOINTS_DIR)}"
        )

    def save(self) -> None:
        """Checkpoint the current step (rank 0 writes; every rank records it)."""
        if self.env.is_main:
            save_checkpoint(
                self.run_dir,
                step=self.step,
                keep_last=self.recipe.checkpoint.keep_last,
                payload=checkpoint_payload(
                    self.runner, step=self.step, layout=self.layout, recipe_yaml=self.recipe_yaml, health=self.health
                ),
            )
            self.sync()
        self.last_saved, self.last_save_time = self.step, time.monotonic()

    def sync(self) -> None:
        """Push the staging copy of a remote run dir to its mirror (rank 0)."""
        if self.mirror and self.env.is_main:
            for log in (self.metrics, self.bad_log):
                if log:
                    log.flush()
            remote.push(self.run_dir, self.mirror)


def _try(action) -> None:
    """Best effort while another error is already on its way to the user."""
    try:
        action()
    except Exception:  # noqa: BLE001 - best effort: the error already raised is the one to report
        pass


def _eval_due(recipe: Recipe, *, epoch: int) -> bool:
    every = recipe.eval.every_epochs
    if not every or (recipe.eval.knn is None and recipe.eval.davis is None):
        return False
    return epoch % every == 0


def _evaluate(
    runner: StepRunner,
    *,
    recipe: Recipe,
    env: group.DistEnv,
    step: int,
    epoch: float,
    metrics: MetricsLog | None,
    progress: TrainProgress,
) -> None:
    """The evaluations of the teacher's backbone (k-NN, DAVIS) on every rank; rank 0 logs them."""
    results = {}
    if recipe.eval.knn is not None:
        results.update(
            evaluate_during_training(backbone=runner.teacher.backbone, settings=recipe.eval.knn, device=env.device)
        )
    if recipe.eval.davis is not None:
        results.update(
            evaluate_davis_during_training(
                backbone=runner.teacher.backbone, settings=recipe.eval.davis, device=env.device
            )
        )
    if metrics:
        metrics.write({"step": step, "epoch": epoch, **{k: round(v, 4) for k, v in results.items()}})
    shown = ", ".join(f"{k} {v:.1f}" for k, v in results.items() if "top1" in k or k == "davis_JF_mean")
    progress.note(f"[cyan]evaluation at epoch {epoch:.0f}:[/] {shown}")


def _due(recipe: Recipe, *, step: int, last_save_time: float) -> bool:
    every_steps = recipe.checkpoint.every_steps
    every_minutes = recipe.checkpoint.every_minutes
    if every_steps and step % every_steps == 0:
        return True
    if not every_minutes:
        return False
    return time.monotonic() - last_save_time >= every_minutes * 60


def _diverged(step: int, values: dict[str, float], *, last_saved: int | None, run_dir: Path) -> TrainingDiverged:
    terms = ", ".join(f"{name} = {value}" for name, value in values.items())
    kept = (
        f"The last good checkpoint (step {last_saved}) in {checkpoint_dir(run_dir)} is intact"
        if last_saved is not None
        else "No checkpoint had been written yet"
    )
    return TrainingDiverged(
        f"the loss became non-finite at step {step + 1} ({terms}); training stopped. {kept}",
        fix="Lower optim.base_lr or optim.clip_grad, check loss.sa_scale/ca_scale, then `flsl resume` (or start again)",
    )


def _print_summary(
    progress: TrainProgress,
    *,
    run_dir: Path,
    shown_as: str,
    step: int,
    total: int,
    values: dict[str, float],
    seconds: float,
    start_step: int,
) -> None:
    checkpoints = list_checkpoints(run_dir)
    rows = [
        (
            "steps",
            f"{step} of {total}"
            + (f" (resumed at {start_step})" if start_step else "")
            + (" (optim.max_steps reached)" if step < total else ""),
        ),
        ("time", f"{seconds:.0f} s"),
    ]
    if values:
        rows += [
            ("final loss", f"{values['loss']:.4f}"),
            ("terms", f"L1 {values['intra']:.4f}  L2 {values['inter']:.4f}  L3 {values['volume']:.4f}"),
        ]
    rows += [
        ("run dir", shown_as),
        ("metrics", storage.join(shown_as, METRICS_NAME)),
        ("checkpoints", ", ".join(ref.path.name for ref in checkpoints) or "none"),
        ("newest", storage.join(shown_as, CHECKPOINTS_DIR, checkpoints[-1].path.name) if checkpoints else "none"),
    ]
    progress.console.print(summary_table(rows, title="flsl pretrain: done"))  # a stop on request never gets here
