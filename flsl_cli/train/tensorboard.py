"""TensorBoard scalars of a run (`logging.tensorboard: true`): the rows written to metrics.jsonl,
k-NN results included, also go to RUN_DIR/tensorboard/, from rank 0 only.

A resumed run continues the same curves: its writer starts with TensorBoard's purge marker at the
first step it trains again, so values an interrupted attempt logged after the checkpoint it
resumes from are discarded by every TensorBoard reader, and each step holds one value.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from flsl_cli.config.schema import Recipe
from flsl_cli.errors import FlslError, RecipeError
from flsl_cli.train.metrics import JsonlWriter

TENSORBOARD_DIR = "tensorboard"
INSTALL = "pip install 'flsl[tensorboard]'"

# metrics.jsonl key -> TensorBoard tag; keys not listed go under "other/" (k-NN under "knn/")
_TAGS = {
    "loss": "loss/total",
    "intra": "loss/intra",
    "inter": "loss/inter",
    "volume": "loss/volume",
    "lr": "schedule/lr",
    "wd": "schedule/weight_decay",
    "teacher_temp": "schedule/teacher_temp",
    "momentum": "schedule/teacher_momentum",
    "images_per_s": "speed/images_per_s",
    "seen": "data/samples_seen",
    "bad": "data/bad_samples",
}
_NOT_SCALARS = ("step", "epoch")


def check_tensorboard(recipe: Recipe, *, source: str) -> None:
    """A recipe that asks for TensorBoard needs the package installed."""
    if recipe.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise RecipeError(
            [
                f"logging.tensorboard: true needs the tensorboard package, which is not installed; "
                f"run {INSTALL}, or set logging.tensorboard=false"
            ],
            source=source,
        )


def tag_of(key: str) -> str:
    if key in _TAGS:
        return _TAGS[key]
    return f"knn/{key}" if key.startswith("knn") else f"other/{key}"


class TensorBoardLog:
    """Scalars of metrics rows, one event per (tag, step)."""

    def __init__(self, run_dir: Path, *, start_step: int) -> None:
        try:  # checked before training starts; a SLURM node may still lack the package
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FlslError(
                "logging.tensorboard: true needs the tensorboard package, which is not installed where the run trains",
                where=str(run_dir),
                fix=f"Run {INSTALL} there, or resume with --set logging.tensorboard=false",
            ) from None

        # purge_step: readers drop what an earlier attempt wrote from this step on
        self._writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=start_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(tag_of(key), float(value), global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsLog:
    """metrics.jsonl, and TensorBoard when the recipe asks for it: one `write` for both."""

    def __init__(self, jsonl: JsonlWriter, tensorboard: TensorBoardLog | None) -> None:
        self._sinks = [sink for sink in (jsonl, tensorboard) if sink is not None]

    def write(self, record: dict[str, Any]) -> None:
        for sink in self._sinks:
            sink.write(record)

    def flush(self) -> None:
        for sink in self._sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()


def open_metrics_log(run_dir: Path, *, recipe: Recipe, start_step: int) -> MetricsLog:
    """The metrics log of rank 0 (metrics.jsonl, plus TensorBoard with logging.tensorboard)."""
    tensorboard = TensorBoardLog(run_dir, start_step=start_step) if recipe.logging.tensorboard else None
    return MetricsLog(JsonlWriter(run_dir), tensorboard)
