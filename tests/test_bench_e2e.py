"""`flsl bench e2e`: the step fed from shards by the data workers against the step alone, the
ratio, and the data workers' CPU time per image, in the table and the JSON (no timing is
asserted)."""

from __future__ import annotations

import json

import pytest
import torch


def test_bench_e2e_from_shards_with_views_made_in_the_training_process(flsl, demo_data, tmp_path):
    """Views made by the training process (tensor-cpu) with the default 2 data workers; the timed
    steps run past an epoch end (6 steps per epoch), where the workers restart as in training.
    Both measurements, their ratio and both paths' worker CPU time per image are reported."""
    out = tmp_path / "e2e.json"
    result = flsl(
        "bench",
        "e2e",
        "recipes/demo.yaml",
        "--data",
        demo_data / "train",
        "--device",
        "tensor-cpu",
        "--batch",
        "32",
        "--steps",
        "6",
        "--warmup",
        "1",
        "--worker-images",
        "8",
        "--set",
        "model.depth=1",
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    settings, step, e2e = figures["settings"], figures["step"], figures["e2e"]
    assert settings["workers"] == 2 and settings["view_device"] == "tensor-cpu" and settings["images"] == 32
    assert settings["steps_per_epoch"] == 6 and e2e["epochs"] == 2 and e2e["bad_samples"] == 0
    for run in (step, e2e):
        assert run["steps"] == 6 and run["step_seconds"] > 0
        assert run["images_per_second"] == pytest.approx(32 / run["step_seconds"])
    assert figures["e2e_fraction_of_step"] == pytest.approx(e2e["images_per_second"] / step["images_per_second"])
    per_image = figures["worker_cpu_ms_per_image"]
    assert set(per_image) == {"cpu", "tensor-cpu"} and per_image["cpu"] > 0
    assert figures["worker_cpu_ratio"] == pytest.approx(per_image["tensor-cpu"] / per_image["cpu"])
    assert figures["machine"]["device"] == "cpu" and settings["worker_images"] == 8
    for shown in (
        "step alone",
        "from the shards (2 data worker(s))",
        "% of the step alone",
        "tensor-cpu: in the training process",
        "wrote",
    ):
        assert shown in result.stdout


def test_bench_e2e_defaults_to_the_recipes_views_on_a_cpu(flsl, demo_data, tmp_path):
    """Without --device on a machine without a GPU the views are made as the recipe says (the
    demo recipe: PIL in the workers), so there is one worker path and no ratio."""
    if torch.cuda.is_available():
        pytest.skip("the default is cuda where torch sees a GPU")
    out = tmp_path / "e2e.json"
    result = flsl(
        "bench",
        "e2e",
        "recipes/demo.yaml",
        "--data",
        demo_data / "train",
        "--batch",
        "8",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--worker-images",
        "4",
        "--set",
        "model.depth=1",
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["settings"]["view_device"] == "cpu" and figures["settings"]["workers"] == 2
    assert set(figures["worker_cpu_ms_per_image"]) == {"cpu"} and figures["worker_cpu_ratio"] is None
    assert figures["e2e"]["steps"] == 2 and figures["e2e"]["epochs"] == 1
    assert "cpu: in the workers with PIL" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--data", "/nonexistent/shards"), "--data does not exist"),
        (("--data", "{train}", "--batch", "1000"), "too few samples"),
        ((), "Missing option '--data'"),
    ],
)
def test_bench_e2e_bad_input_is_a_short_error(flsl, demo_data, args, expected):
    """Missing or absent shards and a batch the shards cannot fill: one message, exit 2."""
    args = [arg.format(train=demo_data / "train") for arg in args]
    result = flsl("bench", "e2e", "recipes/demo.yaml", *args, "--steps", "1")
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is present")
def test_bench_e2e_on_cuda_without_a_gpu_is_a_short_error(flsl, demo_data):
    """--device cuda on a machine without a GPU says so and names the CPU choices."""
    result = flsl("bench", "e2e", "recipes/demo.yaml", "--data", demo_data / "train", "--device", "cuda")
    assert result.returncode == 2
    assert "torch sees none" in result.stderr and "--device tensor-cpu" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_e2e_trains_with_the_training_step_on_views_made_from_the_shards(demo_data, monkeypatch):
    """Every measured step is `StepRunner.run`, the step `flsl pretrain` runs: the step alone on
    the synthetic batch (warm-up and both turns), and from the shards on batches whose views the
    training process made (tensor-cpu) from the shards' samples."""
    from flsl_cli.bench.e2e import E2EBenchSettings, run_e2e_bench
    from flsl_cli.config.load import load_recipe
    from flsl_cli.train.step import StepRunner

    seen = []
    real_run = StepRunner.run

    def recording_run(self, batch, **kwargs):
        seen.append(
            {
                "keys": list(batch.get("key", [])),
                "encoded": "encoded" in batch,
                "teacher": tuple(batch["teacher"].shape),
            }
        )
        return real_run(self, batch, **kwargs)

    monkeypatch.setattr(StepRunner, "run", recording_run)
    recipe = load_recipe("recipes/demo.yaml", overrides=["model.depth=1"])
    figures = run_e2e_bench(
        recipe,
        E2EBenchSettings(
            data=str(demo_data / "train"), steps=3, warmup=1, batch=4, device="tensor-cpu", workers=2, worker_images=4
        ),
    )
    assert len(seen) == 2 * (1 + 3)
    synthetic = seen[: 1 + 2] + seen[-1:]  # warm-up, first turn (2 steps), second turn (1 step)
    from_shards = seen[3:-1]
    assert all(not step["keys"] for step in synthetic)
    assert all(len(step["keys"]) == 4 and not step["encoded"] for step in from_shards)
    assert all(step["teacher"] == (4, 3, 64, 64) for step in seen)
    assert figures["step"]["steps"] == figures["e2e"]["steps"] == 3
