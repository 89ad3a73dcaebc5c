"""A remote run directory (s3://, gs://, ...) checked and prepared through a local copy."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flsl_cli import storage
from flsl_cli.errors import FlslError, RunDirError
from flsl_cli.train import remote


@contextmanager
def staged(target: str, *, newest_checkpoint: bool) -> Iterator[Path]:
    """The run dir to check and prepare: itself, or for a remote one a local copy that is pushed
    back when the block succeeds."""
    if not remote.is_remote(target):
        yield Path(target)
        return
    url = storage.normalize(target)
    local = remote.staging_dir(url, role="parent")
    try:
        with storage_errors(url):
            remote.pull(url, local, rank=None, newest_checkpoint=newest_checkpoint)
        yield local
        with storage_errors(url):
            remote.push(local, url)
    finally:
        shutil.rmtree(local, ignore_errors=True)


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """A remote run dir that cannot be read or written (credentials, bucket, network) is a user
    error naming the URL, not a traceback from the storage library."""
    try:
        yield
    except FlslError:
        raise
    except Exception as exc:  # noqa: BLE001 - each fsspec backend raises its own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunDirError(
            f"cannot reach the run directory ({type(exc).__name__}: {first})",
            where=url,
            fix="Check the URL, that the bucket exists, and the storage credentials (for S3 the "
            "AWS_* variables or profile; for GCS gcloud's)",
        ) from None
