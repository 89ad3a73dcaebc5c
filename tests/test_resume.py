"""Resume: N steps, stop, `flsl resume` for N more gives the same losses and weights as 2N
steps straight (bitwise on CPU), also with loader workers and a stop in mid-epoch."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_flsl, tiny_overrides


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _final(run):
    newest = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    return torch.load(newest, weights_only=True)


def _signal_mid_run(run, common, *, sig, ready) -> subprocess.CompletedProcess:
    """Start `flsl pretrain` in the background, send `sig` once `ready(run)` holds, wait for exit.

    The child gets the default SIGINT disposition: started from a background shell job, it would
    otherwise inherit SIGINT as ignored (as a backgrounded terminal program does) and never see Ctrl-C."""
    process = subprocess.Popen([sys.executable, "-m", "flsl_cli", "pretrain", "recipes/demo.yaml", *common,
                                "--run-dir", str(run)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not ready(run):
        time.sleep(0.1)
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _logged_steps(run) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


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


def test_resume_after_interrupt(demo_data, tmp_path):
    """Ctrl-C mid-run: exit 130 with a clear message, checkpoints intact, resume finishes the run
    exactly as if it had never stopped."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    common = tiny_overrides(demo_data / "train", checkpoint__every_steps=2, optim__epochs=3)
    assert run_flsl("pretrain", "recipes/demo.yaml", *common, "--run-dir", straight).returncode == 0
    result = _signal_mid_run(interrupted, common, sig=signal.SIGINT,
                             ready=lambda run: bool(list((run / "checkpoints").glob("step-*.json"))))
    err = result.stderr
    assert result.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not list((interrupted / "checkpoints").glob(".*tmp*"))
    resumed = run_flsl("resume", interrupted)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(straight, interrupted)


def test_sigterm_saves_the_current_step_and_resumes_exactly(demo_data, tmp_path):
    """SIGTERM (what a scheduler sends on preemption) stops at a step boundary, saves that step
    (nothing lost), exits 75 with a clear message; resume reproduces the uninterrupted run."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    common = tiny_overrides(demo_data / "train", checkpoint__every_steps=1000, optim__epochs=3)
    assert run_flsl("pretrain", "recipes/demo.yaml", *common, "--run-dir", straight).returncode == 0
    result = _signal_mid_run(stopped, common, sig=signal.SIGTERM, ready=lambda run: _logged_steps(run) >= 3)
    err = result.stderr
    assert result.returncode == 75, err
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err
    step = int(err.split("after step ")[1].split(";")[0])
    assert _final(stopped)["step"] == step
    assert _metrics(stopped)[-1]["step"] == step  # every finished step is in the checkpoint
    resumed = run_flsl("resume", stopped)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(straight, stopped)
