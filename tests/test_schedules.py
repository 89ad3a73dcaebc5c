"""Schedules at their boundaries, and the teacher's EMA update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flsl_cli.config.schema import Recipe
from flsl_cli.models.flsl import ema_update
from flsl_cli.train.schedules import Schedules, cosine


def _schedules(**optim) -> Schedules:
    recipe = Recipe.model_validate({"data": {"train": "x"}, "optim": {"epochs": 100, **optim}})
    return Schedules(recipe=recipe, steps_per_epoch=10)


def test_learning_rate_warmup_peak_and_end():
    """lr: 0 at step 0, linear to base_lr * batch / 256 after warmup, cosine to min_lr at the end."""
    s = _schedules(global_batch_size=512, base_lr=5e-4, warmup_epochs=10, min_lr=1e-6)
    assert s.lr(0) == 0.0
    assert s.lr(50) == pytest.approx(5e-4)  # halfway through warmup: half of the peak 1e-3
    assert s.lr(100) == pytest.approx(1e-3)
    assert s.lr(550) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert s.lr(1000) == pytest.approx(1e-6)
    assert all(s.lr(i) >= s.lr(i + 1) for i in range(100, 999))


def test_weight_decay_and_momentum_cosines():
    """wd: 0.04 -> 0.4, teacher momentum: 0.996 -> 1.0, both cosine over the whole run."""
    s = _schedules()
    assert s.weight_decay(0) == pytest.approx(0.04)
    assert s.weight_decay(500) == pytest.approx(0.22)
    assert s.weight_decay(1000) == pytest.approx(0.4)
    assert s.momentum(0) == pytest.approx(0.996)
    assert s.momentum(1000) == pytest.approx(1.0)
    assert s.momentum(999) < 1.0


def test_teacher_temperature_warmup():
    """T_t: linear 0.04 -> 0.07 over 30 epochs, then constant."""
    s = _schedules()
    assert s.teacher_temp(0) == pytest.approx(0.04)
    assert s.teacher_temp(150) == pytest.approx(0.055)
    assert s.teacher_temp(300) == pytest.approx(0.07)
    assert s.teacher_temp(999) == pytest.approx(0.07)


def test_last_layer_frozen_during_first_epoch_only():
    s = _schedules()
    assert s.last_layer_frozen(0) and s.last_layer_frozen(9)
    assert not s.last_layer_frozen(10)


def test_cosine_endpoints():
    assert cosine(0, total=10, start=1.0, end=0.0) == 1.0
    assert cosine(10, total=10, start=1.0, end=0.0) == pytest.approx(0.0)
    assert cosine(20, total=10, start=1.0, end=0.0) == pytest.approx(0.0)


def test_ema_update():
    """teacher <- m * teacher + (1 - m) * student, for every parameter."""
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, momentum=0.9)
    for old, new, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s.detach())
    ema_update(teacher, student, momentum=1.0)
    for a, b in zip(teacher.parameters(), [0.9 * o + 0.1 * s.detach() for o, s in zip(before, student.parameters())]):
        torch.testing.assert_close(a, b)
