"""Checkpoint files in `RUN_DIR/checkpoints/`.

A checkpoint is `step-NNNNNNNN.pt` (a `torch.save` of tensors and plain data) plus
`step-NNNNNNNN.json`, its manifest (size and sha256 of the .pt). Both are written to a
temporary name, flushed to disk and renamed; the manifest is written last and is the commit
marker: a checkpoint without a manifest, or whose file does not match it, is never loaded.
Loading uses `torch.load(weights_only=True)`, which refuses pickles that carry code.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flsl_cli import storage, timestamps
from flsl_cli.errors import CheckpointError

FORMAT = "flsl-checkpoint/1"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_PATTERN = re.compile(r"^step-(\d{8,})\.json$")  # a manifest names its step


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    path: Path
    manifest: dict[str, Any]


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(run_dir: Path, *, step: int, payload: dict[str, Any], keep_last: int) -> Path:
    """Write a checkpoint atomically, then delete all but the newest `keep_last`."""
    import torch  # here, so that reading a run dir (`flsl status`) never loads torch

    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:08d}.pt"
    storage.write_atomic(path, lambda handle: torch.save({"format": FORMAT, **payload}, handle))
    manifest = {
        "format": FORMAT,
        "step": step,
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": _sha256(path),
        "saved_at": timestamps.now(),
    }
    manifest_path = path.with_suffix(".json")
    storage.write_json_atomic(manifest_path, manifest)
    prune(run_dir, keep_last=keep_last)
    return path


def list_checkpoints(run_dir: Path) -> list[CheckpointRef]:
    """Committed checkpoints (those with a manifest), oldest first. Not verified yet."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = MANIFEST_PATTERN.match(entry.name)
        if not match:
            continue
        try:
            manifest = json.loads(entry.read_text())
        except (OSError, ValueError):
            continue
        found.append(CheckpointRef(step=int(match.group(1)), path=entry.with_suffix(".pt"), manifest=manifest))
    return sorted(found, key=lambda ref: ref.step)


DAMAGED_SUFFIX = ".damaged"


def set_aside_newer(run_dir: Path, *, step: int) -> list[str]:
    """After resuming from `step`: rename the checkpoints newer than it (those that were found
    damaged) to `*.damaged`, so that they are never loaded and never count among the
    `keep_last` kept. Returns the names of the checkpoint files set aside."""
    moved = []
    for ref in list_checkpoints(run_dir):
        if ref.step <= step:
            continue
        for path in (ref.path, ref.path.with_suffix(".json")):
            if path.exists():
                path.replace(path.with_name(path.name + DAMAGED_SUFFIX))
        moved.append(ref.path.name)
    return moved


def prune(run_dir: Path, *, keep_last: int) -> None:
    for ref in list_checkpoints(run_dir)[:-keep_last]:
        ref.path.with_suffix(".json").unlink(missing_ok=True)
        ref.path.unlink(missing_ok=True)


def verify(ref: CheckpointRef) -> str | None:
    """None if the file matches its manifest, else the reason it does not."""
    if not ref.path.exists():
        return "the checkpoint file is missing"
    size = ref.path.stat().st_size
    if size != ref.manifest.get("bytes"):
        return f"the file is {size} bytes but its manifest says {ref.manifest.get('bytes')} (truncated?)"
    if _sha256(ref.path) != ref.manifest.get("sha256"):
        return "the file's sha256 does not match its manifest (damaged or replaced)"
    return None


_PASS_INSTEAD = "Pass a flsl checkpoint (RUN_DIR/checkpoints/step-NNNNNNNN.pt) or a run directory"


def load_file(path: Path) -> dict[str, Any]:
    """Load a checkpoint file without unpickling arbitrary objects. A file that is not one is
    named for what it is (empty, text, a manifest, a safetensors export, truncated, ...)."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise CheckpointError("this is a directory, not a checkpoint file", where=str(path), fix=_PASS_INSTEAD)
    if _is_safetensors(path):
        raise CheckpointError(
            "this is a safetensors file (a `flsl export --format timm` output?), not a flsl checkpoint",
            where=str(path),
            fix=_PASS_INSTEAD,
        )
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the error below says it all
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError("the checkpoint does not exist", where=str(path), fix="Check the path") from None
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is not a safe checkpoint
        reason = _why_unloadable(path, exc)
        untrusted = "; never load files from untrusted sources" if "pickled" in reason else ""
        raise CheckpointError(reason, where=str(path), fix=_PASS_INSTEAD + untrusted) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            "this is a PyTorch file but not a flsl checkpoint (it has no flsl format marker)",
            where=str(path),
            fix=_PASS_INSTEAD,
        )
    return payload


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def _why_unloadable(path: Path, exc: Exception) -> str:
    """What a file that torch.load(weights_only=True) refused is, judged by its first bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError as error:
        return f"the file cannot be read ({error.strerror or error})"
    if size == 0:
        return "the file is empty (0 bytes), not a checkpoint"
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip archive
        return (
            f"the file is truncated or damaged: its zip archive is incomplete ({size} bytes; "
            "was it still being copied or written?)"
        )
    if head.startswith(b"\x80"):  # a pickle: a plain one, or torch's legacy format
        if any(sign in str(exc) for sign in ("weights_only", "GLOBAL", "global")):
            return "refused to load the file: it contains pickled Python objects or code, which flsl never runs"
        return "this is a Python pickle that is truncated or not a checkpoint"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text[:1024]):
        if text.lstrip().startswith("{") and path.suffix == ".json":
            return "this is a JSON file (a checkpoint's manifest?), not the checkpoint: the .pt file beside it is"
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        return f"this is a text file, not a checkpoint (it starts with {first!r})"
    return "this is not a checkpoint: its contents are neither a PyTorch archive nor a format flsl reads"


def newest_valid(
    run_dir: Path, *, on_skip: Callable[[CheckpointRef, str], None] | None = None
) -> tuple[CheckpointRef, dict[str, Any]]:
    """The newest committed checkpoint that matches its manifest and loads safely.

    A damaged newer checkpoint is reported through `on_skip(ref, reason)` and an older one is
    used instead; if none is usable a CheckpointError says why.
    """
    refs = list_checkpoints(run_dir)
    if not refs:
        raise CheckpointError(
            "no complete checkpoint in this run directory yet",
            where=str(run_dir),
            fix=f"A run writes its first checkpoint after checkpoint.every_steps steps or at its end; "
            f"`flsl resume {run_dir}` continues it (from step 0 when it has none)",
        )
    reasons = []
    for ref in reversed(refs):
        problem = verify(ref)
        if problem is None:
            try:
                return ref, load_file(ref.path)
            except CheckpointError as exc:
                problem = exc.what
        reasons.append(f"{ref.path.name}: {problem}")
        if on_skip:
            on_skip(ref, problem)
    raise CheckpointError(
        "no usable checkpoint: " + "; ".join(reasons),
        where=str(run_dir),
        fix="Restore a checkpoint file from a backup, or start the run again",
    )


def newest_step(run_dir: Path) -> int | None:
    refs = list_checkpoints(run_dir)
    return refs[-1].step if refs else None
