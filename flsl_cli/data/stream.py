"""The training stream: shards split over ranks and loader workers, exactly resumable.

Per epoch the shard list is shuffled with (seed, epoch). The job has `world * workers` reader
slots; slot s = rank * workers + worker reads shards s, s + slots, s + 2 * slots, ... through
a shuffle buffer seeded by (seed, epoch, slot). Every slot yields the same number of batches
per epoch, `batches_per_slot`, computed from the sample counts so that it holds for any shard
order: the sum of the smallest `shards // slots` shard sizes, in whole batches. Samples past
that are dropped for the epoch (a few per slot when shards are of equal size), so every
rank takes the same number of steps and no sample is seen twice in an epoch.

PyTorch's DataLoader takes batches from its workers in turn, so batch b of an epoch on a rank
comes from reader b % workers. Resuming at batch b therefore means each reader skips its
first ceil((b - reader) / workers) batches, which it does without decoding images, and the
loader's worker 0 plays reader b % workers so that the turn order continues unchanged.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flsl_cli.data.augment import MultiCropAugment, decode_image
from flsl_cli.data.shards import ShardSet, iter_samples
from flsl_cli.errors import DataError


@dataclass(frozen=True)
class StreamLayout:
    """How the data is split over ranks and workers, and what an epoch is."""

    world_size: int
    loader_workers: int  # DataLoader worker processes per rank (0: read in the training process)
    local_batch: int
    batches_per_slot: int

    @property
    def workers(self) -> int:
        """Reader slots per rank."""
        return max(1, self.loader_workers)

    @property
    def steps_per_epoch(self) -> int:
        return self.workers * self.batches_per_slot


def plan_layout(shards: ShardSet, *, world_size: int, num_workers: int, local_batch: int,
                source: str = "data.train") -> tuple[StreamLayout, list[str]]:
    """Choose the layout; returns it with notes for the user (e.g. fewer workers than asked)."""
    notes = []
    count = len(shards.shards)
    if count < world_size:
        raise DataError(
            f"{source} has {count} shard(s) but the run has {world_size} processes; each process "
            "needs at least one shard", where=source,
            fix="Write the data into more shards (at least one per process), or use fewer --devices",
        )
    workers = max(1, num_workers)
    if count < world_size * workers:
        workers = max(1, count // world_size)
        notes.append(f"{count} shards over {world_size} process(es): using {workers} data worker(s) "
                     f"per process instead of {num_workers}")
    loader_workers = workers if num_workers > 0 else 0
    slots = world_size * workers
    smallest = sorted(shard.samples for shard in shards.shards)[: count // slots]
    batches = sum(smallest) // local_batch
    if batches == 0:
        raise DataError(
            f"{source} holds too few samples for one step: {shards.num_samples} samples over "
            f"{slots} reader slot(s) cannot fill a batch of {local_batch} per process",
            where=source, fix="Use a smaller optim.global_batch_size, fewer workers, or more data",
        )
    return StreamLayout(world_size=world_size, loader_workers=loader_workers, local_batch=local_batch,
                        batches_per_slot=batches), notes


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


class TrainStream(IterableDataset):
    """Yields augmented samples for one rank; call `set_epoch` before iterating."""

    def __init__(self, shards: ShardSet, *, layout: StreamLayout, rank: int, seed: int,
                 shuffle_buffer: int, augment: MultiCropAugment) -> None:
        super().__init__()
        self.shards = shards
        self.layout = layout
        self.rank = rank
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.augment = augment
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, *, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip_batches = skip_batches

    def shard_order(self, epoch: int) -> list[str]:
        urls = [shard.url for shard in self.shards.shards]
        random.Random(f"{self.seed}-{epoch}").shuffle(urls)
        return urls

    def slot_shards(self, epoch: int, worker: int) -> list[str]:
        slots = self.layout.world_size * self.layout.workers
        return self.shard_order(epoch)[self.rank * self.layout.workers + worker::slots]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is None and self.layout.workers != 1:
            raise RuntimeError("a multi-worker layout must be read through a DataLoader")
        workers = self.layout.workers
        # The DataLoader's round-robin always starts at its worker 0, which must therefore play
        # the reader that holds the next batch of the epoch.
        worker = ((info.id if info is not None else 0) + self.skip_batches) % workers
        batch = self.layout.local_batch
        take = self.layout.batches_per_slot * batch
        skip = max(0, math.ceil((self.skip_batches - worker) / workers)) * batch
        slot = self.rank * workers + worker
        raw = self._shuffled(self._raw(self.slot_shards(self.epoch, worker)),
                             rng=random.Random(f"{self.seed}-{self.epoch}-{slot}"))
        for position, (key, fields) in enumerate(raw):
            if position >= take:
                return
            if position < skip:
                continue
            yield self._make(key, fields)

    def _raw(self, urls: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
        for url in urls:
            yield from iter_samples(url)

    def _shuffled(self, samples, *, rng: random.Random):
        buffer = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            index = rng.randrange(len(buffer))
            buffer[index], sample = sample, buffer[index]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _make(self, key: str, fields: dict[str, bytes]) -> dict:
        image_bytes = fields.get("jpg") or fields.get("jpeg") or fields.get("png") or fields.get("webp")
        if image_bytes is None:
            raise DataError(f"sample {key} has no image (jpg/png/webp)", where=key,
                            fix="Regenerate the shards")
        views = self.augment(decode_image(image_bytes), rng=sample_rng(self.seed, self.epoch, key))
        views["key"] = key
        return views


def build_loader(stream: TrainStream, *, pin_memory: bool) -> DataLoader:
    use_workers = stream.layout.loader_workers
    return DataLoader(
        stream,
        batch_size=stream.layout.local_batch,
        num_workers=use_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if use_workers else None,
        worker_init_fn=_worker_init,
    )


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)
