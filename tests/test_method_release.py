"""Method details taken from the authors' release: the 96 px position table and ViT-B's betas."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.layers import resample_abs_pos_embed

from flsl_cli.config.load import load_recipe
from flsl_cli.config.schema import Recipe
from flsl_cli.models.flsl import build_student_teacher
from flsl_cli.models.vit import resample_pos_embed, sincos_pos_embed

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _cubic_weights(t: float, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights (a = -0.75, PyTorch's bicubic) of the 4 taps at offset t."""

    def kernel(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    return np.array([kernel(t + 1), kernel(t), kernel(1 - t), kernel(2 - t)])


def _release_resample(table_gd: np.ndarray, *, old: int, new: int) -> np.ndarray:
    """The release's resampling written out: bicubic without antialias, sample positions from the
    scale factor (new + 0.1) / old (half-pixel centres), border taps clamped."""
    scale = (new + 0.1) / old
    grid = table_gd.reshape(old, old, -1)
    matrix = np.zeros((new, old))
    for out in range(new):
        source = (out + 0.5) / scale - 0.5
        base = math.floor(source)
        for tap, weight in zip(range(base - 1, base + 3), _cubic_weights(source - base)):
            matrix[out, min(max(tap, 0), old - 1)] += weight
    return np.einsum("ri,cj,ijd->rcd", matrix, matrix, grid).reshape(new * new, -1)


def test_position_table_is_resampled_bicubic_without_antialias_as_released():
    """The 14 x 14 table resampled to 6 x 6 (a 96 px view at patch 16) equals the release's
    bicubic resampling written out by hand, and differs from timm's antialiased default."""
    table = sincos_pos_embed(grid_size=14, dim=64)
    ours = resample_pos_embed(table, grid=(6, 6))[0].double().numpy()
    reference = _release_resample(table[0].double().numpy(), old=14, new=6)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    timm_default = resample_abs_pos_embed(table, new_size=(6, 6), num_prefix_tokens=0)[0].numpy()
    assert np.abs(timm_default - reference).max() > 0.05


def test_backbone_adds_the_release_table_on_local_views_and_the_plain_table_on_global_views():
    """A 96 px forward adds the release-resampled table to the patch embeddings; a 224 px
    forward adds the 14 x 14 table unchanged."""
    recipe = Recipe.model_validate(
        {
            "data": {"train": "x"},
            "model": {
                "arch": "vit_tiny",
                "depth": 1,
                "head_out_dim": 8,
                "head_hidden_dim": 16,
                "head_bottleneck_dim": 8,
            },
        }
    )
    backbone = build_student_teacher(recipe)[0].backbone.eval()
    for size, grid in ((96, 6), (224, 14)):
        images = torch.randn(2, 3, size, size)
        table = (
            backbone.pos_embed.detach()
            if grid == 14
            else torch.from_numpy(
                _release_resample(backbone.pos_embed[0].double().detach().numpy(), old=14, new=grid)
            ).float()
        )
        with torch.no_grad():
            x = backbone.patch_embed(images).flatten(1, 2) + table
            expected = backbone.norm(backbone.blocks(backbone.norm_pre(x)))
            torch.testing.assert_close(backbone.forward_features(images), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["vits16_300ep.yaml", "vits8_300ep.yaml", "vitb16_300ep.yaml"])
def test_paper_recipes_use_the_release_betas_for_every_width(name):
    """beta_sa = 0.1 / sqrt(384) and beta_ca = 0.2 / sqrt(384) for ViT-S and ViT-B alike."""
    recipe = load_recipe(RECIPES / name)
    assert recipe.beta_sa() == pytest.approx(0.1 / math.sqrt(384))
    assert recipe.beta_ca() == pytest.approx(0.2 / math.sqrt(384))


def test_scale_dim_defaults_to_the_embed_dim():
    """Without loss.scale_dim the betas divide by the model's own width (ViT-B: sqrt(768))."""
    recipe = load_recipe(RECIPES / "vitb16_300ep.yaml", overrides=["loss.scale_dim=null"])
    assert recipe.beta_sa() == pytest.approx(0.1 / math.sqrt(768))
    assert recipe.beta_ca() == pytest.approx(0.2 / math.sqrt(768))
