"""Finding webdataset tar shards on any fsspec storage and reading their samples.

`data.train` may be a directory (with `index.json`, or holding `*.tar`), the URL of an
`index.json`, one `.tar`, a brace pattern (`s3://bucket/in1k-train-{000000..001023}.tar`) or a
comma-separated list of these; local paths and s3://, gs://, http(s)://, memory:// URLs alike.
Sample counts come from `index.json` beside the shards, else from one pass over the tar headers.

Reading a shard retries transient storage errors, continuing after the last sample delivered;
a shard that still fails, or a truncated tar, ends with a `BadShard` record (how many samples
were lost and why) instead of an exception, so training can count it and go on.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass

import braceexpand
from webdataset import tariterators

from flsl_cli import storage
from flsl_cli.errors import DataError, first_line

INDEX_NAME = "index.json"
# The fields that may hold a sample's image, in the readers' order of preference.
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
FIX = "Point it at shards written by `flsl data demo` or `flsl data shards`"


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


@dataclass(frozen=True)
class ShardSet:
    shards: tuple[Shard, ...]
    classes: tuple[str, ...] = ()

    @property
    def num_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)


@dataclass(frozen=True)
class BadShard:
    """Part of a shard that could not be read: `samples` samples were lost, after `delivered`."""

    url: str
    reason: str
    samples: int
    delivered: int


def reader_slot(*, rank: int, worker: int, workers: int) -> int:
    """The reader slot of data worker `worker` of process `rank`, each process running `workers`
    of them: processes hold consecutive slots, and there are world size x `workers` in all. The
    training stream and the k-NN reader split the shards over these slots."""
    return rank * workers + worker


def image_field(fields: Mapping[str, bytes]) -> str | None:
    """The field that holds the sample's image (see IMAGE_FIELDS), or None."""
    return next((name for name in IMAGE_FIELDS if fields.get(name)), None)


def resolve_shards(spec: str, *, key: str = "data.train") -> ShardSet:
    """Every shard named by `spec`, with sample counts, or a DataError naming `key`."""
    items = [item.strip() for item in str(spec).split(",") if item.strip()]
    if not items:
        raise DataError(f"{key} is empty", where=key, fix=FIX)
    shards: list[Shard] = []
    classes: tuple[str, ...] = ()
    for item in items:
        found, found_classes = _resolve_one(storage.normalize(item), key=key)
        shards.extend(found)
        classes = classes or found_classes
    shard_set = ShardSet(shards=tuple(shards), classes=classes)
    if shard_set.num_samples == 0:
        raise DataError(f"{key} holds no samples", where=str(spec), fix="Check that the shards were written completely")
    return shard_set


def _resolve_one(item: str, *, key: str) -> tuple[list[Shard], tuple[str, ...]]:
    if storage.basename(item) == INDEX_NAME:
        return _from_index(item, key=key)
    if "{" in item:
        return _from_files(list(braceexpand.braceexpand(item)), key=key, spec=item)
    if item.endswith((".tar", ".tar.gz", ".tgz")):
        return _from_files([item], key=key, spec=item)
    if not _safe(lambda: storage.isdir(item), item, key=key):
        if _safe(lambda: storage.isfile(item), item, key=key):
            raise DataError(
                f"{key} is a file that is not a shard or a shard list (flsl reads .tar shards, an {INDEX_NAME}, "
                "a directory of them, a brace pattern or a comma-separated list of .tar files)",
                where=item,
                fix=FIX,
            )
        raise DataError(f"{key} does not exist (no directory, index.json or .tar shard there)", where=item, fix=FIX)
    names = _safe(lambda: storage.listdir(item), item, key=key)
    if INDEX_NAME in names:
        return _from_index(storage.join(item, INDEX_NAME), key=key)
    tars = [storage.join(item, name) for name in names if name.endswith(".tar")]
    if not tars:
        raise DataError(f"{key} is a directory with no .tar shards and no {INDEX_NAME}", where=item, fix=FIX)
    return _from_files(tars, key=key, spec=item)


def _safe(action, url: str, *, key: str):
    """Run a storage query, turning 'no such bucket/host' and the like into a DataError."""
    try:
        return action()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(
            f"{key}: the bucket, host or directory does not exist",
            where=url,
            fix="Check the URL (bucket name, prefix) and your credentials",
        ) from None
    except PermissionError:
        raise DataError(
            f"{key}: access denied", where=url, fix="Check that your credentials allow reading this location"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any other storage failure
        raise DataError(
            f"{key}: cannot reach the storage ({first_line(exc)})",
            where=url,
            fix="Check the URL, the network and your credentials",
        ) from None


def _from_index(index_url: str, *, key: str) -> tuple[list[Shard], tuple[str, ...]]:
    try:
        data = json.loads(_safe(lambda: storage.read_bytes(index_url), index_url, key=key))
        base = storage.parent(index_url)
        shards = [Shard(url=storage.join(base, item["name"]), samples=int(item["samples"])) for item in data["shards"]]
        classes = tuple(data.get("classes", ()))
    except DataError as exc:
        if "does not exist" in exc.what:
            raise DataError(f"{key}: the shard index does not exist", where=index_url, fix=FIX) from None
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{key}: the shard index is malformed ({exc})",
            where=index_url,
            fix="Regenerate the shards, or remove index.json to count samples from the tars",
        ) from None
    if storage.is_local(index_url):
        missing = [s.url for s in shards if not storage.exists(s.url)]
        if missing:
            raise DataError(
                f"{key}: {len(missing)} shard(s) listed in the index are missing, e.g. {missing[0]}",
                where=index_url,
                fix="Restore the missing files or regenerate the shards",
            )
    return shards, classes


