"""What the user sees around training: instant help without torch, divergence handling, and
the demo-data command."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, run_flsl, tiny_overrides

from flsl_cli.checkpoint.store import list_checkpoints, load_file, verify


def test_help_does_not_import_torch():
    """`flsl --help` and `flsl pretrain --help` answer without importing torch."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from flsl_cli.cli.app import app\n"
        "for args in (['--help'], ['pretrain', '--help'], ['resume', '--help'], ['recipe', 'show', '--help']):\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "print('torch' in sys.modules, 'timm' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_status_reads_a_run_dir_without_torch(tmp_path):
    """`flsl status` answers from run.json, metrics.jsonl and the manifests without importing
    torch (importing it takes seconds), and shows the newest checkpoint's step when it is newer
    than the last logged line, with the epoch numbered as training numbers it."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text("optim:\n  epochs: 4\n")
    (run / "run.json").write_text('{"status": "stopped", "stop_signal": "SIGTERM", "stopped_at_step": 30}')
    (run / "metrics.jsonl").write_text('{"step": 20, "epoch": 2.0}\n{"step": 24, "epoch": 2.4}\n')
    (run / "checkpoints" / "step-00000030.json").write_text("{}")
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from flsl_cli.cli.app import app\n"
        f"result = CliRunner().invoke(app, ['status', {str(run)!r}, '--json'])\n"
        "assert result.exit_code == 0, result.output\n"
        "shown = json.loads(result.output)\n"
        "print('torch' in sys.modules, shown['step'], shown['epoch'], shown['epochs'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "30", "3", "4"]  # 10 steps an epoch: step 30 ends epoch 3


def test_pretrain_help_lists_the_options():
    result = run_flsl("pretrain", "--help")
    assert result.returncode == 0
    for option in ("--set", "--run-dir", "--devices", "--force"):
        assert option in result.stdout


def test_non_finite_loss_stops_with_step_and_terms(demo_data, tmp_path):
    """An absurd learning rate makes the loss non-finite: exit 3, the step and every term named,
    and the last checkpoint before it intact."""
    run = tmp_path / "run"
    result = run_flsl(
        "pretrain",
        "recipes/demo.yaml",
        *tiny_overrides(
            demo_data / "train",
            optim__base_lr=1e35,
            optim__clip_grad=0,
            optim__warmup_epochs=1,
            checkpoint__every_steps=1,
            optim__min_lr=0,
        ),
        "--run-dir",
        run,
    )
    assert result.returncode == 3, result.stderr
    assert "non-finite at step" in result.stderr and "Traceback" not in result.stderr
    for term in ("loss =", "intra =", "inter =", "volume ="):
        assert term in result.stderr
    failed_step = int(result.stderr.split("non-finite at step ")[1].split()[0])
    refs = list_checkpoints(run)
    assert refs and refs[-1].step < failed_step
    assert verify(refs[-1]) is None and load_file(refs[-1].path)["step"] == refs[-1].step
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and "non-finite" in record["last_error"]["message"]
    shown = run_flsl("status", run, "--json")
    assert json.loads(shown.stdout)["last_error"]["message"] == record["last_error"]["message"]


def test_data_demo_command(tmp_path):
    out = tmp_path / "demo"
    result = run_flsl("data", "demo", out, "--images", "60", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "48 train and 12 val images" in result.stdout
    assert json.loads((out / "train" / "index.json").read_text())["num_samples"] == 48
    again = run_flsl("data", "demo", out, "--images", "60")
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr and "Traceback" not in again.stderr
