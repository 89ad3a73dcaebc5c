"""`flsl sweep`, `flsl status SWEEP_DIR`, `flsl resume SWEEP_DIR` and `flsl compare`: the grid
and its types, every bad input refused with nothing written, a sweep trained here one member
after another, and (on the private SLURM cluster, slurm/cluster.sh) a 2 x 2 grid as one job
array with one member preempted mid-run that finishes bitwise equal to the same member trained
alone, `--max-parallel 1`, and the resume of the members that did not finish.

The cluster tests skip, saying why, only where SLURM is missing and cannot be installed; with
CI=true they fail instead."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import assert_same_run, fails, metrics, run_flsl, tiny_overrides
from slurm_support import (
    TERMINAL,
    job_logs,
    job_state,
    release_requeued,
    run_json,
    running_cluster,
    slurm,
    wait_for,
)

from flsl_cli.launch.sweep.grid import GridSpec, check_members, read_grid, split_values, typed_spec

ONE_TASK = ("--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "1")


# --- The grid --------------------------------------------------------------------------------


def test_values_split_on_top_level_commas_only():
    """Commas inside brackets or quotes stay in their value; YAML lists are one value."""
    assert split_values("1e-3,5e-4") == ["1e-3", "5e-4"]
    assert split_values("[0.05, 0.4],[0.1,0.5]") == ["[0.05, 0.4]", "[0.1,0.5]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]


def test_grid_values_are_typed_by_the_schema(tmp_path):
    """`--grid optim.base_lr=1e-3,5e-4` gives floats and `--grid model.arch=vit_tiny,vit_small`
    strings (the schema types them, as `--set` would); `--list` values move together; the grid
    file gives the same members as the options; the first grid key varies slowest."""
    from flsl_cli.config.load import read_recipe_file

    spec = read_grid(
        grid=["optim.base_lr=1e-3,5e-4", "model.arch=vit_tiny,vit_small"],
        lists=["loss.upsilon=0.03,0.1", "loss.gamma=5,1"],
        from_file=None,
    )
    assert spec.size() == 8
    members = check_members(read_recipe_file("recipes/demo.yaml"), spec=spec, overrides=[], source="demo")
    first = members[0].values
    assert first == {"optim.base_lr": 0.001, "model.arch": "vit_tiny", "loss.upsilon": 0.03, "loss.gamma": 5.0}
    assert type(first["optim.base_lr"]) is float and type(first["loss.gamma"]) is float
    assert type(first["model.arch"]) is str
    assert [(m.values["loss.upsilon"], m.values["loss.gamma"]) for m in members[:2]] == [(0.03, 5.0), (0.1, 1.0)]
    assert [m.values["optim.base_lr"] for m in members] == [0.001] * 4 + [0.0005] * 4
    assert all(m.recipe.optim.base_lr == m.values["optim.base_lr"] for m in members)
    typed = typed_spec(spec, members)
    assert typed.grid == {"optim.base_lr": [0.001, 0.0005], "model.arch": ["vit_tiny", "vit_small"]}
    assert typed.together == {"loss.upsilon": [0.03, 0.1], "loss.gamma": [5.0, 1.0]}

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(
        "grid:\n  optim.base_lr: [1.0e-3, 5.0e-4]\n  model.arch: [vit_tiny, vit_small]\n"
        "list:\n  loss.upsilon: [0.03, 0.1]\n  loss.gamma: [5, 1]\n"
    )
    from_file = read_grid(grid=[], lists=[], from_file=grid_file)
    again = check_members(read_recipe_file("recipes/demo.yaml"), spec=from_file, overrides=[], source="demo")
    assert [m.values for m in again] == [m.values for m in members]
    assert [m.name for m in again] == [m.name.replace("1e-3", "0.001").replace("5e-4", "0.0005") for m in members]


def test_a_value_invalid_for_its_key_names_the_member():
    """A value the schema refuses is reported with the member it belongs to; a problem every
    member has (an unknown key) is said once, with the recipe loader's did-you-mean."""
    from flsl_cli.config.load import read_recipe_file
    from flsl_cli.errors import RecipeError

    spec = GridSpec(grid={"optim.base_lr": [1e-3, -1.0], "model.arch": ["vit_tiny", "vit_smal"]})
    with pytest.raises(RecipeError) as caught:
        check_members(read_recipe_file("recipes/demo.yaml"), spec=spec, overrides=[], source="demo")
    problems = caught.value.problems
    assert len(problems) == 2, problems
    assert any(p.startswith("member 2-base_lr=-1.0-arch=vit_tiny, 3-") and "optim.base_lr" in p for p in problems)
    assert any("member 1-" in p and "3-" in p and "vit_smal" in p for p in problems)
    unknown = GridSpec(grid={"optim.base_lrr": [1e-3, 5e-4]})
    with pytest.raises(RecipeError) as caught:
        check_members(read_recipe_file("recipes/demo.yaml"), spec=unknown, overrides=[], source="demo")
    assert len(caught.value.problems) == 1 and "did you mean optim.base_lr?" in caught.value.problems[0]


