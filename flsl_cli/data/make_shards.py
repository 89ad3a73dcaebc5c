"""`flsl data shards SRC DEST`: webdataset tar shards from an ImageNet-style directory.

1. Plan (see `shard_plan`): every sample's shard is decided, and every input problem raised,
   before anything is written.
2. Write (`make_shards`): the shards not yet in DEST are written by worker processes, each to a
   temporary name and moved into place when complete (see `shard_dest`). `progress.json`
   records the plan's digest and each finished shard's size; a rerun with the same plan keeps
   the recorded shards found at that size and writes the rest, and a different plan is refused.
3. `index.json` is written last: its presence means the shard set is complete.

A sample is the image's original bytes, not re-encoded (`jpg`, `png` or `webp`, from the file's
actual format), `cls` (the label in ASCII) and `json`:
`{"width", "height", "label", "class_name", "synset", "file"}` plus, with boxes,
`"boxes": [{"bbox": [x0, y0, x1, y1], "class", "name", "synset"}]` in the original image's
pixels (the shape of the demo data's boxes). Files PIL cannot identify, or in other formats,
are skipped and listed in the index with the reason. Shard bytes depend only on the input
(written by `webdataset.TarWriter` with fixed tar metadata, see `shard_writer`).
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from flsl_cli import storage
from flsl_cli.data.shard_dest import Destination, discard
from flsl_cli.data.shard_plan import SAMPLE_FORMAT, PlannedSample, ProgressFn, ShardJob, ShardPlan, plan_shards
from flsl_cli.data.shard_workers import WorkerPool
from flsl_cli.data.shard_writer import INDEX_FORMAT, INDEX_NAME, tar_writer, write_sample
from flsl_cli.errors import DataError

PROGRESS_NAME = "progress.json"
PROGRESS_FORMAT = "flsl-shards-progress/1"
STORED_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> image field
_PROGRESS_EVERY_S = 2.0


@dataclass(frozen=True)
class ShardReport:
    dest: str
    shards: int
    samples: int
    classes: int
    skipped: int
    written: int  # shards written by this run
    kept: int  # shards kept from an earlier run
    already_complete: bool = False  # DEST held the complete shard set; nothing was written


# -- writing one shard ------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardResult:
    name: str
    bytes: int
    samples: int
    skipped: tuple[tuple[str, str], ...]  # (file, reason)

    def record(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "samples": self.samples,
            "skipped": [{"file": file, "reason": reason} for file, reason in self.skipped],
        }


def write_shard(job: ShardJob, out_path: str, *, on_sample: Callable[[], None] | None = None) -> ShardResult:
    """Write `job` as one tar at `out_path` (a local temporary name); removed again on failure."""
    skipped = []
    count = 0
    try:
        with storage.open_write(out_path) as raw, tar_writer(raw) as tar:
            for sample in job.samples:
                fields = _encode(job, sample)
                if isinstance(fields, str):
                    skipped.append((sample.relpath, fields))
                else:
                    write_sample(tar, sample.key, fields)
                    count += 1
                if on_sample is not None:
                    on_sample()
        size = os.path.getsize(out_path)
    except OSError as err:
        discard(out_path)
        raise DataError(
            f"cannot write shard {job.name} ({err.strerror or err})",
            where=out_path,
            fix="Check free space and permissions where shards are written",
        ) from None
    except BaseException:
        discard(out_path)
        raise
    return ShardResult(job.name, size, count, tuple(skipped))


def _encode(job: ShardJob, sample: PlannedSample) -> dict[str, bytes] | str:
    """The sample's fields, or the reason it is skipped."""
    try:
        with open(os.path.join(job.src_root, sample.relpath), "rb") as f:
            data = f.read()
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and decompression-bomb warnings: only the header is read
            with Image.open(io.BytesIO(data)) as image:
                image_format, (width, height) = image.format, image.size
    except UnidentifiedImageError:
        return "not a readable image (PIL cannot identify its format)"
    except Exception as err:  # noqa: BLE001 - PIL raises many types for damaged files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"not a readable image ({re.sub(r' ?<[^<>]* at 0x[0-9a-fA-F]+>', '', reason)})"
    field = STORED_FORMATS.get(image_format or "")
    if field is None:
        return f"{image_format} images are not stored (flsl reads JPEG, PNG and WebP)"
    label = sample.label
    info: dict[str, Any] = {
        "width": width,
        "height": height,
        "label": label,
        "class_name": job.classes[label],
        "synset": job.synsets[label],
        "file": sample.relpath,
    }
    if sample.boxes is not None:
        info["boxes"] = [
            {
                "bbox": [_plain(x0), _plain(y0), _plain(x1), _plain(y1)],
                "class": box_label,
                "name": job.classes[box_label],
                "synset": job.synsets[box_label],
            }
            for x0, y0, x1, y1, box_label in sample.boxes
        ]
    return {
        field: data,
        "cls": str(label).encode("ascii"),
        "json": json.dumps(info, separators=(",", ":"), ensure_ascii=False).encode("utf-8"),
    }


