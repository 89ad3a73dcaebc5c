"""Finding webdataset tar shards and reading their samples.

`data.train` may be a directory (with `index.json`, or holding `*.tar`), one `.tar` file, a
brace pattern (`/data/train-{000000..000127}.tar`) or a comma-separated list. Sample counts
come from `index.json` beside the shards, else from one pass over the tar headers.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from flsl_cli.errors import DataError

INDEX_NAME = "index.json"


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


def resolve_shards(spec: str, *, key: str = "data.train") -> ShardSet:
    """Every shard named by `spec`, with sample counts, or a DataError naming `key`."""
    spec = spec.strip()
    fix = "Point it at shards written by `flsl data demo` (or `flsl data shards`)"
    path = Path(spec).expanduser()
    if path.is_dir():
        index = path / INDEX_NAME
        if index.exists():
            return _from_index(index, key=key)
        files = sorted(p for p in path.glob("*.tar"))
        if not files:
            raise DataError(f"{key} is a directory with no .tar shards and no {INDEX_NAME}",
                            where=str(path), fix=fix)
    else:
        names = [part for item in spec.split(",") if item.strip() for part in braceexpand.braceexpand(item.strip())]
        files = [Path(name).expanduser() for name in names]
        missing = [str(f) for f in files if not f.exists()]
        if not files or missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "") if missing else spec
            raise DataError(f"{key} names shards that do not exist: {shown}", where=spec, fix=fix)
    counts = _counts_from_sibling_index(files)
    shards = tuple(Shard(url=str(f), samples=counts.get(f.name) if f.name in counts else count_samples(f))
                   for f in files)
    return _checked(ShardSet(shards=shards), key=key, where=spec)


def _from_index(index: Path, *, key: str) -> ShardSet:
    try:
        data = json.loads(index.read_text())
        shards = tuple(Shard(url=str(index.parent / item["name"]), samples=int(item["samples"]))
                       for item in data["shards"])
        classes = tuple(data.get("classes", ()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{key}: the shard index is unreadable or malformed ({exc})", where=str(index),
                        fix="Regenerate the shards, or remove index.json to count samples from the tars") from None
    missing = [s.url for s in shards if not Path(s.url).exists()]
    if missing:
        raise DataError(f"{key}: {len(missing)} shard(s) listed in the index are missing, e.g. {missing[0]}",
                        where=str(index), fix="Restore the missing files or regenerate the shards")
    return _checked(ShardSet(shards=shards, classes=classes), key=key, where=str(index))


def _counts_from_sibling_index(files: list[Path]) -> dict[str, int]:
    if not files:
        return {}
    index = files[0].parent / INDEX_NAME
    if not index.exists():
        return {}
    try:
        return {item["name"]: int(item["samples"]) for item in json.loads(index.read_text())["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _checked(shard_set: ShardSet, *, key: str, where: str) -> ShardSet:
    if shard_set.num_samples == 0:
        raise DataError(f"{key} holds no samples", where=where,
                        fix="Check that the shards were written completely")
    return shard_set


def count_samples(path: Path) -> int:
    keys = set()
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if member.isfile():
                    keys.add(_split_name(member.name)[0])
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"cannot read the shard ({exc})", where=str(path),
                        fix="Check the file's permissions, or regenerate it") from None
    return len(keys)


def _split_name(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


def iter_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a tar shard, in file order."""
    current_key, fields = None, {}
    try:
        with tarfile.open(url, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                if key != current_key and current_key is not None:
                    yield current_key, fields
                    fields = {}
                current_key = key
                handle = tar.extractfile(member)
                fields[ext] = handle.read() if handle else b""
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"cannot read the shard ({exc})", where=url,
                        fix="Check the file's permissions, or regenerate it") from None
    if current_key is not None:
        yield current_key, fields
