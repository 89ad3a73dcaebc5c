"""Resume: N steps, stop, `flsl resume` for N more gives the same losses and weights as 2N
steps straight (bitwise on CPU), with and without data workers and a stop in mid-epoch.
Stops by signal are in test_stop_signals.py."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_flsl, tiny_overrides


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _final(run):
    newest = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    return torch.load(newest, weights_only=True)


def _assert_same_run(a, b):
    ma, mb = _metrics(a), _metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        for key in ("loss", "intra", "inter", "volume", "lr", "wd", "momentum", "teacher_temp"):
            assert x[key] == y[key], (x["step"], key)
    fa, fb = _final(a), _final(b)
    assert fa["step"] == fb["step"]
    for part in ("student", "teacher"):
        for key in fa[part]:
            assert torch.equal(fa[part][key], fb[part][key]), (part, key)
    for key, state in fa["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, fb["optimizer"]["state"][key][name])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_uninterrupted(demo_data, tmp_path, workers):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = tiny_overrides(demo_data / "train", data__num_workers=workers)
    done = run_flsl("pretrain", "recipes/demo.yaml", *common, "--run-dir", straight)
    assert done.returncode == 0, done.stderr
    total = _metrics(straight)[-1]["step"]
    stop = total // 2 + 1  # stop in mid-epoch, at an odd batch
    first = run_flsl("pretrain", "recipes/demo.yaml", *common, "--set", f"optim.max_steps={stop}", "--run-dir", split)
    assert first.returncode == 0, first.stderr
    assert _final(split)["step"] == stop
    resumed = run_flsl("resume", split, "--set", "optim.max_steps=null")
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {stop}" in resumed.stderr
    _assert_same_run(straight, split)
