"""Shared fixtures and helpers: a small demo data set, a tiny-model recipe, a tiny finished
pretraining run, a CLI runner that starts `flsl` as a real subprocess (as a user would), and
the checks every CLI test makes of a refusal and of a run's metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """240 demo images: 192 train in 8 shards of 24, 48 val."""
    from flsl_cli.data.demo import write_demo_dataset

    out = tmp_path_factory.mktemp("data") / "demo"
    write_demo_dataset(out, images=240, seed=1, image_size=64, samples_per_shard=24)
    return out


def tiny_overrides(train: Path | str, **extra: object) -> list[str]:
    """--set values for a tiny, fast run on CPU, with the demo recipe's 2 data workers per
    process, as users run it (pass data__num_workers=0 for the in-process reader)."""
    values = {
        "data.train": str(train),
        "data.num_workers": 2,
        "data.shuffle_buffer": 16,
        "data.demo": "null",
        "model.arch": "vit_tiny",
        "model.patch_size": 8,
        "model.depth": 2,
        "model.drop_path": 0.1,
        "model.head_out_dim": 64,
        "model.head_hidden_dim": 64,
        "model.head_bottleneck_dim": 32,
        "augment.global_size": 32,
        "augment.local_size": 16,
        "loss.query_window_global": 2,
        "loss.query_window_local": 2,
        "optim.global_batch_size": 8,
        "optim.epochs": 2,
        "optim.warmup_epochs": 1,
        "checkpoint.every_minutes": "null",
        "checkpoint.every_steps": 5,
        "checkpoint.keep_last": 10,
        "logging.every_steps": 1,
        "eval.at_end": "false",
    }
    values.update({key.replace("__", "."): value for key, value in extra.items()})
    args = []
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    return args


@pytest.fixture(scope="session")
def tiny_run(demo_data, tmp_path_factory) -> Path:
    """A flsl run of two steps: a real checkpoint of a tiny architecture (vit_tiny, 2 blocks,
    patch 8, 32 px), made quickly. Tests read it and write their outputs elsewhere."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    result = run_flsl(
        "pretrain", "recipes/demo.yaml", *tiny_overrides(demo_data / "train", optim__max_steps=2), "--run-dir", run
    )
    assert result.returncode == 0, result.stderr
    return run


def fails(result: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    """The command was refused the way users should see it: exit `code`, no traceback, and every
    needle in its message (line breaks of a wrapped message do not count)."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    flat = " ".join(result.stderr.split())
    for needle in needles:
        assert needle in result.stderr or " ".join(needle.split()) in flat, (needle, result.stderr)


def metrics(run: Path) -> list[dict]:
    """The logged steps of a run (none before the first; a line still being written is left out)."""
    import json

    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def run_flsl(
    *args: str, cwd: Path | None = None, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`flsl ARGS` in a subprocess (`env`: variables set on top of this process's)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "flsl_cli", *map(str, args)],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def flsl():
    return run_flsl


def final_checkpoint(run: Path) -> dict:
    """The newest checkpoint of a run, loaded as flsl loads it."""
    import torch

    newest = sorted((Path(run) / "checkpoints").glob("step-*.pt"))[-1]
    return torch.load(newest, weights_only=True)


def assert_same_run(reference: Path, run: Path) -> None:
    """Bitwise the same run: every logged step's loss terms and scheduled values, and the final
    student, teacher and optimizer state."""
    import json

    import torch

    ma = [json.loads(line) for line in (Path(reference) / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        for key in ("loss", "intra", "inter", "volume", "lr", "wd", "momentum", "teacher_temp"):
            assert x[key] == y[key], (x["step"], key)
    fa, fb = final_checkpoint(reference), final_checkpoint(run)
    assert fa["step"] == fb["step"]
    for part in ("student", "teacher"):
        for key in fa[part]:
            assert torch.equal(fa[part][key], fb[part][key]), (part, key)
    for key, state in fa["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, fb["optimizer"]["state"][key][name]), (key, name)
