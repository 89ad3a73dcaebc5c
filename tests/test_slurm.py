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
from pathlib import Path

import pytest
from conftest import REPO, assert_same_run, fails, run_flsl, tiny_overrides
from slurm_support import (
    TERMINAL,
    have_slurm,
    job_logs,
    job_state,
    metric_steps,
    release_requeued,
    restarts_of,
    run_json,
    running_cluster,
    slurm,
    squeeze,
    submitted,
    task_outside_slurm,
    wait_finished,
    wait_for,
)

ON_CPU = ("--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2")


def _common(demo_data, **extra):
    """288 steps of 2 processes with the demo recipe's 2 data workers each: long enough to stop
    and requeue the job several times in mid-run."""
    values = {"optim__epochs": 12, "checkpoint__every_steps": 50, **extra}
    return tiny_overrides(demo_data / "train", **values)


TOTAL_STEPS = 288


# --- The cluster ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node cluster; SLURM_CONF points the client commands at it."""
    with running_cluster(nodes=1) as conf:
        yield conf


def _signal_mid_run(job: str, run: Path, signal_name: str, *, after_step: int) -> None:
    wait_for(
        lambda: len(metric_steps(run)) >= 3 and metric_steps(run)[-1] >= after_step,
        what=f"job {job} to pass step {after_step}",
        run=run,
        timeout=120,
    )
    sent = slurm("scancel", f"--signal={signal_name}", job)
    assert sent.returncode == 0, sent.stderr


@pytest.fixture(scope="module")
def uninterrupted(demo_data, tmp_path_factory) -> Path:
    """The same run straight through, as 2 local gloo processes."""
    run = tmp_path_factory.mktemp("slurm") / "straight"
    result = run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data), "--devices", "2", "--run-dir", run)
    assert result.returncode == 0, result.stderr
    return run


def _sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


# --- Stop, requeue, resume --------------------------------------------------------------------


def _preempt(job: str) -> None:
    """A job of the higher-tier partition that needs the whole node."""
    sent = slurm(
        "sbatch", "--parsable", "--partition=urgent", "--cpus-per-task=16", "--output=/dev/null", "--wrap", "sleep 2"
    )
    assert sent.returncode == 0, sent.stderr


STOPS = [  # (how the job is stopped, the command, who requeues it)
    ("USR2 to the tasks", lambda job: slurm("scancel", "--signal=USR2", job), "flsl"),
    ("TERM to the tasks", lambda job: slurm("scancel", "--signal=TERM", job), "flsl"),
    ("USR2 to the batch shell only", lambda job: slurm("scancel", "--signal=USR2", "--batch", job), "flsl"),
    ("scontrol requeue", lambda job: slurm("scontrol", "requeue", job), "slurm"),
    ("preemption by a higher-priority job", _preempt, "flsl"),
]