def _plain(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _write_task(task: tuple[ShardJob, str]) -> ShardResult:
    job, out_path = task
    return write_shard(job, out_path)


# -- the whole command ------------------------------------------------------------------------


def make_shards(
    src: Path,
    dest: str,
    *,
    labels: Path | None = None,
    boxes: Path | None = None,
    class_names: Path | None = None,
    shard_size: str | None = None,
    samples_per_shard: int | None = None,
    prefix: str | None = None,
    workers: int = 1,
    on_progress: ProgressFn | None = None,
) -> ShardReport:
    """Plan the shards of `src` and write those missing from `dest` (a path or fsspec URL)."""
    if workers < 1:
        raise DataError(f"--workers must be at least 1 (got {workers})", fix="Give a positive number of workers")
    destination = Destination(str(dest))
    destination.check_reachable()
    if destination.is_local and Path(destination.root).resolve().is_relative_to(Path(src).expanduser().resolve()):
        raise DataError(
            "DEST is inside SRC (its folder would be taken for a class)",
            where=destination.url,
            fix="Choose a DEST outside SRC",
        )
    pool = WorkerPool(workers)
    failed = True
    try:
        plan = plan_shards(
            src,
            labels=labels,
            boxes=boxes,
            class_names=class_names,
            shard_size=shard_size,
            samples_per_shard=samples_per_shard,
            prefix=prefix,
            on_progress=on_progress,
            pool=pool,
        )
        report = _write_plan(plan, destination, pool, on_progress=on_progress)
        failed = False
        return report
    finally:
        pool.close(abort=failed)
        destination.close()


def _write_plan(
    plan: ShardPlan, destination: Destination, pool: WorkerPool, *, on_progress: ProgressFn | None
) -> ShardReport:
    sizes = destination.listing()
    records = _usable_records(plan, destination, sizes)
    names = [job.name for job in plan.jobs]
    if records is None:  # already complete
        index = destination.read_json(INDEX_NAME)
        assert index is not None, "complete shards are the ones with an index"
        return ShardReport(
            destination.url,
            len(plan.jobs),
            index["num_samples"],
            len(plan.classes),
            len(index.get("skipped", [])),
            written=0,
            kept=len(plan.jobs),
            already_complete=True,
        )

    destination.prepare()
    progress = _Progress(plan, destination, records)
    progress.flush()  # also shows early that DEST is writable
    if INDEX_NAME in sizes:
        destination.remove(INDEX_NAME)  # an index with missing shards is no longer true
    destination.remove_stale_temporaries(names, sizes)

    todo = [job for job in plan.jobs if job.name not in records]
    kept = len(plan.jobs) - len(todo)
    total = plan.num_samples
    done = sum(len(job.samples) for job in plan.jobs if job.name in records)
    if on_progress is not None:
        on_progress("shards", done, total)

    staging = {job.name: destination.staging_file(job.name) for job in todo}
    planned_count = {job.name: len(job.samples) for job in todo}
    try:
        if pool.workers <= 1:

            def tick() -> None:
                nonlocal done
                done += 1
                if on_progress is not None:
                    on_progress("shards", done, total)

            results: Iterable = (write_shard(job, staging[job.name], on_sample=tick) for job in todo)
        else:
            results = pool.map_unordered(_write_task, [(job, staging[job.name]) for job in todo])
        for result in results:
            destination.commit(staging.pop(result.name), result.name)
            progress.record(result)
            if pool.workers > 1:
                done += planned_count[result.name]
                if on_progress is not None:
                    on_progress("shards", done, total)
    except BaseException:
        pool.close(abort=True)  # no worker may still be writing when the temporaries are removed
        for path in staging.values():
            discard(path)
        progress.flush(quiet=True)
        raise
    progress.flush()

    shards = [
        {"name": name, "samples": progress.records[name]["samples"], "bytes": progress.records[name]["bytes"]}
        for name in names
    ]
    skipped = [item for name in names for item in progress.records[name]["skipped"]]
    num_samples = sum(shard["samples"] for shard in shards)
    index = {
        "format": INDEX_FORMAT,
        "num_samples": num_samples,
        "shards": shards,
        "classes": list(plan.classes),
        "synsets": list(plan.synsets),
        "skipped": skipped,
        "settings": plan.settings.as_dict(),
        "meta": {"made_by": "flsl data shards", "plan": plan.digest, "sample_format": SAMPLE_FORMAT},
    }
    destination.write_json(INDEX_NAME, index)
    return ShardReport(
        destination.url, len(shards), num_samples, len(plan.classes), len(skipped), written=len(todo), kept=kept
    )


def _usable_records(
    plan: ShardPlan, destination: Destination, sizes: dict[str, int | None]
) -> dict[str, dict[str, Any]] | None:
    """Records of the finished shards in DEST that belong to `plan`, or None when DEST already
    holds the complete shard set. Refuses a DEST that holds anything else."""
    fix = "Rerun with the same SRC, annotations and settings to continue, or choose a new DEST"
    index = destination.read_json(INDEX_NAME) if INDEX_NAME in sizes else None
    progress = destination.read_json(PROGRESS_NAME) if PROGRESS_NAME in sizes else None
    records: dict[str, dict[str, Any]] = {}
    if index is not None:
        if not isinstance(index, dict) or index.get("meta", {}).get("plan") != plan.digest:
            raise DataError(
                "DEST already holds a shard set made from other input or settings", where=destination.url, fix=fix
            )
        shard_of = (
            {sample.relpath: job.name for job in plan.jobs for sample in job.samples} if index.get("skipped") else {}
        )
        records = {
            shard["name"]: {
                "bytes": shard.get("bytes"),
                "samples": shard["samples"],
                "skipped": [s for s in index.get("skipped", []) if shard_of.get(s.get("file")) == shard["name"]],
            }
            for shard in index["shards"]
        }
    if progress is not None:
        if not isinstance(progress, dict) or progress.get("plan") != plan.digest:
            raise DataError(
                f"DEST holds an unfinished shard set of another plan ({_difference(progress, plan)})",
                where=destination.url,
                fix=fix,
            )
        records.update(progress.get("shards", {}))
    if index is None and progress is None:
        partials = {f"{job.name}.tmp" for job in plan.jobs}
        foreign = [name for name in sizes if name not in partials]
        if foreign:
            raise DataError(
                f"DEST is not empty (it holds {foreign[0]!r}) and was not made by `flsl data shards`",
                where=destination.url,
                fix="Choose a new or empty DEST",
            )
    usable = {
        name: record
        for name, record in records.items()
        if sizes.get(name) is not None and sizes.get(name) == record.get("bytes")
    }
    if index is not None and len(usable) == len(plan.jobs):
        return None
    return usable


def _difference(progress: Any, plan: ShardPlan) -> str:
    earlier = progress.get("shape") if isinstance(progress, dict) else None
    if not isinstance(earlier, dict):
        return "its progress.json is not from this version of flsl"
    now = plan.settings.shape()
    changed = [f"{key} was {earlier.get(key)!r}, now {now[key]!r}" for key in now if earlier.get(key) != now[key]]
    return "; ".join(changed) if changed else "the source images or annotations differ"


class _Progress:
    """`progress.json`: the plan's digest and a record per finished shard, rewritten at most every
    few seconds (a shard finished but not yet recorded is simply written again on a rerun)."""

    def __init__(self, plan: ShardPlan, destination: Destination, records: dict[str, dict[str, Any]]) -> None:
        self.plan = plan
        self.destination = destination
        self.records = dict(records)
        self._flushed = 0.0

    def record(self, result: ShardResult) -> None:
        self.records[result.name] = result.record()
        if time.monotonic() - self._flushed >= _PROGRESS_EVERY_S:
            self.flush()

    def flush(self, *, quiet: bool = False) -> None:
        order = {job.name: i for i, job in enumerate(self.plan.jobs)}
        content = {
            "format": PROGRESS_FORMAT,
            "plan": self.plan.digest,
            "shape": self.plan.settings.shape(),
            "shards": {name: self.records[name] for name in sorted(self.records, key=order.__getitem__)},
        }
        try:
            self.destination.write_json(PROGRESS_NAME, content)
        except DataError:
            if not quiet:
                raise
        self._flushed = time.monotonic()