# --- Bad input: a clear message each, nothing written, nothing submitted -------------------------


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--grid", "optim.base_lrr=1e-3,5e-4"], ["optim.base_lrr: unknown key", "did you mean optim.base_lr?"]),
        (
            ["--grid", "optim.base_lr=1e-3,5e-4", "--set", "optim.base_lr=1e-3"],
            ["--set optim.base_lr=1e-3: optim.base_lr is swept by the grid"],
        ),
        (["--grid", "optim.base_lr="], ["no values for optim.base_lr"]),
        ([], ["the grid is empty"]),
        (["--grid", "optim.base_lr=1e-3,-1"], ["member 1-base_lr=-1: optim.base_lr: expected greater than 0"]),
        (["--grid", "optim.precision=fp32,fp9"], ["member 1-precision=fp9: optim.precision", "'fp9'"]),
        (["--list", "optim.base_lr=1e-3,5e-4", "--list", "loss.gamma=1,2,3"], ["need as many values each"]),
        (["--grid", "optim.base_lr=1e-3,1e-3"], ["lists the value '1e-3' twice"]),
        (["--grid", "optim.base_lr=1e-3", "--list", "optim.base_lr=1e-3"], ["optim.base_lr is swept twice"]),
        (["--grid", "optim.base_lr=1e-3,5e-4", "--max-parallel", "2"], ["--max-parallel limits the tasks"]),
    ],
)
def test_bad_grids_are_refused_before_anything_is_written(demo_data, tmp_path, args, needles):
    """Each bad grid: exit 2, the message, no traceback, no sweep dir."""
    sweep_dir = tmp_path / "sweep"
    result = run_flsl(
        "sweep", "recipes/demo.yaml", *tiny_overrides(demo_data / "train"), *args, "--sweep-dir", sweep_dir
    )
    fails(result, *needles)
    assert not sweep_dir.exists()


def test_an_existing_sweep_dir_is_refused(demo_data, tmp_path):
    """A sweep dir that exists (even empty) is refused: a sweep never mixes with other files."""
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    result = run_flsl(
        "sweep", "recipes/demo.yaml", *tiny_overrides(demo_data / "train"), "--grid", "optim.base_lr=1e-3,5e-4",
        "--sweep-dir", sweep_dir, *ONE_TASK, "--dry-run",
    )  # fmt: skip
    fails(result, "the sweep dir already exists", "flsl resume")
    assert list(sweep_dir.iterdir()) == []


