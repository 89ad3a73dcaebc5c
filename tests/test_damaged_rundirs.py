"""Nothing overwritten, nothing misread: `flsl resume` on run dirs whose checkpoint manifests are
gone, refusals that name the true reason, temporary files that a SIGKILL left, `--set` of a key
that changes the schedule, log lines that stay whole in a pipe, and a stop signal while the data
workers start. Runs use the recipe's 2 data workers per process, as users run it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import fails, metrics, run_flsl, tiny_overrides
from process_group import Started


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


@pytest.fixture(scope="module")
def ten_steps(demo_data, tmp_path_factory) -> Path:
    """A run of 10 steps with checkpoints at steps 5 and 10 (tests work on copies)."""
    run = tmp_path_factory.mktemp("ten") / "run"
    done = run_flsl(
        "pretrain", "recipes/demo.yaml", *tiny_overrides(demo_data / "train", optim__max_steps=10), "--run-dir", run
    )
    assert done.returncode == 0, done.stderr
    return run


def test_checkpoints_without_manifests_are_never_trained_over(ten_steps, tmp_path):
    """Checkpoint files whose manifests are gone: `flsl resume` refuses (names them, says why they
    are not trusted, offers --adopt-checkpoint and --force) and changes nothing; adopting one
    checks it and resumes from it; --force starts over with the files kept aside."""
    run = _copy(ten_steps, tmp_path / "run")
    checkpoints = run / "checkpoints"
    for manifest in checkpoints.glob("step-*.json"):
        manifest.unlink()
    before, logged = _digests(checkpoints), metrics(run)

    refused = run_flsl("resume", run)
    fails(refused, "step-00000005.pt, step-00000010.pt", "no manifest", "none is trusted")
    fails(refused, f"flsl resume {run} --adopt-checkpoint step-00000010.pt", f"flsl resume {run} --force")
    assert _digests(checkpoints) == before and metrics(run) == logged

    with zipfile.ZipFile(checkpoints / "step-00000015.pt", "w") as archive:  # not a flsl checkpoint
        archive.writestr("notes.txt", "hello")
    fails(run_flsl("resume", run, "--adopt-checkpoint", "step-00000015.pt"), "not a flsl checkpoint")
    assert not (checkpoints / "step-00000015.json").exists()
    (checkpoints / "step-00000015.pt").unlink()

    adopted = run_flsl("resume", run, "--adopt-checkpoint", "step-00000010.pt", "--set", "optim.max_steps=12")
    assert adopted.returncode == 0, adopted.stderr
    assert "adopted step-00000010.pt (step 10)" in adopted.stderr and "from step 10" in adopted.stderr
    assert "step-00000005.pt (no manifest)" in " ".join(adopted.stderr.split())  # the other one is named, not used
    assert metrics(run)[-1]["step"] == 12 and (checkpoints / "step-00000010.json").exists()

    again = _copy(ten_steps, tmp_path / "again")
    for manifest in (again / "checkpoints").glob("step-*.json"):
        manifest.unlink()
    forced = run_flsl("resume", again, "--force", "--set", "optim.max_steps=3")
    assert forced.returncode == 0, forced.stderr
    assert (again / "checkpoints" / "step-00000010.pt.unverified").exists()
    assert metrics(again)[-1]["step"] == 3


def _evil_zip(path: Path, marker: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "flsl-checkpoint/1", "x": Evil()}, path)  # torch's zip format, a pickle inside


def test_each_refusal_says_the_true_reason(tiny_run, demo_data, tmp_path):
    """Not a checkpoint (and possibly unsafe) before damaged; a cut run.json refused by resume
    (not rewritten); a missing run.json or recipe.yaml named; a text file as data.train; an
    unreachable HTTP server reported as a connection error with its URL."""
    _evil_zip(tmp_path / "evil.pt", tmp_path / "pwned")
    with zipfile.ZipFile(tmp_path / "plain.pt", "w") as archive:
        archive.writestr("notes.txt", "hello")
    for name in ("evil.pt", "plain.pt"):
        result = run_flsl("export", tmp_path / name, "--out", tmp_path / "out.safetensors")
        fails(result, name, "not a flsl checkpoint (and possibly unsafe)")
        assert "truncated" not in result.stderr and not (tmp_path / "pwned").exists()

    cut = _copy(tiny_run, tmp_path / "cut")
    text = (cut / "run.json").read_text()
    (cut / "run.json").write_text(text[: len(text) // 2])
    fails(run_flsl("resume", cut), f"{cut / 'run.json'}", "run.json cannot be read", "mv ")
    assert (cut / "run.json").read_text() == text[: len(text) // 2]

    no_record = _copy(tiny_run, tmp_path / "no-record")
    (no_record / "run.json").unlink()
    fails(run_flsl("status", no_record), "run.json is missing", "Restore run.json")
    no_recipe = _copy(tiny_run, tmp_path / "no-recipe")
    (no_recipe / "recipe.yaml").unlink()
    fails(run_flsl("resume", no_recipe), "recipe.yaml is missing", "flsl recipe show")

    notes = tmp_path / "notes.txt"
    notes.write_text("my shards are somewhere else\n")
    base = tiny_overrides(demo_data / "train")
    text_file = run_flsl(
        "pretrain", "recipes/demo.yaml", *base, "--set", f"data.train={notes}", "--run-dir", tmp_path / "a"
    )
    fails(text_file, str(notes), "is a file that is not a shard or a shard list")
    unreachable = "http://127.0.0.1:9/shards/train-{000000..000003}.tar"
    offline = run_flsl(
        "pretrain", "recipes/demo.yaml", *base, "--set", f"data.train={unreachable}", "--run-dir", tmp_path / "b"
    )
    fails(offline, "connection error", "http://127.0.0.1:9/shards")
    assert "matches no shard" not in offline.stderr


def _sigkill_while(started: Started, condition) -> bool:
    """SIGKILL the command's processes as soon as `condition()` holds; False if it never did."""
    caught = started.wait_until(condition)
    if started.process.poll() is None:
        started.signal_group(signal.SIGKILL)
    started.finish()
    return caught


