"""Learning, shown (docs/learning.md): a run that ends with `eval.at_end` prints and logs its
teacher's k-NN beside a random init and the chance level, and `flsl plot` draws that learning
curve (the demo recipe itself: tests/test_demo_recipe.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import metrics, run_flsl, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _eval_overrides(data: Path) -> list[str]:
    values = {
        "eval.at_end": "true",
        "eval.every_epochs": 1,
        "eval.knn.train": data / "train",
        "eval.knn.val": data / "val",
        "eval.knn.k": "[10,20]",
        "eval.knn.resize": 36,
        "eval.knn.crop": 32,
        "eval.knn.workers": 1,
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def evaluated_run(demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("learning") / "run"
    result = run_flsl(
        "pretrain",
        "recipes/demo.yaml",
        *tiny_overrides(demo_data / "train"),
        *_eval_overrides(demo_data),
        "--run-dir",
        run,
    )
    assert result.returncode == 0, result.stderr
    return run, result


def test_run_ends_with_teacher_random_init_and_chance(evaluated_run, demo_data, tmp_path):
    """The end of training shows the teacher's k-NN, a random init's and the chance level, and
    logs them as the last metrics row; the random init's figure is `flsl knn-eval --random-init`'s."""
    run, result = evaluated_run
    shown = " ".join((result.stdout + result.stderr).split())
    assert "random init (same architecture)" in shown and "chance" in shown
    assert "points ahead of random init" in shown or "points behind random init" in shown
    final = metrics(run)[-1]
    assert final["final"] is True
    assert final["knn_bbox_chance_feature_top1"] == pytest.approx(100 / 7, abs=0.01)
    for key in ("knn_bbox_feature_top1_k20", "random_init_knn_bbox_feature_top1_k20"):
        assert 0.0 <= final[key] <= 100.0
    baseline = run_flsl(
        "knn-eval",
        run,
        "--random-init",
        "--train",
        demo_data / "train",
        "--val",
        demo_data / "val",
        "--k",
        "10,20",
        "--resize",
        "36",
        "--crop",
        "32",
        "--workers",
        "1",
        "--output",
        tmp_path / "random.json",
    )
    assert baseline.returncode == 0, baseline.stderr
    figures = json.loads((tmp_path / "random.json").read_text())["results"]["20"]
    assert final["random_init_knn_bbox_feature_top1_k20"] == pytest.approx(figures["feature_top1"], abs=1e-3)


def test_plot_draws_the_learning_curve_with_chance_and_baseline(evaluated_run):
    """`flsl plot`'s k-NN panel: the accuracies over steps, the chance level as a line, the random
    init as a marker, and no image counts on the percentage axis."""
    from flsl_cli.viz.plot import KNN_TITLE, draw_run, read_curves

    run, _ = evaluated_run
    figure = draw_run(read_curves(str(run)))
    panel = next(axes for axes in figure.axes if axes.get_title() == KNN_TITLE)
    labels = [line.get_label() for line in panel.get_lines()]
    assert "knn_bbox_feature_top1_k20" in labels
    assert any(label.startswith("chance") for label in labels)
    assert "random init: knn_bbox_feature_top1_k20" in labels
    assert not any(label.endswith("_images") for label in labels)
    steps = panel.get_lines()[labels.index("knn_bbox_feature_top1_k20")].get_xdata()
    assert len(steps) >= 2  # every epoch, then the end of training


def test_the_supervised_control_trains_with_labels_and_reports_the_knn(demo_data, tmp_path):
    """scripts/supervised_control.py (a row of docs/learning.md): the recipe's backbone trained
    with the labels for 2 epochs, its bbox k-NN at the start and after the training."""
    import subprocess
    import sys

    out = tmp_path / "curve.json"
    overrides = ["data.train=" + str(demo_data / "train"), "optim.epochs=2", "optim.global_batch_size=32"]
    knn = {"eval.knn.train": demo_data / "train", "eval.knn.val": demo_data / "val", "eval.knn.k": "[5]"}
    overrides += [f"{key}={value}" for key, value in knn.items()] + ["eval.knn.workers=1"]
    done = subprocess.run(
        [sys.executable, "scripts/supervised_control.py", "recipes/demo.yaml", "--out", str(out)]
        + [arg for value in overrides for arg in ("--set", value)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    curve = json.loads(out.read_text())
    assert [row["epoch"] for row in curve] == [0, 1, 2]
    assert curve[-1]["step"] == 2 * (192 // 32) and 0 <= curve[-1]["train_accuracy"] <= 100
    assert "knn_bbox_feature_top1_k5" not in curve[1]  # evaluated every 2 epochs
    assert curve[-1]["knn_bbox_feature_top1_k5"] != curve[0]["knn_bbox_feature_top1_k5"]
