"""The shipped demo recipe, as a user runs it: generates the demo data on first use, trains
with a progress log and a summary, its loss goes down over the run, and it ends with its
teacher's bbox k-NN beside a random init and the chance level. It runs on training seed 1,
which the recipe was not tuned on."""

from __future__ import annotations

import json

import pytest
from conftest import run_flsl


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("demo-recipe")
    data = tmp_path / "demo-cache" / "train"
    run = tmp_path / "run"
    result = run_flsl(
        "pretrain",
        "recipes/demo.yaml",
        "--set",
        f"data.train={data}",
        "--set",
        "optim.seed=1",
        "--run-dir",
        run,
        timeout=2400,
    )
    assert result.returncode == 0, result.stderr
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return result, metrics


def test_demo_recipe_trains_and_its_loss_goes_down(demo_run):
    """Demo data generated on first use, a summary at the end, every scheduled value logged, and
    the loss and its intra-view term lower at the end than at the start."""
    result, metrics = demo_run
    assert "generated the demo data set" in result.stderr
    assert "flsl pretrain: done" in result.stderr
    steps = [m for m in metrics if "loss" in m]
    assert steps[-1]["step"] == max(m["step"] for m in metrics)
    for key in (
        "step",
        "epoch",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "loss",
        "intra",
        "inter",
        "volume",
        "images_per_s",
    ):
        assert key in steps[0]
    window = max(3, len(steps) // 6)
    first = sum(m["loss"] for m in steps[:window]) / window
    last = sum(m["loss"] for m in steps[-window:]) / window
    first_intra = sum(m["intra"] for m in steps[:window]) / window
    last_intra = sum(m["intra"] for m in steps[-window:]) / window
    print(f"demo loss: first {first:.4f} -> last {last:.4f}; L1 {first_intra:.4f} -> {last_intra:.4f}")
    assert last < first
    assert last_intra < first_intra


def test_demo_recipe_ends_with_teacher_random_init_and_chance(demo_run):
    """The demo's last lines: the teacher's feature top-1 beside a random init's and chance (1/7),
    also logged as the final metrics row."""
    result, metrics = demo_run
    shown = " ".join(result.stderr.split())
    assert "random init (same architecture)" in shown and "chance" in shown
    final = metrics[-1]
    assert final["final"] is True and final["step"] == 192
    assert final["knn_bbox_chance_feature_top1"] == pytest.approx(100 / 7, abs=0.01)
    print(
        f"demo teacher {final['knn_bbox_feature_top1_k20']:.1f}% against random init "
        f"{final['random_init_knn_bbox_feature_top1_k20']:.1f}% (feature top-1, k=20)"
    )


@pytest.mark.xfail(
    strict=True,
    reason=(
        "docs/learning.md: on the demo data no objective tried (FLSL in every configuration tried, DINO and "
        "SimCLR controls, and training with the labels) gets the bbox feature top-1 above random init within a "
        "CPU demo's length"
    ),
)
def test_demo_recipe_teacher_beats_random_init(demo_run):
    """The demo recipe's teacher ends above random init in bbox feature top-1 on the demo val split."""
    _, metrics = demo_run
    final = metrics[-1]
    assert final["knn_bbox_feature_top1_k20"] > final["random_init_knn_bbox_feature_top1_k20"]
