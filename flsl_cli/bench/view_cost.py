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
from collections.abc import Iterator

import torch

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
    stream = TrainStream(shards, layout=layout, rank=0, seed=recipe.optim.seed, shuffle_buffer=1,
                         augment=MultiCropAugment(recipe))
    stream.set_epoch(0)
    for _, sample in zip(range(images), stream):
        yield sample


def worker_cpu(recipe: Recipe, shards: ShardSet, *, images: int) -> tuple[float, list[dict]]:
    """(CPU seconds per image, the samples) of one reader."""
    samples, start = [], time.process_time()
    for sample in worker_samples(recipe, shards, images=images):
        samples.append(sample)
    return (time.process_time() - start) / max(1, len(samples)), samples


def run_view_cost(recipe: Recipe, shards: ShardSet, *, device: str, images: int, batch: int) -> dict:
    """Worker CPU time per image of both paths and their ratio, and the training process's cost
    per image on the tensor path."""
    target = torch.device("cuda" if device == "cuda" else "cpu")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise FlslError("--device cuda needs a CUDA GPU, and this machine has none", where="--device",
                        fix="Use --device tensor-cpu to measure the tensor path on the CPU")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as build_loader's workers run
    try:
        pil_recipe = recipe.model_copy(update={"augment": recipe.augment.model_copy(update={"device": "cpu"})})
        tensor_recipe = recipe.model_copy(update={"augment": recipe.augment.model_copy(update={"device": device})})
        worker_cpu(tensor_recipe, shards, images=min(images, 4))  # imports and first-call costs out of the figures
        pil_seconds, _ = worker_cpu(pil_recipe, shards, images=images)
        tensor_seconds, samples = worker_cpu(tensor_recipe, shards, images=images)
    finally:
        torch.set_num_threads(threads)
    views = DeviceViews(tensor_recipe, device=target)
    batches = [collate([dict(s) for s in samples[i:i + batch]]) for i in range(0, len(samples), batch)]
    views(collate([dict(s) for s in samples[:batch]]))  # warm-up
    _sync(target)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for item in batches:
        views(item)
    _sync(target)
    made = sum(len(item["key"]) for item in batches)
    return {
        "device": device, "images": len(samples), "batch_size": batch,
        "worker_cpu_ms_per_image": {"cpu": pil_seconds * 1e3, device: tensor_seconds * 1e3},
        "worker_cpu_ratio": tensor_seconds / pil_seconds if pil_seconds > 0 else None,
        "training_process_ms_per_image": {"cpu": (time.process_time() - cpu_start) * 1e3 / made,
                                          "wall": (time.perf_counter() - wall_start) * 1e3 / made},
        "training_process_threads": torch.get_num_threads(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
