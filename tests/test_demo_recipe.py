"""The shipped demo recipe, as a user runs it: generates the demo data on first use, trains
with a progress log and a summary, and its loss goes down over the run."""

from __future__ import annotations

import json

from conftest import run_flsl


def test_demo_recipe_learns(tmp_path):
    data = tmp_path / "demo-cache" / "train"
    run = tmp_path / "run"
    result = run_flsl("pretrain", "recipes/demo.yaml", "--set", f"data.train={data}", "--run-dir", run, timeout=2400)
    assert result.returncode == 0, result.stderr
    assert "generated the demo data set" in result.stderr
    assert "flsl pretrain: done" in result.stderr
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == max(m["step"] for m in metrics)
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
        assert key in metrics[0]
    window = max(3, len(metrics) // 6)
    first = sum(m["loss"] for m in metrics[:window]) / window
    last = sum(m["loss"] for m in metrics[-window:]) / window
    first_intra = sum(m["intra"] for m in metrics[:window]) / window
    last_intra = sum(m["intra"] for m in metrics[-window:]) / window
    print(f"demo loss: first {first:.4f} -> last {last:.4f}; L1 {first_intra:.4f} -> {last_intra:.4f}")
    assert last < first
    assert last_intra < first_intra
