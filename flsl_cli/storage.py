"""The one module that talks to fsspec: paths are strings that may be remote (s3://, gs://,
http(s)://, memory://, or local paths).

Transient storage errors (timeouts, connection resets, HTTP 5xx, throttling) are retried with
exponential backoff; errors that retrying cannot fix (missing file, no permission, unknown
protocol) are raised at once. Credentials come from the usual environment of each backend and
are never printed: error messages name URLs, never storage options.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fsspec.core import url_to_fs

from flsl_cli.errors import DataError

T = TypeVar("T")

RETRY_ATTEMPTS = 6
RETRY_BASE_SECONDS = 0.5
RETRY_MAX_SECONDS = 8.0


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def is_local(url: str) -> bool:
    return protocol(str(url)) in ("file", "local")


def local_path(url: str) -> Path:
    return Path(str(url).removeprefix("file://")).expanduser()


def normalize(url: str | Path) -> str:
    """Local paths get `~` expanded; remote URLs are left as they are."""
    url = str(url)
    return str(local_path(url)) if is_local(url) else url.rstrip("/")


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_local(base):
        return str(local_path(base).joinpath(*parts))
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def parent(url: str) -> str:
    url = str(url)
    if is_local(url):
        return str(local_path(url).parent)
    return url.rstrip("/").rsplit("/", 1)[0]


def basename(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def filesystem(url: str):
    """(fsspec filesystem, path inside it), or a DataError when the protocol is not available."""
    try:
        return url_to_fs(str(url))
    except (ImportError, ValueError) as exc:
        name = protocol(str(url))
        package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                   "http": "aiohttp", "https": "aiohttp"}.get(name)
        fix = (f"Install the fsspec backend for {name}:// (pip install {package})" if package
               else f"Use a protocol fsspec knows (file, s3, gs, http, https, memory, ...); {name}:// is not one")
        raise DataError(f"cannot open {name}:// URLs ({str(exc).splitlines()[0]})", where=str(url), fix=fix) from None


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: timeouts, resets, 5xx and throttling; not missing or forbidden."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    markers = ("timeout", "timed out", "connection", "reset", "temporarily", "throttl", "slow down",
               "503", "502", "500", "504", "internalerror", "serviceunavailable", "endpoint",
               "server disconnected", "broken pipe", "cannot connect", "remote end closed")
    return any(marker in text for marker in markers)


def with_retries(action: Callable[[], T], *, what: str, attempts: int = RETRY_ATTEMPTS,
                 on_retry: Callable[[int, BaseException], None] | None = None) -> T:
    """Run `action`, retrying transient failures with exponential backoff and jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt == attempts or not is_transient(exc):
                raise
            if on_retry:
                on_retry(attempt, exc)
            delay = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (attempt - 1))
            time.sleep(delay * (0.5 + random.random()))
    raise AssertionError("unreachable")  # pragma: no cover


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return with_retries(lambda: fs.exists(path), what=f"checking {url}")


def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    return with_retries(lambda: fs.isdir(path), what=f"checking {url}")


def listdir(url: str) -> list[str]:
    """Names (not paths) of the entries of a directory; [] if it does not exist."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)  # listings are cached per process; another process may have written since
    try:
        entries = with_retries(lambda: fs.ls(path, detail=False), what=f"listing {url}")
    except FileNotFoundError:
        return []
    return sorted(basename(entry) for entry in entries)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return with_retries(lambda: fs.cat_file(path), what=f"reading {url}")


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def replace_local(path: Path, write: Callable[[Any], None]) -> None:
    """Write through `write(handle)` into a temporary sibling, flush it to disk, rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def leftover_temp_files(folder: Path) -> list[Path]:
    """Temporary files of `replace_local` in `folder` (`.NAME.tmp-PID`). Whether they are left
    over from a writer that was killed, or a write in progress, is the caller's to know."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(entry for entry in folder.iterdir() if entry.name.startswith(".") and ".tmp-" in entry.name)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write a whole file so that readers see either the old content or the new, never a part:
    a temporary file renamed into place locally; one PUT (atomic per object) on object stores."""
    if is_local(url):
        replace_local(local_path(url), lambda handle: handle.write(data))
        return
    fs, path = filesystem(url)
    with_retries(lambda: fs.pipe_file(path, data), what=f"writing {url}")


def write_text_atomic(url: str, text: str) -> None:
    write_bytes_atomic(url, text.encode("utf-8"))


def upload_file_atomic(local: Path, url: str) -> None:
    """Copy a finished local file to `url` atomically (rename locally, one upload remotely)."""
    if is_local(url):
        def copy(handle) -> None:
            with open(local, "rb") as source:
                while chunk := source.read(1 << 22):
                    handle.write(chunk)

        replace_local(local_path(url), copy)
        return
    fs, path = filesystem(url)
    with_retries(lambda: fs.put_file(str(local), path), what=f"uploading {url}")


def download(url: str, *, suffix: str = "") -> Path:
    """A local copy of `url` in a temporary file (the local path itself for local URLs)."""
    if is_local(url):
        return local_path(url)
    fs, path = filesystem(url)
    handle, name = tempfile.mkstemp(prefix="flsl-", suffix=suffix)
    os.close(handle)
    with_retries(lambda: fs.get_file(path, name), what=f"downloading {url}")
    return Path(name)


def remove(url: str) -> None:
    fs, path = filesystem(url)
    try:
        with_retries(lambda: fs.rm(path, recursive=True), what=f"removing {url}")
    except FileNotFoundError:
        pass


def makedirs(url: str) -> None:
    if is_local(url):
        local_path(url).mkdir(parents=True, exist_ok=True)
        return
    fs, path = filesystem(url)
    try:
        fs.makedirs(path, exist_ok=True)
    except Exception:  # noqa: BLE001 - object stores have no directories to create
        pass


def open_read(url: str, **options: Any):
    fs, path = filesystem(url)
    return with_retries(lambda: fs.open(path, "rb", **options), what=f"opening {url}")