def test_dry_run_shows_one_job_array(demo_data, tmp_path):
    """--dry-run (no SLURM needed) lists the typed members and shows the #SBATCH --array line of
    the one job array submitit would submit, with --max-parallel as its limit; nothing written."""
    sweep_dir = tmp_path / "sweep"
    result = run_flsl(
        "sweep", "recipes/demo.yaml", *tiny_overrides(demo_data / "train"), "--grid", "optim.base_lr=1e-3,5e-4",
        "--grid", "optim.precision=fp32,auto", "--max-parallel", "3", *ONE_TASK, "--sweep-dir", sweep_dir,
        "--dry-run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --array=0-3%3" in result.stdout.splitlines()
    assert f"#SBATCH --error={sweep_dir}/slurm/%A_%a_0_log.err" in result.stdout.splitlines()
    flat = " ".join(result.stderr.split())
    assert "3-base_lr=5e-4-precision=auto: optim.base_lr=0.0005, optim.precision='auto'" in flat
    assert not sweep_dir.exists()


# --- Here: one member after another --------------------------------------------------------------


def test_a_sweep_here_trains_its_members_in_turn_and_compares_them(demo_data, tiny_run, tmp_path):
    """`flsl sweep --devices 1`: both members train, one after the other, in their own run dirs;
    `flsl status` shows one line per member; `flsl resume` has nothing to do; `flsl compare` of
    the sweep tables the swept key, the final losses, steps and speed, writes a plot and JSON,
    and compared with a run of another recipe it says which keys differ."""
    sweep_dir = tmp_path / "sweep"
    overrides = tiny_overrides(demo_data / "train", optim__global_batch_size=32, optim__epochs=1)
    knn = (
        f"eval.knn={{train: {demo_data / 'train'}, val: {demo_data / 'val'}, k: [1, 5], resize: 36, crop: 32, "
        "grid: 2, workers: 0, batch_size: 16}"
    )
    result = run_flsl(
        "sweep", "recipes/demo.yaml", *overrides, "--set", "eval.at_end=true", "--set", knn,
        "--grid", "optim.base_lr=1e-3,5e-4", "--devices", "1", "--sweep-dir", sweep_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert record["scheduler"] == "local" and record["grid"] == {"optim.base_lr": [0.001, 0.0005]}
    names = [m["name"] for m in record["members"]]
    assert names == ["0-base_lr=1e-3", "1-base_lr=5e-4"]
    runs = [sweep_dir / name for name in names]
    assert [run_json(run)["status"] for run in runs] == ["finished", "finished"]
    assert [metrics(run)[-1]["step"] for run in runs] == [6, 6] and all(metrics(run)[-1].get("final") for run in runs)

    status = run_flsl("status", sweep_dir, "--json")
    assert status.returncode == 0, status.stderr
    members = json.loads(status.stdout)["members"]
    assert [(m["name"], m["status"], m["step"]) for m in members] == [(n, "finished", 6) for n in names]
    shown = run_flsl("status", sweep_dir)
    assert shown.returncode == 0 and "2 finished" in shown.stdout and all(n in shown.stdout for n in names)

    again = run_flsl("resume", sweep_dir, "--devices", "1")
    assert again.returncode == 0 and "nothing to resume" in " ".join(again.stderr.split()), again.stderr
    fails(run_flsl("resume", sweep_dir, "--force", "--devices", "1"), "--force is for one run dir, not a sweep dir")

    compared = run_flsl("compare", sweep_dir, "--json", "--out", tmp_path / "compare.png", "--metric", "loss")
    assert compared.returncode == 0, compared.stderr
    table = json.loads(compared.stdout)
    assert "knn_bbox_top1_k1" in table["metrics"] and "random_init_knn_bbox_top1_k1" not in table["metrics"]
    assert table["keys"] == ["optim.base_lr"] and table["swept"] == ["optim.base_lr"]
    rows = {row["name"]: row for row in table["rows"]}
    for name, run in zip(names, runs):
        row = rows[f"sweep/{name}"]
        last = [m for m in metrics(run) if "loss" in m][-1]  # the last training step (the k-NN row follows it)
        assert (
            row["step"] == 6 and row["metrics"]["loss"] == last["loss"] and row["metrics"]["volume"] == last["volume"]
        )
        assert row["images_per_s"] > 0 and row["train_seconds"] > 0
        final = [m for m in metrics(run) if m.get("final")][-1]  # the k-NN of the teacher at the end
        assert row["metrics"]["knn_bbox_top1_k1"] == final["knn_bbox_top1_k1"]
    assert [rows[f"sweep/{n}"]["values"]["optim.base_lr"] for n in names] == [0.001, 0.0005]
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    shown = run_flsl("compare", sweep_dir, "--out", tmp_path / "knn.png")  # the k-NN top-1, by default
    assert shown.returncode == 0 and (tmp_path / "knn.png").exists(), shown.stderr
    from flsl_cli.launch.compare import compare_runs

    assert compare_runs([sweep_dir]).default_metric() == "knn_bbox_top1_k1"

    mixed = run_flsl("compare", sweep_dir, tiny_run)
    assert mixed.returncode == 0, mixed.stderr
    flat = " ".join(mixed.stderr.split())
    assert "beyond the swept keys, the runs' recipes differ in:" in flat and "optim.max_steps" in flat
    assert "run" in mixed.stdout and tiny_run.name in mixed.stdout

    fails(run_flsl("compare", tmp_path), "neither a run dir nor a sweep dir")
    fails(run_flsl("compare", sweep_dir, "--metric", "knn_nope"), "--metric knn_nope: not logged")


# --- SLURM: one job array ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_cluster():
    with running_cluster(nodes=1) as conf:
        yield conf


def _members(sweep_dir: Path) -> list[dict]:
    return json.loads((sweep_dir / "sweep.json").read_text())["members"]


def _wait_ended(job: str, run: Path, timeout: float = 240) -> None:
    wait_for(lambda: job_state(job) in TERMINAL, what=f"job {job} to end", run=run, timeout=timeout)


def test_a_grid_is_one_job_array_whose_preempted_member_resumes_exactly(slurm_cluster, demo_data, tmp_path):
    """A 2 x 2 grid of the demo recipe (tiny, data workers on) is one job array of 4 tasks, each
    its own run dir; a member preempted mid-run by a job of the higher-tier partition saves its
    step, is requeued by SLURM, resumes and finishes bitwise equal to the same member trained
    alone; the others finish untouched; `flsl status` and `flsl compare` read the sweep; a
    grid larger than the cluster's MaxArraySize is refused before anything is written."""
    sweep_dir = tmp_path / "grid"
    overrides = tiny_overrides(demo_data / "train", optim__epochs=4, checkpoint__every_steps=20)
    result = run_flsl(
        "sweep", "recipes/demo.yaml", *overrides, "--grid", "optim.base_lr=1e-3,5e-4", "--grid", "loss.gamma=1,5",
        *ONE_TASK, "--sweep-dir", sweep_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    members = _members(sweep_dir)
    jobs = [m["job_ids"][0] for m in members]
    array = jobs[0].split("_")[0]
    assert jobs == [f"{array}_{i}" for i in range(4)], jobs  # one array, one task per member
    assert f"submitted SLURM job array {array} of 4 member(s)" in result.stdout
    runs = [sweep_dir / m["run_dir"] for m in members]
    assert [run_json(run)["job_ids"] for run in runs] == [[job] for job in jobs]

    wait_for(
        lambda: all(len(metrics(run)) >= 10 for run in runs),
        what="every member to pass step 10",
        run=runs[0],
        timeout=180,
    )
    # 4 tasks x 3 CPUs of the 16: a job that needs 5 CPUs preempts one (or more) of them
    sent = slurm(
        "sbatch", "--parsable", "--partition=urgent", "--cpus-per-task=5", "--output=/dev/null", "--wrap", "sleep 2"
    )
    assert sent.returncode == 0, sent.stderr
    preempted = wait_for(
        lambda: [i for i, run in enumerate(runs) if (run_json(run).get("last_requeue") or {}).get("cause")],
        what="a member to be preempted",
        run=runs[0],
        timeout=120,
    )
    for index in preempted:
        requeue = run_json(runs[index])["last_requeue"]
        assert requeue["cause"] == "preemption", requeue  # requeued in its grace time by flsl, or by SLURM after it
        assert (runs[index] / "checkpoints" / f"step-{requeue['step']:08d}.json").exists()
        release_requeued(jobs[index], runs[index], restarts=1)
    for job, run in zip(jobs, runs):
        _wait_ended(job, run)
    for run in runs:
        assert run_json(run)["status"] == "finished", job_logs(run)
        assert metrics(run)[-1]["step"] == 96 and "Traceback" not in job_logs(run)

    status = json.loads(run_flsl("status", sweep_dir, "--json").stdout)
    assert [m["status"] for m in status["members"]] == ["finished"] * 4
    assert [m["requeues"] for m in status["members"]] == [1 if i in preempted else 0 for i in range(4)]
    assert status["arrays"] == [array]
    compared = json.loads(run_flsl("compare", sweep_dir, "--json").stdout)
    assert compared["swept"] == ["optim.base_lr", "loss.gamma"] and compared["keys"] == compared["swept"]
    assert [row["values"] for row in compared["rows"]] == [
        {"optim.base_lr": lr, "loss.gamma": gamma} for lr in (0.001, 0.0005) for gamma in (1.0, 5.0)
    ]
    assert [row["step"] for row in compared["rows"]] == [96] * 4

    # the preempted member, trained alone here (one process, as its array task): bitwise the same
    member = members[preempted[0]]
    alone = tmp_path / "alone"
    values = [f"{key}={value}" for key, value in member["values"].items()]
    trained = run_flsl(
        "pretrain", "recipes/demo.yaml", *overrides, *[x for v in values for x in ("--set", v)], "--devices", "1",
        "--run-dir", alone,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert_same_run(alone, runs[preempted[0]])

    limit = int(
        next(line for line in slurm("scontrol", "show", "config").stdout.splitlines() if "MaxArraySize" in line)
        .split("=")[1]
        .strip()
    )
    side = int(limit**0.5) + 1  # side * side > limit
    too_big = tmp_path / "too-big"
    refused = run_flsl(
        "sweep", "recipes/demo.yaml", *overrides, "--grid", "optim.seed=" + ",".join(map(str, range(side))),
        "--grid", "loss.gamma=" + ",".join(map(str, range(1, side + 1))), *ONE_TASK, "--sweep-dir", too_big,
    )  # fmt: skip
    fails(refused, f"the grid has {side * side} members", f"MaxArraySize={limit}")
    assert not too_big.exists()


def test_max_parallel_runs_one_at_a_time_and_resume_takes_the_unfinished(slurm_cluster, demo_data, tmp_path):
    """`--max-parallel 1`: the array's tasks never run two at once; a member cancelled while it
    waits is the only one `flsl resume SWEEP_DIR` submits again (a new array), and it finishes."""
    sweep_dir = tmp_path / "serial"
    overrides = tiny_overrides(demo_data / "train", optim__global_batch_size=16, optim__epochs=1)
    result = run_flsl(
        "sweep", "recipes/demo.yaml", *overrides, "--grid", "optim.base_lr=1e-3,5e-4,2e-4", *ONE_TASK,
        "--max-parallel", "1", "--sweep-dir", sweep_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    members = _members(sweep_dir)
    jobs = [m["job_ids"][0] for m in members]
    runs = [sweep_dir / m["run_dir"] for m in members]
    array = jobs[0].split("_")[0]
    assert slurm("scancel", jobs[2]).returncode == 0  # waits behind the others: never starts
    most = 0
    deadline = time.time() + 300
    while not all(job_state(job) in TERMINAL for job in jobs[:2]) and time.time() < deadline:
        answer = slurm("squeue", "-h", "-r", "-j", array, "-t", "RUNNING", "-o", "%i")
        most = max(most, len(answer.stdout.split()))
        time.sleep(0.3)
    assert most == 1, most
    assert [run_json(run)["status"] for run in runs[:2]] == ["finished", "finished"], job_logs(runs[0])
    assert run_json(runs[2])["status"] == "submitting" and not metrics(runs[2])  # its job never started

    resumed = run_flsl("resume", sweep_dir)
    assert resumed.returncode == 0, resumed.stderr
    after = _members(sweep_dir)
    assert [m["job_ids"] for m in after[:2]] == [[jobs[0]], [jobs[1]]]  # finished: left alone
    again = after[2]["job_ids"]
    assert len(again) == 2 and again[0] == jobs[2] and not again[1].startswith(array + "_")
    assert json.loads((sweep_dir / "sweep.json").read_text())["arrays"] == [array, again[1].split("_")[0]]
    _wait_ended(again[1], runs[2])
    assert run_json(runs[2])["status"] == "finished", job_logs(runs[2])
    assert metrics(runs[2])[-1]["step"] == 12