def test_every_way_slurm_stops_a_job_saves_the_step_and_it_resumes_exactly(
    slurm_cluster, demo_data, uninterrupted, tmp_path
):
    """One 2-task job, its data workers on, stopped five ways in turn: the time-limit warning
    (USR2 to the tasks), TERM to the tasks, USR2to the batch shell alone, `scontrol requeue`,
    and partition-priority preemption. Each time the step reached is committed (only the step
    in flight is redone), the job is requeued (by flsl, or by SLURM itself) and resumes from
    that step; requeues are counted however they happened; the final weights equal an
    uninterrupted run, bitwise."""
    run = tmp_path / "stops"
    shown = run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data), *ON_CPU, "--run-dir", run, "--dry-run")
    assert shown.returncode == 0 and not run.exists(), shown.stderr
    job = submitted(run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data), *ON_CPU, "--run-dir", run), run)
    script = (run / "slurm" / f"{job}_submission.sh").read_text()  # submitit's layout
    assert "#SBATCH --cpus-per-task=3" in script  # 2 data workers + 1
    assert _sbatch_lines(script) == _sbatch_lines(shown.stdout)  # --dry-run showed what was submitted
    assert "submitit.core._submit" in script and "srun" not in script  # the callable runs in the batch step
    assert run_json(run)["owner"]["job_id"] == job  # the job owns the run dir
    assert (run.stat().st_mode & 0o777) == 0o700 and ((run / "slurm").stat().st_mode & 0o777) == 0o700
    step = 0
    for count, (how, stop, by) in enumerate(STOPS, start=1):
        wait_for(
            lambda: restarts_of(run, job) == count - 1 and metric_steps(run) and metric_steps(run)[-1] >= step + 3,
            what=f"job {job} to pass step {step + 3} before '{how}'",
            run=run,
            timeout=150,
        )
        sent = stop(job)
        assert getattr(sent, "returncode", 0) == 0, sent.stderr
        requeued = wait_for(
            lambda: run_json(run).get("requeues") == count and run_json(run).get("last_requeue"),
            what=f"the requeue after '{how}'",
            run=run,
            timeout=90,
        )
        step = requeued["step"]
        assert (run / "checkpoints" / f"step-{step:08d}.json").exists(), how  # committed
        assert metric_steps(run)[-1] == step, how  # nothing trained past it is lost
        assert requeued["by"] == by, (how, requeued)
        if how.startswith("preemption"):
            assert requeued["cause"] == "preemption", requeued
        release_requeued(job, run, restarts=count)
        resumed = squeeze(f"resumed from {run}/checkpoints/step-{step:08d}.pt (step {step})")
        wait_for(
            lambda: resumed in squeeze((run / "slurm" / f"{job}_0_log.err").read_text()),
            what=f"the resume from step {step} after '{how}'",
            run=run,
            timeout=90,
        )

    wait_finished(job, run)
    record = run_json(run)
    assert record["status"] == "finished", job_logs(run)
    assert record["job_ids"] == [job] and record["requeues"] == len(STOPS)
    logs = job_logs(run)
    assert "Traceback" not in logs and "could not requeue" not in logs and "DataLoader worker" not in logs
    assert_same_run(uninterrupted, run)
    assert "owner" not in run_json(run)  # released when the job ended

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
    job = submitted(run_flsl("pretrain", "recipes/demo.yaml", *common, *ON_CPU, "--run-dir", run), run)
    _signal_mid_run(job, run, "TERM", after_step=3)

    # A second writer is refused while the job owns the run dir, here or as another job.
    for args in (("resume", run), ("resume", run, *ON_CPU)):
        refused = run_flsl(*args)
        assert refused.returncode == 2, refused.stderr
        assert f"being written by SLURM job {job}" in refused.stderr and "Traceback" not in refused.stderr

    first = wait_for(lambda: run_json(run).get("last_requeue"), what="the requeue", run=run, timeout=60)
    assert first["signal"] == "SIGTERM"
    assert (run / "checkpoints" / f"step-{first['step']:08d}.json").exists()

    # Another job on the same run dir (slurm/flsl.sbatch, as a plain sbatch user would continue the
    # run): its rank 0 is refused and leaves run.json alone.
    env = dict(os.environ, RUN_DIR=str(run), FLSL_CPU="1", FLSL_PYTHON=sys.executable)
    other = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            f"--output={run}/slurm/%j_0_log.err",
            str(REPO / "slurm" / "flsl.sbatch"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=30,
    ).stdout.strip()
    assert other.isdigit()
    wait_finished(other, run)
    assert f"being written by SLURM job {job}" in (run / "slurm" / f"{other}_0_log.err").read_text()
    record = run_json(run)
    assert record["status"] == "requeued" and record["job_id"] == job and other not in record["job_ids"], record
    assert (record.get("last_error") or {}).get("job_id") != other, record
    release_requeued(job, run, restarts=1)

    _signal_mid_run(job, run, "TERM", after_step=first["step"] + 3)
    wait_finished(job, run)
    record = run_json(run)
    stopped_at = record["stopped_at_step"]
    assert record["status"] == "stopped" and record["job_requeues"] == {job: 1}, record
    assert (run / "checkpoints" / f"step-{stopped_at:08d}.json").exists()
    message = record["last_error"]["message"]
    assert "not requeued" in message and "slurm.max_requeues (1)" in message and "flsl resume" in message
    assert f"checkpoint of step {stopped_at} is saved" in message
    assert squeeze(message) in squeeze((run / "slurm" / f"{job}_0_log.err").read_text())

    status = run_flsl("status", run)
    assert status.returncode == 0, status.stderr
    flat = " ".join(status.stdout.split())
    assert "not requeued" in flat and job in flat and f"step {stopped_at}" in flat

    second = submitted(run_flsl("resume", run, *ON_CPU), run)
    assert second != job
    wait_for(
        lambda: (
            run_json(run).get("job_id") == second
            and run_json(run).get("status") == "running"
            and metric_steps(run)[-1] >= stopped_at + 3
        ),
        what=f"job {second} to train",
        run=run,
        timeout=120,
    )
    assert slurm("scancel", second).returncode == 0  # plain scancel: stop for good, with the step saved
    wait_finished(second, run)
    record = run_json(run)
    cancelled_at = record["stopped_at_step"]
    assert record["status"] == "stopped" and record.get("stop_reason") == "cancelled", record
    assert record["job_requeues"] == {job: 1} and record["requeues"] == 1  # not requeued
    assert (run / "checkpoints" / f"step-{cancelled_at:08d}.json").exists()
    assert metric_steps(run)[-1] == cancelled_at
    assert "Traceback" not in job_logs(run)

    third = submitted(run_flsl("resume", run, *ON_CPU), run)
    wait_finished(third, run)
    assert run_json(run)["status"] == "finished", job_logs(run)
    assert run_json(run)["job_ids"] == [job, second, third]
    assert_same_run(uninterrupted, run)


