"""The FLSL backbone: a timm VisionTransformer with no class token and a fixed 2-D sin-cos
position embedding, resampled on the fly for other input sizes (e.g. 96 px local crops).

`forward_features` returns the patch tokens after the final LayerNorm: (batch, tokens, dim).
"""

from __future__ import annotations

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer

from flsl_cli.config.schema import ModelConfig


def timm_kwargs(config: ModelConfig, *, img_size: int) -> dict:
    """Keyword arguments for timm's VisionTransformer that describe this backbone.

    The same dictionary is what `timm.create_model` needs to load an exported FLSL backbone.
    """
    dims = config.dims()
    return {
        "img_size": img_size,
        "patch_size": config.patch_size,
        "embed_dim": dims["embed_dim"],
        "depth": dims["depth"],
        "num_heads": dims["num_heads"],
        "class_token": False,
        "global_pool": "avg",
        "fc_norm": False,  # keep the final LayerNorm on the tokens (timm moves it after pooling otherwise)
        "num_classes": 0,
        "dynamic_img_size": True,
    }


def sincos_pos_embed(*, grid_size: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding for a grid_size x grid_size token grid: (1, tokens, dim)."""
    return build_sincos2d_pos_embed([grid_size, grid_size], dim=dim).unsqueeze(0)


def build_backbone(config: ModelConfig, *, img_size: int, drop_path: float | None = None) -> VisionTransformer:
    """A ViT without class token whose position embedding is a fixed (non-trained) sin-cos table."""
    rate = config.drop_path if drop_path is None else drop_path
    model = VisionTransformer(**timm_kwargs(config, img_size=img_size), drop_path_rate=rate)
    grid = img_size // config.patch_size
    with torch.no_grad():
        model.pos_embed.copy_(sincos_pos_embed(grid_size=grid, dim=model.embed_dim))
    model.pos_embed.requires_grad_(False)
    return model
