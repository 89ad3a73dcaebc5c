"""What the CLI hands to its backend: options become the schema's settings (SLURM options
override the recipe's `slurm` section as `--set slurm.KEY=...` would; `flsl knn-eval`'s options
become one KnnEvalConfig), with defaults read from the schema. In-process (CliRunner), with only
the last step (the sbatch script, the evaluation) replaced by a recorder."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from flsl_cli.cli.app import app
from flsl_cli.cli.eval import KNN_OPTIONS
from flsl_cli.config.schema import KnnEvalConfig, SlurmConfig
from flsl_cli.launch.slurm import submit
from flsl_cli.launch.slurm.request import SLURM_OPTIONS

REPO = Path(__file__).resolve().parents[1]


def _invoke(*args: object):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


@pytest.fixture
def sbatch_requests(monkeypatch) -> list:
    """The requests whose jobs `flsl pretrain/resume --dry-run` would show."""
    seen = []

    def record(request, *, run_dir):
        seen.append(request)
        return "#!/bin/bash\n"

    monkeypatch.setattr(submit, "dry_run_text", record)
    return seen


def test_slurm_options_override_the_recipe_slurm_section(sbatch_requests, tmp_path, monkeypatch):
    """`--nodes 2 --gpus-per-node 4 --partition gpu --time 1:00:00 --set optim.epochs=2` is the
    recipe's slurm section with those four values replaced, and the job asks for 2 x 4 GPUs."""
    monkeypatch.chdir(REPO)
    result = _invoke(
        "pretrain",
        "recipes/demo.yaml",
        "--nodes",
        2,
        "--gpus-per-node",
        4,
        "--partition",
        "gpu",
        "--time",
        "1:00:00",
        "--set",
        "optim.epochs=2",
        "--set",
        f"data.train={tmp_path}/demo/train",
        "--set",
        "optim.global_batch_size=64",
        "--run-dir",
        tmp_path / "run",
        "--dry-run",
    )
    assert result.exit_code == 0, result.output
    [request] = sbatch_requests
    expected = SlurmConfig(nodes=2, gpus_per_node=4, partition="gpu", time="1:00:00")
    assert request.slurm == expected
    assert (request.nodes, request.tasks_per_node, request.gpus_per_node, request.world_size) == (2, 4, 4, 8)
    assert request.cpus_per_task == 3  # the demo recipe's 2 data workers + 1
    assert request.signal_seconds == 300
    assert not (tmp_path / "run").exists()


def test_slurm_options_and_set_are_one_rule(sbatch_requests, tmp_path, monkeypatch):
    """An option and `--set slurm.KEY=VALUE` give the same request; the option wins over --set."""
    monkeypatch.chdir(REPO)
    common = ["pretrain", "recipes/demo.yaml", "--set", f"data.train={tmp_path}/demo/train", "--dry-run"]
    _invoke(*common, "--nodes", 2, "--gpus-per-node", 0, "--tasks-per-node", 2, "--qos", "low")
    _invoke(
        *common,
        "--set",
        "slurm.nodes=2",
        "--set",
        "slurm.gpus_per_node=0",
        "--set",
        "slurm.tasks_per_node=2",
        "--set",
        "slurm.qos=low",
        "--nodes",
        2,
    )
    _invoke(
        *common,
        "--set",
        "slurm.nodes=5",
        "--set",
        "slurm.gpus_per_node=0",
        "--set",
        "slurm.tasks_per_node=2",
        "--set",
        "slurm.qos=high",
        "--nodes",
        2,
        "--qos",
        "low",
    )
    first, second, third = sbatch_requests
    assert first.slurm == second.slurm == third.slurm
    assert (first.world_size, first.slurm.qos) == (4, "low")


def test_a_bad_slurm_option_is_named_as_an_option(sbatch_requests, tmp_path, monkeypatch):
    """The schema's rule, worded with the option: --tasks-per-node must match --gpus-per-node."""
    monkeypatch.chdir(REPO)
    result = _invoke(
        "pretrain",
        "recipes/demo.yaml",
        "--set",
        f"data.train={tmp_path}/demo/train",
        "--nodes",
        1,
        "--gpus-per-node",
        4,
        "--tasks-per-node",
        2,
        "--dry-run",
    )
    assert result.exit_code == 2
    assert "--tasks-per-node: expected 4 (one process per GPU)" in " ".join(result.output.split())
    assert sbatch_requests == []


def test_every_slurm_option_is_a_slurm_config_field():
    """The SLURM options of pretrain, resume and sweep are exactly SLURM_OPTIONS, each a SlurmConfig
    field."""
    assert set(SLURM_OPTIONS) <= set(SlurmConfig.model_fields)
    command = typer.main.get_command(app)
    for name in ("pretrain", "resume", "sweep"):
        options = {
            p.opts[0]
            for p in command.commands[name].params
            if getattr(p, "rich_help_panel", None) and p.opts[0] not in ("--dry-run", "--max-parallel")
        }
        assert options == set(SLURM_OPTIONS.values()), name


