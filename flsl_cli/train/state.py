"""What a checkpoint holds of a run, and how it is put back: weights, optimizer, scaler, step,
data layout and health, and every random generator, so the next step after a resume is the one an
uninterrupted run would have taken."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from flsl_cli.data.health import DataHealth
from flsl_cli.data.stream import StreamLayout
from flsl_cli.train.step import StepRunner


def checkpoint_payload(runner: StepRunner, *, step: int, layout: StreamLayout, recipe_yaml: str,
                       health: DataHealth) -> dict[str, Any]:
    return {
        "step": step,
        "epoch": step // layout.steps_per_epoch,
        "student": runner.student.state_dict(),
        "teacher": runner.teacher.state_dict(),
        "optimizer": runner.optimizer.state_dict(),
        "scaler": runner.scaler.state_dict(),
        "recipe_yaml": recipe_yaml,
        "layout": {"world_size": layout.world_size, "workers": layout.workers,
                   "local_batch": layout.local_batch, "steps_per_epoch": layout.steps_per_epoch},
        "rng": capture_rng(),
        "data_health": health.state(),
    }


def capture_rng() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": torch.tensor(state, dtype=torch.int64), "python_version": version,
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"].tolist()), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])


def restore(runner: StepRunner, payload: dict[str, Any]) -> None:
    runner.student.load_state_dict(payload["student"])
    runner.teacher.load_state_dict(payload["teacher"])
    runner.optimizer.load_state_dict(payload["optimizer"])
    if payload.get("scaler"):
        runner.scaler.load_state_dict(payload["scaler"])
    restore_rng(payload["rng"])