def test_the_time_limit_warning_requeues_before_the_limit(slurm_cluster, demo_data, tmp_path):
    """A 4-minute job that asks for SIGUSR2 2 minutes before its limit: SLURM's warning stops it
    at a step, which is committed; the job requeues itself and resumes from that step. (SLURM
    may send the warning up to a minute early: the job has trained by then.)"""
    run = tmp_path / "limit"
    common = _common(demo_data, optim__epochs=1000, slurm__signal_minutes_before_end=2)
    job = submitted(run_flsl("pretrain", "recipes/demo.yaml", *common, *ON_CPU, "--time", "4", "--run-dir", run), run)
    requeued = wait_for(lambda: run_json(run).get("last_requeue"), what="the time-limit warning", run=run, timeout=240)
    step = requeued["step"]
    assert requeued["signal"] == "SIGUSR2" and requeued["by"] == "flsl"
    assert (run / "checkpoints" / f"step-{step:08d}.json").exists() and metric_steps(run)[-1] == step
    release_requeued(job, run, restarts=1)
    wait_for(
        lambda: squeeze(f"(step {step})") in squeeze((run / "slurm" / f"{job}_0_log.err").read_text()),
        what="the resume",
        run=run,
        timeout=60,
    )
    assert slurm("scancel", job).returncode == 0
    wait_finished(job, run)
    assert run_json(run)["status"] == "stopped" and "Traceback" not in job_logs(run)


def test_concurrent_jobs_meet_on_different_ports(slurm_cluster, demo_data, tmp_path):
    """Two jobs at once on the same first node: each rendezvous on its own port, both finish."""
    runs = [tmp_path / "a", tmp_path / "b"]
    jobs = [
        submitted(
            run_flsl(
                "pretrain", "recipes/demo.yaml", *_common(demo_data, optim__max_steps=4), *ON_CPU, "--run-dir", run
            ),
            run,
        )
        for run in runs
    ]
    for job, run in zip(jobs, runs):
        wait_finished(job, run)
        assert metric_steps(run)[-1] == 4 and "Traceback" not in job_logs(run), job_logs(run)  # optim.max_steps
    ports = set()
    for job, run in zip(jobs, runs):
        log = squeeze((run / "slurm" / f"{job}_0_log.err").read_text())
        ports.add(log.split("rendezvous")[1].split(",")[0].rsplit(":", 1)[1])
    assert len(ports) == 2, ports