@pytest.mark.parametrize("command", ["pretrain", "resume", "sweep"])
def test_devices_with_a_slurm_option_is_refused_before_anything_is_submitted(
    command, sbatch_requests, tmp_path, monkeypatch
):
    """--devices (processes on this machine) with --nodes (a SLURM job): one clear error, exit 2."""
    monkeypatch.chdir(REPO)
    target = tmp_path / "run" if command == "resume" else "recipes/demo.yaml"
    result = _invoke(command, target, "--devices", 2, "--nodes", 1)
    message = " ".join(result.output.split())
    assert result.exit_code == 2, message
    assert "--devices is for runs on this machine and cannot be combined with SLURM options" in message
    assert "--gpus-per-node" in message and "Traceback" not in message
    assert sbatch_requests == [] and not (tmp_path / "run").exists()


@pytest.fixture
def evaluations(monkeypatch) -> list[dict]:
    """The calls `flsl knn-eval` makes to its backend (nothing is evaluated)."""
    from flsl_cli.eval import report
    from flsl_cli.launch import knn

    seen = []

    def record(**kwargs):
        seen.append(kwargs)
        return {"recorded": True}

    monkeypatch.setattr(knn, "knn_eval", record)
    monkeypatch.setattr(report, "results_table", lambda results: "table")
    monkeypatch.setattr(report, "write_json", lambda path, results: None)
    return seen


def test_knn_eval_options_become_one_knn_eval_config(evaluations, tmp_path):
    """Every option lands in its KnnEvalConfig field; the cache folder and process count beside it."""
    result = _invoke(
        "knn-eval",
        "run/checkpoints/step-00000010.pt",
        "--train",
        "tr",
        "--val",
        "va",
        "--mode",
        "global",
        "--k",
        "5, 10",
        "--temperature",
        0.1,
        "--grid",
        2,
        "--resize",
        128,
        "--crop",
        112,
        "--batch-size",
        16,
        "--workers",
        1,
        "--max-train-images",
        50,
        "--bank",
        "host",
        "--features-dir",
        tmp_path / "cache",
        "--devices",
        2,
        "--output",
        tmp_path / "out.json",
    )
    assert result.exit_code == 0, result.output
    [call] = evaluations
    assert call["settings"] == KnnEvalConfig(
        train="tr",
        val="va",
        mode="global",
        k=[5, 10],
        temperature=0.1,
        grid=2,
        resize=128,
        crop=112,
        batch_size=16,
        workers=1,
        max_train_images=50,
        bank="host",
    )
    assert (call["devices"], call["features_dir"]) == (2, str(tmp_path / "cache"))
    assert call["spec"].checkpoint == "run/checkpoints/step-00000010.pt"


def test_knn_eval_defaults_are_the_schema_defaults(evaluations, tmp_path):
    """With only --train and --val, the settings are KnnEvalConfig's defaults (as in a recipe's
    eval.knn section), so the two cannot drift apart."""
    result = _invoke("knn-eval", "x.pt", "--train", "tr", "--val", "va", "--output", tmp_path / "out.json")
    assert result.exit_code == 0, result.output
    assert evaluations[0]["settings"] == KnnEvalConfig(train="tr", val="va")
    assert evaluations[0]["settings"].workers is None  # up to 4, no more than the CPUs: decided where it runs


def test_every_knn_option_is_a_knn_eval_config_field():
    assert set(KNN_OPTIONS) == set(KnnEvalConfig.model_fields)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--k", "10,x"], ["--k[1]", "'x'"]),
        (["--resize", "100", "--crop", "224"], ["--resize", "crop (224)"]),
        (["--workers", "-1"], ["--workers", "-1"]),
        (["--temperature", "0"], ["--temperature", "0.001"]),
    ],
)
def test_bad_knn_options_are_refused_by_the_schema(evaluations, args, needles):
    result = _invoke("knn-eval", "x.pt", "--train", "tr", "--val", "va", *args)
    flat = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in flat, (needle, flat)
    assert evaluations == []


def test_out_names_the_results_file_and_the_old_spelling_still_works(evaluations, tmp_path):
    """`--out` names what a command writes; `--output` (its old spelling) still works for a release,
    with a note, and both at once is an error before anything runs."""
    result = _invoke("knn-eval", "x.pt", "--train", "tr", "--val", "va", "--out", tmp_path / "new.json")
    assert result.exit_code == 0, result.output
    assert "new.json" in result.output and "old spelling" not in result.output
    result = _invoke("knn-eval", "x.pt", "--train", "tr", "--val", "va", "--output", tmp_path / "old.json")
    assert result.exit_code == 0, result.output
    assert "old.json" in result.output and "--output is now --out" in result.output
    result = _invoke(
        "knn-eval",
        "x.pt",
        "--train",
        "tr",
        "--val",
        "va",
        "--out",
        tmp_path / "a.json",
        "--output",
        tmp_path / "b.json",
    )
    assert result.exit_code == 2 and "both were given" in result.output
    assert len(evaluations) == 2
