"""The backbone and head: no class token, fixed sin-cos positions, final LayerNorm, shapes,
and a teacher that never trains."""

from __future__ import annotations

import pytest
import torch

from flsl_cli.config.schema import Recipe
from flsl_cli.models.flsl import build_student_teacher
from flsl_cli.models.vit import sincos_pos_embed


def _recipe(**model) -> Recipe:
    base = {"arch": "vit_tiny", "depth": 2, "head_out_dim": 32, "head_hidden_dim": 64, "head_bottleneck_dim": 16}
    return Recipe.model_validate({"data": {"train": "x"}, "model": {**base, **model}})


@pytest.mark.parametrize("patch,global_size,local_size", [(16, 224, 96), (8, 64, 32)])
def test_token_shapes_for_global_and_local_views(patch, global_size, local_size):
    """One token per patch (no class token) for both view sizes, embed dim of the arch."""
    recipe = _recipe(patch_size=patch).model_copy(update={})
    sizes = {"global_size": global_size, "local_size": local_size}
    recipe = Recipe.model_validate({**recipe.model_dump(), "augment": sizes})
    student, _ = build_student_teacher(recipe)
    for size in (global_size, local_size):
        tokens = student.tokens(torch.randn(2, 3, size, size))
        assert tokens.shape == (2, (size // patch) ** 2, 192)
        assert torch.isfinite(tokens).all()
    assert student.backbone.cls_token is None


def test_position_embedding_is_fixed_sincos():
    """pos_embed equals the 2-D sin-cos table and is not trained."""
    student, _ = build_student_teacher(_recipe())
    torch.testing.assert_close(student.backbone.pos_embed.detach(), sincos_pos_embed(grid_size=14, dim=192))
    assert not student.backbone.pos_embed.requires_grad


def test_tokens_pass_through_the_final_layernorm():
    """Tokens are LayerNorm outputs: per-token mean ~0 and std ~1 at initialisation."""
    student, _ = build_student_teacher(_recipe())
    tokens = student.tokens(torch.randn(2, 3, 224, 224))
    assert tokens.mean(-1).abs().max() < 1e-4
    torch.testing.assert_close(tokens.std(-1, unbiased=False), torch.ones(2, 196), atol=1e-2, rtol=0)


def test_head_outputs_and_normalized_prototypes():
    student, _ = build_student_teacher(_recipe())
    out = student.head(torch.randn(5, 192))
    assert out.shape == (5, 32)
    assert out.abs().max() <= 1.0 + 1e-5  # cosine between unit bottleneck and unit prototypes


def test_teacher_starts_equal_and_never_requires_grad():
    student, teacher = build_student_teacher(_recipe())
    for (name, s), (_, t) in zip(student.state_dict().items(), teacher.state_dict().items()):
        torch.testing.assert_close(s, t, msg=name)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_backward_reaches_every_trainable_student_parameter():
    student, _ = build_student_teacher(_recipe())
    tokens = student.tokens(torch.randn(2, 3, 224, 224))
    student.head(tokens).sum().backward()
    missing = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
