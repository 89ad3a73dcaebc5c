"""SLURM: `flsl pretrain --nodes` on a real single-node cluster (slurm/cluster.sh, 127.0.0.1):
a 2-task CPU job stopped by USR2 or SIGTERM checkpoints the step it reached, requeues itself and
resumes to the same weights as an uninterrupted run; the requeue limit, `flsl resume --nodes`,
`flsl status`, the plain sbatch template, `--dry-run` and every bad input.

The cluster tests skip, saying why, only where SLURM is missing and cannot be installed (not
root, no apt-get); with CI=true they fail instead."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_flsl, tiny_overrides

SLURM_TOOLS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "slurmctld", "slurmd", "munged")
ON_CPU = ("--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2")
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY")


def _common(demo_data, **extra):
    """288 steps of 2 processes with the demo recipe's 2 data workers each: long enough to stop
    and requeue the job several times in mid-run."""
    values = {"optim__epochs": 12, "checkpoint__every_steps": 50, **extra}
    return tiny_overrides(demo_data / "train", **values)


TOTAL_STEPS = 288


# --- The cluster ------------------------------------------------------------------------------


def _have_slurm() -> bool:
    return all(shutil.which(tool) or Path("/usr/sbin", tool).exists() for tool in SLURM_TOOLS)


def _install_slurm() -> str | None:
    """Install SLURM when it is missing and can be; the reason when it cannot."""
    if _have_slurm():
        return None
    if os.geteuid() != 0:
        return "SLURM is not installed, and installing it (slurm/install-debian.sh) needs root"
    if not shutil.which("apt-get"):
        return "SLURM is not installed, and apt-get is not available to install it"
    done = subprocess.run(["bash", str(REPO / "slurm" / "install-debian.sh")], capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0 or not _have_slurm():
        return f"installing SLURM failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running single-node cluster; SLURM_CONF points the client commands at it."""
    reason = _install_slurm()
    if reason is None and os.geteuid() != 0:
        reason = "starting slurmd (slurm/cluster.sh) needs root"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"SLURM is required under CI: {reason}")
        pytest.skip(reason)
    cluster = REPO / "slurm" / "cluster.sh"
    started = subprocess.run(["bash", str(cluster), "start"], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, f"slurm/cluster.sh start failed:\n{started.stdout}\n{started.stderr}"
    conf = started.stdout.strip().splitlines()[-1].split("=", 1)[1]
    saved = {name: os.environ.get(name) for name in ("SLURM_CONF", "FLSL_MASTER_ADDR")}
    os.environ["SLURM_CONF"] = conf
    try:  # jobs meet at the node's name; where it does not resolve, at the node's address
        socket.gethostbyname(socket.gethostname().split(".")[0])
    except OSError:
        os.environ["FLSL_MASTER_ADDR"] = "127.0.0.1"
    yield conf
    if "already running" not in started.stdout:
        subprocess.run(["bash", str(cluster), "stop"], capture_output=True, text=True, timeout=120)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _slurm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30)


def _state(job: str) -> str:
    """The job's state ("?" when squeue did not answer this time)."""
    answer = _slurm("squeue", "-h", "-t", "all", "-j", job, "-o", "%T")
    states = answer.stdout.split()
    return states[0] if answer.returncode == 0 and states else "?"


def _run_json(run: Path) -> dict:
    try:
        return json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def _logs(run: Path) -> str:
    text = []
    for path in sorted((run / "slurm").glob("*_log.*")):
        lines = [line for line in path.read_text(errors="replace").splitlines()
                 if not line.startswith(("epoch ", "lr ", "0.", "│"))]
        text.append(f"--- {path.name}\n" + "\n".join(lines[-40:]))
    return "\n".join(text)


def _wait(condition, *, what: str, run: Path, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\nrun.json: {_run_json(run)}\n{_logs(run)}")


def _metric_steps(run: Path) -> list[int]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line)["step"] for line in lines if line.strip().endswith("}")]


