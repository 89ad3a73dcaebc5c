"""One FLSL training step: teacher forward, student objective, backward, AdamW, EMA.

The student side runs inside `StudentObjective.forward` so that DistributedDataParallel (which
wraps it from outside) sees every student parameter used in one forward call.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flsl_cli.config.schema import Recipe
from flsl_cli.distributed.ops import all_reduce_sum, world_size
from flsl_cli.losses.flsl import LossWeights, StudentView, flsl_loss
from flsl_cli.models.flsl import Network, ema_update
from flsl_cli.models.precision import autocast_dtype
from flsl_cli.signals import StopRequest
from flsl_cli.train.optim import set_schedule
from flsl_cli.train.schedules import Schedules

TERMS = ("loss", "intra", "inter", "volume")


class NonFiniteLoss(Exception):
    def __init__(self, values: dict[str, float]) -> None:
        self.values = values
        super().__init__(values)


class StudentObjective(nn.Module):
    """The student network and the FLSL loss for one batch of views."""

    def __init__(self, student: Network, *, recipe: Recipe) -> None:
        super().__init__()
        self.student = student
        loss = recipe.loss
        self.beta_sa = recipe.beta_sa()
        self.beta_ca = recipe.beta_ca()
        self.student_temp = loss.student_temp
        self.weights = LossWeights(upsilon=loss.upsilon, eta=loss.eta, gamma=loss.gamma)
        self.fused_modes = recipe.optim.fused_modes

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        *,
        teacher_tokens_bnd: torch.Tensor,
        teacher_head: nn.Module,
        teacher_temp: float,
    ) -> dict[str, torch.Tensor]:
        views = [StudentView(self.student.tokens(batch["global"]), batch["global_queries"])]
        if "locals" in batch:
            locals_ = batch["locals"]
            images, count = locals_.shape[:2]
            tokens = self.student.tokens(locals_.flatten(0, 1)).unflatten(0, (images, count))
            views += [StudentView(tokens[:, i], batch["local_queries"][:, i]) for i in range(count)]
        return flsl_loss(
            views,
            teacher_tokens_bnd,
            student_head=self.student.head,
            teacher_head=teacher_head,
            beta_sa=self.beta_sa,
            beta_ca=self.beta_ca,
            student_temp=self.student_temp,
            teacher_temp=teacher_temp,
            weights=self.weights,
            fused_modes=self.fused_modes,
        )


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one step on one rank (drop path), so resume needs no RNG replay."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def compile_backbones(*networks: Network) -> None:
    """torch.compile each network's backbone feature pass in place, with static shapes (one graph
    per view size). Parameters and state-dict keys stay those of the plain module."""
    for network in networks:
        backbone = network.backbone
        # Replacing the bound method on this instance is the point: state-dict keys stay the module's.
        backbone.forward_features = torch.compile(  # type: ignore[method-assign]
            backbone.forward_features, dynamic=False
        )


@dataclass
class StepRunner:
    recipe: Recipe
    schedules: Schedules
    student: Network
    teacher: Network
    objective: nn.Module  # StudentObjective, possibly wrapped in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    rank: int
    stop_request: StopRequest | None = None
    stop_agreed: bool = False  # set when any rank asked to stop; every rank sees it at the same step
    totals: dict[str, float] | None = None  # the step's counters, summed over ranks

    def run(self, batch: dict, *, step: int, counters: dict[str, float] | None = None) -> dict[str, float]:
        """Train on one batch as global step `step`; returns the loss terms (averaged over
        ranks) and the scheduled values used. `counters` are summed over ranks into `totals`."""
        scheduled = self.schedules.at(step)
        set_schedule(self.optimizer, lr=scheduled["lr"], weight_decay=scheduled["wd"])
        torch.manual_seed(step_seed(self.recipe.optim.seed, step, self.rank))
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        dtype = autocast_dtype(self.recipe.optim.precision, self.device)
        autocast = torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()

        with autocast:
            with torch.no_grad():
                teacher_tokens = self.teacher.tokens(batch["teacher"])
            terms = self.objective(
                batch,
                teacher_tokens_bnd=teacher_tokens,
                teacher_head=self.teacher.head,
                teacher_temp=scheduled["teacher_temp"],
            )

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        if self.schedules.last_layer_frozen(step):
            self.student.head.prototypes.grad = None
        if self.recipe.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.student.parameters() if p.grad is not None], self.recipe.optim.clip_grad
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        ema_update(self.teacher, self.student, momentum=scheduled["momentum"])
        values = self._reduce(terms, counters or {})
        return {**values, **scheduled}

    def _reduce(self, terms: dict[str, torch.Tensor], counters: dict[str, float]) -> dict[str, float]:
        """The loss terms averaged over ranks; sets `totals` (counters summed over ranks) and
        `stop_agreed`. One collective carries the terms, the counters and any stop request, and
        its result is the step's only host sync: it comes after the step's work is queued."""
        counters = {**counters, "stop": 1.0 if self.stop_request is not None and self.stop_request.requested else 0.0}
        device = terms["loss"].device
        local = torch.cat(
            [
                torch.stack([terms[name].detach().float() for name in TERMS]),
                torch.tensor(list(counters.values()), dtype=torch.float32).to(device, non_blocking=True),
            ]
        )
        reduced = all_reduce_sum(local).tolist()
        self.totals = dict(zip(counters, reduced[len(TERMS) :]))
        self.stop_agreed = self.totals["stop"] > 0
        values = dict(zip(TERMS, (value / world_size() for value in reduced[: len(TERMS)])))
        if not all(math.isfinite(v) for v in values.values()):
            raise NonFiniteLoss(values)
        return values
