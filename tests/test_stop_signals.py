"""Stop signals the way schedulers send them: to every process of the run (training processes
and their data workers), at a random step, during a checkpoint write, twice, and before the
first step. Every case stops cleanly at one step (exit 75, 130 for SIGINT), commits that step,
prints no traceback, and `flsl resume` finishes bitwise equal to an uninterrupted run. A data
worker killed by something else is reported by pid and signal."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_same_run, final_checkpoint, metrics, run_flsl, tiny_overrides
from process_group import Started


def _common(demo_data, **extra):
    """72 steps (3 epochs of 24) with the demo recipe's 2 data workers per process."""
    values = {"optim__epochs": 3, "checkpoint__every_steps": 1000, **extra}
    return tiny_overrides(demo_data / "train", **values)


@pytest.fixture(scope="module")
def straight(demo_data, tmp_path_factory):
    """The uninterrupted runs to compare with, for 1 and 2 processes."""
    runs = {}
    for devices in (1, 2):
        run = tmp_path_factory.mktemp("straight") / f"p{devices}"
        done = run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data), "--devices", devices, "--run-dir", run)
        assert done.returncode == 0, done.stderr
        runs[devices] = run
    return runs


def _pretrain(run: Path, args: list) -> Started:
    """`flsl pretrain` of the demo recipe into `run`, in its own process group."""
    return Started("pretrain", "recipes/demo.yaml", *args, "--run-dir", run)


def _stopped_cleanly(result, *, signum: int) -> int:
    """The step the run says it stopped after; asserts the exit code and that nothing leaked."""
    err = result.stderr
    assert result.returncode == (130 if signum == signal.SIGINT else 75), err
    assert "Traceback" not in err + result.stdout and "DataLoader worker" not in err
    assert f"stopped by {signal.Signals(signum).name} after step" in err, err
    return int(err.split("after step ")[1].split(";")[0])


def _committed(run: Path, step: int) -> None:
    assert (run / "checkpoints" / f"step-{step:08d}.json").exists()
    assert final_checkpoint(run)["step"] == step
    assert metrics(run)[-1]["step"] == step  # every finished step is saved: only the step in flight is redone
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "stopped" and record["resumable_from"] == step