def _submitted(result, run: Path) -> str:
    assert result.returncode == 0, result.stderr + _logs(run)
    assert "submitted SLURM job" in result.stdout, result.stdout
    return result.stdout.split("submitted SLURM job ")[1].split(":")[0]


def _signal_mid_run(job: str, run: Path, signal_name: str, *, after_step: int) -> None:
    _wait(lambda: len(_metric_steps(run)) >= 3 and _metric_steps(run)[-1] >= after_step,
          what=f"job {job} to pass step {after_step}", run=run, timeout=120)
    sent = _slurm("scancel", f"--signal={signal_name}", job)
    assert sent.returncode == 0, sent.stderr


def _restarts(run: Path, job: str) -> int:
    """SLURM_RESTART_COUNT of the job's newest attempt that reached flsl."""
    value = _run_json(run).get("job_restarts") or {}
    return int(value.get(job, 0)) if isinstance(value, dict) else 0


def _release_requeued(job: str, run: Path, restarts: int) -> None:
    """SLURM holds a requeued job ~2 minutes (BeginTime); let it start now."""
    def started() -> bool:
        if _restarts(run, job) >= restarts:
            return True
        if _state(job) == "PENDING":
            _slurm("scontrol", "update", f"JobId={job}", "StartTime=now")
            time.sleep(1)
        return False

    _wait(started, what=f"requeued job {job} to start again", run=run, timeout=150)


def _wait_finished(job: str, run: Path, *, timeout: float = 240) -> None:
    _wait(lambda: _state(job) in TERMINAL, what=f"job {job} to end", run=run, timeout=timeout)


def _squeeze(text: str) -> str:
    """Text without whitespace: log lines may be wrapped anywhere by the console."""
    return "".join(text.split())


def _final(run: Path) -> dict:
    newest = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    return torch.load(newest, weights_only=True)


def _assert_same_run(reference: Path, run: Path) -> None:
    ma = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        for key in ("loss", "intra", "inter", "volume", "lr"):
            assert x[key] == y[key], (x["step"], key)
    fa, fb = _final(reference), _final(run)
    assert fa["step"] == fb["step"]
    for part in ("student", "teacher"):
        for key in fa[part]:
            assert torch.equal(fa[part][key], fb[part][key]), (part, key)


@pytest.fixture(scope="module")
def uninterrupted(demo_data, tmp_path_factory) -> Path:
    """The same run straight through, as 2 local gloo processes."""
    run = tmp_path_factory.mktemp("slurm") / "straight"
    result = run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data), "--devices", "2", "--run-dir", run)
    assert result.returncode == 0, result.stderr
    return run


# --- Stop, requeue, resume --------------------------------------------------------------------


def _preempt(job: str) -> None:
    """A job of the higher-tier partition that needs the whole node."""
    sent = _slurm("sbatch", "--parsable", "--partition=urgent", "--cpus-per-task=16", "--output=/dev/null",
                  "--wrap", "sleep 2")
    assert sent.returncode == 0, sent.stderr


STOPS = [  # (how the job is stopped, the command, who requeues it)
    ("USR2 to the tasks", lambda job: _slurm("scancel", "--signal=USR2", job), "flsl"),
    ("TERM to the tasks", lambda job: _slurm("scancel", "--signal=TERM", job), "flsl"),
    ("USR2 to the batch shell only", lambda job: _slurm("scancel", "--signal=USR2", "--batch", job), "flsl"),
    ("scontrol requeue", lambda job: _slurm("scontrol", "requeue", job), "slurm"),
    ("preemption by a higher-priority job", _preempt, "flsl"),
]


