"""The FLSL head's cluster assignment of each token: argmax over the K prototypes of the head
applied to the backbone's final tokens. Only flsl checkpoints carry a head."""

from __future__ import annotations

import torch

from flsl_cli.eval.backbones import EvalModel
from flsl_cli.models.head import ProjectionHead


def load_head(model: EvalModel) -> ProjectionHead | None:
    """The projection head of the flsl checkpoint `model` was loaded from (its teacher or
    student, as loaded), or None for exports, timm models and random inits."""
    described = model.description
    if described.get("kind") != "flsl" or described.get("random_init"):
        return None
    from flsl_cli.models.load import load_network

    network, _, _, _ = load_network(described["source"], which=described.get("which") or "teacher")
    head = network.head.eval()
    for parameter in head.parameters():
        parameter.requires_grad_(False)
    return head


@torch.no_grad()
def cluster_map(head: ProjectionHead, tokens_hwd: torch.Tensor) -> torch.Tensor:
    """(h, w) prototype index of each token."""
    return head(tokens_hwd.float()).argmax(dim=-1)