def test_the_python_entry_point_returns_the_submitit_job(slurm_cluster, demo_data, tmp_path):
    """`submit_pretrain` with a recipe object, overrides and SLURM options: the dry run hands
    over what would be submitted and writes nothing; the real call returns the submitit.Job,
    whose logs are where the job writes them, and the run trains to optim.max_steps."""
    import submitit

    from flsl_cli.config.load import load_recipe
    from flsl_cli.launch.slurm.submit import submit_pretrain

    pairs = _common(demo_data, optim__max_steps=4)[1::2]  # "--set", "K=V", ... -> "K=V", ...
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", overrides=pairs[:-1])
    options = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 2}
    run = tmp_path / "python"
    shown: list[str] = []
    assert (
        submit_pretrain(
            recipe, overrides=[pairs[-1]], slurm_options=options, run_dir=run, dry_run=True, on_script=shown.append
        )
        is None
    )
    assert "#SBATCH --ntasks-per-node=2" in shown[0] and not run.exists()
    job = submit_pretrain(recipe, overrides=[pairs[-1]], slurm_options=options, run_dir=run)
    assert isinstance(job, submitit.Job) and job.job_id.isdigit()
    assert job.paths.folder == run / "slurm" and job.paths.submission_file.exists()
    wait_finished(job.job_id, run)
    assert metric_steps(run)[-1] == 4 and "Traceback" not in job_logs(run), job_logs(run)  # optim.max_steps
    assert f"flsl: job {job.job_id} done" in job.paths.stderr.read_text()


def test_a_job_that_fails_at_start_reads_failed(slurm_cluster, demo_data, tmp_path):
    """A job whose Python does not exist fails before flsl runs: `flsl status` says failed (not
    starting); a job SLURM no longer knows is shown as such; a run dir that vanished before its
    job started is not recreated and the job is not requeued."""
    run = tmp_path / "broken"
    job = submitted(
        run_flsl(
            "pretrain",
            "recipes/demo.yaml",
            *_common(demo_data),
            *ON_CPU,
            "--set",
            "slurm.python=/nonexistent/python",
            "--run-dir",
            run,
        ),
        run,
    )
    wait_finished(job, run, timeout=60)
    summary = json.loads(run_flsl("status", run, "--json").stdout)
    assert summary["status"].startswith("failed"), summary
    record = run_json(run)
    (run / "run.json").write_text(json.dumps({**record, "job_ids": [*record["job_ids"], "999999"]}))
    shown = run_flsl("status", run)
    assert "no longer known to SLURM" in " ".join(shown.stdout.split()), shown.stdout

    gone = tmp_path / "gone"
    held = submitted(
        run_flsl(
            "pretrain",
            "recipes/demo.yaml",
            *_common(demo_data),
            *ON_CPU,
            "--set",
            "slurm.extra_sbatch={hold: true}",  # submitted held: it cannot start before the run dir is gone
            "--run-dir",
            gone,
        ),
        gone,
    )
    assert job_state(held) == "PENDING"
    shutil.rmtree(gone)
    slurm("scontrol", "release", held)
    wait_for(lambda: job_state(held) in TERMINAL, what=f"job {held} to end", run=gone, timeout=90)
    assert job_state(held) != "PENDING" and not gone.exists()


