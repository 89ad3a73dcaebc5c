"""The run directory: resolved recipe, run record, metrics and checkpoints.

    RUN_DIR/recipe.yaml      the fully resolved recipe this run trains with
    RUN_DIR/run.json         flsl version, creation time, recipe fingerprint, status
    RUN_DIR/metrics.jsonl    one JSON object per logged step
    RUN_DIR/checkpoints/     step-NNNNNNNN.pt + .json manifests
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from flsl_cli import __version__
from flsl_cli.checkpoint.store import list_checkpoints
from flsl_cli.errors import RunDirError

RECIPE_NAME = "recipe.yaml"
RUN_NAME = "run.json"
METRICS_NAME = "metrics.jsonl"


def fingerprint(recipe_yaml: str) -> str:
    return hashlib.sha256(recipe_yaml.encode()).hexdigest()[:16]


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_new_run(run_dir: Path, *, recipe_yaml: str, force: bool) -> None:
    """Create a run directory for a new run, refusing to mix it with another run's files."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError("the run directory is a file", where=str(run_dir), fix="Choose another --run-dir")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        _refuse_or_clear(run_dir, recipe_yaml=recipe_yaml, force=force)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / RECIPE_NAME, recipe_yaml)
    record = {
        "flsl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recipe_fingerprint": fingerprint(recipe_yaml),
        "status": "created",
    }
    write_text_atomic(run_dir / RUN_NAME, json.dumps(record, indent=1) + "\n")


def _refuse_or_clear(run_dir: Path, *, recipe_yaml: str, force: bool) -> None:
    is_run = (run_dir / RUN_NAME).exists() or (run_dir / RECIPE_NAME).exists()
    checkpoints = list_checkpoints(run_dir)
    if not is_run:
        raise RunDirError(
            "the run directory is not empty and does not hold a flsl run", where=str(run_dir),
            fix="Choose a new or empty --run-dir; flsl never deletes files it did not write",
        )
    same = (run_dir / RECIPE_NAME).exists() and (run_dir / RECIPE_NAME).read_text() == recipe_yaml
    if checkpoints:
        what = ("the run directory already holds this run with checkpoints" if same
                else "the run directory holds a different run, with checkpoints")
        raise RunDirError(
            f"{what} (newest: step {checkpoints[-1].step})", where=str(run_dir),
            fix=(f"Continue it with `flsl resume {run_dir}`, or choose another --run-dir "
                 "(--force never deletes checkpoints)"),
        )
    if not force:
        raise RunDirError(
            "the run directory holds another run (with no checkpoint yet)", where=str(run_dir),
            fix="Choose another --run-dir, or pass --force to start over in it",
        )
    for name in (RECIPE_NAME, RUN_NAME, METRICS_NAME, "checkpoints"):
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def read_run(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """(recipe YAML text, run record) of an existing run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError("the run directory does not exist", where=str(run_dir),
                          fix="Pass the --run-dir of a run started with `flsl pretrain`")
    recipe_path = run_dir / RECIPE_NAME
    if not recipe_path.exists():
        raise RunDirError(f"this is not a flsl run directory (no {RECIPE_NAME})", where=str(run_dir),
                          fix="Pass the --run-dir of a run started with `flsl pretrain`")
    try:
        record = json.loads((run_dir / RUN_NAME).read_text())
    except (OSError, ValueError):
        record = {}
    return recipe_path.read_text(), record


def update_status(run_dir: Path, **fields: Any) -> None:
    path = Path(run_dir) / RUN_NAME
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {}
    record.update(fields)
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")


def truncate_metrics(run_dir: Path, *, after_step: int) -> None:
    """Drop metrics logged after `after_step` (steps that a resume will run again)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= after_step:
                kept.append(line)
        except ValueError:
            continue
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def load_recipe_yaml(text: str) -> dict[str, Any]:
    return yaml.safe_load(text) or {}
