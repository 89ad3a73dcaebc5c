"""SLURM across two nodes: a private cluster of two slurmd daemons on this machine (nodes n1-ib and
n2-ib, `FLSL_SLURM_NODE_SUFFIX=-ib slurm/cluster.sh start --nodes 2`), one CPU rank with its 2
data workers on each node, the run dir shared by both as on a real cluster. A two-node run
equals the same run as two local processes, bitwise; a stop that reaches both nodes (USR2, TERM,
preemption) saves one step and resumes exactly; a rank that is killed or hangs on one node ends
the job with the node, rank and signal named, and the run resumes (by itself within
slurm.requeue_on_failure, or with `flsl resume`); a run moves between one and two nodes; and the
bad inputs of a multi-node job. Like tests/test_slurm.py, these skip, saying why, only where
SLURM is missing and cannot be installed; with CI=true they fail instead."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import assert_same_run, run_flsl, tiny_overrides
from slurm_support import (
    job_logs,
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

TWO_NODES = ("--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1")
ONE_NODE = ("--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "1")
TOTAL_STEPS = 96
# The nodes are named with a suffix, as on clusters with one name per network (a name after the
# number, which a hand-written node list parser once rejected). SLURM 22.05 lists them as they
# are, n1-ib,n2-ib; the bracket form n[1-2]-ib is covered in test_slurm.py.
SUFFIX = "-ib"
N1, N2 = f"n1{SUFFIX}", f"n2{SUFFIX}"
NODELIST = f"{N1},{N2}"


def _recipe(demo_data, **extra):
    """The one short recipe of these tests: 96 steps of 2 processes, 2 data workers each,
    a checkpoint every 10 steps."""
    values = {"optim__epochs": 4, "checkpoint__every_steps": 10, "checkpoint__keep_last": 3, **extra}
    return tiny_overrides(demo_data / "train", **values)


@pytest.fixture(scope="module")
def two_nodes():
    """A private two-node cluster beside the single-node one of tests/test_slurm.py (its own
    state dir and ports). Its node names resolve while it runs, and no longer once it stopped."""
    base = os.environ.get("FLSL_SLURM_DIR") or f"/tmp/flsl-slurm-{os.getuid()}"
    port = int(os.environ.get("FLSL_SLURM_PORT") or 16817) + 10
    mark = f"# flsl-slurm {base}-2n"
    with running_cluster(nodes=2, state_dir=f"{base}-2n", port=port, node_suffix=SUFFIX) as conf:
        nodes = slurm("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %T").stdout.split("\n")
        assert [line.split()[0] for line in nodes if line.strip()] == [N1, N2], nodes
        assert [socket.gethostbyname(name) for name in (N1, N2)] == ["127.0.0.2", "127.0.0.3"]
        yield conf
    assert mark not in Path("/etc/hosts").read_text()  # `cluster.sh stop` removed its lines


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory) -> Path:
    """The same recipe straight through as 2 local gloo processes on this machine."""
    run = tmp_path_factory.mktemp("two-nodes") / "local"
    result = run_flsl("pretrain", "recipes/demo.yaml", *_recipe(demo_data), "--devices", "2", "--run-dir", run)
    assert result.returncode == 0, result.stderr
    return run


def _rank_log(run: Path, job: str, rank: int) -> str:
    try:
        return (run / "slurm" / f"{job}_{rank}_log.err").read_text(errors="replace")
    except OSError:
        return ""


def _pid(run: Path, job: str, rank: int, *, restart: int) -> int | None:
    """The pid of a rank's training process, from the line every rank logs first."""
    for line in _rank_log(run, job, rank).splitlines():
        if line.startswith(f"flsl: rank {rank} of ") and line.endswith(f"restart {restart}"):
            return int(line.split("pid ")[1].split(")")[0])
    return None


def _past(run: Path, step: int) -> bool:
    steps = metric_steps(run)
    return bool(steps) and steps[-1] >= step