def test_plain_sbatch_template_runs_and_requeues(slurm_cluster, demo_data, tmp_path):
    """slurm/flsl.sbatch (sbatch + srun, no submitit): creates the run, stops on USR2 at a step,
    requeues itself and finishes from that step."""
    run = tmp_path / "template"
    overrides = " ".join(_common(demo_data))
    env = dict(
        os.environ,
        RECIPE=str(REPO / "recipes" / "demo.yaml"),
        RUN_DIR=str(run),
        FLSL_CPU="1",
        FLSL_PYTHON=sys.executable,
        FLSL_SET=overrides,
    )
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            f"--output={tmp_path}/template-%j.out",
            str(REPO / "slurm" / "flsl.sbatch"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=30,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    log = tmp_path / f"template-{job}.out"
    _signal_mid_run(job, run, "USR2", after_step=3)
    step = wait_for(lambda: run_json(run).get("last_requeue"), what="the requeue", run=run, timeout=60)["step"]
    release_requeued(job, run, restarts=1)
    wait_finished(job, run)
    text = log.read_text()
    assert run_json(run)["status"] == "finished", text[-3000:]
    assert squeeze(f"(step {step})") in squeeze(text) and f"created {run}" in text
    assert metric_steps(run) == list(range(1, TOTAL_STEPS + 1))


# --- Bad input --------------------------------------------------------------------------------


def test_unknown_partition_is_refused_in_one_line(slurm_cluster, demo_data, tmp_path):
    run = tmp_path / "run"
    result = run_flsl(
        "pretrain", "recipes/demo.yaml", *_common(demo_data), *ON_CPU, "--partition", "nosuch", "--run-dir", run
    )
    fails(result, "sbatch refused the job", "invalid partition", "--partition")
    assert len(result.stderr.strip().splitlines()) <= 4  # one message (wrapped by the console)
    assert not run.exists()


def test_nodes_zero(demo_data, tmp_path):
    fails(
        run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data), "--nodes", "0", "--run-dir", tmp_path / "run"),
        "--nodes: expected greater than or equal to 1, found 0",
        "leave out --nodes",
    )
    assert not (tmp_path / "run").exists()


def test_sbatch_missing_suggests_running_here(demo_data, tmp_path):
    """Without sbatch on PATH: one line saying so and how to run here instead; nothing written."""
    result = run_flsl(
        "pretrain",
        "recipes/demo.yaml",
        *_common(demo_data),
        *ON_CPU,
        "--run-dir",
        tmp_path / "run",
        env={"PATH": str(Path(sys.executable).parent)},
        timeout=120,
    )
    fails(result, "sbatch was not found on PATH", "leaving out --nodes", "--devices")
    assert not (tmp_path / "run").exists()


def test_a_submitit_without_a_needed_parameter_is_named_with_its_version(demo_data, tmp_path):
    """submitit 1.4.6 (a real release, from the package index) has no `use_srun`: the job is
    refused before anything is submitted, naming that version and how to upgrade, and the run
    dir is taken back."""
    if not have_slurm():
        if os.environ.get("CI") == "true":
            pytest.fail("SLURM is required under CI")
        pytest.skip("sbatch/srun not installed")
    old = tmp_path / "submitit-1.4.6"
    got = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(old), "submitit==1.4.6"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if got.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot install submitit 1.4.6 from the package index:\n{got.stderr[-2000:]}")
        pytest.skip("the package index cannot be reached")
    run = tmp_path / "run"
    result = run_flsl(
        "pretrain",
        "recipes/demo.yaml",
        *_common(demo_data),
        *ON_CPU,
        "--run-dir",
        run,
        env={"PYTHONPATH": f"{old}{os.pathsep}{REPO}"},
        timeout=120,
    )
    fails(result, "submitit 1.4.6 does not take a parameter flsl needs", "use_srun", "submitit>=1.5")
    assert not run.exists()


def test_devices_with_nodes_is_refused(demo_data, tmp_path):
    fails(
        run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data), "--nodes", "2", "--devices", "2"),
        "--devices is for runs on this machine",
    )


