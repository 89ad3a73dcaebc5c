"""Helpers for the tests that run flsl on a private SLURM cluster (slurm/cluster.sh): starting
the cluster for a test session or module, asking SLURM about jobs, waiting on a run's files.
Runs are compared with conftest.assert_same_run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

from flsl_cli.train.run_record import JobStates

SLURM_TOOLS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "slurmctld", "slurmd", "munged")
TERMINAL = JobStates.ENDED  # the one list of SLURM job states flsl uses
CLUSTER = REPO / "slurm" / "cluster.sh"


def have_slurm() -> bool:
    return all(shutil.which(tool) or Path("/usr/sbin", tool).exists() for tool in SLURM_TOOLS)


def install_slurm() -> str | None:
    """Install SLURM when it is missing and can be; the reason when it cannot."""
    if have_slurm():
        return None
    if os.geteuid() != 0:
        return "SLURM is not installed, and installing it (slurm/install-debian.sh) needs root"
    if not shutil.which("apt-get"):
        return "SLURM is not installed, and apt-get is not available to install it"
    done = subprocess.run(
        ["bash", str(REPO / "slurm" / "install-debian.sh")], capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0 or not have_slurm():
        return f"installing SLURM failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return None


@contextlib.contextmanager
def running_cluster(
    *, nodes: int = 1, state_dir: str | None = None, port: int | None = None, node_suffix: str = ""
) -> Iterator[str]:
    """A running private cluster of `nodes` nodes while the block runs (stopped afterwards
    unless it was already running); SLURM_CONF points the client commands at it meanwhile.
    Skips, saying why, where SLURM can be neither found nor installed; fails under CI=true."""
    reason = install_slurm()
    if reason is None and os.geteuid() != 0:
        reason = "starting slurmd (slurm/cluster.sh) needs root"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"SLURM is required under CI: {reason}")
        pytest.skip(reason)
    env = dict(os.environ)
    if state_dir is not None:
        env["FLSL_SLURM_DIR"] = state_dir
    if port is not None:
        env["FLSL_SLURM_PORT"] = str(port)
    env["FLSL_SLURM_NODE_SUFFIX"] = node_suffix
    started = subprocess.run(
        ["bash", str(CLUSTER), "start", "--nodes", str(nodes)], capture_output=True, text=True, timeout=180, env=env
    )
    assert started.returncode == 0, f"slurm/cluster.sh start failed:\n{started.stdout}\n{started.stderr}"
    conf = started.stdout.strip().splitlines()[-1].split("=", 1)[1]
    saved = {name: os.environ.get(name) for name in ("SLURM_CONF", "FLSL_MASTER_ADDR")}
    os.environ["SLURM_CONF"] = conf
    os.environ.pop("FLSL_MASTER_ADDR", None)
    if nodes == 1:
        try:  # jobs meet at the node's name; where it does not resolve, at the node's address
            socket.gethostbyname(socket.gethostname().split(".")[0])
        except OSError:
            os.environ["FLSL_MASTER_ADDR"] = "127.0.0.1"
    try:
        yield conf
    finally:
        if "already running" not in started.stdout:
            subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120, env=env)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def slurm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30)


def job_state(job: str) -> str:
    """The job's state ("?" when squeue did not answer this time)."""
    answer = slurm("squeue", "-h", "-t", "all", "-j", job, "-o", "%T")
    states = answer.stdout.split()
    return states[0] if answer.returncode == 0 and states else "?"


def run_json(run: Path) -> dict:
    try:
        return json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def job_logs(run: Path) -> str:
    text = []
    for path in sorted((run / "slurm").glob("*_log.*")):
        lines = [
            line
            for line in path.read_text(errors="replace").splitlines()
            if not line.startswith(("epoch ", "lr ", "0.", "│"))
        ]
        text.append(f"--- {path.name}\n" + "\n".join(lines[-40:]))
    return "\n".join(text)


def wait_for(condition, *, what: str, run: Path, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\nrun.json: {run_json(run)}\n{job_logs(run)}")


def metric_steps(run: Path) -> list[int]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line)["step"] for line in lines if line.strip().endswith("}")]


def submitted(result, run: Path) -> str:
    assert result.returncode == 0, result.stderr + job_logs(run)
    assert "submitted SLURM job" in result.stdout, result.stdout
    return result.stdout.split("submitted SLURM job ")[1].split(":")[0]


def restarts_of(run: Path, job: str) -> int:
    """SLURM_RESTART_COUNT of the job's newest attempt that reached flsl."""
    value = run_json(run).get("job_restarts") or {}
    return int(value.get(job, 0)) if isinstance(value, dict) else 0


def release_requeued(job: str, run: Path, restarts: int) -> None:
    """SLURM holds a requeued job ~2 minutes (BeginTime); let it start now. Not in the second of
    the requeue: slurmd refuses a job credential issued in the second the old one was revoked
    ("Job credential revoked"), and the job then ends instead of starting."""
    pending_since: list[float] = []

    def started() -> bool:
        if restarts_of(run, job) >= restarts:
            return True
        if job_state(job) == "PENDING":
            pending_since.append(time.time())
            if pending_since[-1] - pending_since[0] >= 3:
                slurm("scontrol", "update", f"JobId={job}", "StartTime=now")
                time.sleep(1)
        return False

    wait_for(started, what=f"requeued job {job} to start again", run=run, timeout=150)


def wait_finished(job: str, run: Path, *, timeout: float = 240) -> None:
    wait_for(lambda: job_state(job) in TERMINAL, what=f"job {job} to end", run=run, timeout=timeout)


def squeeze(text: str) -> str:
    """Text without whitespace: log lines may be wrapped anywhere by the console."""
    return "".join(text.split())


def task_outside_slurm(run: Path, recipe_args: list[str], **slurm_env: str) -> subprocess.CompletedProcess:
    """`job prepare` of a run dir of the demo recipe, then one task of it started with the given
    SLURM_* variables (and none of this shell's) but outside SLURM, as a node would start it."""
    prepared = subprocess.run(
        [sys.executable, "-m", "flsl_cli.launch.slurm.job", "prepare", "recipes/demo.yaml", str(run), *recipe_args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert prepared.returncode == 0, prepared.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FLSL_MASTER"))}
    env.update(slurm_env)
    return subprocess.run(
        [sys.executable, "-m", "flsl_cli.launch.slurm.job", "task", str(run), "--cpu"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
