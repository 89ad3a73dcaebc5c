"""Token grids of a backbone at chosen layers, through timm's `forward_intermediates` (the last
layer's tokens pass the final norm, as the features the method trains and k-NN evaluates)."""

from __future__ import annotations

import numpy as np
import torch

from flsl_cli.errors import FlslError
from flsl_cli.eval.backbones import EvalModel


def depth_of(model: EvalModel) -> int:
    blocks = getattr(model.module, "blocks", None)
    if blocks is None or not hasattr(model.module, "forward_intermediates"):
        raise FlslError(
            f"the model {model.description.get('arch', '')} has no transformer blocks to take layers from",
            fix="Visualize a ViT (a flsl checkpoint, its export, or a timm ViT)",
        )
    return len(blocks)


def default_layers(depth: int) -> list[int]:
    """Three layers spread over the depth, the last included (4, 8, 12 for a depth of 12)."""
    return sorted({max(1, round(depth * part / 3)) for part in (1, 2, 3)})


def check_layers(layers: list[int], *, depth: int, model: str) -> None:
    for layer in layers:
        if not 1 <= layer <= depth:
            example = ",".join(map(str, default_layers(depth)))
            raise FlslError(
                f"layer {layer} is beyond the depth of {model} ({depth} blocks, layers 1 to {depth})",
                fix=f"Pass --layers between 1 and {depth}, e.g. --layers {example}",
            )


def to_tensor(model: EvalModel, pixels_hw3: np.ndarray) -> torch.Tensor:
    """(1, 3, h, w), normalised with the model's mean and std."""
    image = torch.from_numpy(np.array(pixels_hw3, copy=True)).permute(2, 0, 1).float().div(255.0)
    mean = torch.tensor(model.mean).view(3, 1, 1)
    std = torch.tensor(model.std).view(3, 1, 1)
    return ((image - mean) / std).unsqueeze(0)


@torch.no_grad()
def layer_tokens(model: EvalModel, pixels_hw3: np.ndarray, *, layers: list[int]) -> dict[int, torch.Tensor]:
    """{layer (1-based): tokens (h, w, d)} for the image."""
    images = to_tensor(model, pixels_hw3)
    depth = depth_of(model)
    out = model.module.forward_intermediates(  # type: ignore[operator]  # timm's model contract
        images, indices=[layer - 1 for layer in layers], norm=False, output_fmt="NCHW", intermediates_only=True
    )
    grids = {}
    for layer, tokens_bdhw in zip(layers, out):
        if layer == depth and hasattr(model.module, "norm"):  # the trained features
            tokens_bhwd = model.module.norm(tokens_bdhw.permute(0, 2, 3, 1))  # type: ignore[operator]  # checked above
        else:
            tokens_bhwd = tokens_bdhw.permute(0, 2, 3, 1)
        grids[layer] = tokens_bhwd[0].float()
    return grids
