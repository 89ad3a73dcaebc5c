"""`flsl bench step`: flsl's step and the eager baseline measured in one run, with the FLOPs,
utilisation and ratio in the table and the JSON (no timing is asserted)."""

from __future__ import annotations

import json

import pytest
import torch


def test_bench_step_reports_both_variants_on_the_demo_recipe(flsl, tmp_path):
    """Two timed steps of each variant on CPU: images/s, step time, FLOPs counted by torch, the
    stated peak (--peak-tflops) and the MFU it gives, and the baseline / flsl ratio."""
    out = tmp_path / "step.json"
    result = flsl(
        "bench",
        "step",
        "recipes/demo.yaml",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--batch",
        "4",
        "--device",
        "cpu",
        "--peak-tflops",
        "0.5",
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    baseline, fast = figures["variants"]["baseline"], figures["variants"]["flsl"]
    assert figures["settings"]["images"] == 4 and figures["flops_per_step"] > 0
    assert figures["flops_per_image"] == pytest.approx(figures["flops_per_step"] / 4)
    for run in (baseline, fast):
        assert run["steps"] == 2 and run["step_seconds"] > 0 and run["precision"] == "fp32"
        assert run["images_per_second"] == pytest.approx(4 / run["step_seconds"])
        assert run["mfu"] == pytest.approx(figures["flops_per_step"] / run["step_seconds"] / 0.5e12)
    assert figures["speedup"] == pytest.approx(baseline["step_seconds"] / fast["step_seconds"])
    assert figures["peak_source"] == "--peak-tflops" and figures["machine"]["device"] == "cpu"
    assert "eager baseline" in result.stdout and "flsl / baseline" in result.stdout and "MFU" in result.stdout


def test_bench_step_compile_and_fused_modes_are_what_the_flsl_variant_runs(flsl, tmp_path, monkeypatch):
    """--set optim.fused_modes=true reaches the flsl variant only; the baseline keeps the
    explicit modes (its recipe is the release's way)."""
    out = tmp_path / "step.json"
    result = flsl(
        "bench",
        "step",
        "recipes/demo.yaml",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--batch",
        "2",
        "--set",
        "optim.fused_modes=true",
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["variants"]["flsl"]["fused_modes"] and not figures["variants"]["baseline"]["fused_modes"]
    assert figures["peak_tflops"] is None and figures["variants"]["flsl"]["mfu"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is present")
def test_bench_step_on_cuda_without_a_gpu_is_a_short_error(flsl):
    result = flsl("bench", "step", "recipes/demo.yaml", "--device", "cuda", "--steps", "1")
    assert result.returncode == 2
    assert "no CUDA GPU" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("workers", [0, 1])
def test_bench_step_runs_with_the_threads_training_would_use(tmp_path, workers):
    """On a CPU the step runs with the torch threads `flsl pretrain` would compute with beside
    data.num_workers data workers (the CPUs left after the workers, at least one); the JSON records
    them, the output says them, a line marks each phase, and on 80 columns in a pipe no column
    header is cut."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    from flsl_cli.distributed.env import cpu_threads

    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    out = tmp_path / "step.json"
    args = ["--steps", "2", "--warmup", "1", "--batch", "2", "--device", "cpu", "--set", "model.depth=1"]
    result = subprocess.run(
        [sys.executable, "-m", "flsl_cli", "bench", "step", "recipes/demo.yaml", *args]
        + ["--set", f"data.num_workers={workers}", "--out", str(out)],
        cwd=REPO,
        env={**env, "COLUMNS": "80", "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    expected = cpu_threads(data_workers=workers, environ={})
    figures = json.loads(out.read_text())
    assert figures["settings"]["torch_threads"] == figures["machine"]["torch_threads"] == expected
    assert f"less {workers} data worker(s)" in figures["settings"]["threads_chosen_as"]
    stderr = " ".join(result.stderr.split())
    assert f"{expected} torch thread(s) as `flsl pretrain` would" in stderr
    assert "counting the FLOPs" in stderr and "turn 2/2, flsl's step: 1 timed step(s)" in stderr
    header = next(line for line in result.stdout.splitlines() if "variant" in line)
    assert "…" not in header and "precision" in header and "images/s" in header
