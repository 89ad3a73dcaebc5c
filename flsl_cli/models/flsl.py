"""The student/teacher pair: backbone + head each; the teacher is an EMA copy of the student.

Legend for tensor names: b = images, n = tokens of a view, q = queries, d = embed dim, k = K.
"""

from __future__ import annotations

import torch
from torch import nn

from flsl_cli.config.schema import Recipe
from flsl_cli.models.head import ProjectionHead
from flsl_cli.models.vit import build_backbone


class Network(nn.Module):
    """Backbone + projection head. The head is applied to modes, not to raw tokens, so the
    two parts are called separately by the training step."""

    def __init__(self, recipe: Recipe, *, drop_path: float | None = None) -> None:
        super().__init__()
        config = recipe.model
        self.backbone = build_backbone(config, img_size=recipe.augment.global_size, drop_path=drop_path)
        self.head = ProjectionHead(
            self.backbone.embed_dim,
            out_dim=config.head_out_dim,
            hidden_dim=config.head_hidden_dim,
            bottleneck_dim=config.head_bottleneck_dim,
            layers=config.head_layers,
        )

    def tokens(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """Patch tokens after the final LayerNorm, (b, n, d)."""
        return self.backbone.forward_features(images_bchw)


def build_student_teacher(recipe: Recipe) -> tuple[Network, Network]:
    """The student (trained) and the teacher (EMA, no drop path, never receives gradients)."""
    student = Network(recipe)
    teacher = Network(recipe, drop_path=0.0)
    teacher.load_state_dict(student.state_dict())
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return student, teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, *, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    teacher_params: list[torch.Tensor] = list(teacher.parameters())
    student_params: list[torch.Tensor] = list(student.parameters())
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, [p.detach() for p in student_params], alpha=1.0 - momentum)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(module, "module", module)


__all__ = ["Network", "build_student_teacher", "ema_update", "unwrap"]
