"""What a checkpoint holds of a run, and how it is put back: weights, optimizer, scaler, step,
data layout and health, and torch's random generator, so the next step after a resume is the one
an uninterrupted run would have taken.

Python's and numpy's global generators are not saved: flsl draws nothing from them (crops,
queries and shard order come from generators seeded by (seed, epoch, key), drop path from a
per-step torch seed), so their states would only record whatever the process started with.
Checkpoints written before this still carry them; they are ignored.
"""

from __future__ import annotations

from typing import Any

import torch

from flsl_cli.data.health import DataHealth
from flsl_cli.data.stream import StreamLayout
from flsl_cli.train.step import StepRunner


def checkpoint_payload(
    runner: StepRunner, *, step: int, layout: StreamLayout, recipe_yaml: str, health: DataHealth
) -> dict[str, Any]:
    return {
        "step": step,
        "epoch": step // layout.steps_per_epoch,
        "student": runner.student.state_dict(),
        "teacher": runner.teacher.state_dict(),
        "optimizer": runner.optimizer.state_dict(),
        "scaler": runner.scaler.state_dict(),
        "recipe_yaml": recipe_yaml,
        "layout": {
            "world_size": layout.world_size,
            "workers": layout.workers,
            "local_batch": layout.local_batch,
            "steps_per_epoch": layout.steps_per_epoch,
        },
        "rng": capture_rng(),
        "data_health": health.state(),
    }


def capture_rng() -> dict[str, Any]:
    return {"torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])


def restore(runner: StepRunner, payload: dict[str, Any]) -> None:
    runner.student.load_state_dict(payload["student"])
    runner.teacher.load_state_dict(payload["teacher"])
    runner.optimizer.load_state_dict(payload["optimizer"])
    if payload.get("scaler"):
        runner.scaler.load_state_dict(payload["scaler"])
    restore_rng(payload["rng"])
