"""The recipe's `eval` section runs the bounding-box k-NN during pretraining and logs it."""

from __future__ import annotations

import json

from conftest import run_flsl, tiny_overrides


def test_knn_every_epoch_lands_in_metrics(demo_data, tmp_path):
    run = tmp_path / "run"
    extra = [
        "--set",
        "eval.every_epochs=1",
        "--set",
        f"eval.knn={{train: {demo_data / 'train'}, val: {demo_data / 'val'}, k: [1, 5], resize: 36,"
        " crop: 32, grid: 2, workers: 0, batch_size: 16}",
    ]
    result = run_flsl(
        "pretrain", "recipes/demo.yaml", *tiny_overrides(demo_data / "train", optim__epochs=2), *extra, "--run-dir", run
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "knn_bbox_top1_k1" in line]
    assert [round(line["epoch"]) for line in evals] == [1, 2]
    for line in evals:
        assert 0.0 <= line["knn_bbox_top1_k1"] <= 100.0 and line["knn_bbox_images"] > 0
