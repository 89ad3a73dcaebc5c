"""Several processes: a 2-process gloo run equals a 1-process run on the same global batches,
and `flsl pretrain --devices 2` and `torchrun --nproc-per-node 2 -m flsl_cli pretrain` train end
to end with real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_flsl, tiny_overrides
from dist_workers import train_on_fixed_batches

from flsl_cli.config.schema import Recipe
from flsl_cli.data.augment import MultiCropAugment
from flsl_cli.data.shards import resolve_shards
from flsl_cli.data.stream import TrainStream, build_loader, plan_layout
from flsl_cli.launch.local import free_port, run_local_processes


def _recipe(train) -> Recipe:
    return Recipe.model_validate(
        {
            "data": {"train": str(train), "num_workers": 0},
            "model": {
                "arch": "vit_tiny",
                "patch_size": 8,
                "depth": 2,
                "drop_path": 0.0,
                "head_out_dim": 64,
                "head_hidden_dim": 64,
                "head_bottleneck_dim": 32,
            },
            "augment": {"global_size": 32, "local_size": 16},
            "loss": {"query_window_global": 2, "query_window_local": 2},
            "optim": {"global_batch_size": 8, "epochs": 2, "warmup_epochs": 0, "freeze_last_layer_epochs": 0},
        }
    )


def test_two_processes_equal_one_process(demo_data, tmp_path):
    """Same global batches: loss terms and updated student/teacher weights agree."""
    recipe = _recipe(demo_data / "train")
    shards = resolve_shards(str(demo_data / "train"))
    layout, _ = plan_layout(shards, world_size=1, num_workers=0, local_batch=8)
    stream = TrainStream(shards, layout=layout, rank=0, seed=0, shuffle_buffer=8, augment=MultiCropAugment(recipe))
    stream.set_epoch(0)
    batches = []
    for batch in build_loader(stream, pin_memory=False):
        batches.append({k: v for k, v in batch.items() if torch.is_tensor(v)})
        if len(batches) == 3:
            break
    torch.save(batches, tmp_path / "batches.pt")

    results = {}
    for nprocs in (1, 2):
        out = tmp_path / f"out{nprocs}.pt"
        run_local_processes(
            train_on_fixed_batches,
            nprocs=nprocs,
            kwargs={
                "recipe_data": recipe.model_dump(mode="json"),
                "batches_path": str(tmp_path / "batches.pt"),
                "out_path": str(out),
            },
        )
        results[nprocs] = torch.load(out, weights_only=True)

    one, two = results[1], results[2]
    for a, b in zip(one["history"], two["history"]):
        for term in ("loss", "intra", "inter", "volume"):
            assert a[term] == pytest.approx(b[term], rel=1e-5, abs=1e-6), term
    moved = 0
    for key in one["student"]:
        torch.testing.assert_close(one["student"][key], two["student"][key], atol=2e-5, rtol=1e-4, msg=key)
        torch.testing.assert_close(one["teacher"][key], two["teacher"][key], atol=2e-5, rtol=1e-4, msg=key)
        moved += int(not torch.equal(one["student"][key], one["teacher"][key]))
    assert moved > 0  # the steps really updated the student


def test_pretrain_with_two_cpu_processes(demo_data, tmp_path):
    """`--devices 2` runs two gloo processes; only rank 0 writes; the run finishes and checkpoints."""
    run = tmp_path / "run"
    result = run_flsl(
        "pretrain",
        "recipes/demo.yaml",
        *tiny_overrides(demo_data / "train", optim__epochs=1),
        "--devices",
        "2",
        "--run-dir",
        run,
    )
    assert result.returncode == 0, result.stderr
    assert "2 CPU process(es)" in result.stderr
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == len(set(metrics)) > 0  # one writer: no duplicated lines
    assert list((run / "checkpoints").glob("*.pt"))


@pytest.mark.parametrize("error", ["DataError", "CheckpointError", "RunStopped"])
def test_an_error_in_a_spawned_process_arrives_with_its_type_and_fields(error):
    """A user error raised in one of 2 spawned processes is raised in the launcher as itself:
    same class, message, where, fix, exit code and extra fields (a RunStopped's step)."""
    from dist_workers import fail_on_rank

    from flsl_cli import errors

    with pytest.raises(errors.FlslError) as caught:
        run_local_processes(fail_on_rank, nprocs=2, kwargs={"rank": 1, "error": error})
    raised = caught.value
    assert type(raised) is getattr(errors, error)
    if error == "RunStopped":
        assert (raised.step, raised.signal_name, raised.exit_code) == (7, "SIGTERM", 75)
    else:
        assert (raised.what, raised.where, raised.fix) == (f"a {error} on rank 1", "somewhere", "Do this")


def test_pretrain_under_torchrun_with_two_cpu_processes(demo_data, tmp_path):
    """`torchrun --nproc-per-node 2 -m flsl_cli pretrain ...` trains one run with two gloo ranks:
    rank 0 alone sets up the run dir and prints; the run finishes and checkpoints."""
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "flsl_cli",
            "pretrain",
            "recipes/demo.yaml",
            *tiny_overrides(demo_data / "train", optim__epochs=1),
            "--run-dir",
            str(run),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("run dir:") == 1 and "(2 CPU process(es)) under torchrun" in output
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == len(set(metrics)) > 0  # one writer: no duplicated lines
    assert list((run / "checkpoints").glob("*.pt"))
    assert "owner" not in json.loads((run / "run.json").read_text())  # released by rank 0 at the end
