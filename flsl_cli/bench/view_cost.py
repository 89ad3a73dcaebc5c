"""`flsl bench data --device`: the CPU time a data worker spends per image, views made with PIL
in the worker (`augment.device: cpu`) against views made by the training process
(`tensor-cpu` or `cuda`, where a worker only reads the bytes and draws the plan), and what
making the views costs the training process instead.

Both paths read the same samples in the same order through `TrainStream`, here in one process
with one torch thread, as a loader worker runs; a worker's CPU time is this process's CPU time
(`time.process_time`) while it yields samples. The training process's share (decoding the
batch and making its views) is measured on the batches the tensor path's reader delivered: CPU
time, and wall time (after the device finished) for a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from flsl_cli.bench.step import sync_device
from flsl_cli.config.schema import Recipe
from flsl_cli.data.augment import MultiCropAugment
from flsl_cli.data.device_views import DeviceViews
from flsl_cli.data.shards import ShardSet
from flsl_cli.data.stream import TrainStream, collate, plan_layout
from flsl_cli.errors import FlslError

VIEW_COST_IMAGES = 256  # samples each path reads


def worker_samples(recipe: Recipe, shards: ShardSet, *, images: int) -> Iterator[dict]:
    """The first `images` samples one reader delivers, views or plans as `recipe.augment.device` says."""
    layout, _ = plan_layout(shards, world_size=1, num_workers=0, local_batch=1, source="URL")
    stream = TrainStream(
        shards, layout=layout, rank=0, seed=recipe.optim.seed, shuffle_buffer=1, augment=MultiCropAugment(recipe)
    )
    stream.set_epoch(0)
    for _, sample in zip(range(images), stream):
        yield sample


def worker_cpu(recipe: Recipe, shards: ShardSet, *, images: int) -> float:
    """CPU seconds per image of one reader (each sample is dropped once made, as a worker hands it on)."""
    read, start = 0, time.process_time()
    for _ in worker_samples(recipe, shards, images=images):
        read += 1
    return (time.process_time() - start) / max(1, read)


def with_view_device(recipe: Recipe, device: str) -> Recipe:
    """The recipe with `augment.device` set to `device`."""
    return recipe.model_copy(update={"augment": recipe.augment.model_copy(update={"device": device})})


def worker_cpu_by_path(recipe: Recipe, shards: ShardSet, *, devices: Sequence[str], images: int) -> dict[str, float]:
    """For each `augment.device` in `devices`, in turn: the CPU seconds per image of one data
    worker reading the same samples, with one torch thread as build_loader's workers run.
    Imports and first-call costs are paid before the measured reads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipes = {device: with_view_device(recipe, device) for device in devices}
        for device in devices:
            worker_cpu(recipes[device], shards, images=min(images, 4))
        return {device: worker_cpu(recipes[device], shards, images=images) for device in devices}
    finally:
        torch.set_num_threads(threads)


def run_view_cost(recipe: Recipe, shards: ShardSet, *, device: str, images: int, batch: int) -> dict:
    """Worker CPU time per image of both paths and their ratio, and the training process's cost
    per image on the tensor path."""
    target = torch.device("cuda" if device == "cuda" else "cpu")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise FlslError(
            "--device cuda needs a CUDA GPU, and this machine has none",
            where="--device",
            fix="Use --device tensor-cpu to measure the tensor path on the CPU",
        )
    paths = worker_cpu_by_path(recipe, shards, devices=("cpu", device), images=images)
    pil_seconds, tensor_seconds = paths["cpu"], paths[device]
    tensor_recipe = with_view_device(recipe, device)
    samples = list(worker_samples(tensor_recipe, shards, images=images))
    views = DeviceViews(tensor_recipe, device=target)
    batches = [collate([dict(s) for s in samples[i : i + batch]]) for i in range(0, len(samples), batch)]
    views(collate([dict(s) for s in samples[:batch]]))  # warm-up
    sync_device(target)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for item in batches:
        views(item)
    sync_device(target)
    made = sum(len(item["key"]) for item in batches)
    return {
        "device": device,
        "images": len(samples),
        "batch_size": batch,
        "worker_cpu_ms_per_image": {"cpu": pil_seconds * 1e3, device: tensor_seconds * 1e3},
        "worker_cpu_ratio": tensor_seconds / pil_seconds if pil_seconds > 0 else None,
        "training_process_ms_per_image": {
            "cpu": (time.process_time() - cpu_start) * 1e3 / made,
            "wall": (time.perf_counter() - wall_start) * 1e3 / made,
        },
        "training_process_threads": torch.get_num_threads(),
    }
