"""The one module that talks to fsspec: paths are strings that may be remote (s3://, gs://,
http(s)://, memory://, or local paths).

Transient storage errors (timeouts, connection resets, HTTP 5xx, throttling: told by exception
type, errno and HTTP status) are retried with exponential backoff, each retry logged as one
WARNING line of the `flsl_cli.storage` logger (what, URL, attempt n/N, reason); errors that
retrying cannot fix (missing file, no permission, malformed data, unknown protocol) are raised
at once. Credentials come from the usual environment of each backend and
are never printed: error messages name URLs, never storage options.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from fsspec.core import url_to_fs

from flsl_cli.errors import DataError, FlslError
from flsl_cli.processes import pid_alive

T = TypeVar("T")
log = logging.getLogger(__name__)

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


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it), or a DataError when the protocol is not available."""
    try:
        return url_to_fs(str(url))
    except (ImportError, ValueError) as exc:
        name = protocol(str(url))
        package = {
            "s3": "s3fs",
            "gs": "gcsfs",
            "gcs": "gcsfs",
            "az": "adlfs",
            "abfs": "adlfs",
            "http": "aiohttp",
            "https": "aiohttp",
        }.get(name)
        fix = (
            f"Install the fsspec backend for {name}:// (pip install {package})"
            if package
            else f"Use a protocol fsspec knows (file, s3, gs, http, https, memory, ...); {name}:// is not one"
        )
        raise DataError(f"cannot open {name}:// URLs ({str(exc).splitlines()[0]})", where=str(url), fix=fix) from None


# What marks a failure that may pass if tried again. Decided from the exception's type, its
# errno and the HTTP status or error code the server sent, never from the words of a message.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNRESET",
        "ECONNABORTED",
        "ECONNREFUSED",
        "ETIMEDOUT",
        "EPIPE",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ENETDOWN",
        "ENETRESET",
        "EAGAIN",
        "EBUSY",
        "EREMOTEIO",
    )
    if hasattr(errno, name)
)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "RequestLimitExceeded",
        "TooManyRequestsException",
    }
)
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError, ssl.SSLError)
# Exception classes of optional libraries, by module: (transient, permanent) class names.
_LIBRARY_ERRORS = {
    "aiohttp": (("ClientConnectionError", "ClientPayloadError"), ("ClientSSLError",)),
    "botocore.exceptions": (("HTTPClientError", "ConnectionError", "IncompleteReadError"), ("SSLError",)),
}


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: timeouts, resets, refused or dropped connections, throttling and
    HTTP 5xx, recognised by type, errno and status (also on the error a backend translated from:
    its `__cause__`); not missing, forbidden, malformed or anything else."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _transient_verdict(current)
        if verdict is not None:
            return verdict
        current = current.__cause__
    return False


def _transient_verdict(exc: BaseException) -> bool | None:
    """True or False when `exc` itself tells, None when only its cause may."""
    for module, (transient, permanent) in _LIBRARY_ERRORS.items():
        library = sys.modules.get(module)
        if library is None:
            continue
        if isinstance(exc, tuple(getattr(library, name) for name in permanent if hasattr(library, name))):
            return False
        if isinstance(exc, tuple(getattr(library, name) for name in transient if hasattr(library, name))):
            return True
    if isinstance(exc, _PERMANENT) and not isinstance(exc, ssl.SSLEOFError):  # EOF: the peer hung up
        return False
    if isinstance(exc, (TimeoutError, ConnectionError, ssl.SSLEOFError)):
        return True
    status, code = http_status(exc)
    if status is not None or code is not None:
        return status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _TRANSIENT_ERRNOS or None  # a generic EIO may wrap a 502 (its cause says)
    return None


