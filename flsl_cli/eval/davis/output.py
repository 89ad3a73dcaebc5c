"""Where the predicted masks go: `--out DIR` gets one folder per sequence with one palette PNG
per frame (DAVIS's layout, so the official evaluation code reads it as a results folder).

Every process writes into a staging folder beside DIR; only when the whole evaluation has
succeeded are the sequence folders moved into DIR (a sequence folder already there is replaced),
so a failure or a stop leaves DIR as it was.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from flsl_cli.errors import FlslError


def open_staging(out: Path) -> Path:
    """A new empty staging folder beside `out` (`out` itself need not exist)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FlslError("--out is a file, not a folder", where=str(out), fix="Pass a folder for the predicted masks")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def publish(staging: Path, out: Path) -> list[Path]:
    """Move every entry of `staging` into `out` (replacing entries of the same name) and remove
    `staging`; returns the entries moved."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    moved = []
    for entry in sorted(staging.iterdir()):
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        entry.replace(target)
        moved.append(target)
    shutil.rmtree(staging, ignore_errors=True)
    return moved


def discard(staging: Path | None) -> None:
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
