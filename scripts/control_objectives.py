"""Control objectives for the learning study (docs/learning.md), trained by flsl's own loop,
data, views, schedules and evaluation; only the objective changes. `StudentObjective` (the FLSL
loss) is replaced for this process by one of:

- `dino`: DINO's loss on mean-pooled tokens. Each view's patch tokens are mean-pooled (the
  backbone has no class token), the same projection head is applied, and the loss is DINO's
  cross-entropy between the centred, sharpened teacher prediction on the teacher view and the
  student's prediction on the student global view and each local view (teacher centre: EMA of
  the teacher's batch mean, momentum 0.9).
- `simclr`: SimCLR's NT-Xent (temperature 0.2) between the student's mean-pooled, projected
  (head MLP, L2-normalised) teacher view and student global view of each image, every other
  image of the batch a negative.

The teacher still follows the student by EMA in flsl's step and is what the recipe's eval
section evaluates. So these runs answer "does anything learn on this data at this scale", which
tells a data or scale limit apart from an FLSL defect.

    python scripts/control_objectives.py {dino,simclr} RECIPE.yaml --run-dir DIR [--set KEY=VALUE ...]

It takes what `flsl pretrain` takes (recipe and overrides) and trains on this machine in one
process; the recipe's eval section evaluates the teacher as in any flsl run.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from flsl_cli.launch.here import start_pretrain
from flsl_cli.train import loop, step


class DinoObjective(nn.Module):
    """DINO's loss on mean-pooled tokens, with the constructor and call of `StudentObjective`."""

    def __init__(self, student: nn.Module, *, recipe) -> None:
        super().__init__()
        self.student = student
        self.student_temp = recipe.loss.student_temp
        self.register_buffer("center", torch.zeros(1, recipe.model.head_out_dim))

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        *,
        teacher_tokens_bnd: torch.Tensor,
        teacher_head: nn.Module,
        teacher_temp: float,
    ) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_tokens_bnd.mean(dim=1)).float()
            teacher_probs = F.softmax((teacher_logits - self.center) / teacher_temp, dim=-1)
            self.center.mul_(0.9).add_(teacher_logits.mean(dim=0, keepdim=True), alpha=0.1)
        pooled = [self.student.tokens(batch["global"]).mean(dim=1)]
        if "locals" in batch:
            locals_ = batch["locals"]
            images, count = locals_.shape[:2]
            tokens = self.student.tokens(locals_.flatten(0, 1)).mean(dim=1).unflatten(0, (images, count))
            pooled += [tokens[:, i] for i in range(count)]
        losses = [
            -(teacher_probs * F.log_softmax(self.student.head(p).float() / self.student_temp, dim=-1))
            .sum(dim=-1)
            .mean()
            for p in pooled
        ]
        total = torch.stack(losses).mean()
        zero = total.detach() * 0
        return {"loss": total, "intra": zero, "inter": total.detach(), "volume": zero}


class SimclrObjective(nn.Module):
    """SimCLR's NT-Xent on two views, with the constructor and call of `StudentObjective`."""

    temperature = 0.2

    def __init__(self, student: nn.Module, *, recipe) -> None:
        super().__init__()
        self.student = student

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        *,
        teacher_tokens_bnd: torch.Tensor,
        teacher_head: nn.Module,
        teacher_temp: float,
    ) -> dict[str, torch.Tensor]:
        views = torch.cat([batch["teacher"], batch["global"]])
        embedded = F.normalize(self.student.head.mlp(self.student.tokens(views).mean(dim=1)).float(), dim=-1)
        images = batch["teacher"].shape[0]
        logits = embedded @ embedded.T / self.temperature
        logits.fill_diagonal_(float("-inf"))
        targets = torch.cat([torch.arange(images, 2 * images), torch.arange(images)]).to(logits.device)
        total = F.cross_entropy(logits, targets)
        zero = total.detach() * 0
        return {"loss": total, "intra": zero, "inter": total.detach(), "volume": zero}


OBJECTIVES = {"dino": DinoObjective, "simclr": SimclrObjective}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("objective", choices=sorted(OBJECTIVES))
    parser.add_argument("recipe")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    loop.StudentObjective = step.StudentObjective = OBJECTIVES[args.objective]  # the one change
    start_pretrain(args.recipe, overrides=args.overrides, run_dir=args.run_dir, devices=1, force=False)


if __name__ == "__main__":
    main()
