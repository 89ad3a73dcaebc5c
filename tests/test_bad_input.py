"""Every bad input gets a clear answer: exit code 2, a message that names the key or path at
fault, no Python traceback, and nothing written (no run dir, no output file).

The malformed recipes run in-process through `flsl recipe validate` and `flsl pretrain` (the
same code as the command line, without a second of imports per case); a handful of cases, and
every case the project once got wrong, also run as real subprocesses.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run_flsl, tiny_overrides
from typer.testing import CliRunner

from flsl_cli.cli.app import app
from flsl_cli.config.load import load_recipe, recipe_to_yaml

TINY = {
    "model": {
        "arch": "vit_tiny",
        "patch_size": 8,
        "depth": 2,
        "drop_path": 0.1,
        "head_out_dim": 64,
        "head_hidden_dim": 64,
        "head_bottleneck_dim": 32,
    },
    "data": {"train": "/nonexistent-flsl-data/train", "num_workers": 0, "shuffle_buffer": 16},
    "augment": {"global_size": 32, "local_size": 16},
    "loss": {"query_window_global": 2, "query_window_local": 2},
    "optim": {"global_batch_size": 8, "epochs": 2, "warmup_epochs": 1, "max_steps": 1},
    "checkpoint": {"every_minutes": None, "every_steps": 5},
    "logging": {"every_steps": 1},
}
INF, NAN = float("inf"), float("nan")
HUGE_MODEL = {
    "model": {
        "arch": "vit_large",
        "depth": 48,
        "patch_size": 8,
        "head_out_dim": 131072,
        "head_hidden_dim": 16384,
        "head_bottleneck_dim": 4096,
    },
    "augment": {"global_size": 1024, "local_size": 512},
    "optim": {"global_batch_size": 4096},
}


def _with(changes: dict) -> dict:
    """TINY with `changes` merged in, section by section (a None section removes it)."""
    recipe = {section: dict(values) for section, values in TINY.items()}
    for section, values in changes.items():
        if values is None:
            recipe.pop(section, None)
        elif isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section].update(values)
        else:
            recipe[section] = values
    return recipe


# (id, recipe as a dict of changes to TINY or as raw YAML text, words the message must hold)
RECIPES = [
    ("epochs-bool", {"optim": {"epochs": True}}, ["optim.epochs", "boolean"]),
    ("epochs-huge", {"optim": {"epochs": 10**15}}, ["optim.epochs", "10000"]),
    ("epochs-fraction", {"optim": {"epochs": 2.5}}, ["optim.epochs", "2.5"]),
    ("epochs-text", {"optim": {"epochs": "ten"}}, ["optim.epochs", "'ten'"]),
    ("epochs-zero", {"optim": {"epochs": 0}}, ["optim.epochs", "default 300"]),
    ("batch-huge", {"optim": {"global_batch_size": 10**9}}, ["optim.global_batch_size", "65536"]),
    ("batch-bool", {"optim": {"global_batch_size": False}}, ["optim.global_batch_size", "boolean"]),
    ("lr-negative", {"optim": {"base_lr": -1}}, ["optim.base_lr", "greater than 0"]),
    ("lr-nan", {"optim": {"base_lr": NAN}}, ["optim.base_lr", "finite"]),
    ("lr-bool", {"optim": {"base_lr": True}}, ["optim.base_lr", "boolean"]),
    ("min-lr-above-peak", {"optim": {"min_lr": 1.0, "base_lr": 0.1}}, ["optim.min_lr"]),
    ("warmup-past-end", {"optim": {"warmup_epochs": 5}}, ["optim.warmup_epochs"]),
    ("betas-out-of-range", {"optim": {"betas": [0.9, 1.5]}}, ["optim.betas"]),
    ("betas-inf", {"optim": {"betas": [0.9, INF]}}, ["optim.betas", "finite"]),
    ("momentum-above-one", {"optim": {"momentum_teacher": 2}}, ["optim.momentum_teacher"]),
    ("precision-unknown", {"optim": {"precision": "fp8"}}, ["optim.precision", "'fp8'"]),
    ("seed-negative", {"optim": {"seed": -1}}, ["optim.seed"]),
    ("seed-huge", {"optim": {"seed": 10**20}}, ["optim.seed"]),
    ("max-steps-zero", {"optim": {"max_steps": 0}}, ["optim.max_steps"]),
    ("teacher-temp-inf", {"loss": {"teacher_temp": INF}}, ["loss.teacher_temp", "finite"]),
    ("teacher-temp-zero", {"loss": {"teacher_temp": 0}}, ["loss.teacher_temp"]),
    ("student-temp-negative", {"loss": {"student_temp": -0.1}}, ["loss.student_temp"]),
    ("warmup-temp-nan", {"loss": {"warmup_teacher_temp": NAN}}, ["loss.warmup_teacher_temp", "finite"]),
    ("gamma-inf", {"loss": {"gamma": INF}}, ["loss.gamma", "finite"]),
    ("query-window-too-big", {"loss": {"query_window_global": 100}}, ["loss.query_window_global"]),
    ("head-out-dim-huge", {"model": {"head_out_dim": 10**10}}, ["model.head_out_dim", "131072"]),
    ("head-out-dim-one", {"model": {"head_out_dim": 1}}, ["model.head_out_dim"]),
    ("arch-unknown", {"model": {"arch": "vit_huge"}}, ["model.arch", "'vit_huge'"]),
    ("patch-size-odd", {"model": {"patch_size": 15}}, ["model.patch_size"]),
    ("patch-size-bool", {"model": {"patch_size": True}}, ["model.patch_size", "boolean"]),
    ("depth-zero", {"model": {"depth": 0}}, ["model.depth"]),
    ("drop-path-one", {"model": {"drop_path": 1.0}}, ["model.drop_path"]),
    ("model-key-misspelt", {"model": {"archh": "vit_tiny"}}, ["model.archh", "did you mean model.arch?"]),
    ("head-hidden-huge", {"model": {"head_hidden_dim": 10**6}}, ["model.head_hidden_dim"]),
    ("demo-images-huge", {"data": {"demo": {"images": 10**12}}}, ["data.demo.images", "1000000"]),
    ("demo-images-few", {"data": {"demo": {"images": 5}}}, ["data.demo.images"]),
    ("workers-negative", {"data": {"num_workers": -1}}, ["data.num_workers"]),
    ("workers-huge", {"data": {"num_workers": 1000}}, ["data.num_workers"]),
    ("shuffle-buffer-huge", {"data": {"shuffle_buffer": 10**9}}, ["data.shuffle_buffer"]),
    ("bad-fraction-above-one", {"data": {"max_bad_fraction": 2}}, ["data.max_bad_fraction"]),
    ("data-train-missing", "data: {num_workers: 0}\n", ["data.train", "missing"]),
    ("data-not-a-section", {"data": 3}, ["data", "section"]),
    ("local-larger-than-global", {"augment": {"local_size": 64}}, ["augment.local_size"]),
    ("global-not-patch-multiple", {"augment": {"global_size": 36}}, ["augment.global_size", "patch_size"]),
    ("scale-reversed", {"augment": {"teacher_scale": [0.9, 0.5]}}, ["augment.teacher_scale"]),
    ("local-crops-many", {"augment": {"local_crops": 100}}, ["augment.local_crops"]),
    ("keep-last-zero", {"checkpoint": {"keep_last": 0}}, ["checkpoint.keep_last"]),
    ("every-minutes-negative", {"checkpoint": {"every_minutes": -5}}, ["checkpoint.every_minutes"]),
    ("log-every-zero", {"logging": {"every_steps": 0}}, ["logging.every_steps"]),
    ("eval-without-knn", {"eval": {"every_epochs": 1}}, ["eval.knn"]),
    ("knn-k-zero", {"eval": {"knn": {"train": "a", "val": "b", "k": [0]}}}, ["eval.knn.k"]),
    ("slurm-time-words", {"slurm": {"time": "forever"}}, ["slurm.time", "'forever'"]),
    ("slurm-nodes-zero", {"slurm": {"nodes": 0}}, ["slurm.nodes"]),
    ("section-misspelt", {"optimm": {}}, ["optimm", "did you mean optim?"]),
    ("needs-more-memory-than-any-machine", HUGE_MODEL, ["model.", "GB"]),
    (
        "batch-beyond-memory",
        {
            "model": {"arch": "vit_large", "patch_size": 8},
            "augment": {"global_size": 512, "local_size": 256},
            "optim": {"global_batch_size": 65536},
        },
        ["optim.global_batch_size", "GB", "at most"],
    ),
    ("duplicate-key", "data: {train: x}\noptim:\n  epochs: 1\n  epochs: 2\n", ["optim.epochs", "lines 3 and 4"]),
    ("duplicate-section", "optim: {epochs: 1}\ndata: {train: x}\noptim: {epochs: 2}\n", ["optim", "lines 1 and 3"]),
    ("yaml-syntax", "model: [unclosed\n", ["not valid YAML", "(line 2, column 1)"]),
    ("top-level-list", "- just\n- a list\n", ["mapping of sections"]),
    ("empty-file", "", ["data", "missing"]),
    ("alias-inside-itself", "data: {train: x}\nslurm: {setup: &a [x, *a]}\n", ["slurm.setup.1", "alias"]),
    (
        "alias-bomb",
        "data: {train: x}\na: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
        + "".join(f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdef", "bcdefg")),
        ["100000", "aliases"],
    ),
    ("data-train-empty", {"data": {"train": ""}}, ["data.train", "non-empty"]),
    ("sbatch-option-list", {"slurm": {"extra_sbatch": {"gres": [1]}}}, ["slurm.extra_sbatch.gres", "string or"]),
]


def _recipe_text(recipe: dict | str) -> str:
    return recipe if isinstance(recipe, str) else yaml.safe_dump(_with(recipe), sort_keys=False)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _invoke(*args) -> tuple[int, str, str]:
    """`flsl ARGS` in this process; an exception that escaped the CLI counts as a traceback."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    stderr = result.stderr + (f"\nTraceback: {result.exception!r}" if escaped else "")
    return result.exit_code, result.stdout, stderr


