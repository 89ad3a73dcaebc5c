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
    """144 steps of 2 processes (~12 s of training): long enough to signal in mid-run."""
    values = {"optim__epochs": 6, "checkpoint__every_steps": 50, **extra}
    return tiny_overrides(demo_data / "train", **values)


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


def _release_requeued(job: str, run: Path, restarts: int) -> None:
    """SLURM holds a requeued job ~2 minutes (BeginTime); let it start now."""
    def started() -> bool:
        if _run_json(run).get("job_restarts", 0) >= restarts:
            return True
        if _state(job) == "PENDING":
            _slurm("scontrol", "update", f"JobId={job}", "StartTime=now")
            time.sleep(1)
        return False

    _wait(started, what=f"requeued job {job} to start again", run=run, timeout=120)


def _wait_finished(job: str, run: Path, *, timeout: float = 150) -> None:
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


def test_usr2_checkpoints_the_step_requeues_and_resumes_exactly(slurm_cluster, demo_data, uninterrupted, tmp_path):
    """SLURM's time-limit warning (USR2): a checkpoint of the interrupted step, the job requeued,
    the requeued job resuming from that step, final weights equal to the uninterrupted run."""
    run = tmp_path / "usr2"
    job = _submitted(run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data), *ON_CPU, "--run-dir", run), run)
    assert (run / "owner.json").exists()
    _signal_mid_run(job, run, "USR2", after_step=3)

    requeued = _wait(lambda: _run_json(run).get("last_requeue"), what="the requeue", run=run, timeout=60)
    step = requeued["step"]
    assert requeued["signal"] == "SIGUSR2" and 3 <= step < 144
    assert (run / "checkpoints" / f"step-{step:08d}.json").exists()  # committed checkpoint of that step
    assert _metric_steps(run)[-1] == step  # nothing logged past it: at most the step in flight is lost
    assert _run_json(run)["job_requeues"] == {job: 1}

    _release_requeued(job, run, restarts=1)
    _wait_finished(job, run)
    record = _run_json(run)
    assert record["status"] == "finished", _logs(run)
    assert record["job_ids"] == [job] and record["requeues"] == 1
    rank0 = _squeeze((run / "slurm" / f"{job}_0_log.err").read_text())
    assert _squeeze(f"job {job} (restart 1)") in rank0
    assert _squeeze(f"resumed from {run}/checkpoints/step-{step:08d}.pt (step {step})") in rank0
    assert "Traceback" not in _logs(run)
    _assert_same_run(uninterrupted, run)
    assert not (run / "owner.json").exists()

    status = run_flsl("status", run, "--json")
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    assert summary["status"] == "finished" and summary["step"] == 144 and summary["requeues"] == 1
    assert summary["newest_checkpoint"]["step"] == 144 and summary["job_ids"] == [job]


def test_sigterm_requeues_until_the_limit_then_resume_submits_the_rest(slurm_cluster, demo_data, uninterrupted,
                                                                       tmp_path):
    """Preemption's SIGTERM: checkpoint, requeue, resume; a second SIGTERM past
    slurm.max_requeues=1 stops with a clear message; a second writer is refused while the job
    runs; `flsl resume RUN --nodes 1` submits the rest; the weights equal the uninterrupted run."""
    run = tmp_path / "sigterm"
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
    _wait_finished(second, run)
    assert _run_json(run)["status"] == "finished", _logs(run)
    assert _run_json(run)["job_ids"] == [job, second]
    _assert_same_run(uninterrupted, run)


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
    assert _metric_steps(run) == list(range(1, 145))


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
