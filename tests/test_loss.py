"""The FLSL loss terms on small hand-made tensors (FLSL-method.md, "One training step")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from flsl_cli.losses.flsl import (
    LossWeights,
    StudentView,
    attention_modes,
    flsl_loss,
    gather_queries,
    global_mean_probs,
    inter_view_term,
    intra_view_term,
    volume_term,
)
from flsl_cli.losses.queries import grid_query_indices


def test_modes_are_attention_weighted_means():
    """m = softmax(beta z.Z^T) Z, checked against an explicit loop over tokens."""
    torch.manual_seed(0)
    tokens = torch.randn(2, 5, 4)
    queries = tokens[:, [1, 3]]
    beta = 0.7
    modes = attention_modes(queries, tokens, beta=beta)
    for b in range(2):
        for q in range(2):
            logits = torch.tensor([beta * float(queries[b, q] @ tokens[b, n]) for n in range(5)])
            weights = torch.exp(logits) / torch.exp(logits).sum()
            expected = sum(weights[n] * tokens[b, n] for n in range(5))
            torch.testing.assert_close(modes[b, q], expected)


def test_intra_view_term_zero_when_all_tokens_equal():
    """If every token of a view is the same vector, its mode is that vector: 2 - 2cos = 0."""
    tokens = torch.tensor([0.3, -1.2, 2.0]).expand(1, 6, 3).clone()
    z = gather_queries(tokens, torch.tensor([[0, 4]]))
    modes = attention_modes(z, tokens, beta=0.05)
    assert intra_view_term(z, modes).item() == pytest.approx(0.0, abs=1e-6)
    opposite = -z
    assert intra_view_term(z, opposite).item() == pytest.approx(4.0, abs=1e-6)


def test_volume_term_zero_for_uniform_and_positive_otherwise():
    """KL(p_bar || uniform) vanishes only for a uniform mean prediction."""
    k = 8
    assert volume_term(torch.full((k,), 1.0 / k)).item() == pytest.approx(0.0, abs=1e-6)
    peaked = torch.tensor([0.5] + [0.5 / (k - 1)] * (k - 1))
    expected = float((peaked * peaked.log()).sum()) + math.log(k)
    assert volume_term(peaked).item() == pytest.approx(expected, rel=1e-6)
    assert volume_term(peaked).item() > 0


def test_inter_view_term_is_cross_entropy():
    """L2 = mean over queries of -sum_k p_t log p_s."""
    p_t = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    p_s = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    expected = -(p_t * p_s.log()).sum(1).mean()
    torch.testing.assert_close(inter_view_term(p_t, p_s.log()), expected)


def test_global_mean_probs_single_process_is_plain_mean():
    """On one process p_bar is the mean prediction and its gradient is 1/queries per query."""
    probs = torch.rand(6, 4, requires_grad=True)
    mean = global_mean_probs(probs)
    torch.testing.assert_close(mean, probs.mean(0))
    mean.sum().backward()
    torch.testing.assert_close(probs.grad, torch.full_like(probs, 1 / 6))


class _RecordingHead(nn.Module):
    """A head that records what it was applied to."""

    def __init__(self, dim: int, k: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, k)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.linear(x)


def _setup(seed=0):
    torch.manual_seed(seed)
    student_tokens = torch.randn(2, 9, 4, requires_grad=True)
    teacher_tokens = torch.randn(2, 16, 4)
    index = torch.tensor([[0, 4, 8], [2, 3, 7]])
    return student_tokens, teacher_tokens, index


def _loss(student_tokens, teacher_tokens, index, student_head, teacher_head):
    return flsl_loss(
        [StudentView(student_tokens, index)],
        teacher_tokens,
        student_head=student_head,
        teacher_head=teacher_head,
        beta_sa=0.5,
        beta_ca=1.0,
        student_temp=0.1,
        teacher_temp=0.04,
        weights=LossWeights(upsilon=0.03, eta=1.0, gamma=5.0),
    )


def test_no_gradient_reaches_the_teacher():
    """Backward through the total loss leaves teacher tokens and teacher head without gradients."""
    student_tokens, teacher_tokens, index = _setup()
    teacher_tokens.requires_grad_(True)
    student_head, teacher_head = _RecordingHead(4, 5), _RecordingHead(4, 5)
    terms = _loss(student_tokens, teacher_tokens, index, student_head, teacher_head)
    terms["loss"].backward()
    assert teacher_tokens.grad is None
    assert all(p.grad is None for p in teacher_head.parameters())
    assert student_tokens.grad is not None and student_tokens.grad.abs().sum() > 0
    assert all(p.grad is not None for p in student_head.parameters())


def test_teacher_mode_uses_teacher_tokens_only():
    """The teacher head sees softmax(beta_ca z.Z+^T) Z+: changing the student's non-query tokens
    does not change it, changing teacher tokens does."""
    student_tokens, teacher_tokens, index = _setup()
    teacher_head = _RecordingHead(4, 5)
    _loss(student_tokens, teacher_tokens, index, _RecordingHead(4, 5), teacher_head)
    z = gather_queries(student_tokens.detach(), index)
    expected = attention_modes(z, teacher_tokens, beta=1.0).flatten(0, 1)
    torch.testing.assert_close(teacher_head.seen[-1], expected)

    others = student_tokens.detach().clone()
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, [0, 4, 8]] = False
    mask[1, [2, 3, 7]] = False
    others[mask] = torch.randn(int(mask.sum()), 4)
    _loss(others, teacher_tokens, index, _RecordingHead(4, 5), teacher_head)
    torch.testing.assert_close(teacher_head.seen[-1], expected)

    _loss(student_tokens, teacher_tokens + 1.0, index, _RecordingHead(4, 5), teacher_head)
    assert not torch.allclose(teacher_head.seen[-1], expected)


def test_total_is_weighted_sum_of_terms():
    """total = upsilon L1 + eta L2 + gamma L3 with the paper's default weights."""
    student_tokens, teacher_tokens, index = _setup()
    terms = _loss(student_tokens, teacher_tokens, index, _RecordingHead(4, 5), _RecordingHead(4, 5))
    expected = 0.03 * terms["intra"] + 1.0 * terms["inter"] + 5.0 * terms["volume"]
    torch.testing.assert_close(terms["loss"], expected)
    assert set(terms) == {"loss", "intra", "inter", "volume"}