def test_a_two_node_run_equals_the_same_run_on_one_machine(two_nodes, demo_data, reference, tmp_path):
    """`--nodes 2 --tasks-per-node 1`: rank 0 on n1, rank 1 on n2, meeting at n1; the weights
    equal `--devices 2` on one machine bitwise. Each rank's log names its node; only rank 0
    writes the shared files (each step logged once); `flsl status` lists the job's nodes."""
    run = tmp_path / "run"
    job = submitted(run_flsl("pretrain", "recipes/demo.yaml", *_recipe(demo_data), *TWO_NODES, "--run-dir", run), run)
    wait_finished(job, run)
    assert run_json(run)["status"] == "finished", job_logs(run)
    assert_same_run(reference, run)
    assert metric_steps(run) == list(range(1, TOTAL_STEPS + 1))  # one writer: no step twice
    assert sorted(p.name for p in run.iterdir()) == [
        "bad_samples.jsonl",
        "checkpoints",
        "logs",
        "metrics.jsonl",
        "recipe.yaml",
        "run.json",
        "run.json.lock",
        "slurm",
    ]
    assert f"flsl: rank 0 of 2 on node {N1}" in _rank_log(run, job, 0)
    assert f"flsl: rank 1 of 2 on node {N2}" in _rank_log(run, job, 1)
    assert f"rendezvous {N1}:" in _rank_log(run, job, 0)
    assert "Traceback" not in job_logs(run)

    summary = json.loads(run_flsl("status", run, "--json").stdout)
    assert summary["job_nodes"] == {job: NODELIST} and summary["nodes"] == NODELIST
    shown = " ".join(run_flsl("status", run).stdout.split())
    assert f"{job} (COMPLETED, nodes {NODELIST})" in shown, shown


def _preempt_both_nodes(job: str) -> subprocess.CompletedProcess:
    """A job of the higher-tier partition that needs every CPU of both nodes."""
    return slurm(
        "sbatch",
        "--parsable",
        "--partition=urgent",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=8",
        "--output=/dev/null",
        "--wrap",
        "sleep 2",
    )


STOPS = [  # (how, the command, the signal the ranks get)
    ("USR2 to the tasks", lambda job: slurm("scancel", "--signal=USR2", job), "SIGUSR2"),
    ("TERM to the tasks", lambda job: slurm("scancel", "--signal=TERM", job), "SIGTERM"),
    ("preemption by a job that needs both nodes", _preempt_both_nodes, "SIGTERM"),
]


def test_a_stop_that_reaches_both_nodes_saves_one_step_and_resumes_bitwise(two_nodes, demo_data, reference, tmp_path):
    """USR2 (the time-limit warning), TERM, and partition preemption, each reaching the tasks
    on both nodes: both ranks stop after the same step, that step is committed once, the job is
    requeued and resumes on both nodes from it; the final weights equal the uninterrupted local
    run."""
    run = tmp_path / "run"
    job = submitted(run_flsl("pretrain", "recipes/demo.yaml", *_recipe(demo_data), *TWO_NODES, "--run-dir", run), run)
    step = 0
    for count, (how, stop, signal_name) in enumerate(STOPS, start=1):
        wait_for(
            lambda: restarts_of(run, job) == count - 1 and _past(run, step + 3),
            what=f"job {job} to pass step {step + 3}",
            run=run,
            timeout=150,
        )
        sent = stop(job)
        assert sent.returncode == 0, sent.stderr
        requeued = wait_for(
            lambda: run_json(run).get("requeues") == count and run_json(run).get("last_requeue"),
            what=f"the requeue after '{how}'",
            run=run,
            timeout=90,
        )
        step = requeued["step"]
        assert requeued["signal"] == signal_name and requeued["by"] == "flsl", (how, requeued)
        if how.startswith("preemption"):
            assert requeued["cause"] == "preemption", requeued
        assert (run / "checkpoints" / f"step-{step:08d}.json").exists() and metric_steps(run)[-1] == step
        for rank in (0, 1):  # both ranks stopped after that same step
            assert squeeze(f"after step {step}") in squeeze(_rank_log(run, job, rank)), _rank_log(run, job, rank)
        release_requeued(job, run, restarts=count)
        wait_for(
            lambda: _pid(run, job, 1, restart=count) and squeeze(f"(step {step})") in squeeze(_rank_log(run, job, 0)),
            what=f"both nodes to resume from step {step}",
            run=run,
            timeout=90,
        )
    wait_finished(job, run)
    assert run_json(run)["status"] == "finished", job_logs(run)
    assert run_json(run)["requeues"] == len(STOPS) and "Traceback" not in job_logs(run)
    assert_same_run(reference, run)


