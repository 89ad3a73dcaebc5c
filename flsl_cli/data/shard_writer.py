"""A small, deterministic writer of webdataset tar shards, on `webdataset.TarWriter`.

`ShardWriter` appends samples (a key plus a few named byte fields) to tar files named
`{prefix}-{i:06d}.tar`, starting a new shard every `samples_per_shard` samples, and on a clean
exit writes an `index.json` that lists the shards, their sample counts, the class names and
free-form metadata.

Guarantees:

* The same samples, written in the same order, give byte-identical shards: `tar_writer` sets
  fixed member metadata (mtime 0, uid/gid 0, empty user/group names, mode 0o444, PAX format),
  and `webdataset.TarWriter` writes the fields of a sample in sorted extension order.
* A file is never visible under its final name until it is complete: each shard is written to
  `NAME.tar.tmp` and moved into place by `storage.commit_file` once closed; `index.json` is
  written with `storage.write_json_atomic`.
* If the `with` block raises, the partly written shard is removed and the exception propagates;
  shards completed before the error are left in place but no `index.json` is written.

`tar_writer` and `write_sample` write samples the same way into any binary stream (`flsl data
shards` uses them on its workers' files).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import webdataset

from flsl_cli import storage
from flsl_cli.data.shards import INDEX_NAME

INDEX_FORMAT = "flsl-shards/1"


class ShardWriter:
    """Write samples into webdataset tar shards under `out_dir`; use as a context manager.

    Example::

        with ShardWriter(out, prefix="train", samples_per_shard=100, classes=names) as writer:
            writer.write("train-0000000", {"jpg": jpeg_bytes, "cls": b"3"})
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        prefix: str,
        samples_per_shard: int,
        classes: list[str] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if not prefix or "/" in prefix or "." in prefix:
            raise ValueError(f"prefix must be a non-empty name without '/' or '.', got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.classes = list(classes) if classes is not None else []
        self.meta = dict(meta) if meta is not None else {}
        self.shards: list[dict[str, Any]] = []
        self.num_samples = 0
        self._stream: IO[bytes] | None = None
        self._tar: webdataset.TarWriter | None = None
        self._tmp_path: Path | None = None
        self._in_shard = 0
        self._keys: set[str] = set()
        self._closed = False

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> ShardWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            try:
                self._finish_shard()
                self._write_index()
            except BaseException:
                self._abort()
                raise
        else:
            self._abort()
        self._closed = True

    # -- public API ------------------------------------------------------------------------

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Append one sample: each `fields[ext]` becomes the tar member `{key}.{ext}`."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        check_sample(key, fields)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")

        if self._tar is None:
            self._start_shard()
        assert self._tar is not None
        write_sample(self._tar, key, fields)
        self._keys.add(key)
        self._in_shard += 1
        self.num_samples += 1
        if self._in_shard >= self.samples_per_shard:
            self._finish_shard()

    # -- internals -------------------------------------------------------------------------

    def _shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def _start_shard(self) -> None:
        name = self._shard_name(len(self.shards))
        self._tmp_path = self.out_dir / f"{name}.tmp"
        self._stream = storage.open_write(str(self._tmp_path))
        self._tar = tar_writer(self._stream)
        self._in_shard = 0

    def _finish_shard(self) -> None:
        """Close the open shard (if any) and move it to its final name."""
        if self._tar is None or self._tmp_path is None:
            return
        name = self._shard_name(len(self.shards))
        self._close()
        storage.commit_file(self._tmp_path, self.out_dir / name)
        self._tmp_path = None
        self.shards.append({"name": name, "samples": self._in_shard})
        self._in_shard = 0

    def _write_index(self) -> None:
        index = {
            "format": INDEX_FORMAT,
            "num_samples": self.num_samples,
            "shards": self.shards,
            "classes": self.classes,
            "meta": self.meta,
        }
        storage.write_json_atomic(self.out_dir / INDEX_NAME, index, indent=2)

    def _close(self) -> None:
        """Close the tar, then the file under it (TarWriter leaves a stream it was given open)."""
        try:
            if self._tar is not None:
                self._tar.close()
        finally:
            self._tar = None
            if self._stream is not None:
                self._stream.close()
            self._stream = None

    def _abort(self) -> None:
        """Drop the partly written shard and any temporary file."""
        try:
            self._close()
        except OSError:
            pass  # the partial file is removed next; the error that stopped the writer is reported
        if self._tmp_path is not None:
            self._tmp_path.unlink(missing_ok=True)
        self._tmp_path = None


def check_sample(key: str, fields: Mapping[str, bytes]) -> None:
    """Raise ValueError/TypeError unless `key` and `fields` make a valid webdataset sample."""
    _check_key(key)
    if not fields:
        raise ValueError(f"sample {key!r} has no fields")
    for ext, data in fields.items():
        if not ext or "/" in ext or ext.startswith("_"):  # webdataset keeps "_" names for metadata
            raise ValueError(f"bad field name {ext!r} in sample {key!r}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"field {ext!r} of sample {key!r} must be bytes, got {type(data).__name__}")


def tar_writer(stream: IO[bytes]) -> webdataset.TarWriter:
    """A `webdataset.TarWriter` on an open binary stream, with the fixed member metadata that
    makes shards byte-reproducible and fields written as given (no encoding)."""
    return webdataset.TarWriter(stream, user="", group="", mode=0o444, mtime=0, encoder=False, format="PAX_FORMAT")


def write_sample(writer: webdataset.TarWriter, key: str, fields: Mapping[str, bytes]) -> None:
    """Append one sample: a member `{key}.{ext}` per field, in sorted extension order."""
    check_sample(key, fields)
    writer.write({"__key__": key, **{ext: bytes(data) for ext, data in fields.items()}})


def _check_key(key: str) -> None:
    # webdataset splits a member name into key and extension at the first '.' of its basename.
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key must be non-empty and contain no '.' or '/', got {key!r}")
