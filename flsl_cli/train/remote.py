"""Run directories on remote storage (`--run-dir s3://bucket/runs/x`).

A remote run directory is mirrored by a local staging directory: each process pulls what it
needs (the recipe, the run record, the metrics, its own log, the checkpoint manifests and, to
resume, the newest checkpoint that matches its manifest), trains against the local copy, and
rank 0 pushes after every checkpoint and when it stops. Every process pushes its own log
(`logs/rank-N.log`) when it ends, however it ends. A checkpoint is pushed file first and manifest last, each in
one upload (atomic per object), so the remote directory never shows a checkpoint that is not
complete; checkpoints pruned locally lose their manifest remotely before their file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from flsl_cli import storage
from flsl_cli.checkpoint.store import CHECKPOINTS_DIR, checkpoint_dir, list_checkpoints, verify
from flsl_cli.train.metrics import BAD_SAMPLES_NAME
from flsl_cli.train.rundir import LOGS_DIR, METRICS_NAME, RECIPE_NAME, RUN_NAME, rank_log_path
from flsl_cli.train.tensorboard import TENSORBOARD_DIR

SMALL_FILES = (RECIPE_NAME, RUN_NAME, METRICS_NAME, BAD_SAMPLES_NAME)


def is_remote(run_dir: str | Path) -> bool:
    return not storage.is_local(str(run_dir))


def staging_dir(url: str, *, role: str) -> Path:
    """A fresh local directory that mirrors `url` for one process (`role`: parent, rank0, ...)."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    root = Path(os.environ.get("FLSL_STAGING_DIR", Path(tempfile.gettempdir()) / "flsl-staging"))
    path = root / f"{digest}-{role}-{os.getpid()}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def pull(url: str, local: Path, *, rank: int | None, newest_checkpoint: bool) -> None:
    """Copy the run's small files, the log of `rank` (a training process; None for none) and the
    checkpoint manifests; with `newest_checkpoint`, also the newest checkpoint file whose size
    and sha256 match its manifest (older ones are tried next)."""
    names = storage.listdir(url)
    for name in SMALL_FILES:
        if name in names:
            (local / name).write_bytes(storage.read_bytes(storage.join(url, name)))
    log = rank_log_path(local, rank=rank) if rank is not None else None
    if log is not None and LOGS_DIR in names and log.name in storage.listdir(storage.join(url, LOGS_DIR)):
        log.parent.mkdir(parents=True, exist_ok=True)  # this attempt's lines follow the earlier ones
        log.write_bytes(storage.read_bytes(storage.join(url, LOGS_DIR, log.name)))
    remote_checkpoints = storage.join(url, CHECKPOINTS_DIR)
    manifests = [n for n in storage.listdir(remote_checkpoints) if n.endswith(".json")]
    if not manifests:
        return
    checkpoint_dir(local).mkdir(parents=True, exist_ok=True)
    for name in manifests:
        (checkpoint_dir(local) / name).write_bytes(storage.read_bytes(storage.join(remote_checkpoints, name)))
    if not newest_checkpoint:
        return
    for ref in reversed(list_checkpoints(local)):
        source = storage.download(storage.join(remote_checkpoints, ref.path.name), suffix=".pt")
        shutil.move(str(source), ref.path)
        if verify(ref) is None:
            return
        ref.path.unlink()


def remove_cut_uploads(url: str) -> list[str]:
    """Remove the temporary uploads (`NAME.tmp`, on remote filesystems that cannot upload
    atomically) that a killed push left in the run's checkpoint folder; returns their names.
    Only rank 0 pushes, so none of them is an upload in progress when rank 0 calls this."""
    folder = storage.join(url, CHECKPOINTS_DIR)
    cut = sorted(n for n in storage.listdir(folder) if n.endswith(storage.REMOTE_TEMP_SUFFIX))
    for name in cut:
        storage.remove(storage.join(folder, name))
    return cut


def push_log(local: Path, url: str, *, rank: int) -> None:
    """Upload this process's log (`logs/rank-N.log`), whole, over the remote one."""
    log = rank_log_path(local, rank=rank)
    if log.exists():
        storage.makedirs(storage.join(url, LOGS_DIR))
        storage.write_bytes_atomic(storage.join(url, LOGS_DIR, log.name), log.read_bytes())


def push(local: Path, url: str) -> None:
    """Bring the remote directory up to date with the local one (rank 0 only)."""
    storage.makedirs(url)
    remote_checkpoints = storage.join(url, CHECKPOINTS_DIR)
    local_refs = {ref.path.name: ref for ref in list_checkpoints(local)}
    remote_names = set(storage.listdir(remote_checkpoints)) - set(remove_cut_uploads(url))
    for _, ref in sorted(local_refs.items()):
        manifest = ref.path.with_suffix(".json")
        if manifest.name in remote_names or not ref.path.exists():
            continue
        storage.upload_file_atomic(ref.path, storage.join(remote_checkpoints, ref.path.name))
        storage.write_bytes_atomic(storage.join(remote_checkpoints, manifest.name), manifest.read_bytes())
    local_manifests = {Path(name).with_suffix(".json").name for name in local_refs}
    for name in sorted(remote_names):
        if name.endswith(".json") and name not in local_manifests:
            storage.remove(storage.join(remote_checkpoints, name))
            storage.remove(storage.join(remote_checkpoints, Path(name).with_suffix(".pt").name))
    events = sorted((local / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    if events:
        storage.makedirs(storage.join(url, TENSORBOARD_DIR))
    for path in events:  # event files grow as the run goes: each push sends them whole
        storage.write_bytes_atomic(storage.join(url, TENSORBOARD_DIR, path.name), path.read_bytes())
    for name in SMALL_FILES:
        path = local / name
        if path.exists():
            storage.write_bytes_atomic(storage.join(url, name), path.read_bytes())