def test_time_limit_shorter_than_the_warning(demo_data, tmp_path):
    fails(
        run_flsl("pretrain", "recipes/demo.yaml", *_common(demo_data), *ON_CPU, "--time", "00:04:00", "--dry-run"),
        "not longer than slurm.signal_minutes_before_end",
    )


def test_a_multi_node_run_dir_on_a_local_filesystem_is_warned_about(demo_data, tmp_path):
    """--nodes 2 with the run dir on a filesystem that is usually local to one machine (this
    test's tmp dir, when it is one): a warning that names it and says what to use instead."""
    from flsl_cli.launch.slurm.submit import filesystem_type

    kind = filesystem_type(tmp_path)
    result = run_flsl(
        "pretrain",
        "recipes/demo.yaml",
        *_common(demo_data, optim__global_batch_size=8),
        "--nodes",
        "2",
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "1",
        "--run-dir",
        tmp_path / "run",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    flat = " ".join(result.stderr.split())
    if kind in ("ext4", "xfs", "btrfs", "tmpfs", "overlay"):
        assert f"filesystem of type {kind}" in flat and "shared filesystem" in flat, flat
    one = run_flsl(
        "pretrain", "recipes/demo.yaml", *_common(demo_data), *ON_CPU, "--run-dir", tmp_path / "one", "--dry-run"
    )
    assert one.returncode == 0 and "filesystem, which is usually local" not in " ".join(one.stderr.split())


def test_dry_run_prints_what_was_asked(demo_data, tmp_path):
    """--dry-run needs no SLURM and writes nothing: the sbatch script holds the nodes, tasks,
    GPUs, stop signal, time limit and partition asked for."""
    run = tmp_path / "run"
    result = run_flsl(
        "pretrain",
        "recipes/demo.yaml",
        *_common(demo_data, optim__global_batch_size=64),
        "--nodes",
        "4",
        "--gpus-per-node",
        "2",
        "--partition",
        "gpu",
        "--time",
        "1-12:00:00",
        "--account",
        "vision",
        "--set",
        "slurm.signal_minutes_before_end=10",
        "--set",
        "slurm.extra_sbatch={gres: 'gpu:2'}",
        "--run-dir",
        run,
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --signal=USR2@600",
        "#SBATCH --time=2160",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=vision",
        "#SBATCH --requeue",
        "#SBATCH --gres=gpu:2",
        "#SBATCH --open-mode=append",
        f"#SBATCH --error={run}/slurm/%j_0_log.err",
    ):
        assert line in script.splitlines(), (line, script)
    assert "use_srun=False" in script and "submitit.SlurmExecutor" in script and "srun" in script
    assert "8 GPU process(es)" not in result.stderr and "= 8" in " ".join(result.stderr.split())
    assert not run.exists()


# --- Pieces that need no cluster ----------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
        ("r[1-2]n[01-03]", ["r1n01", "r1n02", "r1n03", "r2n01", "r2n02", "r2n03"]),
        ("gpu-st-p4d-[1-3]", ["gpu-st-p4d-1", "gpu-st-p4d-2", "gpu-st-p4d-3"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("gpu[001-003,010],login5,n[8-9]", ["gpu001", "gpu002", "gpu003", "gpu010", "login5", "n8", "n9"]),
    ],
)
def test_every_form_of_slurm_node_list_gives_the_hosts_and_the_rendezvous(monkeypatch, nodelist, hosts):
    """The function the tasks use (submitit's JobEnvironment underneath) expands every form of
    SLURM_JOB_NODELIST, and the rendezvous is the first host."""
    from flsl_cli.launch.slurm.rendezvous import job_hosts, torch_env

    monkeypatch.setenv("SLURM_JOB_NODELIST", nodelist)
    assert job_hosts() == hosts
    task = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": nodelist}
    assert torch_env(task)["MASTER_ADDR"] == hosts[0]


def test_a_node_list_that_cannot_be_read_is_recorded_not_a_traceback(demo_data, tmp_path):
    """A task whose SLURM_JOB_NODELIST cannot be read ends with a message naming the node list,
    no traceback, and run.json records that error."""
    run = tmp_path / "run"
    task = task_outside_slurm(
        run,
        _common(demo_data),
        SLURM_JOB_ID="4243",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NTASKS="1",
        SLURM_JOB_NODELIST="gpu[01-02",
        SLURMD_NODENAME="gpu01",
    )
    assert task.returncode == 2 and "Traceback" not in task.stderr, task.stderr
    assert "cannot read the SLURM node list 'gpu[01-02'" in " ".join(task.stderr.split())
    record = run_json(run)
    assert record["status"] == "failed" and "gpu[01-02" in record["last_error"]["message"], record


def test_rendezvous_from_slurm_variables(monkeypatch):
    """Every task derives the same master address and port from SLURM's variables; a restart
    gets another port; variables inherited from the submitting shell are replaced."""
    from flsl_cli.launch.slurm.rendezvous import torch_env

    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    base = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NTASKS": "16",
        "RANK": "3",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "login-node",
    }
    tasks = [torch_env({**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 8)}) for r in range(16)]
    assert {(t["MASTER_ADDR"], t["MASTER_PORT"]) for t in tasks} == {("gpu07", tasks[0]["MASTER_PORT"])}
    assert [t["RANK"] for t in tasks] == [str(r) for r in range(16)]
    assert tasks[9]["LOCAL_RANK"] == "1" and tasks[9]["WORLD_SIZE"] == "16"
    restarted = torch_env({**base, "SLURM_PROCID": "0", "SLURM_RESTART_COUNT": "1"})
    assert restarted["MASTER_PORT"] != tasks[0]["MASTER_PORT"]
    bound = torch_env({**base, "SLURM_PROCID": "5", "SLURM_LOCALID": "5", "CUDA_VISIBLE_DEVICES": "5"})
    assert bound["LOCAL_RANK"] == "0"  # one GPU bound to the task: it is cuda:0


