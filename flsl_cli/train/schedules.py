"""Per-iteration schedules as pure functions of the global step, so resuming restores one integer.

Each function takes the step (0-based, the step about to run) and the run's length in steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flsl_cli.config.schema import Recipe


def cosine(step: int, *, total: int, start: float, end: float) -> float:
    """Half a cosine from `start` at step 0 to `end` at step `total` (and after)."""
    if total <= 0:
        return end
    progress = min(max(step / total, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, *, warmup: int, total: int, peak: float, end: float) -> float:
    """Linear warmup from 0 to `peak` over `warmup` steps, then cosine to `end` at `total`."""
    if step < warmup:
        return peak * step / warmup
    return cosine(step - warmup, total=total - warmup, start=peak, end=end)


def linear_warmup(step: int, *, warmup: int, start: float, end: float) -> float:
    """Linear from `start` to `end` over `warmup` steps, then constant `end`."""
    if step >= warmup:
        return end
    return start + (end - start) * step / warmup


@dataclass(frozen=True)
class Schedules:
    """Every scheduled value of a run, given its recipe and steps per epoch."""

    recipe: Recipe
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.recipe.optim.epochs * self.steps_per_epoch

    @property
    def lr_warmup_steps(self) -> int:
        return self._steps(self.recipe.optim.warmup_epochs)

    def _steps(self, epochs: float) -> int:
        return int(round(epochs * self.steps_per_epoch))

    def peak_lr(self) -> float:
        optim = self.recipe.optim
        return optim.base_lr * optim.global_batch_size / 256.0

    def lr(self, step: int) -> float:
        optim = self.recipe.optim
        return warmup_cosine(
            step, warmup=self.lr_warmup_steps, total=self.total_steps, peak=self.peak_lr(), end=optim.min_lr
        )

    def weight_decay(self, step: int) -> float:
        optim = self.recipe.optim
        return cosine(step, total=self.total_steps, start=optim.weight_decay, end=optim.weight_decay_end)

    def momentum(self, step: int) -> float:
        return cosine(step, total=self.total_steps, start=self.recipe.optim.momentum_teacher, end=1.0)

    def teacher_temp(self, step: int) -> float:
        loss = self.recipe.loss
        return linear_warmup(
            step,
            warmup=self._steps(loss.warmup_teacher_temp_epochs),
            start=loss.warmup_teacher_temp,
            end=loss.teacher_temp,
        )

    def last_layer_frozen(self, step: int) -> bool:
        return step < self._steps(self.recipe.optim.freeze_last_layer_epochs)

    def at(self, step: int) -> dict[str, float]:
        return {
            "lr": self.lr(step),
            "wd": self.weight_decay(step),
            "momentum": self.momentum(step),
            "teacher_temp": self.teacher_temp(step),
        }