@pytest.mark.parametrize("grid,window", [(14, 3), (6, 2), (8, 2), (28, 3), (7, 7)])
def test_query_sampling_picks_one_token_per_window(grid, window):
    """One query per w x w window of a block of whole windows placed at a grid corner."""
    for seed in range(20):
        index = grid_query_indices(grid=grid, window=window, rng=np.random.default_rng(seed))
        windows = grid // window
        assert index.shape == (windows * windows,)
        rows, cols = index // grid, index % grid
        block = windows * window
        all_cells = {(i, j) for i in range(windows) for j in range(windows)}

        def one_per_window(top, left, rows=rows, cols=cols, block=block, all_cells=all_cells):
            inside = (
                (rows >= top).all()
                and (rows < top + block).all()
                and (cols >= left).all()
                and (cols < left + block).all()
            )
            cells = [((r - top) // window, (c - left) // window) for r, c in zip(rows, cols)]
            return inside and len(cells) == len(set(cells)) and set(cells) == all_cells

        corners = [(top, left) for top in (0, grid - block) for left in (0, grid - block)]
        assert any(one_per_window(top, left) for top, left in corners)


def test_query_sampling_uses_every_corner_and_offset():
    """Over many draws the block lands on all four corners and every in-window position occurs."""
    corners, offsets = set(), set()
    for seed in range(200):
        index = grid_query_indices(grid=14, window=3, rng=np.random.default_rng(seed))
        rows, cols = index // 14, index % 14
        corners.add((int(rows.min() >= 2), int(cols.min() >= 2)))
        offsets.add((int(rows[0] % 3), int(cols[0] % 3)))
    assert len(corners) == 4
    assert len(offsets) == 9