def _refused(code: int, out: str, err: str, needles: list[str]) -> None:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out and "Traceback" not in err, err
    flat = " ".join(err.split())  # usage errors are boxed and wrapped by click/rich
    for needle in needles:
        assert needle in err or needle in flat, (needle, err)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty working directory: a default run dir (runs/...) or output file would land here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name,recipe,needles", RECIPES, ids=[case[0] for case in RECIPES])
def test_malformed_recipe(name, recipe, needles, workdir):
    """`flsl recipe validate` and `flsl pretrain` refuse the recipe with the key named and the
    re-check command, and nothing is written."""
    path = workdir / "r.yaml"
    path.write_text(_recipe_text(recipe))
    before = _tree(workdir)
    code, out, err = _invoke("recipe", "validate", path)
    _refused(code, out, err, needles)
    if "problem" in err:  # recipe problems end with the command that checks again
        assert err.strip().splitlines()[-1].startswith(f"Check it again with: flsl recipe validate {path}")
    code, out, err = _invoke("pretrain", path, "--run-dir", workdir / "run")
    _refused(code, out, err, needles)
    assert _tree(workdir) == before


def test_at_least_forty_malformed_recipes():
    assert len(RECIPES) >= 40 and len({case[0] for case in RECIPES}) == len(RECIPES)