def test_a_busy_port_is_skipped_and_every_rank_uses_the_one_rank_0_took(tmp_path):
    """Rank 0 skips a candidate port that something else holds and notes the one it took; the
    other ranks read that note, so all meet on one port."""
    from flsl_cli.launch.slurm.rendezvous import RESTART_SLOTS, agree_on_port, master_port

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
    from flsl_cli.launch.slurm.rendezvous import master_port

    assert master_port("1", 7) != master_port("2", 0)
    ports = {master_port(str(job), restart) for job in range(1000, 1100) for restart in range(4)}
    assert len(ports) == 400


@pytest.mark.parametrize(
    "fields, outcome",
    [
        ({"JobState": "RUNNING", "Restarts": "0", "PreemptTime": "None"}, "running"),  # USR2 / scancel --signal
        ({"JobState": "RUNNING", "Restarts": "0", "PreemptTime": "2026-01-01T00:00:00"}, "running"),  # in grace
        ({"JobState": "COMPLETING", "Restarts": "1"}, "requeued"),  # scontrol requeue, preemption after grace
        ({"JobState": "PENDING", "Restarts": "1"}, "requeued"),
        ({"JobState": "COMPLETING", "Restarts": "0", "RunTime": "00:00:30", "TimeLimit": "00:10:00"}, "cancelled"),
        ({"JobState": "COMPLETING", "Restarts": "0", "RunTime": "00:10:00", "TimeLimit": "00:10:00"}, "time limit"),
        ({"JobState": "TIMEOUT", "Restarts": "0"}, "time limit"),
        ({"JobState": "PREEMPTED", "Restarts": "0"}, "cancelled"),  # PreemptMode=CANCEL: it does not come back
        ({"JobState": "PREEMPTED", "Restarts": "1"}, "requeued"),
        (None, "running"),  # scontrol did not answer: try to requeue
    ],
)
def test_what_became_of_a_stopped_job(fields, outcome):
    """The states `scontrol show job` showed in the private cluster for each kind of stop."""
    from flsl_cli.launch.slurm.job import stop_outcome

    assert stop_outcome(fields, restart=0) == outcome


