"""Resume: N steps, stop, `flsl resume` for N more gives the same losses and weights as 2N
steps straight (bitwise on CPU), with and without data workers and a stop in mid-epoch.
Stops by signal are in test_stop_signals.py."""

from __future__ import annotations

import json

import pytest
from conftest import assert_same_run, final_checkpoint, metrics, run_flsl, tiny_overrides


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_uninterrupted(demo_data, tmp_path, workers):
    """A run that reached optim.max_steps reads finished, and a resume past it ends equal to an
    uninterrupted run."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = tiny_overrides(demo_data / "train", data__num_workers=workers)
    done = run_flsl("pretrain", "recipes/demo.yaml", *common, "--run-dir", straight)
    assert done.returncode == 0, done.stderr
    total = metrics(straight)[-1]["step"]
    stop = total // 2 + 1  # stop in mid-epoch, at an odd batch
    first = run_flsl("pretrain", "recipes/demo.yaml", *common, "--set", f"optim.max_steps={stop}", "--run-dir", split)
    assert first.returncode == 0, first.stderr
    assert final_checkpoint(split)["step"] == stop
    shown = json.loads(run_flsl("status", split, "--json").stdout)
    assert (shown["status"], shown["step"]) == ("finished", stop)  # optim.max_steps reached: finished
    resumed = run_flsl("resume", split, "--set", "optim.max_steps=null")
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {stop}" in resumed.stderr
    assert_same_run(straight, split)