# --- Misused commands ---------------------------------------------------------------------------


class _Evil:
    """A pickle that would run a command when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def files(workdir, demo_data) -> dict[str, str]:
    """Wrong inputs of every kind, and a tiny recipe on the demo data."""
    from safetensors.torch import save_file

    w = workdir
    (w / "text.pt").write_text("hello, this is not a checkpoint\n")
    (w / "empty.pt").write_bytes(b"")
    (w / "random.bin").write_bytes(bytes(range(7, 256)) * 12)
    torch.save({"weights": torch.zeros(4096)}, w / "whole.pt")
    data = (w / "whole.pt").read_bytes()
    (w / "truncated.pt").write_bytes(data[: len(data) // 2])
    (w / "whole.pt").unlink()
    (w / "evil.pt").write_bytes(pickle.dumps({"format": "flsl-checkpoint/1", "x": _Evil(w / "pwned")}))
    save_file({"w": torch.zeros(3)}, str(w / "model.safetensors"))
    (w / "step-00000005.json").write_text('{"format": "flsl-checkpoint/1", "step": 5}')
    (w / "binary.yaml").write_bytes(b"\x80\x81\xfe\xff" * 50)
    (w / "tiny.yaml").write_text(yaml.safe_dump(_with({"data": {"train": str(demo_data / "train")}})))
    (w / "foreign").mkdir()
    (w / "foreign" / "thesis.tex").write_text("precious")
    (w / "emptydir").mkdir()
    (w / "nonempty").mkdir()
    (w / "nonempty" / "keep.txt").write_text("keep")
    # a run (tiny recipe) whose only checkpoint is damaged, and another run with no checkpoint
    run = w / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe_to_yaml(load_recipe(w / "tiny.yaml")))
    (run / "run.json").write_text('{"status": "stopped"}')
    (run / "checkpoints" / "step-00000005.pt").write_text("cut short")
    (run / "checkpoints" / "step-00000005.json").write_text(
        '{"format": "flsl-checkpoint/1", "step": 5, "file": "step-00000005.pt", "bytes": 999, "sha256": "0"}'
    )
    other = w / "other"
    other.mkdir()
    (other / "recipe.yaml").write_text("data: {train: elsewhere}\n")
    (other / "run.json").write_text('{"status": "created"}')
    return {"w": str(w), "data": str(demo_data / "train"), "recipe": str(w / "tiny.yaml"), "run": str(run)}


KNN = ["--train", "{data}", "--val", "{data}"]

# (id, arguments with {w} (the working dir), {data}, {recipe} and {run} filled in (so a literal brace
# is written twice), words the message must hold)
COMMANDS = [
    ("pretrain-recipe-missing", ["pretrain", "{w}/nope.yaml", "--run-dir", "{w}/new"], ["nope.yaml", "does not exist"]),
    ("pretrain-recipe-is-dir", ["pretrain", "{w}/emptydir", "--run-dir", "{w}/new"], ["emptydir", "directory"]),
    ("pretrain-recipe-binary", ["pretrain", "{w}/binary.yaml", "--run-dir", "{w}/new"], ["binary.yaml", "UTF-8"]),
    (
        "pretrain-set-without-value",
        ["pretrain", "{recipe}", "--set", "optim.epochs", "--run-dir", "{w}/new"],
        ["optim.epochs", "KEY=VALUE"],
    ),
    ("pretrain-set-without-key", ["pretrain", "{recipe}", "--set", "=3", "--run-dir", "{w}/new"], ["KEY=VALUE"]),
    (
        "pretrain-set-empty-key-part",
        ["pretrain", "{recipe}", "--set", "optim..epochs=3", "--run-dir", "{w}/new"],
        ["optim..epochs", "dotted KEY"],
    ),
    (
        "pretrain-set-below-a-value",
        ["pretrain", "{recipe}", "--set", "optim.epochs.x=1", "--run-dir", "{w}/new"],
        ["optim.epochs", "not a section"],
    ),
    (
        "pretrain-set-bool-epochs",
        ["pretrain", "{recipe}", "--set", "optim.epochs=true", "--run-dir", "{w}/new"],
        ["optim.epochs", "boolean"],
    ),
    (
        "pretrain-set-duplicate-key",
        ["pretrain", "{recipe}", "--set", "model={{arch: vit_tiny, arch: vit_small}}", "--run-dir", "{w}/new"],
        ["model.arch", "twice"],
    ),
    (
        "pretrain-set-head-huge",
        ["pretrain", "{recipe}", "--set", "model.head_out_dim=10000000000", "--run-dir", "{w}/new"],
        ["model.head_out_dim"],
    ),
    ("pretrain-devices-zero", ["pretrain", "{recipe}", "--devices", "0", "--run-dir", "{w}/new"], ["--devices"]),
    ("pretrain-run-dir-is-file", ["pretrain", "{recipe}", "--run-dir", "{w}/text.pt"], ["text.pt", "is a file"]),
    (
        "pretrain-run-dir-below-a-file",
        ["pretrain", "{recipe}", "--run-dir", "{w}/text.pt/run"],
        ["text.pt/run", "cannot create the run directory"],
    ),
    (
        "pretrain-run-dir-foreign",
        ["pretrain", "{recipe}", "--run-dir", "{w}/foreign", "--force"],
        ["foreign", "does not hold a flsl run"],
    ),
    ("pretrain-run-dir-other-run", ["pretrain", "{recipe}", "--run-dir", "{w}/other"], ["other", "--force"]),
    (
        "pretrain-data-missing",
        ["pretrain", "{recipe}", "--set", "data.train={w}/nowhere", "--run-dir", "{w}/new"],
        ["data.train", "nowhere"],
    ),
    (
        "pretrain-data-empty",
        ["pretrain", "{recipe}", "--set", "data.train={w}/emptydir", "--run-dir", "{w}/new"],
        ["emptydir", "no .tar shards"],
    ),
    (
        "pretrain-batch-vs-devices",
        ["pretrain", "{recipe}", "--set", "optim.global_batch_size=8", "--devices", "3", "--run-dir", "{w}/new"],
        ["optim.global_batch_size", "processes (3)"],
    ),
    ("pretrain-devices-with-slurm", ["pretrain", "{recipe}", "--nodes", "2", "--devices", "2"], ["--devices"]),
    (
        "pretrain-slurm-bad-time",
        ["pretrain", "{recipe}", "--nodes", "1", "--time", "forever", "--dry-run"],
        ["forever"],
    ),
    ("resume-missing", ["resume", "{w}/nowhere"], ["nowhere", "does not exist"]),
    ("resume-file", ["resume", "{w}/text.pt"], ["text.pt", "is a file, not a run directory"]),
    ("resume-recipe-of-run", ["resume", "{run}/recipe.yaml"], ["is a file", "holds it: {run}"]),
    ("resume-empty-dir", ["resume", "{w}/emptydir"], ["emptydir", "not a flsl run directory"]),
    (
        "resume-shape-change",
        ["resume", "{run}", "--set", "model.arch=vit_small"],
        ["model.arch", "cannot change on resume"],
    ),
    ("resume-bool-epochs", ["resume", "{run}", "--set", "optim.epochs=true"], ["optim.epochs", "boolean"]),
    ("resume-unknown-key", ["resume", "{run}", "--set", "optim.lr=1"], ["optim.lr", "unknown key"]),
    ("resume-damaged-only", ["resume", "{run}"], ["no usable checkpoint", "step-00000005.pt"]),
    ("resume-devices-zero", ["resume", "{run}", "--devices", "0"], ["--devices"]),
    ("status-missing", ["status", "{w}/nowhere"], ["nowhere", "does not exist"]),
    ("status-file", ["status", "{w}/text.pt"], ["text.pt"]),
    ("status-empty-dir", ["status", "{w}/emptydir"], ["emptydir", "not a flsl run directory"]),
    ("export-text", ["export", "{w}/text.pt", "--out", "{w}/out.safetensors"], ["text.pt", "text file"]),
    ("export-empty", ["export", "{w}/empty.pt", "--out", "{w}/out.safetensors"], ["empty.pt", "empty"]),
    ("export-random", ["export", "{w}/random.bin", "--out", "{w}/out.safetensors"], ["random.bin", "not a checkpoint"]),
    ("export-truncated", ["export", "{w}/truncated.pt", "--out", "{w}/out.safetensors"], ["truncated.pt", "truncated"]),
    ("export-pickled-code", ["export", "{w}/evil.pt", "--out", "{w}/out.safetensors"], ["evil.pt", "refused to load"]),
    (
        "export-safetensors",
        ["export", "{w}/model.safetensors", "--out", "{w}/out.safetensors"],
        ["model.safetensors", "safetensors file"],
    ),
    ("export-manifest", ["export", "{w}/step-00000005.json", "--out", "{w}/out.safetensors"], ["manifest"]),
    ("export-missing", ["export", "{w}/nope.pt", "--out", "{w}/out.safetensors"], ["nope.pt", "does not exist"]),
    ("export-format-unknown", ["export", "{w}/text.pt", "--format", "keras", "--out", "{w}/o"], ["--format"]),
    ("export-no-out", ["export", "{w}/text.pt"], ["--out"]),
    (
        "export-run-without-checkpoint",
        ["export", "{w}/other", "--out", "{w}/out.safetensors"],
        ["other", "no complete checkpoint"],
    ),
    ("knn-text-checkpoint", ["knn-eval", "{w}/text.pt", *KNN], ["text.pt", "text file"]),
    ("knn-k-words", ["knn-eval", "{w}/text.pt", *KNN, "--k", "a,b"], ["--k"]),
    ("knn-k-empty", ["knn-eval", "{w}/text.pt", *KNN, "--k", ""], ["--k"]),
    ("knn-temperature-zero", ["knn-eval", "{w}/text.pt", *KNN, "--temperature", "0"], ["--temperature"]),
    (
        "knn-resize-below-crop",
        ["knn-eval", "{w}/text.pt", *KNN, "--resize", "100", "--crop", "224"],
        ["--resize", "crop (224)"],
    ),
    ("knn-mode-unknown", ["knn-eval", "{w}/text.pt", *KNN, "--mode", "patch"], ["--mode"]),
    ("knn-workers-negative", ["knn-eval", "{w}/text.pt", *KNN, "--workers", "-1"], ["--workers"]),
    ("knn-no-train", ["knn-eval", "{w}/text.pt", "--val", "{data}"], ["--train"]),
    ("knn-missing-checkpoint", ["knn-eval", "{w}/nope.pt", *KNN], ["nope.pt"]),
    ("demo-images-huge", ["data", "demo", "{w}/demo", "--images", "1000000000000"], ["--images"]),
    ("demo-images-few", ["data", "demo", "{w}/demo", "--images", "5"], ["--images"]),
    ("demo-out-is-file", ["data", "demo", "{w}/text.pt", "--images", "20"], ["text.pt", "not a directory"]),
    ("demo-out-not-empty", ["data", "demo", "{w}/nonempty", "--images", "20"], ["nonempty", "not empty"]),
    ("demo-image-size-huge", ["data", "demo", "{w}/demo", "--image-size", "5000"], ["--image-size"]),
    ("shards-src-missing", ["data", "shards", "{w}/nowhere", "{w}/shards"], ["nowhere"]),
    ("recipe-show-missing", ["recipe", "show", "{w}/nope.yaml"], ["nope.yaml", "does not exist"]),
    ("recipe-show-bad-set", ["recipe", "show", "{recipe}", "--set", "optim.epochs=true"], ["optim.epochs"]),
    ("recipe-validate-devices-zero", ["recipe", "validate", "{recipe}", "--devices", "0"], ["--devices"]),
    ("recipe-validate-dir", ["recipe", "validate", "{w}/emptydir"], ["emptydir", "directory"]),
]


@pytest.mark.parametrize("name,args,needles", COMMANDS, ids=[case[0] for case in COMMANDS])
def test_misused_command(name, args, needles, files):
    """The command is refused with the path or option named, and writes nothing (no run dir,
    no output, no code from a pickle run)."""
    w = Path(files["w"])
    before = _tree(w)
    code, out, err = _invoke(*[a.format(**files) for a in args])
    _refused(code, out, err, [n.format(**files) for n in needles])
    assert _tree(w) == before


def test_at_least_forty_misused_commands():
    assert len(COMMANDS) >= 40 and len({case[0] for case in COMMANDS}) == len(COMMANDS)


def test_missing_onnx_extra_names_it_with_brackets(files, monkeypatch):
    """The install line keeps its brackets (`flsl[onnx]`): messages are not read as markup."""
    from flsl_cli.export import onnx_format

    monkeypatch.setattr(onnx_format, "_NEEDED", ("onnx", "flsl_no_such_module"))
    code, out, err = _invoke("export", f"{files['w']}/text.pt", "--format", "onnx", "--out", f"{files['w']}/m.onnx")
    _refused(code, out, err, ["pip install 'flsl[onnx]'"])


def test_run_that_fails_before_its_first_step_leaves_no_run_dir(files, monkeypatch):
    """Running out of memory while the networks are built: a clear error, and the run dir the
    command created is gone again."""
    import flsl_cli.launch.here as here

    def no_memory(**_):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(here, "train_process", no_memory)
    run = Path(files["w"]) / "new"
    code, out, err = _invoke("pretrain", files["recipe"], "--run-dir", run)
    _refused(code, out, err, ["ran out of memory", "optim.global_batch_size"])
    assert not run.exists()


# --- The same, as a user runs them: real subprocesses -------------------------------------------


def test_cases_from_the_issue_as_subprocesses(demo_data, tmp_path):
    """The inputs that once gave tracebacks or passed silently, run as `flsl` processes."""
    run = tmp_path / "run"
    dup = tmp_path / "dup.yaml"
    dup.write_text("data: {train: x}\noptim:\n  epochs: 1\n  epochs: 2\n")
    cases = [
        (
            [
                "pretrain",
                "recipes/demo.yaml",
                *tiny_overrides(demo_data / "train"),
                "--set",
                "model.head_out_dim=10000000000",
                "--run-dir",
                run,
            ],
            ["model.head_out_dim"],
        ),
        (
            [
                "pretrain",
                "recipes/demo.yaml",
                "--set",
                f"data.train={tmp_path}/demo/train",
                "--set",
                "data.demo.images=1000000000000",
                "--run-dir",
                run,
            ],
            ["data.demo.images"],
        ),
        (["recipe", "validate", "recipes/demo.yaml", "--set", "optim.epochs=true"], ["optim.epochs", "boolean"]),
        (["recipe", "validate", "recipes/demo.yaml", "--set", "loss.teacher_temp=.inf"], ["loss.teacher_temp"]),
        (
            ["recipe", "validate", "recipes/demo.yaml", "--set", "optim.global_batch_size=1000000000"],
            ["optim.global_batch_size"],
        ),
        (["recipe", "validate", dup], ["optim.epochs", "lines 3 and 4"]),
        (["resume", dup], ["dup.yaml", "is a file"]),
    ]
    for args, needles in cases:
        result = run_flsl(*args, cwd=REPO)
        _refused(result.returncode, result.stdout, result.stderr, needles)
        assert not run.exists() and not (tmp_path / "demo").exists()


def test_more_data_workers_than_cpus_is_said_once_in_flsl_words(demo_data, tmp_path):
    """More data workers than CPUs: one flsl note naming data.num_workers, not torch's
    UserWarning once per loader."""
    workers = len(os.sched_getaffinity(0)) + 1
    result = run_flsl(
        "pretrain",
        "recipes/demo.yaml",
        *tiny_overrides(demo_data / "train", optim__max_steps=1, data__num_workers=workers),
        "--run-dir",
        tmp_path / "run",
    )
    assert result.returncode == 0, result.stderr
    assert "UserWarning" not in result.stderr
    assert " ".join(result.stderr.split()).count(f"data.num_workers is {workers}") == 1


def test_knn_eval_default_workers_fit_the_cpus():
    """knn-eval's default loader workers never exceed the CPUs each process has (at least one)."""
    from flsl_cli.distributed.env import usable_cpus
    from flsl_cli.eval.api import default_workers

    assert 1 <= default_workers(1) <= max(1, min(4, usable_cpus()))
    assert default_workers(usable_cpus() * 2) == 1