def test_every_way_slurm_stops_a_job_saves_the_step_and_it_resumes_exactly(slurm_cluster, demo_data,
                                                                            uninterrupted, tmp_path):
    """One 2-task job, its data workers on, stopped five ways in turn: the time-limit warning
    (USR2 to the tasks), TERM to the tasks, USR2to the batch shell alone, `scontrol requeue`,
    and partition-priority preemption. Each time the step reached is committed (only the step
    in flight is redone), the job is requeued (by flsl, or by SLURM itself) and resumes from
    that step; requeues are counted however they happened; the final weights equal an
    uninterrupted run, bitwise."""
    run = tmp_path / "stops"
    job = _submitted(run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data), *ON_CPU, "--run-dir", run), run)
    assert "#SBATCH --cpus-per-task=3" in (run / "slurm" / "job.sbatch").read_text()  # 2 data workers + 1
    assert (run / "owner.json").exists()
    step = 0
    for count, (how, stop, by) in enumerate(STOPS, start=1):
        _wait(lambda: _restarts(run, job) == count - 1 and _metric_steps(run) and _metric_steps(run)[-1] >= step + 3,
              what=f"job {job} to pass step {step + 3} before '{how}'", run=run, timeout=150)
        sent = stop(job)
        assert getattr(sent, "returncode", 0) == 0, sent.stderr
        requeued = _wait(lambda: _run_json(run).get("requeues") == count and _run_json(run).get("last_requeue"),
                         what=f"the requeue after '{how}'", run=run, timeout=90)
        step = requeued["step"]
        assert (run / "checkpoints" / f"step-{step:08d}.json").exists(), how  # committed
        assert _metric_steps(run)[-1] == step, how  # nothing trained past it is lost
        assert requeued["by"] == by, (how, requeued)
        if how.startswith("preemption"):
            assert requeued["cause"] == "preemption", requeued
        _release_requeued(job, run, restarts=count)
        resumed = _squeeze(f"resumed from {run}/checkpoints/step-{step:08d}.pt (step {step})")
        _wait(lambda: resumed in _squeeze((run / "slurm" / f"{job}_0_log.err").read_text()),
              what=f"the resume from step {step} after '{how}'", run=run, timeout=90)

    _wait_finished(job, run)
    record = _run_json(run)
    assert record["status"] == "finished", _logs(run)
    assert record["job_ids"] == [job] and record["requeues"] == len(STOPS)
    logs = _logs(run)
    assert "Traceback" not in logs and "could not requeue" not in logs and "DataLoader worker" not in logs
    _assert_same_run(uninterrupted, run)
    assert not (run / "owner.json").exists()

    status = run_flsl("status", run, "--json")
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    assert summary["status"] == "finished" and summary["step"] == TOTAL_STEPS
    assert summary["requeues"] == len(STOPS) and summary["job_requeues"] == {job: len(STOPS)}
    assert summary["newest_checkpoint"]["step"] == TOTAL_STEPS and summary["job_ids"] == [job]
    assert summary["last_error"] is None and summary["nodes"]


