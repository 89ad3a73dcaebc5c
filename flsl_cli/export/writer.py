"""Where an export is written: a temporary sibling of the target that is verified first and
then renamed onto it, so a failed export leaves nothing at the target (and an existing target,
replaced with --force, stays as it was until the new file is proven good)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flsl_cli.export import ExportError

# What a timm folder export holds; --force replaces a directory only if it holds nothing else.
FOLDER_FILES = frozenset({"config.json", "model.safetensors"})


def check_target(out: Path, *, force: bool, folder: bool) -> None:
    """Refuse a target that exists (unless --force) or that --force must not replace."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise ExportError(
            "the output already exists", where=str(out), fix="Pass --force to replace it, or choose another --out"
        )
    if folder and not out.is_dir():
        raise ExportError(
            "the output is a file, but this export writes a directory",
            where=str(out),
            fix="Remove the file or choose another --out",
        )
    if not folder and out.is_dir():
        raise ExportError(
            "the output is a directory, but this export writes a file",
            where=str(out),
            fix="Choose a file name for --out",
        )
    if folder:
        others = sorted(entry.name for entry in out.iterdir() if entry.name not in FOLDER_FILES)
        if others:
            raise ExportError(
                f"the output directory holds files that are not part of a timm export ({', '.join(others[:3])})",
                where=str(out),
                fix="--force only replaces an earlier export; choose another --out",
            )


def _temporary_sibling(out: Path, tag: str) -> Path:
    # keep the suffix: timm chooses its loader by the file name (.safetensors)
    return out.with_name(f".{out.stem}.flsl-{tag}-{os.getpid()}{out.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def staged(out: Path, *, force: bool, folder: bool) -> Iterator[Path]:
    """Yield a temporary path beside `out` to write and verify; on a clean exit move it onto
    `out`, on any error remove it."""
    check_target(out, force=force, folder=folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(out, "tmp")
    _remove(tmp)
    try:
        yield tmp
        _commit(tmp, out)
    finally:
        _remove(tmp)


def _commit(tmp: Path, out: Path) -> None:
    if not out.is_dir():
        os.replace(tmp, out)  # atomic, also over an existing file
        return
    old = _temporary_sibling(out, "old")
    _remove(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    _remove(old)