def _from_files(urls: list[str], *, key: str, spec: str) -> tuple[list[Shard], tuple[str, ...]]:
    urls = [storage.normalize(url) for url in urls]
    missing = _missing(urls, key=key)
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        what = "matches no shard" if len(missing) == len(urls) else f"names {len(missing)} shard(s) that do not exist"
        raise DataError(f"{key} {what}: {shown}", where=spec, fix=FIX)
    counts: dict[str, int] = {}
    index_classes: tuple[str, ...] = ()
    for directory in sorted({storage.parent(url) for url in urls}):
        sibling = storage.join(directory, INDEX_NAME)
        try:
            data = json.loads(storage.read_bytes(sibling))
            counts.update({storage.join(directory, item["name"]): int(item["samples"]) for item in data["shards"]})
            index_classes = index_classes or tuple(data.get("classes", ()))
        except Exception:  # noqa: BLE001 - no (readable) sibling index: count the samples instead
            continue
    shards = [Shard(url=url, samples=counts[url] if url in counts else count_samples(url)) for url in urls]
    return shards, index_classes


def _missing(urls: list[str], *, key: str) -> list[str]:
    if all(storage.is_local(url) for url in urls):
        return [url for url in urls if not storage.local_path(url).exists()]
    missing = []
    for directory in sorted({storage.parent(url) for url in urls}):
        members = [url for url in urls if storage.parent(url) == directory]
        try:
            listed = set(storage.listdir(directory))
            if not listed and not _safe(lambda d=directory: storage.isdir(d), directory, key=key):
                raise DataError(
                    f"{key}: the bucket or directory does not exist",
                    where=directory,
                    fix="Check the URL (bucket name, prefix) and your credentials",
                )
            missing += [url for url in members if storage.basename(url) not in listed]
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - listing unsupported (plain HTTP servers): ask per file
            if storage.is_transient(exc):  # retried already: the server cannot be reached at all
                raise DataError(
                    f"{key}: connection error: cannot reach {directory} after {storage.RETRY_ATTEMPTS} attempts "
                    f"({first_line(exc)})",
                    where=directory,
                    fix="Check that the server is up and the URL (host, port) is right, and the network between",
                ) from None
            missing += [url for url in members if not _safe(lambda u=url: storage.exists(u), url, key=key)]
    return missing


def count_samples(url: str) -> int:
    keys = set()
    try:
        with storage.open_read(url) as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
            for member in tar:
                key, _ = tariterators.base_plus_ext(member.name)
                if member.isfile() and key is not None:
                    keys.add(key)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DataError(
            f"cannot read the shard ({exc})", where=url, fix="Check the file's permissions, or regenerate it"
        ) from None
    return len(keys)


def _read_tar(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The shard's samples in file order: webdataset's tar iterators read the members and group
    them by key (`a/b.jpg`, `a/b.cls` -> sample `a/b`); errors propagate to `iter_samples`."""
    with storage.open_read(url, block_size=1 << 22) as handle:
        members = ({**member, "__url__": url} for member in tariterators.tar_file_iterator(handle))
        for sample in tariterators.group_by_keys(members):
            key = sample.pop("__key__")
            yield key, {ext: data for ext, data in sample.items() if not ext.startswith("__")}


def iter_samples(
    url: str, *, expected: int | None = None, attempts: int = storage.RETRY_ATTEMPTS
) -> Generator[tuple[str, dict[str, bytes]] | BadShard, None, None]:
    """(key, {extension: bytes}) for each sample of a shard, in file order, then a BadShard
    record if the shard could not be read to its end."""
    delivered = 0
    for attempt in range(1, attempts + 1):
        try:
            for index, sample in enumerate(_read_tar(url)):
                if index >= delivered:
                    delivered += 1
                    yield sample
            return
        except GeneratorExit:
            raise
        except Exception as exc:  # noqa: BLE001 - classified: retry, or report the loss
            if storage.retry_after(exc, url=url, what="reading", attempt=attempt, attempts=attempts):
                continue
            reason = _describe_failure(exc, delivered=delivered, attempts=attempt)
            lost = max(1, (expected - delivered) if expected is not None else 1)
            yield BadShard(url=url, reason=reason, samples=lost, delivered=delivered)
            return


# webdataset's tar iterator appends " @ <the stream object>" to the message of an error it passes
# on; the reason already names the shard's URL.
_STREAM_SUFFIX = re.compile(r" @ <[^<>]*>$")


def _describe_failure(exc: BaseException, *, delivered: int, attempts: int) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = _STREAM_SUFFIX.sub("", text)
    if isinstance(exc, (tarfile.TarError, EOFError)):
        return f"truncated or corrupt tar after {delivered} samples ({text})"
    if attempts > 1:
        return f"unreadable after {attempts} attempts, {delivered} samples read ({type(exc).__name__}: {text})"
    return f"unreadable after {delivered} samples ({type(exc).__name__}: {text})"