def test_requeue_limit_cancel_and_resume(slurm_cluster, demo_data, uninterrupted, tmp_path):
    """TERM requeues the job; the next TERM past slurm.max_requeues=1 stops it with a clear
    message; a second writer is refused meanwhile; `flsl resume RUN --nodes 1` submits a new job,
    which a plain `scancel` stops with its step saved and not requeued; a third job finishes the
    run, bitwise equal to the uninterrupted one."""
    run = tmp_path / "limit"
    common = _common(demo_data, slurm__max_requeues=1)
    job = _submitted(run_flsl("pretrain", "recipes/demo.yaml", *common, *ON_CPU, "--run-dir", run), run)
    _signal_mid_run(job, run, "TERM", after_step=3)

    # A second writer is refused while the job owns the run dir, here or as another job.
    for args in (("resume", run), ("resume", run, *ON_CPU)):
        refused = run_flsl(*args)
        assert refused.returncode == 2, refused.stderr
        assert f"being written by SLURM job {job}" in refused.stderr and "Traceback" not in refused.stderr

    first = _wait(lambda: _run_json(run).get("last_requeue"), what="the requeue", run=run, timeout=60)
    assert first["signal"] == "SIGTERM"
    assert (run / "checkpoints" / f"step-{first['step']:08d}.json").exists()
    _release_requeued(job, run, restarts=1)

    _signal_mid_run(job, run, "TERM", after_step=first["step"] + 3)
    _wait_finished(job, run)
    record = _run_json(run)
    stopped_at = record["stopped_at_step"]
    assert record["status"] == "stopped" and record["job_requeues"] == {job: 1}, record
    assert (run / "checkpoints" / f"step-{stopped_at:08d}.json").exists()
    message = record["last_error"]["message"]
    assert "not requeued" in message and "slurm.max_requeues (1)" in message and "flsl resume" in message
    assert f"checkpoint of step {stopped_at} is saved" in message
    assert _squeeze(message) in _squeeze((run / "slurm" / f"{job}_0_log.err").read_text())

    status = run_flsl("status", run)
    assert status.returncode == 0, status.stderr
    flat = " ".join(status.stdout.split())
    assert "not requeued" in flat and job in flat and f"step {stopped_at}" in flat

    second = _submitted(run_flsl("resume", run, *ON_CPU), run)
    assert second != job
    _wait(lambda: _run_json(run).get("job_id") == second and _run_json(run).get("status") == "running"
          and _metric_steps(run)[-1] >= stopped_at + 3, what=f"job {second} to train", run=run, timeout=120)
    assert _slurm("scancel", second).returncode == 0  # plain scancel: stop for good, with the step saved
    _wait_finished(second, run)
    record = _run_json(run)
    cancelled_at = record["stopped_at_step"]
    assert record["status"] == "stopped" and record.get("stop_reason") == "cancelled", record
    assert record["job_requeues"] == {job: 1} and record["requeues"] == 1  # not requeued
    assert (run / "checkpoints" / f"step-{cancelled_at:08d}.json").exists()
    assert _metric_steps(run)[-1] == cancelled_at
    assert "Traceback" not in _logs(run)

    third = _submitted(run_flsl("resume", run, *ON_CPU), run)
    _wait_finished(third, run)
    assert _run_json(run)["status"] == "finished", _logs(run)
    assert _run_json(run)["job_ids"] == [job, second, third]
    _assert_same_run(uninterrupted, run)


def test_the_time_limit_warning_requeues_before_the_limit(slurm_cluster, demo_data, tmp_path):
    """A 2-minute job that asks for SIGUSR2 90 s before its limit: SLURM's warning stops it at a
    step, which is committed; the job requeues itself and resumes from that step."""
    run = tmp_path / "limit"
    common = _common(demo_data, optim__epochs=1000, slurm__signal_minutes_before_end=1.5)
    job = _submitted(run_flsl("pretrain", "recipes/demo.yaml", *common, *ON_CPU, "--time", "2", "--run-dir", run),
                     run)
    requeued = _wait(lambda: _run_json(run).get("last_requeue"), what="the time-limit warning", run=run,
                     timeout=150)
    step = requeued["step"]
    assert requeued["signal"] == "SIGUSR2" and requeued["by"] == "flsl"
    assert (run / "checkpoints" / f"step-{step:08d}.json").exists() and _metric_steps(run)[-1] == step
    _release_requeued(job, run, restarts=1)
    _wait(lambda: _squeeze(f"(step {step})") in _squeeze((run / "slurm" / f"{job}_0_log.err").read_text()),
          what="the resume", run=run, timeout=60)
    assert _slurm("scancel", job).returncode == 0
    _wait_finished(job, run)
    assert _run_json(run)["status"] == "stopped" and "Traceback" not in _logs(run)


def test_concurrent_jobs_meet_on_different_ports(slurm_cluster, demo_data, tmp_path):
    """Two jobs at once on the same first node: each rendezvous on its own port, both finish."""
    runs = [tmp_path / "a", tmp_path / "b"]
    jobs = [_submitted(run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data, optim__max_steps=4), *ON_CPU,
                                "--run-dir", run), run) for run in runs]
    for job, run in zip(jobs, runs):
        _wait_finished(job, run)
        assert _metric_steps(run)[-1] == 4 and "Traceback" not in _logs(run), _logs(run)  # optim.max_steps
    ports = set()
    for job, run in zip(jobs, runs):
        log = _squeeze((run / "slurm" / f"{job}_0_log.err").read_text())
        ports.add(log.split("rendezvous")[1].split(",")[0].rsplit(":", 1)[1])
    assert len(ports) == 2, ports


