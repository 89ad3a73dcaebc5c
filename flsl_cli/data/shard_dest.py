"""Where `flsl data shards` writes: a local directory or any fsspec URL (`s3://`, `gs://`,
`memory://`, ...), with writes that never leave a partial file under its final name.

* local: a shard is written to `NAME.tmp` in the destination directory, then flushed to disk
  and renamed (`storage.commit_file`).
* object stores (S3, GCS, Azure, memory): a shard is built in a local temporary directory and
  uploaded to its final key in one `put_file` (a single PUT or a multipart upload; either
  becomes visible only when complete).
* other fsspec file systems: uploaded to a temporary name, then moved to the final name.

Storage goes through `flsl_cli.storage` (transient remote errors are retried). Storage options
(credentials, endpoints) come from the backend's usual configuration (for S3: AWS environment
variables, profiles, or fsspec's `FSSPEC_S3_*` variables) and are never printed; a
`user:password@` in DEST is masked in messages.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from flsl_cli import storage
from flsl_cli.errors import DataError

_BUCKETED = storage.OBJECT_STORES - {"memory"}


class Destination:
    """A destination directory (`url`) on any storage `flsl_cli.storage` reaches (which also
    retries transient remote errors)."""

    def __init__(self, url: str) -> None:
        self.url = storage.redact(url)
        try:
            storage.filesystem(url)
        except DataError as err:  # named again with the redacted URL
            raise DataError(err.what, where=self.url, fix=err.fix) from None
        self.root = storage.normalize(url)
        self.protocol = storage.protocol(self.root)
        self.is_local = storage.is_local(self.root)
        self._staging: str | None = None

    # -- checks ----------------------------------------------------------------------------

    def check_reachable(self) -> None:
        """Fail early on a missing bucket or a destination that is a file; creates nothing."""
        if self.protocol in _BUCKETED:
            bucket = self.root.split("://", 1)[1].split("/", 1)[0]
            try:
                exists = storage.exists(f"{self.protocol}://{bucket}")
            except PermissionError:
                raise DataError(
                    f"access to bucket {bucket!r} is denied",
                    where=self.url,
                    fix="Check the credentials and the bucket's permissions",
                ) from None
            except Exception as err:  # noqa: BLE001 - network and credential errors of any backend
                raise DataError(
                    f"cannot reach the destination ({type(err).__name__}: {_first_line(err)})",
                    where=self.url,
                    fix="Check the URL, the network and the credentials",
                ) from None
            if not exists:
                raise DataError(
                    f"bucket {bucket!r} does not exist",
                    where=self.url,
                    fix="Create the bucket first (flsl does not create buckets) or fix the URL",
                )
        try:
            is_file = storage.isfile(self.root)
        except FileNotFoundError:
            is_file = False
        except OSError as err:
            raise DataError(
                f"cannot reach the destination ({err.strerror or _first_line(err)})",
                where=self.url,
                fix="Check the URL, the permissions and the credentials",
            ) from None
        if is_file:
            raise DataError("DEST is a file, expected a directory", where=self.url, fix="Choose another DEST")

    def prepare(self) -> None:
        """Create the destination directory (not on object stores, where keys need no folders)."""
        try:
            storage.makedirs(self.root)
        except OSError as err:
            raise self.not_writable(err) from None

    def not_writable(self, err: BaseException) -> DataError:
        reason = getattr(err, "strerror", None) or _first_line(err) or type(err).__name__
        return DataError(
            f"DEST is not writable ({reason})",
            where=self.url,
            fix="Choose a DEST you can write to (check permissions, free space and credentials)",
        )

    # -- reading ---------------------------------------------------------------------------

    def listing(self) -> dict[str, int | None]:
        """{name: size in bytes, None for a folder} of what is directly in the destination
        (empty if it does not exist)."""
        try:
            return storage.list_sizes(self.root)
        except OSError as err:
            raise DataError(
                f"cannot list DEST ({err.strerror or _first_line(err)})",
                where=self.url,
                fix="Check the permissions and credentials",
            ) from None

    def read_json(self, name: str) -> Any | None:
        """The parsed JSON file `name`, or None if it does not exist."""
        try:
            return json.loads(storage.read_bytes(self.path(name)))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except ValueError as err:
            raise DataError(
                f"{name} in DEST is not valid JSON ({err})",
                where=self.url,
                fix="Use a new DEST, or delete the damaged file to start over",
            ) from None

    # -- writing ---------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return storage.join(self.root, name)

    def write_json(self, name: str, obj: Any) -> None:
        """Write `name` so that it appears complete or not at all."""
        try:
            storage.write_json_atomic(self.path(name), obj, indent=2)
        except OSError as err:
            raise self.not_writable(err) from None

    def staging_file(self, name: str) -> str:
        """A local path to build `name` in before `commit` (`NAME.tmp` beside it when local, so
        that the commit is a rename)."""
        if self.is_local:
            return self.path(name) + ".tmp"
        if self._staging is None:
            self._staging = tempfile.mkdtemp(prefix="flsl-shards-")
        return os.path.join(self._staging, name)

    def commit(self, staging: str, name: str) -> None:
        """Move a complete staged file to its final name."""
        try:
            storage.commit_file(Path(staging), self.path(name))
        except OSError as err:
            raise self.not_writable(err) from None
        finally:
            if not self.is_local:
                discard(staging)

    def remove(self, name: str) -> None:
        try:
            storage.remove(self.path(name))
        except OSError as err:
            raise self.not_writable(err) from None

    def remove_stale_temporaries(self, names: list[str], listing: dict[str, int | None]) -> None:
        """Delete the `NAME.tmp` files an interrupted run left, for the given final names."""
        for name in names:
            if f"{name}.tmp" in listing:
                self.remove(f"{name}.tmp")

    def close(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def discard(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
