"""Recipe validation: every bad value is caught before any work, with the key and a remedy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO

from flsl_cli.config.load import load_recipe
from flsl_cli.errors import RecipeError

SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _problems(tmp_path, data, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, data), overrides=list(overrides))
    return info.value.problems


def test_shipped_recipes_are_valid():
    """Every recipe in recipes/ validates."""
    assert {p.name for p in SHIPPED} >= {"demo.yaml", "vits16_300ep.yaml", "vits8_300ep.yaml", "vitb16_300ep.yaml"}
    for path in SHIPPED:
        load_recipe(path)


@pytest.mark.parametrize(
    "name,arch,patch",
    [
        ("vits16_300ep.yaml", "vit_small", 16),
        ("vits8_300ep.yaml", "vit_small", 8),
        ("vitb16_300ep.yaml", "vit_base", 16),
    ],
)
def test_paper_recipes_hold_the_paper_settings(name, arch, patch):
    """The paper recipes carry FLSL-method.md's defaults (batch 512, 300 epochs, coefficients, K)."""
    r = load_recipe(REPO / "recipes" / name)
    assert (r.model.arch, r.model.patch_size) == (arch, patch)
    assert r.optim.global_batch_size == 512 and r.optim.epochs == 300
    assert (r.loss.upsilon, r.loss.eta, r.loss.gamma) == (0.03, 1.0, 5.0)
    assert r.model.head_out_dim == 4096 and r.model.drop_path == 0.1
    assert (r.augment.global_size, r.augment.local_size, r.augment.local_crops) == (224, 96, 2)
    assert r.optim.base_lr == 5e-4 and r.optim.warmup_epochs == 10 and r.optim.clip_grad == 3.0
    assert (r.loss.teacher_temp, r.loss.warmup_teacher_temp, r.loss.warmup_teacher_temp_epochs) == (0.07, 0.04, 30)
    if arch == "vit_small":
        assert r.beta_sa() == pytest.approx(0.0051, abs=1e-4) and r.beta_ca() == pytest.approx(0.0102, abs=1e-4)


def test_unknown_key_suggests_the_right_one(tmp_path):
    problems = _problems(tmp_path, {"data": {"train": "x"}, "optim": {"epoch": 3}})
    assert any("optim.epoch" in p and "did you mean optim.epochs?" in p for p in problems)


def test_unknown_section_suggests_the_right_one(tmp_path):
    problems = _problems(tmp_path, {"data": {"train": "x"}, "optimm": {}})
    assert any("optimm" in p and "did you mean optim?" in p for p in problems)


def test_wrong_type_names_key_expected_and_found(tmp_path):
    problems = _problems(tmp_path, {"data": {"train": "x"}, "optim": {"epochs": "ten"}})
    assert any(p.startswith("optim.epochs: expected") and "'ten'" in p for p in problems)


def test_negative_learning_rate(tmp_path):
    problems = _problems(tmp_path, {"data": {"train": "x"}}, overrides=["optim.base_lr=-0.001"])
    assert any(p.startswith("optim.base_lr") and "greater than 0" in p and "-0.001" in p for p in problems)


def test_local_crop_larger_than_global(tmp_path):
    problems = _problems(tmp_path, {"data": {"train": "x"}, "augment": {"local_size": 256}})
    assert any(p.startswith("augment.local_size: expected at most global_size (224), found 256") for p in problems)


def test_every_problem_is_reported_at_once(tmp_path):
    problems = _problems(
        tmp_path, {"data": {"train": "x", "num_workers": -1}, "model": {"arch": "vit_huge"}, "optim": {"base_lr": -1}}
    )
    assert len(problems) == 3


def test_missing_data_section(tmp_path):
    problems = _problems(tmp_path, {"model": {"arch": "vit_small"}})
    assert any(p.startswith("data: required key is missing") for p in problems)


def test_set_overrides_are_typed(tmp_path):
    """--set values are parsed as YAML: numbers are numbers, null is None."""
    path = _write(tmp_path, {"data": {"train": "x"}})
    r = load_recipe(path, overrides=["optim.epochs=10", "model.arch=vit_tiny", "checkpoint.every_steps=null"])
    assert r.optim.epochs == 10 and r.model.arch == "vit_tiny" and r.checkpoint.every_steps is None


def test_batch_not_divisible_by_processes(tmp_path, flsl):
    """`flsl recipe validate --devices 3` refuses a global batch of 512."""
    result = flsl("recipe", "validate", REPO / "recipes" / "vits16_300ep.yaml", "--devices", "3")
    assert result.returncode != 0
    assert "optim.global_batch_size" in result.stderr and "multiple of the number of processes (3)" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_validate_and_show(tmp_path, flsl):
    """validate exits 0 on a good recipe, non-zero listing every problem on a bad one; show prints
    the resolved recipe with defaults filled in."""
    good = flsl("recipe", "validate", REPO / "recipes" / "demo.yaml")
    assert good.returncode == 0, good.stderr
    bad = _write(tmp_path, {"data": {"train": "x"}, "model": {"archh": "vit_tiny"}, "optim": {"base_lr": -1}})
    result = flsl("recipe", "validate", bad)
    assert result.returncode == 2
    assert "model.archh: unknown key; did you mean model.arch?" in result.stderr
    assert "optim.base_lr" in result.stderr and str(bad) in result.stderr
    assert "Traceback" not in result.stderr
    shown = flsl("recipe", "show", REPO / "recipes" / "vits16_300ep.yaml", "--set", "optim.epochs=10")
    resolved = yaml.safe_load(shown.stdout)
    assert resolved["optim"]["epochs"] == 10 and resolved["loss"]["gamma"] == 5.0


@pytest.mark.parametrize(
    "content,needle",
    [
        ("model: [unclosed", "not valid YAML (line 1"),
        ("- just\n- a list\n", "expected a mapping of sections"),
    ],
)
def test_recipe_not_yaml(tmp_path, flsl, content, needle):
    result = flsl("recipe", "validate", _write(tmp_path, content))
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr


def test_recipe_missing(tmp_path, flsl):
    result = flsl("pretrain", tmp_path / "nope.yaml", "--run-dir", tmp_path / "run")
    assert result.returncode == 2 and "the recipe file does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