def test_a_job_that_fails_at_start_reads_failed(slurm_cluster, demo_data, tmp_path):
    """A job whose Python does not exist fails before flsl runs: `flsl status` says failed (not
    starting); a job SLURM no longer knows is shown as such; a run dir that vanished before its
    job started is not recreated and the job is not requeued."""
    run = tmp_path / "broken"
    job = _submitted(run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data), *ON_CPU,
                              "--set", "slurm.python=/nonexistent/python", "--run-dir", run), run)
    _wait_finished(job, run, timeout=60)
    summary = json.loads(run_flsl("status", run, "--json").stdout)
    assert summary["status"].startswith("failed"), summary
    record = _run_json(run)
    (run / "run.json").write_text(json.dumps({**record, "job_ids": [*record["job_ids"], "999999"]}))
    shown = run_flsl("status", run)
    assert "no longer known to SLURM" in " ".join(shown.stdout.split()), shown.stdout

    gone = tmp_path / "gone"
    held = _submitted(run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data), *ON_CPU, "--run-dir", gone), gone)
    _slurm("scontrol", "hold", held)
    shutil.rmtree(gone)
    _slurm("scontrol", "release", held)
    _wait(lambda: _state(held) in TERMINAL, what=f"job {held} to end", run=gone, timeout=90)
    assert _state(held) != "PENDING" and not gone.exists()


def test_plain_sbatch_template_runs_and_requeues(slurm_cluster, demo_data, tmp_path):
    """slurm/flsl.sbatch (sbatch + srun, no submitit): creates the run, stops on USR2 at a step,
    requeues itself and finishes from that step."""
    run = tmp_path / "template"
    overrides = " ".join(_common(demo_data))
    env = dict(os.environ, RECIPE=str(REPO / "recipes" / "demo.yaml"), RUN_DIR=str(run), FLSL_CPU="1",
               FLSL_PYTHON=sys.executable, FLSL_SET=overrides)
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
         f"--output={tmp_path}/template-%j.out", str(REPO / "slurm" / "flsl.sbatch")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    log = tmp_path / f"template-{job}.out"
    _signal_mid_run(job, run, "USR2", after_step=3)
    step = _wait(lambda: _run_json(run).get("last_requeue"), what="the requeue", run=run, timeout=60)["step"]
    _release_requeued(job, run, restarts=1)
    _wait_finished(job, run)
    text = log.read_text()
    assert _run_json(run)["status"] == "finished", text[-3000:]
    assert _squeeze(f"(step {step})") in _squeeze(text) and f"created {run}" in text
    assert _metric_steps(run) == list(range(1, TOTAL_STEPS + 1))


# --- Bad input --------------------------------------------------------------------------------


def _fails(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    flat = " ".join(result.stderr.split())
    for needle in needles:
        assert needle in flat, (needle, result.stderr)


def test_unknown_partition_is_refused_in_one_line(slurm_cluster, demo_data, tmp_path):
    run = tmp_path / "run"
    result = run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data), *ON_CPU, "--partition", "nosuch",
                      "--run-dir", run)
    _fails(result, "sbatch refused the job", "invalid partition", "--partition")
    assert len(result.stderr.strip().splitlines()) <= 4  # one message (wrapped by the console)
    assert not run.exists()


def test_nodes_zero(demo_data, tmp_path):
    _fails(run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data), "--nodes", "0", "--run-dir",
                    tmp_path / "run"), "--nodes must be at least 1, found 0", "leave out --nodes")
    assert not (tmp_path / "run").exists()


def test_sbatch_missing_suggests_running_here(demo_data, tmp_path):
    env = dict(os.environ, PATH=str(Path(sys.executable).parent), COLUMNS="200")
    result = subprocess.run([sys.executable, "-m", "flsl_cli", "pretrain", "recipes/demo.yaml", *_common(demo_data),
                             *ON_CPU, "--run-dir", str(tmp_path / "run")], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=120)
    _fails(result, "sbatch was not found on PATH", "leaving out --nodes", "--devices")
    assert not (tmp_path / "run").exists()


