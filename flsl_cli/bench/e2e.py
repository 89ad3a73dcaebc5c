"""`flsl bench e2e`: training throughput from shards against the step alone, in one run.

One `StepRunner`, built by `build_runner` as `flsl pretrain` builds it, is timed twice in this
process:

* step alone: on a synthetic batch already resident on the device (`flsl bench step`'s batch
  and timing), so no data loading is included; timed in two turns, before and after the other;
* end to end: on batches from the shards, read by `build_loader`'s data workers and taken
  through `iterate` as the training loop takes them, with the views made where `--device`
  says: `cpu` (PIL in the workers, step on the CPU), `tensor-cpu` (the workers draw only the
  plan; the training process decodes and makes the views with tensor ops on the CPU) or `cuda`
  (the same on the GPU, which also runs the step). Epoch ends inside the timed steps restart
  the workers, as they do in training.

The ratio of the two is how much of the step's speed the data path keeps. The CPU time a data
worker spends per image is measured as `flsl bench data --device` measures it (one reader in
this process, one torch thread; `view_cost.worker_cpu_by_path`), for the PIL path and, when
the views are made in the training process, for that path too, with their ratio.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flsl_cli.bench.step import machine_info, resolve_device, sync_device, synthetic_batch, timed_turn, warm_up
from flsl_cli.bench.view_cost import VIEW_COST_IMAGES, with_view_device, worker_cpu_by_path
from flsl_cli.config.schema import Recipe
from flsl_cli.data.augment import MultiCropAugment
from flsl_cli.data.device_views import DeviceViews, device_views_for
from flsl_cli.data.shards import resolve_shards
from flsl_cli.data.stream import StreamLayout, TrainStream, build_loader, iterate, plan_layout
from flsl_cli.distributed.env import cpu_threads
from flsl_cli.errors import FlslError
from flsl_cli.train.loop import build_runner
from flsl_cli.train.step import StepRunner

NOTE = (
    "Both figures come from the same networks and step in one invocation: the step alone on a synthetic batch "
    "resident on the device, timed in two turns before and after the step fed from the shards by the data "
    "workers; the first steps (warm-up, and the workers' start) are not timed."
)
SCHEDULE_STEPS = 1_000_000  # schedules long enough for any bench; their values do not change the speed


@dataclass(frozen=True)
class E2EBenchSettings:
    data: str
    steps: int = 20
    warmup: int = 3
    batch: int | None = None  # None: the recipe's global batch, at most 64 (one GPU's share in the paper)
    device: str | None = None  # cpu | tensor-cpu | cuda; None: cuda when torch sees a GPU, else augment.device
    workers: int | None = None  # None: the recipe's data.num_workers
    worker_images: int = VIEW_COST_IMAGES


def view_device_for(recipe: Recipe, asked: str | None) -> str:
    """Where the views are made (`augment.device`); the step runs on the GPU only for `cuda`."""
    view_device = asked or ("cuda" if torch.cuda.is_available() else recipe.augment.device)
    if view_device == "cuda" and not torch.cuda.is_available():
        named = "--device cuda" if asked else "the recipe's augment.device: cuda"
        raise FlslError(
            f"{named} makes the views and runs the step on a CUDA GPU, but torch sees none",
            where="--device",
            fix="Run on a machine with a GPU, or pass --device cpu or --device tensor-cpu",
        )
    return view_device


def bench_recipe(recipe: Recipe, *, data: str, view_device: str, images: int, workers: int | None) -> Recipe:
    """The recipe as the bench trains it: its data, view device, batch and workers."""
    data_update = {"train": data} if workers is None else {"train": data, "num_workers": workers}
    data_config = recipe.data.model_copy(update=data_update)
    optim = recipe.optim.model_copy(update={"global_batch_size": images})
    return with_view_device(recipe, view_device).model_copy(update={"data": data_config, "optim": optim})


def timed_from_shards(
    runner: StepRunner, stream: TrainStream, *, views: DeviceViews | None, steps: int, warmup: int, first_step: int
) -> dict:
    """`warmup` untimed then `steps` timed training steps on the stream's batches, epoch after
    epoch, as the training loop takes them."""
    device = runner.device
    loader = build_loader(stream, pin_memory=device.type == "cuda")
    done, epoch, start, bad, epochs_timed = 0, 0, 0.0, 0, 0
    while done < warmup + steps:
        stream.set_epoch(epoch)
        batches = iterate(loader)
        for batch in batches:
            if done == warmup:
                sync_device(device)
                start = time.perf_counter()
            if views is not None:
                batch = views(batch)
            bad += sum(report["samples"] for report in batch.pop("bad", []))
            runner.run(batch, step=first_step + done)
            done += 1
            if done == warmup + steps:
                break
        batches.close()  # the loader's workers end here, as at an epoch end in training
        if done > warmup:
            epochs_timed += 1
        epoch += 1
    sync_device(device)
    seconds = time.perf_counter() - start
    runner.optimizer.zero_grad(set_to_none=True)
    return {
        "steps": steps,
        "seconds": round(seconds, 4),
        "step_seconds": seconds / steps,
        "epochs": epochs_timed,
        "bad_samples": bad,
    }


def run_e2e_bench(
    recipe: Recipe, settings: E2EBenchSettings, *, on_stage: Callable[[str], None] = lambda message: None
) -> dict:
    """The step alone and the step fed from the shards, their images/s and ratio, and the data
    workers' CPU time per image."""
    view_device = view_device_for(recipe, settings.device)
    device = resolve_device("cuda" if view_device == "cuda" else "cpu")
    shards = resolve_shards(settings.data, key="--data")
    images = settings.batch or min(recipe.optim.global_batch_size, 64)
    recipe = bench_recipe(recipe, data=settings.data, view_device=view_device, images=images, workers=settings.workers)
    layout, notes = plan_layout(
        shards, world_size=1, num_workers=recipe.data.num_workers, local_batch=images, source="--data"
    )
    threads = torch.get_num_threads()
    if device.type == "cpu":  # as `flsl pretrain` sets it: the data workers compute too
        torch.set_num_threads(cpu_threads(data_workers=layout.loader_workers))
        on_stage(
            f"the step computes with {torch.get_num_threads()} torch thread(s), as `flsl pretrain` would beside "
            f"{layout.loader_workers} data worker(s)"
        )
    try:
        views = device_views_for(recipe, device=device, source="--device")
        runner = build_runner(recipe, device=device, rank=0, world_size=1, steps_per_epoch=SCHEDULE_STEPS)
        batch = synthetic_batch(recipe, images=images, device=device, seed=recipe.optim.seed)
        # The step alone is timed in two turns around the shards' turn, so that the first steps'
        # slowness (allocator, caches) and a change in a shared machine's load weigh on both.
        before, after = settings.steps - settings.steps // 2, settings.steps // 2
        on_stage(
            f"the step alone on a synthetic batch of {images} images: {settings.warmup} untimed, then "
            f"{before} timed steps (and {after} more after the shards' turn)"
        )
        warm_up(runner, batch, steps=settings.warmup, first_step=0)
        seconds, peak = timed_turn(
            runner, batch, steps=before, first_step=settings.warmup, device=device, others_resident=0
        )
        reading = f"{layout.loader_workers} data worker(s)" if layout.loader_workers else "the training process reading"
        on_stage(
            f"from the shards with {reading}, views made on {view_device}: {settings.warmup} untimed, "
            f"then {settings.steps} timed steps"
        )
        stream = TrainStream(
            shards,
            layout=layout,
            rank=0,
            seed=recipe.optim.seed,
            shuffle_buffer=recipe.data.shuffle_buffer,
            augment=MultiCropAugment(recipe),
        )
        e2e = timed_from_shards(
            runner,
            stream,
            views=views,
            steps=settings.steps,
            warmup=settings.warmup,
            first_step=settings.warmup + before,
        )
        if after:
            on_stage(f"the step alone again: {after} timed steps")
            more, peak_after = timed_turn(
                runner,
                batch,
                steps=after,
                device=device,
                others_resident=0,
                first_step=2 * settings.warmup + before + settings.steps,
            )
            seconds += more
            peak = None if peak is None or peak_after is None else max(peak, peak_after)
        del batch
        machine = machine_info(device)
    finally:
        torch.set_num_threads(threads)
    step: dict[str, Any] = {
        "steps": settings.steps,
        "seconds": round(seconds, 4),
        "step_seconds": seconds / settings.steps,
        "peak_memory_bytes": peak,
    }
    for figures in (step, e2e):
        figures["images_per_second"] = images / figures["step_seconds"]
    paths = ("cpu",) if view_device == "cpu" else ("cpu", view_device)
    worker_images = min(shards.num_samples, settings.worker_images)
    on_stage(
        f"data-worker CPU time per image ({worker_images} images, one worker): views made on " + " and on ".join(paths)
    )
    cost = worker_cpu_by_path(recipe, shards, devices=paths, images=worker_images)
    return {
        "settings": {
            **_settings(
                recipe, settings, layout=layout, images=images, view_device=view_device, worker_images=worker_images
            ),
            "torch_threads": machine["torch_threads"],
        },
        "step": step,
        "e2e": e2e,
        "e2e_fraction_of_step": e2e["images_per_second"] / step["images_per_second"],
        "worker_cpu_ms_per_image": {path: value * 1e3 for path, value in cost.items()},
        "worker_cpu_ratio": cost[view_device] / cost["cpu"] if view_device != "cpu" and cost["cpu"] > 0 else None,
        "machine": machine,
        "notes": notes,
        "note": NOTE,
    }


def _settings(
    recipe: Recipe,
    settings: E2EBenchSettings,
    *,
    layout: StreamLayout,
    images: int,
    view_device: str,
    worker_images: int,
) -> dict:
    aug, model = recipe.augment, recipe.model
    return {
        "data": settings.data,
        "images": images,
        "steps": settings.steps,
        "warmup": settings.warmup,
        "view_device": view_device,
        "workers": layout.loader_workers,
        "steps_per_epoch": layout.steps_per_epoch,
        "worker_images": worker_images,
        "global_size": aug.global_size,
        "local_size": aug.local_size,
        "local_crops": aug.local_crops,
        "arch": model.arch,
        "patch_size": model.patch_size,
        "depth": model.dims()["depth"],
        "precision": recipe.optim.precision,
        "compile": recipe.optim.compile,
        "fused_modes": recipe.optim.fused_modes,
    }
