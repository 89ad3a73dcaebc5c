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

import collections
import math
import multiprocessing
import random
import re
import signal
import sys
import traceback
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from flsl_cli import signals
from flsl_cli.data import worker_deaths
from flsl_cli.data.augment import MultiCropAugment, decode_for, open_image
from flsl_cli.data.device_views import plan_tensors
from flsl_cli.data.shards import BadShard, ShardSet, image_field, iter_samples, reader_slot
from flsl_cli.data.view_plan import complete_plan
from flsl_cli.errors import DataError, FlslError, first_line


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


def plan_layout(
    shards: ShardSet, *, world_size: int, num_workers: int, local_batch: int, source: str = "data.train"
) -> tuple[StreamLayout, list[str]]:
    """Choose the layout; returns it with notes for the user (e.g. fewer workers than asked)."""
    notes = []
    count = len(shards.shards)
    if count < world_size:
        raise DataError(
            f"{source} has {count} shard(s) but the run has {world_size} processes; each process "
            "needs at least one shard",
            where=source,
            fix="Write the data into more shards (at least one per process), or use fewer --devices",
        )
    workers = max(1, num_workers)
    if count < world_size * workers:
        workers = max(1, count // world_size)
        notes.append(
            f"{count} shards over {world_size} process(es): using {workers} data worker(s) "
            f"per process instead of {num_workers}"
        )
    loader_workers = workers if num_workers > 0 else 0
    slots = world_size * workers
    smallest = sorted(shard.samples for shard in shards.shards)[: count // slots]
    batches = sum(smallest) // local_batch
    if batches == 0:
        raise DataError(
            f"{source} holds too few samples for one step: {shards.num_samples} samples over "
            f"{slots} reader slot(s) cannot fill a batch of {local_batch} per process",
            where=source,
            fix="Use a smaller optim.global_batch_size, fewer workers, or more data",
        )
    read = slots * batches * local_batch
    if read < 0.99 * shards.num_samples:
        notes.append(_unread_note(shards, slots=slots, smallest=smallest, local_batch=local_batch, read=read))
    return StreamLayout(
        world_size=world_size, loader_workers=loader_workers, local_batch=local_batch, batches_per_slot=batches
    ), notes


def _unread_note(shards: ShardSet, *, slots: int, smallest: list[int], local_batch: int, read: int) -> str:
    """Why an epoch reads fewer samples than the shards hold, by cause: shards left over when
    their count is not a multiple of the reader slots, shards of unequal size (every slot reads
    as many samples as the smallest share), and a slot's samples that do not fill a last batch."""
    count, total = len(shards.shards), shards.num_samples
    per_slot = sum(smallest)
    batch_rest = per_slot - per_slot // local_batch * local_batch
    lost_to_shards = total - slots * per_slot
    causes = []
    if count % slots:
        causes.append(
            f"{count} shards do not split evenly over {slots} reader slot(s), so the samples of "
            f"{count % slots} shard(s) are left out ({lost_to_shards} samples; a shard count that is a "
            f"multiple of {slots} avoids it)"
        )
    elif lost_to_shards:
        causes.append(
            f"the shards differ in size and each slot reads as many samples as the smallest share "
            f"({per_slot}), so {lost_to_shards} samples are left out (shards of equal size avoid it)"
        )
    if batch_rest:
        causes.append(
            f"each slot's {per_slot} samples fill {per_slot // local_batch} batches of {local_batch} and "
            f"the last {batch_rest} are left out ({slots * batch_rest} samples; a per-process batch "
            f"that divides {per_slot} avoids it)"
        )
    return (
        f"each epoch reads {read} of the {total} samples ({read / total:.1%}) with {slots} reader slot(s) "
        f"(processes x data workers): {'; and '.join(causes)}. The samples left out change from epoch to epoch"
    )


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


class TrainStream(IterableDataset):
    """Yields augmented samples for one rank; call `set_epoch` before iterating."""

    def __init__(
        self,
        shards: ShardSet,
        *,
        layout: StreamLayout,
        rank: int,
        seed: int,
        shuffle_buffer: int,
        augment: MultiCropAugment,
    ) -> None:
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
        return self.shard_order(epoch)[reader_slot(rank=self.rank, worker=worker, workers=self.layout.workers) :: slots]

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._samples()
        except FlslError as exc:  # handed over as an item (it pickles intact): torch's loader
            yield {"error": exc}  # re-raises a worker's exception as text

    def _samples(self) -> Iterator[dict]:
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
        slot = reader_slot(rank=self.rank, worker=worker, workers=workers)
        lost: list[dict] = []
        raw = _Peekable(
            self._shuffled(
                self._raw(self.slot_shards(self.epoch, worker), lost),
                rng=random.Random(f"{self.seed}-{self.epoch}-{slot}"),
            )
        )
        recent: collections.deque = collections.deque(maxlen=RECENT_RECORDS)
        for position in range(take):
            record = raw.next()
            reports, lost[:] = list(lost), []
            if position < skip:  # consumed before the resume point: not decoded, not reported again
                if record is not None:
                    recent.append(record)
                continue
            if record is None:  # the slot ran short because samples were lost
                sample = self._replacement(f"slot{slot}-position{position}", recent=recent, ahead=raw)
            else:
                try:
                    sample = self._make(record)
                except BadSample as exc:
                    reports.append(
                        {"kind": "sample", "shard": record.url, "key": record.key, "reason": str(exc), "samples": 1}
                    )
                    sample = self._replacement(record.key, recent=recent, ahead=raw)
                recent.append(record)
            sample["bad"] = reports
            yield sample

    def _raw(self, urls: list[str], lost: list[dict]) -> Iterator[RawRecord]:
        counts = {shard.url: shard.samples for shard in self.shards.shards}
        for url in urls:
            for item in iter_samples(url, expected=counts.get(url)):
                if isinstance(item, BadShard):
                    lost.append(
                        {
                            "kind": "shard",
                            "shard": item.url,
                            "key": None,
                            "reason": item.reason,
                            "samples": item.samples,
                        }
                    )
                else:
                    yield RawRecord(key=item[0], fields=item[1], url=url)

    def _shuffled(self, samples: Iterator[RawRecord], *, rng: random.Random) -> Iterator[RawRecord]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[RawRecord] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            index = rng.randrange(len(buffer))
            buffer[index], sample = sample, buffer[index]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _make(self, record: RawRecord, *, rng_key: str | None = None) -> dict:
        fields = record.fields
        field = image_field(fields)
        if field is None:
            raise BadSample(f"no image field (found: {', '.join(sorted(fields)) or 'nothing'})")
        image_bytes = fields[field]
        rng = sample_rng(self.seed, self.epoch, rng_key or record.key)
        aug = self.augment.recipe.augment
        try:
            image = open_image(image_bytes)
            plan = self.augment.plan(image.size, rng=rng)
            if aug.device == "cpu":
                image, scale = decode_for(image, plan, global_size=aug.global_size, local_size=aug.local_size)
        except Exception as exc:  # noqa: BLE001 - any decoder failure makes the sample bad
            raise BadSample(f"image does not decode ({first_line(exc)})") from None
        views: dict[str, Any]  # the views' tensors, or the bytes and the plan's arrays
        if aug.device == "cpu":
            views = self.augment.render(image, plan, scale=scale, rng=rng)
        else:  # the training process makes the views (device_views.py): here only the bytes and the plan
            whole_plan = complete_plan(self.augment.recipe, plan, rng=rng)
            views = {"encoded": image_bytes, "shard": record.url, **plan_tensors(whole_plan, size=image.size)}
        return {**views, "key": record.key}

    def _replacement(self, name: str, *, recent, ahead: _Peekable) -> dict:
        """Stand-in for a bad or missing sample, so every reader keeps its batch count: another
        sample of this reader (the most recent one that decodes, else the next one), with its
        own augmentation. Chosen deterministically, so resumed runs make the same choice."""
        for record in [*reversed(recent), *ahead.peek(RECENT_RECORDS)]:
            try:
                return self._make(record, rng_key=f"{name}~{record.key}")
            except BadSample:
                continue
        raise DataError(
            f"no readable sample near {name}: {len(recent)} recent and the next samples are all bad",
            where=self.slot_shards(self.epoch, 0)[0] if self.shards.shards else None,
            fix="Check the shards with `tar -tf` and regenerate the damaged ones",
        )


RECENT_RECORDS = 16


@dataclass(frozen=True)
class RawRecord:
    key: str
    fields: dict
    url: str


class BadSample(Exception):
    """A sample that cannot be used (no image, or the image does not decode)."""


class _Peekable:
    def __init__(self, iterator) -> None:
        self._iterator = iter(iterator)
        self._ahead: list = []

    def next(self):
        if self._ahead:
            return self._ahead.pop(0)
        return next(self._iterator, None)

    def peek(self, count: int) -> list:
        while len(self._ahead) < count:
            item = next(self._iterator, None)
            if item is None:
                break
            self._ahead.append(item)
        return list(self._ahead)


def collate(samples: list[dict]) -> dict:
    """Stack the views; keep sample keys and bad-sample reports as lists; a user error from
    the reader is passed on."""
    errors = [sample["error"] for sample in samples if "error" in sample]
    if errors:
        return {"error": errors[0]}
    reports = [report for sample in samples for report in sample.pop("bad", [])]
    encoded = [sample.pop("encoded") for sample in samples if "encoded" in sample]
    batch = default_collate(samples)
    batch["bad"] = reports
    if encoded:
        batch["encoded"] = encoded
    return batch


def build_loader(stream: TrainStream, *, pin_memory: bool) -> DataLoader:
    """The rank's loader. Workers are forked where the platform can: a process that was itself
    spawned (`flsl --devices N`) would otherwise spawn them too, each importing torch anew at
    every epoch."""
    use_workers = stream.layout.loader_workers
    fork = use_workers and "fork" in multiprocessing.get_all_start_methods()
    return DataLoader(
        stream,
        batch_size=stream.layout.local_batch,
        num_workers=use_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if use_workers else None,
        worker_init_fn=_worker_init,
        collate_fn=collate,
        multiprocessing_context=multiprocessing.get_context("fork") if fork else None,
    )


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)
    signals.for_data_worker()
    quiet_when_the_reader_is_gone()


def quiet_when_the_reader_is_gone() -> None:
    """A data worker hands each batch's tensors over by file descriptor, from a thread of
    `multiprocessing.resource_sharer`. When the training process ends (killed, or ended by the
    job) while it takes one, that thread's connection breaks and it passes the error to
    `sys.excepthook`, which would print a traceback. Nothing is lost then (the reader is gone),
    so that error is not printed; any other error is, as before."""
    before = sys.excepthook

    def hook(exc_type, exc, tb) -> None:
        if issubclass(exc_type, (OSError, EOFError)) and any(
            frame.filename.endswith("resource_sharer.py") for frame in traceback.extract_tb(tb)
        ):
            return
        before(exc_type, exc, tb)

    sys.excepthook = hook


class WorkerDied(RuntimeError):
    """A data worker ended while the loader still needed it."""

    def __init__(self, pid: int, how: str):
        super().__init__(f"data worker {pid} ended: {how}")
        self.pid, self.how = pid, how


def iterate(loader: DataLoader) -> Generator[dict, None, None]:
    """The loader's batches. Its worker processes start with the stop signals held back (see
    `flsl_cli.signals`) and are watched (`worker_deaths`), so any loader error that follows a
    worker's death becomes WorkerDied; a user error raised inside a worker arrives as itself.
    torch may also report a death from its SIGCHLD handler at any moment of the step:
    `worker_failure` reads both."""
    before = worker_deaths.children()
    with signals.held():
        batches = iter(loader)
    worker_deaths.watch(worker_deaths.children() - before)
    try:
        for batch in batches:
            if "error" in batch:
                raise batch["error"]
            yield batch
    except FlslError:
        raise
    except Exception as exc:  # noqa: BLE001 - a dead worker shows as any loader error
        died = worker_deaths.abnormal_end()
        if died is not None:
            raise WorkerDied(*died) from exc
        raise


_WORKER_KILLED = re.compile(r"DataLoader worker \(pid (\d+)\) is killed by signal: (.+?)\.?\s*$")
_WORKER_EXITED = re.compile(r"DataLoader worker \(pid\(s\) (\d+)[\d, ]*\) exited unexpectedly")


def _signal_name(description: str) -> str:
    """'SIGKILL' for torch's 'Killed' (the signal's strsignal text), else the text itself."""
    return next((s.name for s in signal.Signals if signal.strsignal(s) == description), description)


def _signal_in_chain(exc: BaseException, *, pid: int) -> str | None:
    """The signal torch's SIGCHLD handler named for `pid` anywhere in the exception's chain.
    torch reaps the worker and raises "exited unexpectedly" from that report, so the signal
    survives there when the watcher thread (`worker_deaths`) lost the race with the reaping."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        killed = _WORKER_KILLED.search(str(current).strip())
        if killed and int(killed.group(1)) == pid:
            return _signal_name(killed.group(2))
        current = current.__cause__ or current.__context__
    return None


def worker_failure(exc: BaseException, *, run_dir: str) -> DataError | None:
    """The DataError for a data worker that died (WorkerDied, or torch's own report of it),
    else None."""
    text = str(exc).strip()
    if isinstance(exc, WorkerDied):
        pid, how = exc.pid, exc.how
    elif killed := _WORKER_KILLED.search(text):
        pid, how = int(killed.group(1)), _signal_name(killed.group(2))
    elif exited := _WORKER_EXITED.search(text):
        pid = int(exited.group(1))
        died = worker_deaths.abnormal_end(pid=pid)
        how = died[1] if died else "unknown"
    else:
        return None
    if how == "unknown":
        how = _signal_in_chain(exc, pid=pid) or how
    if how.startswith("SIG"):
        what = f"data worker (pid {pid}) was killed by {how}"
    elif how.startswith("exit code"):
        what = f"data worker (pid {pid}) exited with {how}"
    else:
        what = f"data worker (pid {pid}) exited unexpectedly"
    return DataError(
        f"{what}; the run stopped (stop signals never end data workers, so something else did: "
        "out of memory? see `dmesg`)",
        fix="Check the machine's memory (fewer data.num_workers or a smaller optim.global_batch_size "
        f"use less), then continue with `flsl resume {run_dir}`",
    )