def test_devices_with_nodes_is_refused(demo_data, tmp_path):
    _fails(run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data), "--nodes", "2", "--devices", "2"),
           "--devices is for runs on this machine")


def test_time_limit_shorter_than_the_warning(demo_data, tmp_path):
    _fails(run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data), *ON_CPU, "--time", "00:04:00",
                    "--dry-run"), "not longer than slurm.signal_minutes_before_end")


def test_dry_run_prints_what_was_asked(demo_data, tmp_path):
    """--dry-run needs no SLURM and writes nothing: the sbatch script holds the nodes, tasks,
    GPUs, stop signal, time limit and partition asked for."""
    run = tmp_path / "run"
    result = run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data, optim__global_batch_size=64),
                      "--nodes", "4", "--gpus-per-node", "2", "--partition", "gpu", "--time", "1-12:00:00",
                      "--account", "vision", "--set", "slurm.signal_minutes_before_end=10",
                      "--set", "slurm.extra_sbatch={gres: 'gpu:2'}", "--run-dir", run, "--dry-run")
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --signal=USR2@600", "#SBATCH --time=1-12:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account=vision", "#SBATCH --requeue", "#SBATCH --gres=gpu:2"):
        assert line in script.splitlines(), (line, script)
    assert f"{run}/slurm" in script and "srun" in script
    assert "8 GPU process(es)" not in result.stderr and "= 8" in " ".join(result.stderr.split())
    assert not run.exists()


# --- Pieces that need no cluster ----------------------------------------------------------------


def test_rendezvous_from_slurm_variables():
    """Every task derives the same master address and port from SLURM's variables; a restart
    gets another port; variables inherited from the submitting shell are replaced."""
    from flsl_cli.launch.rendezvous import expand_nodelist, torch_env

    assert expand_nodelist("gpu[001-003,010],login5,n[8-9]") == ["gpu001", "gpu002", "gpu003", "gpu010",
                                                                  "login5", "n8", "n9"]
    base = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "16",
            "RANK": "3", "WORLD_SIZE": "1", "MASTER_ADDR": "login-node"}
    tasks = [torch_env({**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 8)}) for r in range(16)]
    assert {(t["MASTER_ADDR"], t["MASTER_PORT"]) for t in tasks} == {("gpu07", tasks[0]["MASTER_PORT"])}
    assert [t["RANK"] for t in tasks] == [str(r) for r in range(16)]
    assert tasks[9]["LOCAL_RANK"] == "1" and tasks[9]["WORLD_SIZE"] == "16"
    restarted = torch_env({**base, "SLURM_PROCID": "0", "SLURM_RESTART_COUNT": "1"})
    assert restarted["MASTER_PORT"] != tasks[0]["MASTER_PORT"]
    bound = torch_env({**base, "SLURM_PROCID": "5", "SLURM_LOCALID": "5", "CUDA_VISIBLE_DEVICES": "5"})
    assert bound["LOCAL_RANK"] == "0"  # one GPU bound to the task: it is cuda:0


def test_a_live_owner_refuses_a_second_writer(tmp_path):
    """owner.json: a live local process or a pending/running SLURM job refuses a second writer;
    a dead process or a finished job does not."""
    from flsl_cli.errors import RunDirError
    from flsl_cli.train.rundir import local_owner, refuse_if_owned, slurm_owner, update_status, write_owner

    update_status(tmp_path, status="running")
    write_owner(tmp_path, local_owner())  # this test's own process: alive
    with pytest.raises(RunDirError, match="being written by flsl process"):
        refuse_if_owned(tmp_path, slurm_state=lambda _: None)
    refuse_if_owned(tmp_path, slurm_state=lambda _: None, me=local_owner())  # its own owner passes
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_owner(tmp_path, {**local_owner(), "pid": int(dead.stdout), "started": None})
    refuse_if_owned(tmp_path, slurm_state=lambda _: None)

    write_owner(tmp_path, slurm_owner("77"))
    for state in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
        with pytest.raises(RunDirError, match=f"SLURM job 77 \\({state}\\)"):
            refuse_if_owned(tmp_path, slurm_state=lambda _, s=state: s)
    for state in ("COMPLETED", "FAILED", "CANCELLED", ""):
        refuse_if_owned(tmp_path, slurm_state=lambda _, s=state: s)
    with pytest.raises(RunDirError, match="cannot be asked"):  # no squeue here, and run.json says running
        refuse_if_owned(tmp_path, slurm_state=lambda _: None)
    update_status(tmp_path, status="finished")
    refuse_if_owned(tmp_path, slurm_state=lambda _: None)