def test_a_rank_that_dies_or_hangs_on_one_node_ends_the_job_and_the_run_resumes(
    two_nodes, demo_data, reference, tmp_path
):
    """Rank 1 on n2 hangs (SIGSTOP): rank 0 gives up after slurm.collective_timeout_minutes
    with a clear error, and slurm.requeue_on_failure=1 requeues the job, which resumes. Then
    rank 1 is killed (SIGKILL): past the limit the job ends, run.json and `flsl status` name
    node n2, rank 1 and SIGKILL; `flsl resume` finishes the run, bitwise equal to the
    uninterrupted one."""
    run = tmp_path / "run"
    recipe = _recipe(demo_data, slurm__requeue_on_failure=1, slurm__collective_timeout_minutes=0.25)
    job = submitted(run_flsl("pretrain", "recipes/demo.yaml", *recipe, *TWO_NODES, "--run-dir", run), run)

    wait_for(lambda: _past(run, 12), what=f"job {job} to pass step 12", run=run, timeout=150)
    hung = _pid(run, job, 1, restart=0)
    os.kill(hung, signal.SIGSTOP)
    requeued = wait_for(
        lambda: run_json(run).get("last_requeue"), what="the requeue after the hang", run=run, timeout=120
    )
    assert requeued["cause"] == "failure" and requeued["step"] >= 10, requeued
    error = run_json(run)["last_error"]
    assert error["rank"] == 0 and error["node"] == N1, error
    assert "lost contact with another process" in error["message"] and "= 0.25" in error["message"], error
    release_requeued(job, run, restarts=1)
    wait_for(
        lambda: (
            _pid(run, job, 1, restart=1)
            and run_json(run).get("status") == "running"
            and _past(run, requeued["step"] + 3)
        ),
        what="the requeued job to train",
        run=run,
        timeout=120,
    )

    os.kill(_pid(run, job, 1, restart=1), signal.SIGKILL)
    wait_finished(job, run)
    record = run_json(run)
    assert record["status"] == "failed", record
    error = record["last_error"]
    assert (error["node"], error["rank"], error["signal"]) == (N2, 1, "SIGKILL"), error
    assert record["failure_requeues"] == {job: 1}
    shown = " ".join(run_flsl("status", run).stdout.split())
    assert f"rank 1 on node {N2}" in shown and "killed by SIGKILL" in shown and "failed" in shown, shown
    assert "Traceback" not in job_logs(run)

    again = submitted(run_flsl("resume", run, *TWO_NODES), run)
    wait_finished(again, run)
    assert run_json(run)["status"] == "finished", job_logs(run)
    assert_same_run(reference, run)


