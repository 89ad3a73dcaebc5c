"""`flsl bench data`: decode + FLSL augmentation throughput, shards against an ImageFolder.

Two pipelines run in one invocation on the same images, with the same `MultiCropAugment`,
loader workers and batch size, so only reading and decoding differ:

* flsl: `TrainStream` + `build_loader` over the shards, as training reads them (one process).
* reference: `torchvision.datasets.ImageFolder` with its default PIL loader
  (`Image.open(f).convert("RGB")`, what the released FLSL/DINO code uses) through a DataLoader,
  on a copy of the same samples' original image bytes written to `DIR/<label>/<key>.<ext>`.

Worker start-up is not measured: in every epoch the clock starts once each worker has delivered
its first batch, and only the images after that are counted. An epoch that ends before the
measured time is up is followed by the next one (warm-up again excluded). The pipelines take
turns (flsl, reference, flsl, reference), so a change in the load of a shared machine during
the run weighs on both alike.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, features
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from flsl_cli.config.schema import Recipe
from flsl_cli.data.augment import MultiCropAugment
from flsl_cli.data.shards import BadShard, Shard, ShardSet, image_field, iter_samples, resolve_shards
from flsl_cli.data.stream import TrainStream, build_loader, plan_layout
from flsl_cli.distributed.env import usable_cpus
from flsl_cli.errors import DataError

ROUNDS = 2  # turns per pipeline; each measures seconds / ROUNDS
BATCH_CAP = 64  # a loader's batch on one GPU; larger batches only add collation memory
NOTE = (
    "Figures are for this machine only; both pipelines ran in the same invocation, one after "
    "the other in alternating turns, with the same augmentation, workers and batch size."
)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class DataBenchSettings:
    url: str
    workers: int = 2
    seconds: float = 20.0
    max_images: int = 2000
    imagefolder: Path | None = None  # reuse (or write and keep) the reference copy here
    device: str | None = None  # also measure worker CPU time per image against this augment.device


@dataclass(frozen=True)
class Measurement:
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def select_samples(shards: ShardSet, *, max_images: int, workers: int) -> ShardSet:
    """The leading shards holding at most `max_images` samples, at least one per worker; when
    whole shards hold more, each keeps only its first max_images // shards samples."""
    whole, total = 0, 0
    for shard in shards.shards:
        if total + shard.samples > max_images:
            break
        whole, total = whole + 1, total + shard.samples
    chosen = shards.shards[: max(whole, min(workers, len(shards.shards)))]
    if sum(shard.samples for shard in chosen) > max_images:
        quota = max(1, max_images // len(chosen))
        chosen = tuple(Shard(url=shard.url, samples=min(shard.samples, quota)) for shard in chosen)
    return ShardSet(shards=tuple(chosen), classes=shards.classes)


def bench_batch_size(recipe: Recipe, shards: ShardSet, *, workers: int) -> int:
    """The recipe's batch, capped at BATCH_CAP and at a quarter of a worker's samples, so that
    every epoch has measured batches after the warm-up."""
    per_worker = shards.num_samples // max(1, workers)
    return max(1, min(BATCH_CAP, recipe.optim.global_batch_size, per_worker // 4))


def extract_imagefolder(shards: ShardSet, dest: Path, *, on_progress: Progress | None = None) -> int:
    """Write each selected sample's original image bytes to dest/<label>/<key>.<ext>."""
    total, written = shards.num_samples, 0
    for shard in shards.shards:
        with closing(iter_samples(shard.url, expected=shard.samples)) as samples:
            for index, item in enumerate(samples):
                if index >= shard.samples:
                    break
                if isinstance(item, BadShard):
                    raise DataError(
                        f"cannot read the shard for the ImageFolder copy: {item.reason}",
                        where=item.url,
                        fix="Check the shard, or pick other data",
                    )
                key, fields = item
                ext = image_field(fields)
                if ext is None:
                    continue
                label = fields["cls"].decode("ascii", "replace").strip() if fields.get("cls") else "unlabelled"
                folder = dest / _safe_name(label)
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{_safe_name(key)}.{ext}").write_bytes(fields[ext])
                written += 1
                if on_progress:
                    on_progress(written, total)
    return written


def _safe_name(text: str) -> str:
    return text.replace("/", "_").replace(os.sep, "_").lstrip(".") or "_"


def measure(batches: Callable[[], Generator[int, None, None]], *, seconds: float, warmup: int) -> Measurement:
    """Images per second over `seconds` of measured time: each `batches()` call yields the batch
    sizes of one epoch, whose first `warmup` batches start the clock and are not counted."""
    images, elapsed = 0, 0.0
    while elapsed < seconds:
        start = last = None
        with closing(batches()) as sizes:
            for index, size in enumerate(sizes):
                last = time.perf_counter()
                if index + 1 == warmup:
                    start = last
                elif start is not None:
                    images += size
                    if elapsed + (last - start) >= seconds:
                        break
        if start is None or last is None or last == start:
            raise DataError(
                f"too few samples to measure: an epoch ends within the warm-up ({warmup} batch(es))",
                fix="Raise --max-images, or use fewer --workers",
            )
        elapsed += last - start
    return Measurement(images=images, seconds=elapsed)


def flsl_batches(
    recipe: Recipe, shards: ShardSet, *, workers: int, batch: int
) -> tuple[Callable[[], Generator[int, None, None]], int, list[str]]:
    """(batches(), workers used, notes) of the training stream over `shards`, a new epoch per call."""
    layout, notes = plan_layout(shards, world_size=1, num_workers=workers, local_batch=batch, source="URL")
    # A shuffle buffer of 1 keeps file order, so this pipeline decodes exactly the samples copied
    # for the reference; a larger buffer only moves undecoded bytes around.
    stream = TrainStream(
        shards, layout=layout, rank=0, seed=recipe.optim.seed, shuffle_buffer=1, augment=MultiCropAugment(recipe)
    )
    loader = build_loader(stream, pin_memory=False)
    epochs = itertools.count()

    def batches() -> Generator[int, None, None]:
        stream.set_epoch(next(epochs))
        for item in loader:
            yield len(item["key"])

    return batches, layout.workers, notes


@dataclass(frozen=True)
class ReferenceTransform:
    """The FLSL augmentation as an ImageFolder transform, with a fresh generator per sample."""

    augment: MultiCropAugment

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return self.augment(image, rng=np.random.default_rng())


def reference_batches(
    recipe: Recipe, folder: Path, *, workers: int, batch: int, max_images: int
) -> tuple[Callable[[], Generator[int, None, None]], int]:
    """(batches(), images) of torchvision's ImageFolder + DataLoader, read with PIL's
    default loader."""
    try:
        dataset = ImageFolder(str(folder), transform=ReferenceTransform(MultiCropAugment(recipe)))
    except (FileNotFoundError, OSError) as exc:
        raise DataError(
            f"not a usable ImageFolder copy ({exc})",
            where=str(folder),
            fix="Point --imagefolder at DIR/<label>/<image> files, or leave it out",
        ) from None
    if len(dataset) > max_images:
        dataset = Subset(dataset, range(max_images))
    loader = DataLoader(
        dataset,
        batch_size=batch,
        num_workers=workers,
        shuffle=False,
        drop_last=True,
        prefetch_factor=2,
        persistent_workers=False,
        worker_init_fn=_one_thread,
    )

    def batches() -> Generator[int, None, None]:
        for _views, labels in loader:
            yield len(labels)

    return batches, len(dataset)


def _one_thread(_worker_id: int) -> None:
    """As `build_loader`'s workers do, so the two pipelines differ only in reading."""
    torch.set_num_threads(1)


def machine_info() -> dict:
    try:
        importlib.metadata.distribution("Pillow-SIMD")
        simd = True
    except importlib.metadata.PackageNotFoundError:
        simd = False
    return {
        "cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "machine": platform.machine(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "pillow_simd": simd,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }


def pipeline_figures(turns: list[Measurement], *, workers: int, source: str) -> dict:
    images, seconds = sum(turn.images for turn in turns), sum(turn.seconds for turn in turns)
    total = images / seconds
    return {
        "source": source,
        "workers": workers,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_second": total,
        "images_per_second_per_worker": total / workers,
        "turns_images_per_second": [round(turn.images_per_second, 2) for turn in turns],
    }


@contextmanager
def reference_copy(
    shards: ShardSet, target: Path | None, *, stage: Callable[[str], None], on_progress: Progress | None
) -> Iterator[tuple[Path, bool]]:
    """(folder, reused): `target` as it is when it holds files, else the samples copied into it
    (kept), or into a temporary folder removed afterwards when there is no target."""
    folder = target or Path(tempfile.mkdtemp(prefix="flsl-bench-imagefolder-"))
    reused = folder.is_dir() and any(folder.iterdir())
    try:
        if reused:
            stage(f"reusing the ImageFolder copy in {folder}")
        else:
            stage(
                f"copying {shards.num_samples} images from the shards to "
                f"{folder if target else 'a temporary ImageFolder'}"
            )
            extract_imagefolder(shards, folder, on_progress=on_progress)
        yield folder, reused
    finally:
        if target is None:
            shutil.rmtree(folder, ignore_errors=True)


def measure_in_turns(
    pipelines: dict[str, Callable[[], Generator[int, None, None]]], *, seconds: float, warmup: int
) -> dict[str, list[Measurement]]:
    """ROUNDS turns per pipeline, taken in order, each of seconds / ROUNDS."""
    turns: dict[str, list[Measurement]] = {name: [] for name in pipelines}
    for _ in range(ROUNDS):
        for name, batches in pipelines.items():
            turns[name].append(measure(batches, seconds=seconds / ROUNDS, warmup=warmup))
    return turns


def run_data_bench(
    recipe: Recipe,
    settings: DataBenchSettings,
    *,
    on_extract: Progress | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> dict:
    """Measure both pipelines; returns the figures (see `flsl bench data --output`)."""
    stage = on_stage or (lambda _message: None)
    # Both pipelines make their views with PIL in the workers; settings.device measures the other paths.
    recipe = recipe.model_copy(update={"augment": recipe.augment.model_copy(update={"device": "cpu"})})
    machine = machine_info()
    shards = select_samples(
        resolve_shards(settings.url, key="URL"), max_images=settings.max_images, workers=settings.workers
    )
    batch = bench_batch_size(recipe, shards, workers=min(settings.workers, len(shards.shards)))
    flsl, workers, notes = flsl_batches(recipe, shards, workers=settings.workers, batch=batch)
    for message in notes:
        stage(message)
    with reference_copy(shards, settings.imagefolder, stage=stage, on_progress=on_extract) as (folder, reused):
        reference, reference_samples = reference_batches(
            recipe, folder, workers=workers, batch=batch, max_images=settings.max_images
        )
        stage(
            f"measuring {settings.seconds:g} s per pipeline, in {ROUNDS} turns each (flsl, reference, ...), "
            f"with {workers} worker(s) and batch {batch}"
        )
        turns = measure_in_turns({"flsl": flsl, "reference": reference}, seconds=settings.seconds, warmup=workers)
    pipelines = {
        "flsl": pipeline_figures(turns["flsl"], workers=workers, source=settings.url),
        "reference": pipeline_figures(
            turns["reference"],
            workers=workers,
            source=str(folder) if settings.imagefolder else "temporary ImageFolder copy",
        ),
    }
    aug = recipe.augment
    view_cost = None
    if settings.device:
        from flsl_cli.bench.view_cost import VIEW_COST_IMAGES, run_view_cost

        stage(f"measuring data-worker CPU time per image: views in the workers (cpu) against {settings.device}")
        view_cost = run_view_cost(
            recipe, shards, device=settings.device, batch=batch, images=min(shards.num_samples, VIEW_COST_IMAGES)
        )
    return {
        "view_cost": view_cost,
        "pipelines": pipelines,
        "ratio": pipelines["flsl"]["images_per_second"] / pipelines["reference"]["images_per_second"],
        "settings": {
            "url": settings.url,
            "workers": workers,
            "batch_size": batch,
            "seconds": settings.seconds,
            "turns": ROUNDS,
            "samples": shards.num_samples,
            "reference_samples": reference_samples,
            "imagefolder_reused": reused,
            "global_size": aug.global_size,
            "local_size": aug.local_size,
            "local_crops": aug.local_crops,
            "patch_size": recipe.model.patch_size,
        },
        "machine": machine,
        "notes": notes,
        "note": NOTE,
    }
