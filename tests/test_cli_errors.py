"""Bad input: each case gives one clear message (what, where, how to fix), a non-zero exit
code, no traceback, and writes or loses nothing."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
from conftest import fails, run_flsl, tiny_overrides
from servers import http_server


@pytest.fixture(scope="module")
def finished_run(demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "done"
    result = run_flsl(
        "pretrain", "recipes/demo.yaml", *tiny_overrides(demo_data / "train", optim__epochs=1), "--run-dir", run
    )
    assert result.returncode == 0, result.stderr
    return run


def test_data_path_missing(tmp_path):
    run = tmp_path / "run"
    fails(
        run_flsl("pretrain", "recipes/demo.yaml", *tiny_overrides(tmp_path / "nowhere"), "--run-dir", run),
        "data.train does not exist",
        "flsl data demo",
    )
    assert not run.exists()


def test_data_path_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    run = tmp_path / "run"
    fails(
        run_flsl("pretrain", "recipes/demo.yaml", *tiny_overrides(tmp_path / "empty"), "--run-dir", run),
        "no .tar shards",
    )
    assert not run.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without read permission")
def test_data_unreadable(demo_data, tmp_path):
    data = tmp_path / "train"
    shutil.copytree(demo_data / "train", data)
    (data / "index.json").unlink()
    for shard in data.glob("*.tar"):
        shard.chmod(0)
    fails(
        run_flsl("pretrain", "recipes/demo.yaml", *tiny_overrides(data), "--run-dir", tmp_path / "run"),
        "cannot read the shard",
    )


def test_data_corrupt_shard(demo_data, tmp_path):
    """A shard that is not a tar file stops the run with the shard named."""
    data = tmp_path / "train"
    shutil.copytree(demo_data / "train", data)
    (data / "index.json").unlink()
    for shard in data.glob("*.tar"):
        shard.write_bytes(b"this is not a tar file" * 10)
    fails(
        run_flsl("pretrain", "recipes/demo.yaml", *tiny_overrides(data), "--run-dir", tmp_path / "run"),
        "cannot read the shard",
    )


def test_batch_not_divisible_by_processes(demo_data, tmp_path):
    run = tmp_path / "run"
    fails(
        run_flsl(
            "pretrain",
            "recipes/demo.yaml",
            *tiny_overrides(demo_data / "train", optim__global_batch_size=9),
            "--devices",
            "2",
            "--run-dir",
            run,
        ),
        "optim.global_batch_size",
        "multiple of the number of processes (2)",
    )
    assert not run.exists()


def test_negative_learning_rate_writes_nothing(demo_data, tmp_path):
    run = tmp_path / "run"
    fails(
        run_flsl(
            "pretrain", "recipes/demo.yaml", *tiny_overrides(demo_data / "train", optim__base_lr=-1), "--run-dir", run
        ),
        "optim.base_lr",
    )
    assert not run.exists()


def test_run_dir_with_another_run_is_refused(demo_data, finished_run, tmp_path):
    """A different recipe into a dir holding a run with checkpoints: refused even with --force."""
    before = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    for extra in ([], ["--force"]):
        fails(
            run_flsl(
                "pretrain",
                "recipes/demo.yaml",
                *tiny_overrides(demo_data / "train", optim__epochs=3),
                "--run-dir",
                finished_run,
                *extra,
            ),
            "holds a different run",
            "flsl resume",
        )
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == before


def test_force_restarts_a_run_without_checkpoints(demo_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("old: run\n")
    (run / "run.json").write_text("{}")
    fails(
        run_flsl(
            "pretrain", "recipes/demo.yaml", *tiny_overrides(demo_data / "train", optim__max_steps=1), "--run-dir", run
        ),
        "--force",
    )
    ok = run_flsl(
        "pretrain",
        "recipes/demo.yaml",
        *tiny_overrides(demo_data / "train", optim__max_steps=1),
        "--run-dir",
        run,
        "--force",
    )
    assert ok.returncode == 0, ok.stderr


def test_run_dir_with_foreign_files_is_refused(demo_data, tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "thesis.tex").write_text("precious")
    fails(
        run_flsl("pretrain", "recipes/demo.yaml", *tiny_overrides(demo_data / "train"), "--run-dir", run, "--force"),
        "does not hold a flsl run",
    )
    assert (run / "thesis.tex").read_text() == "precious"


def test_resume_without_checkpoint_starts_over(demo_data, tmp_path):
    """A run stopped before its first checkpoint: `flsl resume` starts it again from step 0 with
    its saved recipe, says so, and the logs hold each step once."""
    import json

    run = tmp_path / "run"
    first = run_flsl(
        "pretrain", "recipes/demo.yaml", *tiny_overrides(demo_data / "train", optim__max_steps=2), "--run-dir", run
    )
    assert first.returncode == 0, first.stderr
    shutil.rmtree(run / "checkpoints")
    result = run_flsl("resume", run)
    assert result.returncode == 0, result.stderr
    assert "no checkpoint yet: starting it again from step 0" in " ".join(result.stderr.split())
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resume_not_a_run(tmp_path):
    fails(run_flsl("resume", tmp_path), "not a flsl run directory")
    fails(run_flsl("resume", tmp_path / "missing"), "does not exist")


def test_resume_refuses_shape_changes(finished_run):
    """A refused shape change names each key, and suggests no `flsl recipe validate` command
    (which knows nothing of the saved run and would answer ok)."""
    result = run_flsl("resume", finished_run, "--set", "model.head_out_dim=128", "--set", "model.arch=vit_small")
    fails(result, "model.head_out_dim: cannot change on resume", "model.arch: cannot change on resume")
    assert "recipe validate" not in result.stderr


def test_resume_with_truncated_only_checkpoint(finished_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    for path in (run / "checkpoints").glob("*.pt"):
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size // 3)
    fails(run_flsl("resume", run), "no usable checkpoint", "truncated")


def test_resume_with_pickle_carrying_code(finished_run, tmp_path):
    """A checkpoint replaced by a malicious pickle (manifest updated to match) is refused, and
    its code never runs."""
    import hashlib
    import json

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for path in (run / "checkpoints").glob("*.pt"):
        path.write_bytes(pickle.dumps({"format": "flsl-checkpoint/1", "student": Evil()}))
        manifest = path.with_suffix(".json")
        data = json.loads(manifest.read_text())
        data.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
        manifest.write_text(json.dumps(data))
    fails(run_flsl("resume", run), "refused to load")
    assert not marker.exists()


def test_unknown_key_via_cli(demo_data, tmp_path):
    fails(
        run_flsl("pretrain", "recipes/demo.yaml", "--set", "optim.lr=0.1", "--run-dir", tmp_path / "r"),
        "optim.lr: unknown key",
        "did you mean",
    )
    assert not (tmp_path / "r").exists()


def test_data_shard_that_cannot_be_opened(demo_data, tmp_path):
    """A listed shard that cannot be opened as a file (here a directory) is named in the error."""
    data = tmp_path / "train"
    data.mkdir()
    (data / "broken-000000.tar").mkdir()
    fails(
        run_flsl("pretrain", "recipes/demo.yaml", *tiny_overrides(data), "--run-dir", tmp_path / "run"),
        "cannot read the shard",
        "broken-000000.tar",
    )
    assert not (tmp_path / "run").exists()


def test_a_damaged_checkpoint_set_aside_never_crowds_out_the_good_ones(finished_run, tmp_path):
    """Resumed past a damaged newest checkpoint with checkpoint.keep_last=1 and stopped before
    that step again: the damaged one was set aside (`*.damaged`), so the one kept is the step the
    resumed run saved, and the run resumes from it."""
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    *_, older, newest = sorted((run / "checkpoints").glob("*.pt"))
    damaged_step, resumed_step = (int(path.stem.split("-")[1]) for path in (newest, older))
    assert damaged_step - resumed_step >= 2
    with open(newest, "r+b") as handle:
        handle.truncate(newest.stat().st_size // 2)
    stop = resumed_step + 1
    result = run_flsl(
        "resume",
        run,
        "--set",
        "checkpoint.keep_last=1",
        "--set",
        "checkpoint.every_steps=1",
        "--set",
        f"optim.max_steps={stop}",
    )
    assert result.returncode == 0, result.stderr
    assert f"set the damaged {newest.name} aside as {newest.name}.damaged" in " ".join(result.stderr.split())
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == sorted(
        [f"{newest.name}.damaged", f"{newest.stem}.json.damaged", f"step-{stop:08d}.json", f"step-{stop:08d}.pt"]
    )
    again = run_flsl("resume", run, "--set", "optim.max_steps=null")
    assert again.returncode == 0, again.stderr
    assert f"(step {stop})" in " ".join(again.stderr.split())


def test_resume_names_a_skipped_damaged_checkpoint_once(finished_run, tmp_path):
    """A damaged newest checkpoint: resume continues from the previous one and says once which
    file it skipped and why."""
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    newest = sorted((run / "checkpoints").glob("*.pt"))[-1]
    with open(newest, "r+b") as handle:
        handle.truncate(newest.stat().st_size // 2)
    result = run_flsl("resume", run)
    assert result.returncode == 0, result.stderr
    assert " ".join(result.stderr.split()).count(f"skipping damaged checkpoint {newest.name}") == 1


# Recipes `flsl pretrain` refuses before it trains: (a description, --set values given the demo
# data's train split as DATA, the words of the refusal).
REFUSED = [
    ("missing local data", ["data.train=DATA/../nowhere"], "data.train does not exist"),
    ("missing k-NN split", ["eval.at_end=true", "eval.knn.val=DATA/../nowhere"], "eval.knn.val does not exist"),
    ("missing DAVIS folder", ["eval.davis={davis: DATA/../nodavis}"], "nodavis"),
    ("batch larger than the data", ["optim.global_batch_size=256"], "too few samples"),
    ("views on a GPU this machine lacks", ["augment.device=cuda"], "augment.device: cuda"),
]


@pytest.mark.parametrize("overrides,words", [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_validate_refuses_what_pretrain_refuses(demo_data, tmp_path, overrides, words):
    """`flsl recipe validate` runs every check `flsl pretrain` runs before training: on each of
    these recipes both exit 2 with the same error message, and pretrain writes no run dir."""
    values = [value.replace("DATA", str(demo_data / "train")) for value in overrides]
    sets = [word for value in [*tiny_overrides(demo_data / "train")[1::2], *values] for word in ("--set", value)]
    validated = run_flsl("recipe", "validate", "recipes/demo.yaml", *sets)
    trained = run_flsl("pretrain", "recipes/demo.yaml", *sets, "--run-dir", tmp_path / "run")
    fails(validated, words)
    fails(trained, words)
    error = validated.stderr[validated.stderr.index("error:") :]
    assert trained.stderr[trained.stderr.index("error:") :] == error
    assert not (tmp_path / "run").exists()


def test_validate_warns_about_remote_data_it_cannot_read(tmp_path):
    """A remote data.train that cannot be read from here is a warning that says so (exit 0), while
    `flsl pretrain` refuses it."""
    server = http_server(tmp_path).start()
    try:
        url = f"http://127.0.0.1:{server.port}/nowhere/train-{{0..3}}.tar"
        validated = run_flsl("recipe", "validate", "recipes/demo.yaml", "--set", f"data.train={url}")
        trained = run_flsl("pretrain", "recipes/demo.yaml", "--set", f"data.train={url}", "--run-dir", tmp_path / "r")
    finally:
        server.kill()
    assert validated.returncode == 0, validated.stderr
    flat = " ".join(validated.stderr.split())
    assert "warning: data.train could not be read from this machine, so it was not checked" in flat
    assert "ok:" in validated.stdout
    fails(trained, "data.train")
