"""run.json as one typed record: its transitions, writers in several processes at once, a
truncated or unreadable file (a clear error, never a traceback), and `flsl status` on a run dir
in S3 (moto over HTTP)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import pytest
from conftest import REPO

from flsl_cli.errors import RunDirError
from flsl_cli.train.run_record import (
    JobStates,
    Owner,
    RunRecord,
    RunStatus,
    claim,
    load_record,
    read_owner,
    release,
    update_record,
    write_record,
)
from flsl_cli.train.rundir import refuse_if_owned


def test_transitions_of_a_slurm_run(tmp_path):
    """Created, submitted, started, requeued by SLURM and by flsl (one count per requeue, the
    larger of flsl's and SLURM's), a requeue that did not happen undone, stopped, failed,
    finished: each is what run.json then says, and keys of other versions are kept."""
    write_record(tmp_path, RunRecord(flsl_version="0.1.0", created="now", recipe_fingerprint="abc"))
    (tmp_path / "run.json").write_text(
        json.dumps({**json.loads((tmp_path / "run.json").read_text()), "future_key": [1, 2]})
    )
    with update_record(tmp_path) as record:
        record.submitting(slurm={"nodes": 2})
    assert load_record(tmp_path).status is RunStatus.SUBMITTING
    with update_record(tmp_path) as record:
        record.submitted(job_id="41")
        record.attempt_started(job_id="41", restart=0, nodes="n[1-2]-ib")
        record.running(world_size=4)
    with update_record(tmp_path) as record:
        assert record.requeued(job_id="41", restart=0, by="flsl", cause="SIGUSR2", step=50, signal="SIGUSR2") == 1
    with update_record(tmp_path) as record:  # the next attempt: SLURM requeued it (restart 1 -> count 2)
        record.attempt_started(job_id="41", restart=1, nodes="n[1-2]-ib")
        assert record.requeued(job_id="41", restart=1, by="slurm", cause="preemption", step=60, signal="SIGTERM") == 2
        before = record.requeue_counts()
        record.requeued(job_id="41", restart=1, by="flsl", cause="SIGUSR2", step=61, signal="SIGUSR2")
        record.requeue_undone(before)  # scontrol refused: nothing was requeued
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["status"] == "requeued" and saved["requeues"] == 2 and saved["job_requeues"] == {"41": 2}
    assert saved["last_requeue"]["by"] == "slurm" and saved["last_requeue"]["step"] == 60
    assert saved["job_ids"] == ["41"] and saved["job_nodes"] == {"41": "n[1-2]-ib"} and saved["scheduler"] == "slurm"
    assert saved["future_key"] == [1, 2]
    with update_record(tmp_path) as record:
        record.resumed(step=60, job_id="41", restart=1)
        record.stopped(step=70, reason="cancelled")
    assert load_record(tmp_path).status.ended and load_record(tmp_path).stopped_at_step == 70
    with update_record(tmp_path) as record:
        record.failed({"message": "task 1 was killed by SIGKILL"})
    assert json.loads((tmp_path / "run.json").read_text())["last_error"]["message"].endswith("SIGKILL")
    with update_record(tmp_path) as record:
        record.finished(step=96)
    final = load_record(tmp_path)
    assert final.status is RunStatus.FINISHED and final.step == 96 and final.resumes[0]["restart"] == 1


def test_a_later_attempt_clears_the_last_stop(tmp_path):
    """A stop (signal, step, resumable step) and an error are history once a later attempt
    runs: `running` clears them, so `flsl status` does not show a stale stop."""
    with update_record(tmp_path) as record:
        record.running(world_size=1)
        record.stopped(step=30, resumable_from=30, signal="SIGTERM")
    stopped = load_record(tmp_path)
    assert (stopped.status, stopped.stop_signal, stopped.stopped_at_step, stopped.resumable_from) == (
        RunStatus.STOPPED,
        "SIGTERM",
        30,
        30,
    )
    with update_record(tmp_path) as record:
        record.failed({"message": "boom"}, step=31, resumable_from=30)
    with update_record(tmp_path) as record:
        record.resumed(step=30)
        record.running(world_size=1)
        record.finished(step=48)
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["status"] == "finished" and saved["step"] == 48 and len(saved["resumes"]) == 1
    assert not {"stop_signal", "stopped_at_step", "resumable_from", "last_error"} & set(saved)


def test_the_owner_is_part_of_the_record_and_refuses_a_second_writer(tmp_path):
    """run.json's owner: a live local process or a pending/running SLURM job refuses a second
    writer; a dead process or a finished job does not; releasing leaves a newer owner alone;
    releasing after the run dir is gone does nothing."""
    with update_record(tmp_path) as record:
        record.running(world_size=1)
    me = Owner.this_process()  # this test's own process: alive
    claim(tmp_path, me)
    assert json.loads((tmp_path / "run.json").read_text())["owner"]["pid"] == os.getpid()
    with pytest.raises(RunDirError, match="being written by flsl process"):
        refuse_if_owned(tmp_path, slurm_state=lambda _: None)
    refuse_if_owned(tmp_path, slurm_state=lambda _: None, me=Owner.this_process())  # its own owner passes
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim(tmp_path, Owner(kind="local", since="then", host=me.host, pid=int(dead.stdout)))
    refuse_if_owned(tmp_path, slurm_state=lambda _: None)

    job = Owner.slurm_job("77")
    claim(tmp_path, job)
    release(tmp_path, me)  # not the owner now: nothing changes
    assert read_owner(tmp_path) == job
    for state in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
        with pytest.raises(RunDirError, match=f"SLURM job 77 \\({state}\\)"):
            refuse_if_owned(tmp_path, slurm_state=lambda _, s=state: s)
    for state in ("COMPLETED", "FAILED", "CANCELLED", ""):
        refuse_if_owned(tmp_path, slurm_state=lambda _, s=state: s)
    with pytest.raises(RunDirError, match="cannot be asked"):  # no squeue here, and run.json says running
        refuse_if_owned(tmp_path, slurm_state=lambda _: None)
    with update_record(tmp_path) as record:
        record.finished(step=10)
    refuse_if_owned(tmp_path, slurm_state=lambda _: None)
    release(tmp_path, Owner.slurm_job("77"))
    assert read_owner(tmp_path) is None and "owner" not in json.loads((tmp_path / "run.json").read_text())
    gone = tmp_path / "gone"
    release(gone, job)  # a run dir removed meanwhile: nothing is created
    assert not gone.exists()


def test_one_list_of_slurm_job_states():
    """A job that is ending or gone no longer holds the run dir; one that waits, runs or is
    completing does; flags after a state are dropped."""
    for state in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "SUSPENDED"):
        assert JobStates.holds_run(state), state
    for state in ("COMPLETED", "CANCELLED by 0", "FAILED", "TIMEOUT", "PREEMPTED", "REVOKED", "OUT_OF_MEMORY"):
        assert not JobStates.holds_run(state), state
    assert JobStates.base("COMPLETING+") == "COMPLETING" and "COMPLETING" in JobStates.ENDING


def _writer(run_dir: str, field: str, count: int) -> None:
    for i in range(count):
        with update_record(run_dir) as record:
            if field == "resumes":
                record.resumed(step=i)
            else:
                record.job_requeues[f"job{i}"] = i + 1


def test_concurrent_writers_lose_nothing(tmp_path):
    """Two processes (as the batch step and rank 0 of a job) change run.json at the same time,
    200 times each: every change of both is there."""
    write_record(tmp_path, RunRecord())
    context = multiprocessing.get_context("spawn")
    writers = [
        context.Process(target=_writer, args=(str(tmp_path), field, 200)) for field in ("resumes", "job_requeues")
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    record = load_record(tmp_path)
    assert [event["step"] for event in record.resumes] == list(range(200))
    assert len(record.job_requeues) == 200


@pytest.mark.parametrize("content", ['{"status": "running", "job_ids": ["4', "", "[1, 2]", '{"status": "dancing"}'])
def test_a_truncated_or_unreadable_run_json_is_a_clear_error(tmp_path, content):
    """A cut-off, empty, non-object or unknown-status run.json: `flsl status` says what is wrong
    with which file (exit 2, no traceback), and a writer refuses to overwrite it."""
    (tmp_path / "recipe.yaml").write_text("{}\n")
    (tmp_path / "run.json").write_text(content)
    with pytest.raises(RunDirError, match="run.json"):
        with update_record(tmp_path):
            pass
    assert (tmp_path / "run.json").read_text() == content
    shown = subprocess.run(
        [sys.executable, "-m", "flsl_cli", "status", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert shown.returncode == 2 and "Traceback" not in shown.stderr, shown.stderr
    assert "run.json" in shown.stderr and str(tmp_path) in " ".join(shown.stderr.split()), shown.stderr


def test_status_of_a_run_dir_in_s3(tmp_path):
    """`flsl status s3://runs/x` (moto over HTTP) reads run.json, the step reached and the newest
    checkpoint from the bucket."""
    pytest.importorskip("moto")
    s3fs = pytest.importorskip("s3fs")
    from servers import S3_ENV, moto_server

    server = moto_server().start()
    try:
        endpoint = f"http://127.0.0.1:{server.port}"
        fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("runs")
        fs.pipe("runs/x/recipe.yaml", b"{}\n")
        fs.pipe(
            "runs/x/run.json",
            json.dumps({"status": "stopped", "stopped_at_step": 20, "stop_signal": "SIGINT"}).encode(),
        )
        fs.pipe(
            "runs/x/metrics.jsonl",
            b"".join(json.dumps({"step": s, "epoch": s / 10}).encode() + b"\n" for s in range(1, 21)),
        )
        for step in (10, 20):
            fs.pipe(f"runs/x/checkpoints/step-{step:08d}.json", b"{}")
            fs.pipe(f"runs/x/checkpoints/step-{step:08d}.pt", b"0")
        env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}
        shown = subprocess.run(
            [sys.executable, "-m", "flsl_cli", "status", "s3://runs/x", "--json"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=120,
        )
        assert shown.returncode == 0, shown.stderr
        summary = json.loads(shown.stdout)
        assert summary["run_dir"] == "s3://runs/x" and summary["status"] == "stopped" and summary["step"] == 20
        assert summary["newest_checkpoint"]["step"] == 20 and summary["checkpoints"] == 2
        assert summary["stopped"] == {"step": 20, "signal": "SIGINT"}
        missing = subprocess.run(
            [sys.executable, "-m", "flsl_cli", "status", "s3://runs/none"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=120,
        )
        assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
        assert "not a flsl run directory" in " ".join(missing.stderr.split())
    finally:
        server.kill()