def http_status(exc: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, error code) an exception carries: aiohttp's `status`, botocore's `response`,
    gcsfs's `code`; (None, None) when it carries none."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        code = (response.get("Error") or {}).get("Code")
        return (int(status) if isinstance(status, int) else None), (str(code) if code else None)
    for name in ("status", "status_code", "code"):
        value = getattr(exc, name, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value, None
    return None, None


def _reason(exc: BaseException) -> str:
    """The type and what the server or OS said, from attributes only (messages may hold URLs
    with credentials in them)."""
    parts = [type(exc).__name__]
    status, code = http_status(exc)
    if status is not None or code is not None:
        parts.append(" ".join(str(p) for p in (f"HTTP {status}" if status else None, code) if p))
    elif isinstance(exc, OSError) and exc.errno is not None:
        parts.append(errno.errorcode.get(exc.errno, str(exc.errno)))
    cause = exc.__cause__
    if cause is not None and cause is not exc:
        parts.append(f"from {_reason(cause)}")
    return " ".join(parts)


def with_retries(action: Callable[[], T], *, url: str, what: str, attempts: int = RETRY_ATTEMPTS) -> T:
    """Run `action` (`what` it does to `url`: "reading", "listing", ...), retrying transient
    failures with exponential backoff and jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not retry_after(exc, url=url, what=what, attempt=attempt, attempts=attempts):
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def retry_after(exc: BaseException, *, url: str, what: str, attempt: int, attempts: int) -> bool:
    """Whether to try again after attempt `attempt` of `attempts` failed with `exc`: when it is
    transient and attempts are left, after logging one line and waiting the backoff. The one
    retry policy of flsl."""
    if attempt >= attempts or not is_transient(exc):
        return False
    delay = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (attempt - 1)) * (0.5 + random.random())
    log.warning(
        "retrying %s %s: attempt %d/%d failed (%s); next in %.1f s",
        what,
        redact(url),
        attempt,
        attempts,
        _reason(exc),
        delay,
    )
    _sleep(delay)
    return True


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return with_retries(lambda: fs.exists(path), url=url, what="checking")


def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    return with_retries(lambda: fs.isdir(path), url=url, what="checking")


def isfile(url: str) -> bool:
    fs, path = filesystem(url)
    return with_retries(lambda: fs.isfile(path), url=url, what="checking")


def info(url: str) -> dict[str, Any]:
    """What the file system knows of a file: size, and mtime or ETag or the like (names vary by backend)."""
    fs, path = filesystem(url)
    return with_retries(lambda: fs.info(path), url=url, what="checking")


def listdir(url: str) -> list[str]:
    """Names (not paths) of the entries of a directory; [] if it does not exist."""
    return sorted(list_sizes(url))


def list_sizes(url: str) -> dict[str, int | None]:
    """{name: size in bytes, None for a folder} of the entries of a directory; {} if it does not exist."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)  # listings are cached per process; another process may have written since
    try:
        entries = with_retries(lambda: fs.ls(path, detail=True), url=url, what="listing")
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {
        basename(entry["name"]): (int(entry.get("size") or 0) if entry.get("type") == "file" else None)
        for entry in entries
    }


def read_text_file(
    path: str | Path, *, what: str, error: type[FlslError] = FlslError, missing_fix: str = "Check the path"
) -> str:
    """The text of a user's local UTF-8 file (a byte-order mark is dropped), or `error` saying
    what is wrong with it: missing, a directory, not UTF-8, unreadable. `what` names the file
    for the user ("recipe file", "box file", ...)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise error(f"the {what} does not exist", where=str(path), fix=missing_fix) from None
    except IsADirectoryError:
        raise error(f"the {what} is a directory, expected a file", where=str(path), fix=missing_fix) from None
    except UnicodeDecodeError as err:
        raise error(
            f"the {what} is not UTF-8 text ({err.reason} at byte {err.start})",
            where=str(path),
            fix="Give a UTF-8 text file",
        ) from None
    except OSError as err:
        raise error(
            f"cannot read the {what} ({err.strerror or err})", where=str(path), fix="Check the file's permissions"
        ) from None


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return with_retries(lambda: fs.cat_file(path), url=url, what="reading")


OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"})


def is_object_store(url: str) -> bool:
    """Storage where one upload is atomic per object and folders need not be created."""
    return protocol(str(url)) in OBJECT_STORES


def temporary_sibling(path: Path) -> Path:
    """Where `replace_local` builds `path` (`.NAME.tmp-PID`)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def replace_local(path: Path, write: Callable[[Any], None]) -> None:
    """Write through `write(handle)` into a temporary sibling, flush it to disk, rename it over
    `path` and flush the directory, so that readers (and a machine that crashes) see either the
    old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` survive a crash (where the platform allows opening a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def leftover_temp_files(folder: Path) -> list[Path]:
    """Temporary files of `replace_local` in `folder` (`.NAME.tmp-PID`). Whether they are left
    over from a writer that was killed, or a write in progress, is the caller's to know."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(entry for entry in folder.iterdir() if entry.name.startswith(".") and ".tmp-" in entry.name)


def abandoned_temp_files(folder: Path) -> list[Path]:
    """The temporary files and folders in `folder` (`.NAME.tmp-PID`) whose writer, a process of
    this machine, is gone."""
    return [entry for entry in leftover_temp_files(folder) if not _writer_alive(entry)]


def _writer_alive(temporary: Path) -> bool:
    pid = temporary.name.rsplit(".tmp-", 1)[-1]
    return pid.isdigit() and pid_alive(int(pid))


def write_atomic(url: str | Path, write: Callable[[Any], None]) -> None:
    """Write a whole file through `write(handle)` (a binary handle) so that readers see either
    the old content or the new, never a part: see `replace_local` for local paths; remote files
    are built in a local temporary file and moved into place by `commit_file`."""
    url = str(url)
    if is_local(url):
        replace_local(local_path(url), write)
        return
    handle, name = tempfile.mkstemp(prefix="flsl-")
    try:
        with os.fdopen(handle, "wb") as staged:
            write(staged)
        commit_file(Path(name), url)
    finally:
        Path(name).unlink(missing_ok=True)


def write_bytes_atomic(url: str | Path, data: bytes) -> None:
    url = str(url)
    if is_local(url) or not is_object_store(url):
        write_atomic(url, lambda handle: handle.write(data))
        return
    fs, path = filesystem(url)
    with_retries(lambda: fs.pipe_file(path, data), url=url, what="writing")


def write_text_atomic(url: str | Path, text: str) -> None:
    write_bytes_atomic(url, text.encode("utf-8"))


def write_json_atomic(url: str | Path, obj: Any, *, indent: int = 1) -> None:
    write_text_atomic(url, json.dumps(obj, indent=indent) + "\n")


# Where a remote filesystem cannot upload atomically, a file is uploaded to this name, then moved.
REMOTE_TEMP_SUFFIX = ".tmp"


def commit_file(staged: Path, url: str | Path) -> None:
    """Move a complete local file to `url` so that it appears whole or not at all: flushed to
    disk and renamed locally (`staged` must be on the same file system, e.g. `url` + ".tmp");
    one upload on object stores (a single PUT or a multipart upload, visible only when complete);
    an upload to a temporary name, then a move, elsewhere. A remote commit leaves `staged` in place."""
    url = str(url)
    if is_local(url):
        with open(staged, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staged, local_path(url))
        _fsync_dir(local_path(url).parent)
        return
    fs, path = filesystem(url)
    if is_object_store(url):
        with_retries(lambda: fs.put_file(str(staged), path), url=url, what="uploading")
        return
    temporary = path + REMOTE_TEMP_SUFFIX
    with_retries(lambda: fs.put_file(str(staged), temporary), url=url, what="uploading")
    with_retries(lambda: fs.mv(temporary, path), url=url, what="moving")


def upload_file_atomic(local: Path, url: str | Path) -> None:
    """Copy a finished local file to `url` atomically (rename locally, one upload remotely)."""
    url = str(url)
    if is_local(url):

        def copy(handle) -> None:
            with open(local, "rb") as source:
                while chunk := source.read(1 << 22):
                    handle.write(chunk)

        replace_local(local_path(url), copy)
        return
    commit_file(Path(local), url)


def download(url: str, *, suffix: str = "") -> Path:
    """A local copy of `url` in a temporary file (the local path itself for local URLs)."""
    if is_local(url):
        return local_path(url)
    fs, path = filesystem(url)
    handle, name = tempfile.mkstemp(prefix="flsl-", suffix=suffix)
    os.close(handle)
    with_retries(lambda: fs.get_file(path, name), url=url, what="downloading")
    return Path(name)


def remove(url: str) -> None:
    fs, path = filesystem(url)
    try:
        with_retries(lambda: fs.rm(path, recursive=True), url=url, what="removing")
    except FileNotFoundError:
        pass


def makedirs(url: str) -> None:
    """Create a directory and its parents (nothing to do on object stores, where keys need no folders)."""
    if is_local(url):
        local_path(url).mkdir(parents=True, exist_ok=True)
        return
    if is_object_store(url):
        return
    fs, path = filesystem(url)
    with_retries(lambda: fs.makedirs(path, exist_ok=True), url=url, what="creating")


def redact(url: str) -> str:
    """`url` without a user:password part, fit to print."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def open_read(url: str, **options: Any) -> Any:
    """A binary fsspec stream reading `url` (opened with retries)."""
    fs, path = filesystem(url)
    return with_retries(lambda: fs.open(path, "rb", **options), url=url, what="opening")


def open_write(url: str) -> Any:
    """A binary fsspec stream writing `url`. Not atomic: write a staging name, then
    `commit_file` it (as the shard writers do)."""
    fs, path = filesystem(url)
    return fs.open(path, "wb")