def test_temp_files_of_a_killed_write_are_removed_by_the_next_command(demo_data, tmp_path):
    """SIGKILL during the first checkpoint write, then `flsl resume` (which starts again from
    step 0) removes the temporary file; SIGKILL during `flsl data demo`, then `flsl data demo`
    on the same path removes the half-built folder."""
    run, caught = tmp_path / "run", False
    for _ in range(5):  # the write takes milliseconds: try again when the poll misses it
        shutil.rmtree(run, ignore_errors=True)
        started = Started("pretrain", "recipes/demo.yaml", *tiny_overrides(demo_data / "train"), "--run-dir", run)

        def writing_the_first() -> bool:
            names = os.listdir(run / "checkpoints") if (run / "checkpoints").is_dir() else []
            return any(".tmp-" in name for name in names) and not any(n.endswith(".json") for n in names)

        if _sigkill_while(started, writing_the_first):
            caught = True
            break
    assert caught, "never caught the first checkpoint write"
    left = [p.name for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert left
    resumed = run_flsl("resume", run, "--set", "optim.max_steps=6")
    assert resumed.returncode == 0, resumed.stderr
    assert "starting it again from step 0" in resumed.stderr and f"removed checkpoints/{left[0]}" in resumed.stderr
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]

    out = tmp_path / "demo"
    started = Started("data", "demo", out, "--images", "4000")
    assert _sigkill_while(started, lambda: any(p.name.startswith(".demo.tmp-") for p in tmp_path.iterdir()))
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".demo.tmp-")]
    again = run_flsl("data", "demo", out, "--images", "40")
    assert again.returncode == 0, again.stderr
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name] and (out / "dataset.json").exists()


def test_resume_set_that_changes_the_schedule_is_refused_unless_allowed(tiny_run, tmp_path):
    """`--set optim.global_batch_size` on resume changes the run's length: refused with the
    steps before and after, then allowed by name with a note saying the same; a learning rate
    of 1e30 is refused by the schema."""
    run = _copy(tiny_run, tmp_path / "run")
    recipe = (run / "recipe.yaml").read_text()
    refused = run_flsl("resume", run, "--set", "optim.global_batch_size=16")
    fails(refused, "optim.global_batch_size", "8 -> 16", "total steps 48 -> 24", "--allow-schedule-change")
    assert (run / "recipe.yaml").read_text() == recipe
    fails(run_flsl("resume", run, "--set", "optim.seed=3"), "optim.seed", "0 -> 3", "--allow-schedule-change")

    allowed = run_flsl("resume", run, "--set", "optim.global_batch_size=16", "--allow-schedule-change")
    assert allowed.returncode == 0, allowed.stderr
    flat = " ".join(allowed.stderr.split())
    assert "the run changes: optim.global_batch_size 8 -> 16; total steps 48 -> 24" in flat, flat
    assert "peak learning rate" in flat

    too_high = run_flsl(
        "recipe", "validate", "recipes/demo.yaml", "--set", "optim.base_lr=1e30", "--set", "loss.gamma=1e9"
    )
    fails(too_high, "optim.base_lr: expected less than or equal to 1", "loss.gamma", "use a value")


def test_output_to_a_pipe_keeps_each_line_whole(tiny_run, tmp_path):
    """With stderr a pipe and no COLUMNS, a run dir path of 150 characters stays whole on one
    line in the "resuming" and "resumed from" lines and in the summary table (grep finds them)."""
    deep = tmp_path / ("a-run-dir-with-a-long-name-" * 5)
    run = _copy(tiny_run, deep / "run")
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    started = Started("resume", run, "--set", "optim.max_steps=3", env=dict(env, PYTHONUNBUFFERED="1"))
    result = started.finish()
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert any(f"resuming {run} from step 2" in line for line in lines), result.stderr
    newest = str(run / "checkpoints" / "step-00000003.pt")
    assert any("newest" in line and f" {newest} " in line for line in lines), result.stderr
    assert any(f"resumed from {run / 'checkpoints' / 'step-00000002.pt'} (step 2)" in line for line in lines), (
        result.stderr
    )


def test_a_signal_while_the_data_workers_start_stops_before_the_first_step(demo_data, tmp_path):
    """SIGTERM to the run's processes once its data workers exist but before the first step:
    the run stops before its first step (nothing trained, nothing saved), as the README says."""
    run = tmp_path / "run"
    args = tiny_overrides(demo_data / "train", data__shuffle_buffer=1000)  # the first batch waits on many samples
    started = Started("pretrain", "recipes/demo.yaml", *args, "--run-dir", run)
    launcher_and_workers = 3
    assert started.wait_until(lambda: len(started.processes()) >= launcher_and_workers and not metrics(run))
    started.signal_group(signal.SIGTERM)
    result = started.finish()
    err = " ".join(result.stderr.split())
    assert result.returncode == 75 and "Traceback" not in err, err
    assert "stopped by SIGTERM before its first step" in err, err
    assert not metrics(run) and not list(run.glob("checkpoints/*.json"))
    assert json.loads((run / "run.json").read_text())["status"] == "stopped"