_REQUEUES_ITSELF = """
import json, os, signal, sys, time
from flsl_cli.launch.slurm.queries import job_info, requeue
signal.signal(signal.SIGTERM, lambda *_: None)  # as the batch step: SIGTERM is a stop, passed on
job, restart = os.environ["SLURM_JOB_ID"], int(os.environ.get("SLURM_RESTART_COUNT") or 0)
if restart == 0:
    reason = requeue(job, restart=0)
    info = job_info(job)  # asked while SLURM ends every process of the job
    answer = {"reason": reason, "restarts": info and info.get("Restarts")}
    with open(sys.argv[1] + "/" + job + ".part", "w") as out:
        json.dump(answer, out)
    os.replace(sys.argv[1] + "/" + job + ".part", sys.argv[1] + "/" + job + ".json")
    time.sleep(60)
"""


def test_a_job_that_requeues_itself_gets_slurm_s_answer(slurm_cluster, tmp_path):
    """`scontrol requeue` from inside a job makes SLURM send SIGTERM to every process of the
    job, the commands that ask SLURM included: they run with the stop signals held, so the
    requeue is known to have worked and the question asked right after it is answered."""
    script = tmp_path / "requeue_itself.py"
    script.write_text(_REQUEUES_ITSELF)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    jobs = []
    for _ in range(4):
        sent = subprocess.run(
            [
                "sbatch",
                "--parsable",
                f"--chdir={tmp_path}",
                "--output=/dev/null",
                "--wrap",
                f"{sys.executable} {script} {tmp_path}",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert sent.returncode == 0, sent.stderr
        jobs.append(sent.stdout.strip())
    try:
        for job in jobs:
            answer = wait_for(
                lambda: (tmp_path / f"{job}.json").exists() and json.loads((tmp_path / f"{job}.json").read_text()),
                what=f"job {job} to requeue itself",
                run=tmp_path,
                timeout=90,
            )
            assert answer == {"reason": None, "restarts": "1"}, (job, answer)
    finally:
        slurm("scancel", *jobs)


def test_a_job_asks_for_its_data_workers_cpus():
    """--cpus-per-task defaults to data workers + 1; the flag or the recipe wins."""
    from flsl_cli.config.schema import SlurmConfig
    from flsl_cli.launch.slurm.request import SlurmRequest

    assert SlurmRequest.of(SlurmConfig(), {}, data_workers=10).cpus_per_task == 11
    assert SlurmRequest.of(SlurmConfig(cpus_per_task=4), {}, data_workers=10).cpus_per_task == 4
    assert SlurmRequest.of(SlurmConfig(), {"cpus_per_task": 2}, data_workers=10).cpus_per_task == 2


def test_stopping_one_cluster_leaves_the_host_names_of_another(tmp_path):
    """`cluster.sh stop` removes only the /etc/hosts lines its own cluster added: the one-node
    cluster's state dir (/tmp/flsl-slurm-0) is a prefix of the two-node one's (-2n), whose node
    names must keep resolving while it runs."""
    hosts = tmp_path / "hosts"
    theirs = "127.0.0.2 n1-ib # flsl-slurm /tmp/c-0-2n"
    hosts.write_text(f"127.0.0.1 localhost\n{theirs}\n127.0.0.2 n1 # flsl-slurm /tmp/c-0\n")
    env = dict(os.environ, FLSL_HOSTS_FILE=str(hosts), FLSL_SLURM_DIR="/tmp/c-0")
    stopped = subprocess.run(["bash", str(REPO / "slurm" / "cluster.sh"), "stop"], env=env, capture_output=True)
    assert stopped.returncode == 0, stopped.stderr
    assert hosts.read_text().splitlines() == ["127.0.0.1 localhost", theirs]