def test_a_run_moves_between_two_nodes_and_one(two_nodes, demo_data, tmp_path):
    """A two-node run cancelled mid-run resumes on one node (1 process), is cancelled again and
    finishes on two nodes; each resume notes that the world size changed."""
    run = tmp_path / "run"
    first = submitted(run_flsl("pretrain", "recipes/demo.yaml", *_recipe(demo_data), *TWO_NODES, "--run-dir", run), run)
    legs = [(first, None), ("one node", ONE_NODE), ("two nodes", TWO_NODES)]
    job = first
    for index, (_name, flags) in enumerate(legs):
        if flags is not None:
            job = submitted(run_flsl("resume", run, *flags), run)
        if index < len(legs) - 1:
            start = metric_steps(run)[-1] if metric_steps(run) else 0
            wait_for(
                lambda: run_json(run).get("job_id") == job and _past(run, start + 12),
                what=f"job {job} to train",
                run=run,
                timeout=150,
            )
            assert slurm("scancel", job).returncode == 0
        wait_finished(job, run)
    record = run_json(run)
    assert record["status"] == "finished" and record["world_size"] == 2, job_logs(run)
    one, two = record["job_ids"][1:]
    assert squeeze("resuming with 1 process(es) x 2 worker(s) instead of 2 x 2") in squeeze(_rank_log(run, one, 0))
    assert squeeze("resuming with 2 process(es) x 2 worker(s) instead of 1 x 2") in squeeze(_rank_log(run, two, 0))
    assert record["job_nodes"][one] in (N1, N2) and record["job_nodes"][two] == NODELIST
    assert "Traceback" not in job_logs(run)


# --- Bad input --------------------------------------------------------------------------------


def test_more_nodes_than_the_partition_has(two_nodes, demo_data, tmp_path):
    """--nodes 3 on the two-node cluster: SLURM refuses; one line names the partition's node
    count; nothing is left behind."""
    run = tmp_path / "run"
    result = run_flsl(
        "pretrain",
        "recipes/demo.yaml",
        *_recipe(demo_data, optim__global_batch_size=12),
        "--nodes",
        "3",
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "1",
        "--run-dir",
        run,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    flat = " ".join(result.stderr.split())
    assert "sbatch refused the job" in flat and "partition debug has 2 node(s), the job asks for 3" in flat, flat
    error = result.stderr[result.stderr.index("error") :]  # after the shared-filesystem warning, if any
    assert len(error.strip().splitlines()) <= 4  # one message (wrapped by the console)
    assert not run.exists()
    assert "flsl-" not in slurm("squeue", "-h", "-o", "%j").stdout


def test_a_first_node_that_does_not_resolve_is_a_clear_error(demo_data, tmp_path):
    """A task whose node list begins with a name that does not resolve stops at the rendezvous
    with a message naming it (no hang, no traceback), and run.json records it."""
    run = tmp_path / "run"
    task = task_outside_slurm(
        run,
        _recipe(demo_data),
        SLURM_JOB_ID="4242",
        SLURM_PROCID="1",
        SLURM_LOCALID="0",
        SLURM_NTASKS="2",
        SLURM_JOB_NODELIST="flsl-no-such-node[1-2]",
        SLURMD_NODENAME="flsl-no-such-node2",
    )
    assert task.returncode == 2 and "Traceback" not in task.stderr, task.stderr
    flat = " ".join(task.stderr.split())
    assert "the rendezvous host flsl-no-such-node1 (the first node of flsl-no-such-node[1-2]) does not resolve" in flat
    assert "FLSL_MASTER_ADDR" in flat
    assert "does not resolve" in run_json(run)["last_error"]["message"]


def test_srun_task_failures_are_read():
    """What srun prints when a task dies: the node, the ranks and the signal."""
    from flsl_cli.launch.slurm.batch import parse_task_failure

    killed = parse_task_failure("srun: error: n2: task 1: Killed\n")
    assert (killed.node, killed.ranks, killed.signal_name) == ("n2", "1", "SIGKILL")
    assert killed.describe() == "task 1 (rank 1) on node n2 was killed by SIGKILL"
    exited = parse_task_failure("srun: error: n1: task 0: Exited with exit code 2")
    assert exited.signal_name is None and "exited with exit code 2" in exited.describe()
    assert parse_task_failure("srun: error: gpu07: tasks 8-15: Terminated").signal_name == "SIGTERM"
    assert parse_task_failure("srun: Force Terminated StepId=7.0") is None
