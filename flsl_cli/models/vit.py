"""The FLSL backbone: a timm VisionTransformer with no class token and a fixed 2-D sin-cos
position embedding, resampled on the fly for other input sizes (e.g. 96 px local crops) the way
the authors' release does it (bicubic, no antialias; see `resample_pos_embed`).

`forward_features` returns the patch tokens after the final LayerNorm: (batch, tokens, dim).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


def resample_pos_embed(table_1nd: torch.Tensor, *, grid: tuple[int, int]) -> torch.Tensor:
    """The square position table resampled to a `grid` of (rows, cols) tokens, as the release's
    DINO-derived ViT does: bicubic, no antialias, with the scale factor (new + 0.1) / old (the
    0.1 keeps the output size from rounding down), so a 14 x 14 table gives the 6 x 6 table of a
    96 px view at patch 16. timm's own resampling antialiases, which blurs the table."""
    old = math.isqrt(table_1nd.shape[1])
    rows, cols = grid
    if (rows, cols) == (old, old):
        return table_1nd
    dim = table_1nd.shape[-1]
    table = table_1nd.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    table = F.interpolate(
        table, scale_factor=((rows + 0.1) / old, (cols + 0.1) / old), mode="bicubic", align_corners=False
    )
    return table.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(table_1nd.dtype)


class FlslVisionTransformer(VisionTransformer):
    """timm's VisionTransformer (same weights, same keys) whose position table is resampled the
    release's way for inputs other than the pretraining size."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_img_size or self.cls_token is not None or self.reg_token is not None:
            return super()._pos_embed(x)
        assert self.pos_embed is not None, "the FLSL backbone has a position table"
        batch, rows, cols, dim = x.shape
        return self.pos_drop(x.view(batch, -1, dim) + resample_pos_embed(self.pos_embed, grid=(rows, cols)))


def build_backbone(config: ModelConfig, *, img_size: int, drop_path: float | None = None) -> VisionTransformer:
    """A ViT without class token whose position embedding is a fixed (non-trained) sin-cos table."""
    rate = config.drop_path if drop_path is None else drop_path
    model = FlslVisionTransformer(**timm_kwargs(config, img_size=img_size), drop_path_rate=rate)
    grid = img_size // config.patch_size
    assert model.pos_embed is not None, "built with a position table"
    with torch.no_grad():
        model.pos_embed.copy_(sincos_pos_embed(grid_size=grid, dim=model.embed_dim))
    model.pos_embed.requires_grad_(False)
    return model


def set_fused_attention(backbone: VisionTransformer, *, enabled: bool) -> None:
    """Switch every block between timm's fused attention (scaled_dot_product_attention, timm's
    default) and the explicit softmax(q k^T / sqrt(d)) v; the two agree within rounding."""
    for block in backbone.blocks:
        block.attn.fused_attn = enabled  # type: ignore[union-attr]  # each timm Block has an Attention