@pytest.mark.parametrize("signum, devices", [(signal.SIGTERM, 1), (signal.SIGINT, 2)])
def test_a_signal_to_every_process_stops_at_a_step_and_resumes_exactly(demo_data, straight, tmp_path, signum, devices):
    """The whole process group (ranks and data workers) signalled at a random step."""
    run = tmp_path / "run"
    at = random.Random().randrange(3, 40)
    started = _pretrain(run, [*_common(demo_data), "--devices", devices])
    started.wait_for(lambda: len(metrics(run)) >= at, what=f"step {at}")
    every = 1 + (devices if devices > 1 else 0) + 2 * devices  # launcher, ranks, 2 data workers each
    started.wait_for(lambda: len(started.processes()) >= every, what="the data workers")
    started.signal_group(signum)
    step = _stopped_cleanly(started.finish(), signum=signum)
    assert step >= at
    _committed(run, step)
    shown = json.loads(run_flsl("status", run, "--json").stdout)  # the stop, in training's numbering
    assert shown["status"] == "stopped" and shown["stopped"] == {"step": step, "signal": signal.Signals(signum).name}
    assert (shown["step"], shown["epoch"], shown["epochs"]) == (step, (step - 1) // 24 + 1, 3)
    resumed = run_flsl("resume", run, "--devices", devices)
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {step}" in resumed.stderr
    assert_same_run(straight[devices], run)
    shown = json.loads(run_flsl("status", run, "--json").stdout)  # the stop is history now
    assert shown["status"] == "finished" and shown["stopped"] is None and shown["last_error"] is None
    assert (shown["step"], shown["epoch"], shown["epochs"]) == (72, 3, 3)


@pytest.mark.parametrize("signum", [signal.SIGUSR2])
def test_a_signal_during_a_checkpoint_write_lets_it_finish(demo_data, straight, tmp_path, signum):
    """A signal while a periodic checkpoint is being written (its temporary file exists, its
    manifest does not): the write completes, the run stops at the next step and saves it."""
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    started = _pretrain(run, _common(demo_data, checkpoint__every_steps=10))

    seen = []

    def writing() -> bool:
        names = os.listdir(checkpoints) if checkpoints.is_dir() else []
        seen[:] = [name for name in names if name.startswith(".step-") and ".tmp-" in name]
        return bool(seen)

    started.wait_for(writing, what="a checkpoint write")
    started.signal_group(signum)
    step = _stopped_cleanly(started.finish(), signum=signum)
    _committed(run, step)
    written = seen[0][1:].split(".tmp-")[0]  # .step-00000010.pt.tmp-PID -> step-00000010.pt
    assert (checkpoints / written).with_suffix(".json").exists()  # the write under way completed
    assert run_flsl("resume", run).returncode == 0
    assert_same_run(straight[1], run)


def test_a_second_signal_during_the_stop_save_changes_nothing(demo_data, straight, tmp_path):
    """SIGHUP (a closed terminal or ssh session), then SIGTERM while the stop checkpoint is
    written: it is still committed."""
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    started = _pretrain(run, _common(demo_data))
    started.wait_for(lambda: len(metrics(run)) >= 5, what="step 5")
    started.signal_group(signal.SIGHUP)
    started.wait_for(lambda: checkpoints.is_dir() and bool(os.listdir(checkpoints)), what="the stop checkpoint")
    started.signal_group(signal.SIGTERM)
    step = _stopped_cleanly(started.finish(), signum=signal.SIGHUP)
    _committed(run, step)
    assert run_flsl("resume", run).returncode == 0
    assert_same_run(straight[1], run)


def test_a_signal_before_the_first_step_stops_with_nothing_to_save(demo_data, tmp_path):
    """Stopped while it starts up: a clean exit that says so; the run starts again from step 0."""
    run = tmp_path / "run"
    started = _pretrain(run, _common(demo_data, optim__epochs=1))
    started.wait_for(started.handles_stop_signals, what="the stop handling")
    started.signal_group(signal.SIGTERM)
    result = started.finish()
    err = " ".join(result.stderr.split())
    if "after step" in err:  # start-up outran the signal: still a clean stop at a step
        _committed(run, _stopped_cleanly(result, signum=signal.SIGTERM))
        return
    assert result.returncode == 75 and "Traceback" not in err, err
    assert "before its first step" in err and "nothing to save" in err and f"flsl resume {run}" in err
    assert not list((run / "checkpoints").glob("*.json")) if (run / "checkpoints").exists() else True
    again = run_flsl("resume", run)  # as the message says
    assert again.returncode == 0, again.stderr


def test_a_data_worker_killed_by_something_else_is_named(demo_data, tmp_path):
    """SIGKILL to one data worker (what the OOM killer does): a one-line error with its pid and
    the signal, exit 2, no traceback; run.json says failed with that message."""
    run = tmp_path / "run"
    started = _pretrain(run, _common(demo_data))
    started.wait_for(lambda: len(metrics(run)) >= 3, what="step 3")
    victim = [pid for pid in started.processes() if pid != started.process.pid][0]
    os.kill(victim, signal.SIGKILL)
    result = started.finish()
    err = " ".join(result.stderr.split())
    assert result.returncode == 2, err
    assert "Traceback" not in err
    assert f"data worker (pid {victim}) was killed by SIGKILL" in err and f"flsl resume {run}" in err, err
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and f"pid {victim}" in record["last_error"]["message"]


def test_sigkill_during_a_checkpoint_write_then_status_and_resume(demo_data, straight, tmp_path):
    """SIGKILL (nothing can be saved) while a checkpoint is written: `flsl status` says the
    process is gone and lists the temporary file it left; `flsl resume` removes it and finishes
    bitwise equal to an uninterrupted run."""
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    started = _pretrain(run, _common(demo_data, checkpoint__every_steps=10))

    def writing_the_second() -> bool:  # the first is committed, the next one is being written
        names = os.listdir(checkpoints) if checkpoints.is_dir() else []
        return "step-00000010.json" in names and any(".tmp-" in name for name in names)

    started.wait_for(writing_the_second, what="a second checkpoint write")
    started.signal_group(signal.SIGKILL)
    started.finish()
    leftovers = [p for p in checkpoints.iterdir() if ".tmp-" in p.name]
    status = run_flsl("status", run, "--json")
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    assert summary["status"] == "stopped (process gone)", summary
    assert sorted(summary["leftovers"]) == sorted(str(p) for p in leftovers)
    resumed = run_flsl("resume", run)
    assert resumed.returncode == 0, resumed.stderr
    assert not [p for p in checkpoints.iterdir() if ".tmp-" in p.name]
    assert_same_run(straight[1], run)


_SIGNAL_WHILE_SPAWNING = """
import os, signal, subprocess, sys
import flsl_cli.launch.local as local

child = subprocess.Popen(["sleep", "60"])  # stands for a training process being spawned


class Context:
    processes = [type("Process", (), {"pid": child.pid, "is_alive": lambda self: child.poll() is None})()]

    def join(self):
        child.wait(timeout=30)
        return True


def start_processes(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # the stop comes while the processes start
    return Context()


local.mp.start_processes = start_processes
try:
    local.run_local_processes(print, nprocs=2, kwargs={})
finally:
    child.kill()
print("the training process ended by", signal.Signals(-child.returncode).name)
"""


def test_a_signal_while_the_processes_start_reaches_them(tmp_path):
    """`--devices N`: a stop signal to the parent while it spawns the training processes is
    passed on to them once they exist; the parent lives on to wait for them."""
    script = tmp_path / "spawning.py"
    script.write_text(_SIGNAL_WHILE_SPAWNING)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "the training process ended by SIGTERM" in done.stdout, done.stdout
