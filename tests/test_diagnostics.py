"""The collapse diagnostics (`flsl diagnose`, docs/learning.md): the figures on inputs whose
answer is known, and the command on real checkpoints and on bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import fails, run_flsl

from flsl_cli.eval.diagnostics import effective_rank, feature_diagnostics, image_similarity, prototype_usage


def test_effective_rank_of_known_matrices():
    """One direction gives 1; k orthogonal directions of equal energy give k; unequal energy less."""
    torch.manual_seed(0)
    line = torch.randn(500, 1) @ torch.randn(1, 16)
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-6)
    basis = torch.linalg.qr(torch.randn(16, 16))[0][:, :4].T  # 4 orthonormal directions
    signs = torch.tensor([[1.0], [-1.0]])
    rows = torch.cat([signs * direction for direction in basis])  # centred: each direction +/- once
    assert effective_rank(rows) == pytest.approx(4.0, rel=1e-6)
    uneven = torch.cat([signs * basis[0] * 3, signs * basis[1]])
    p = torch.tensor([9.0, 1.0]) / 10
    assert effective_rank(uneven) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)
    assert effective_rank(torch.ones(10, 8)) == 1.0  # no spread at all


def test_similarity_within_and_between_images():
    """Identical tokens inside each image, orthogonal images: within 1, between 0; and the means
    equal the plain average over explicit pairs on random tokens."""
    tokens = torch.zeros(3, 5, 4)
    for image in range(3):
        tokens[image, :, image] = 1.0
    assert image_similarity(tokens) == (pytest.approx(1.0), pytest.approx(0.0))
    torch.manual_seed(1)
    tokens = torch.randn(4, 6, 8)
    unit = torch.nn.functional.normalize(tokens, dim=-1)
    cos = torch.einsum("and,bmd->abnm", unit, unit)
    within = sum((cos[a, a].sum() - 6) / 30 for a in range(4)) / 4
    between = sum(cos[a, b].mean() for a in range(4) for b in range(4) if a != b) / 12
    got = image_similarity(tokens)
    assert got[0] == pytest.approx(float(within), abs=1e-6)
    assert got[1] == pytest.approx(float(between), abs=1e-6)
    assert math.isnan(image_similarity(tokens[:1])[1])


def test_prototype_usage_of_one_hot_and_uniform_predictions():
    """Every token sure of its own prototype: entropy 0, all used, mean perplexity K; all tokens
    on one prototype: 1/K used; uniform predictions: entropy log K."""
    k = 8
    eye = torch.eye(k)
    assert prototype_usage(eye) == pytest.approx(
        {"teacher_entropy": 0.0, "prototypes_in_use": 1.0, "mean_perplexity_share": 1.0}, abs=1e-6
    )
    one = torch.zeros(5, k)
    one[:, 3] = 1.0
    usage = prototype_usage(one)
    assert usage["prototypes_in_use"] == 1 / k and usage["mean_perplexity_share"] == pytest.approx(1 / k)
    uniform = torch.full((4, k), 1.0 / k)
    assert prototype_usage(uniform)["teacher_entropy"] == pytest.approx(math.log(k))


def test_feature_diagnostics_reads_the_head_at_its_temperature():
    """With a head, the prototype figures come from softmax(head(token) / T)."""
    torch.manual_seed(2)
    tokens = torch.randn(2, 4, 6)
    head = torch.nn.Linear(6, 5)
    results = feature_diagnostics(tokens, head=head, teacher_temp=0.5)
    with torch.no_grad():
        expected = prototype_usage(torch.softmax(head(tokens.reshape(-1, 6)) / 0.5, dim=-1))
    assert results["teacher_entropy"] == pytest.approx(expected["teacher_entropy"])
    assert set(feature_diagnostics(tokens)) == {"effective_rank", "within_image_cosine", "between_image_cosine"}


def test_diagnose_a_run_beside_random_init(tiny_run, demo_data):
    """`flsl diagnose RUN_DIR --json`: the figures of the newest checkpoint and of a random init,
    at the checkpoint's own training size."""
    result = run_flsl("diagnose", tiny_run, "--val", demo_data / "val", "--images", "16", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 16 and report["crop"] == 32 and report["step"] == 2
    for part in ("trained", "random_init"):
        assert 1.0 <= report[part]["effective_rank"] <= report["embed_dim"]
        assert 0.0 < report[part]["prototypes_in_use"] <= 1.0
    table = run_flsl("diagnose", tiny_run, "--val", demo_data / "val", "--images", "8")
    assert table.returncode == 0 and "effective rank" in table.stdout and "random init" in table.stdout


def test_diagnose_bad_input(tiny_run, demo_data, tmp_path):
    """A run without checkpoints, a file that is not a flsl network, an empty val split: one
    clear message each, exit 2, no traceback."""
    empty_run = tmp_path / "run"
    (empty_run / "checkpoints").mkdir(parents=True)
    fails(run_flsl("diagnose", empty_run, "--val", demo_data / "val"), "no complete checkpoint")
    exported = tmp_path / "export.safetensors"
    assert run_flsl("export", tiny_run, "--format", "timm", "--out", exported).returncode == 0
    fails(run_flsl("diagnose", exported, "--val", demo_data / "val"), "not a flsl checkpoint")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "index.json").write_text(json.dumps({"shards": []}))
    fails(run_flsl("diagnose", tiny_run, "--val", tmp_path / "val"), "val")