def test_a_busy_port_is_skipped_and_every_rank_uses_the_one_rank_0_took(tmp_path):
    """Rank 0 skips a candidate port that something else holds and notes the one it took; the
    other ranks read that note, so all meet on one port."""
    from flsl_cli.launch.rendezvous import RESTART_SLOTS, agree_on_port, master_port

    first = master_port("31337", 0)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("", first))
        busy.listen()
        taken = agree_on_port(tmp_path, attempt="31337.0", rank=0, first=first)
        assert taken == first + RESTART_SLOTS
    assert agree_on_port(tmp_path, attempt="31337.0", rank=3, first=first, timeout=5) == taken
    with pytest.raises(Exception, match="rendezvous port"):  # rank 0 of another attempt never noted one
        agree_on_port(tmp_path, attempt="31337.1", rank=1, first=first, timeout=0.5)


def test_ports_of_concurrent_jobs_and_restarts_differ():
    """Job 1 restart 7 and job 2 restart 0 (which once shared a port) differ, and so do the
    first restarts of nearby jobs."""
    from flsl_cli.launch.rendezvous import master_port

    assert master_port("1", 7) != master_port("2", 0)
    ports = {master_port(str(job), restart) for job in range(1000, 1100) for restart in range(4)}
    assert len(ports) == 400


@pytest.mark.parametrize("fields, outcome", [
    ({"JobState": "RUNNING", "Restarts": "0", "PreemptTime": "None"}, "running"),  # USR2 / scancel --signal
    ({"JobState": "RUNNING", "Restarts": "0", "PreemptTime": "2026-01-01T00:00:00"}, "running"),  # in grace
    ({"JobState": "COMPLETING", "Restarts": "1"}, "requeued"),  # scontrol requeue, preemption after grace
    ({"JobState": "PENDING", "Restarts": "1"}, "requeued"),
    ({"JobState": "COMPLETING", "Restarts": "0", "RunTime": "00:00:30", "TimeLimit": "00:10:00"}, "cancelled"),
    ({"JobState": "COMPLETING", "Restarts": "0", "RunTime": "00:10:00", "TimeLimit": "00:10:00"}, "time limit"),
    ({"JobState": "TIMEOUT", "Restarts": "0"}, "time limit"),
    (None, "running"),  # scontrol did not answer: try to requeue
])
def test_what_became_of_a_stopped_job(fields, outcome):
    """The states `scontrol show job` showed in the private cluster for each kind of stop."""
    from flsl_cli.launch.slurm_job import stop_outcome

    assert stop_outcome(fields, restart=0) == outcome


def test_a_job_asks_for_its_data_workers_cpus():
    """--cpus-per-task defaults to data workers + 1; the flag or the recipe wins."""
    from flsl_cli.config.schema import SlurmConfig
    from flsl_cli.launch.slurm import SlurmFlags, resolve_request

    assert resolve_request(SlurmConfig(), SlurmFlags(), data_workers=10).cpus_per_task == 11
    assert resolve_request(SlurmConfig(cpus_per_task=4), SlurmFlags(), data_workers=10).cpus_per_task == 4
    assert resolve_request(SlurmConfig(), SlurmFlags(cpus_per_task=2), data_workers=10).cpus_per_task == 2
