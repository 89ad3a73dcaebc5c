"""`flsl export`: timm, ONNX, mmdet/mmseg and detectron2 files that load as-is and reproduce the
backbone's features, written only after that check passed, never over a file without --force,
and never from a checkpoint that carries code."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_flsl
from torch import nn

from flsl_cli.export import ExportError, framework_format, keymaps, timm_format
from flsl_cli.export.api import export_checkpoint
from flsl_cli.export.onnx_format import require_onnx
from flsl_cli.models.load import load_backbone

IMAGE_SIZE = 32  # augment.global_size of tiny_overrides
PATCH = 8
EMBED = 192
DEPTH = 2


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
    """The tiny trained run of conftest (vit_tiny, 2 blocks, patch 8, 32 px) with its checkpoint."""
    return tiny_run


@pytest.fixture(scope="module")
def source(run_dir):
    """The teacher backbone the exports must reproduce."""
    return load_backbone(run_dir).backbone


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))


def _leftovers(directory: Path) -> list[str]:
    return [entry.name for entry in directory.iterdir() if ".flsl-" in entry.name]


def _export(run_dir: Path, fmt: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    result = run_flsl("export", run_dir, "--format", fmt, "--out", out, *extra)
    assert result.returncode == 0, result.stderr
    assert re.search(r"max abs difference: \S+", result.stdout)
    return result


def test_export_help_does_not_import_torch():
    """`flsl export --help` lists the options and answers without importing torch."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from flsl_cli.cli.app import app\n"
        "result = CliRunner().invoke(app, ['export', '--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert all(o in result.output for o in ('--format', '--out', '--which', '--force')), result.output\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]


def test_timm_file_loads_with_the_printed_line(run_dir, source, tmp_path):
    """The line flsl prints loads the .safetensors in timm strictly, with features equal to the
    backbone's, and the verification found them equal too."""
    out = tmp_path / "backbone.safetensors"
    result = _export(run_dir, "timm", out)
    assert "max abs difference: 0 (timm file" in result.stdout
    lines = [
        line.strip() for line in result.stdout.splitlines() if line.strip().startswith("model = timm.create_model(")
    ]
    assert len(lines) == 1 and str(out) in lines[0]
    import timm

    namespace = {"timm": timm}
    exec(lines[0], namespace)  # exactly what the user pastes
    model = namespace["model"].eval()
    with torch.no_grad():
        assert torch.equal(model.forward_features(_images()), source.forward_features(_images()))
    assert model.cls_token is None and model.pos_embed.shape == (1, (IMAGE_SIZE // PATCH) ** 2, EMBED)
    assert _leftovers(tmp_path) == []


def test_timm_folder_loads_with_local_dir(run_dir, source, tmp_path):
    """The folder form (config.json + model.safetensors) loads with `local-dir:`, carries
    FLSL's normalization, and reproduces the features."""
    import timm
    from timm.data import resolve_data_config

    out = tmp_path / "vit-flsl"
    result = _export(run_dir, "timm", out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert f'timm.create_model("local-dir:{out}", pretrained=True)' in result.stdout
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model.forward_features(_images()), source.forward_features(_images()))
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["depth"] == DEPTH and config["flsl"]["which"] == "teacher"
    assert resolve_data_config({}, model=model)["mean"] == pytest.approx((0.485, 0.456, 0.406))


def test_onnx_matches_in_onnxruntime_with_any_batch(run_dir, source, tmp_path):
    """The ONNX graph maps images to patch tokens in onnxruntime, for batch sizes it was not
    traced with, within 1e-4 of the backbone."""
    import onnxruntime

    out = tmp_path / "backbone.onnx"
    _export(run_dir, "onnx", out)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["tokens"]
    for batch in (1, 5):
        images = _images(batch)
        tokens = session.run(["tokens"], {"images": images.numpy()})[0]
        with torch.no_grad():
            expected = source.forward_features(images).numpy()
        assert tokens.shape == (batch, (IMAGE_SIZE // PATCH) ** 2, EMBED)
        assert abs(tokens - expected).max() < 1e-4 * max(1.0, abs(expected).max())


@pytest.mark.parametrize("fmt,container", [("mmseg", "state_dict"), ("detectron2", "model")])
def test_framework_files_hold_the_documented_keys(run_dir, source, tmp_path, fmt, container):
    """mmseg and detectron2 files are plain tensors under the documented keys and shapes, with a
    zero class-token row in front of FLSL's position table; the check found them exact."""
    out = tmp_path / f"backbone-{fmt}.pth"
    result = export_checkpoint(run_dir, fmt=fmt, out=out)  # the CLI path is exercised in the --force test
    assert result.files == (out,) and [check.max_abs_diff for check in result.checks] == [0.0]
    state = torch.load(out, map_location="cpu", weights_only=True)[container]
    expected = keymaps.expected_shapes(
        framework=fmt, depth=DEPTH, embed_dim=EMBED, patch_size=PATCH, tokens=(IMAGE_SIZE // PATCH) ** 2
    )
    assert {key: tuple(value.shape) for key, value in state.items()} == expected
    prefix = "backbone.net." if fmt == "detectron2" else ""
    qkv = f"{prefix}blocks.1.attn.qkv.weight" if fmt == "detectron2" else "layers.1.attn.attn.in_proj_weight"
    assert torch.equal(state[qkv], source.state_dict()["blocks.1.attn.qkv.weight"])
    pos = state[f"{prefix}pos_embed"]
    assert pos.shape == (1, 17, EMBED) and not pos[:, 0].any()
    assert torch.equal(pos[:, 1:], source.pos_embed)
    if fmt == "mmseg":
        assert torch.equal(state["ln1.weight"], source.norm.weight) and not state["cls_token"].any()
    else:
        assert not any(key.endswith("net.norm.weight") for key in state)


def test_mmdet_file_is_the_mmseg_mapping(run_dir, tmp_path):
    """--format mmdet writes mmseg's VisionTransformer keys (the backbone mmdet configs borrow)."""
    result = export_checkpoint(run_dir, fmt="mmdet", out=tmp_path / "b.pth")
    assert result.checks[0].max_abs_diff == 0.0
    state = torch.load(tmp_path / "b.pth", map_location="cpu", weights_only=True)["state_dict"]
    assert set(state) == set(
        keymaps.expected_shapes(framework="mmseg", depth=DEPTH, embed_dim=EMBED, patch_size=PATCH, tokens=16)
    )
    assert 'type="mmseg.VisionTransformer"' in result.usage[0]


def test_docs_show_the_mapping_the_code_uses():
    """docs/export.md holds the mmseg and detectron2 tables exactly as keymaps defines them."""
    docs = (REPO / "docs" / "export.md").read_text()
    for framework in ("mmseg", "detectron2"):
        assert keymaps.markdown_table(framework) in docs, framework
    assert keymaps.RULES["mmdet"] is keymaps.RULES["mmseg"]


def _tiny_backbone():
    from flsl_cli.config.schema import ModelConfig
    from flsl_cli.models.vit import build_backbone

    torch.manual_seed(0)
    model = build_backbone(ModelConfig(arch="vit_tiny", patch_size=PATCH, depth=DEPTH), img_size=IMAGE_SIZE)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # no LayerNorm left at identity
    return model.eval()


@pytest.mark.parametrize("framework", ["mmseg", "detectron2"])
def test_keymaps_round_trip(framework):
    """Mapping to a framework and back returns every tensor unchanged (detectron2: all but the
    final norm), and a key the table does not know is an error, not a silent drop."""
    state = _tiny_backbone().state_dict()
    mapped = keymaps.to_framework(state, framework=framework)
    back = keymaps.to_timm(mapped, framework=framework)
    assert set(back) == set(state) - keymaps.dropped_keys(framework=framework)
    assert all(torch.equal(back[key], state[key]) for key in back)
    with pytest.raises(KeyError):
        keymaps.to_framework({**state, "blocks.0.ls1.gamma": torch.ones(EMBED)}, framework=framework)


class _MmsegLayer(nn.Module):
    """mmseg's TransformerEncoderLayer, built from the torch modules it wraps (mmcv's
    MultiheadAttention holds an nn.MultiheadAttention as `attn`; its FFN a Sequential)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = nn.Module()
        self.ffn.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU()), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn.attn(y, y, y, need_weights=False)[0]
        return x + self.ffn.layers(self.ln2(x))


class _MmsegViT(nn.Module):
    """mmseg's VisionTransformer forward with with_cls_token=False and final_norm=True."""

    def __init__(self, dim: int, depth: int, heads: int, patch: int, tokens: int) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.projection = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.layers = nn.ModuleList(_MmsegLayer(dim, heads) for _ in range(depth))
        self.ln1 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.projection(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = x[:, 1:]  # with_cls_token=False
        for layer in self.layers:
            x = layer(x)
        return self.ln1(x)


def test_mmseg_keys_mean_the_same_computation():
    """Loaded strictly into mmseg's module structure (torch's MultiheadAttention in_proj, the FFN
    Sequential, a class-token slot), the exported tensors compute the backbone's features."""
    backbone = _tiny_backbone()
    stand_in = _MmsegViT(EMBED, DEPTH, 3, PATCH, (IMAGE_SIZE // PATCH) ** 2).eval()
    stand_in.load_state_dict(keymaps.to_framework(backbone.state_dict(), framework="mmseg"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(stand_in(_images()), backbone.forward_features(_images()), atol=1e-5, rtol=1e-5)


def test_refuses_to_overwrite_without_force(run_dir, tmp_path):
    """An existing --out is left untouched without --force, and replaced with it."""
    out = tmp_path / "backbone.pth"
    out.write_bytes(b"keep me")
    result = run_flsl("export", run_dir, "--format", "detectron2", "--out", out)
    assert result.returncode == 2 and "already exists" in result.stderr and "--force" in result.stderr
    assert "Traceback" not in result.stderr and out.read_bytes() == b"keep me"
    _export(run_dir, "detectron2", out, "--force")
    assert "backbone.net.pos_embed" in torch.load(out, map_location="cpu", weights_only=True)["model"]
    assert _leftovers(tmp_path) == []


class _RunsCode:
    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    """A checkpoint that would run a command when unpickled is refused; the command never runs
    and nothing is written."""
    _RunsCode.marker = tmp_path / "pwned"
    evil = tmp_path / "step-00000001.pt"
    with open(evil, "wb") as handle:
        pickle.dump({"format": "flsl-checkpoint/1", "step": 1, "teacher": _RunsCode()}, handle)
    out = tmp_path / "backbone.safetensors"
    result = run_flsl("export", evil, "--format", "timm", "--out", out)
    assert result.returncode == 2, result.stderr
    assert "refused to load" in result.stderr and "Traceback" not in result.stderr
    assert not _RunsCode.marker.exists() and not out.exists()


def _corrupt_one_weight(tensors):
    tensors = dict(tensors)
    key = next(key for key in tensors if key.endswith(("attn.proj.weight", "out_proj.weight")))
    tensors[key] = tensors[key] * 1.01  # (a constant shift would vanish behind the LayerNorm)
    return tensors


@pytest.mark.parametrize("fmt,name", [("timm", "b.safetensors"), ("timm", "folder"), ("mmseg", "b.pth")])
def test_failed_verification_leaves_nothing(run_dir, tmp_path, monkeypatch, fmt, name):
    """A file whose weights differ from the backbone fails the check: an error that says so, and
    nothing at --out (not even a temporary file)."""
    if fmt == "timm":
        original = timm_format._tensors
        monkeypatch.setattr(timm_format, "_tensors", lambda backbone: _corrupt_one_weight(original(backbone)))
    else:
        original = framework_format.to_framework
        monkeypatch.setattr(
            framework_format,
            "to_framework",
            lambda state, framework: _corrupt_one_weight(original(state, framework=framework)),
        )
    out = tmp_path / name
    with pytest.raises(ExportError, match="verification failed .* max abs difference"):
        export_checkpoint(run_dir, fmt=fmt, out=out)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_force_keeps_the_old_file_when_verification_fails(run_dir, tmp_path, monkeypatch):
    """--force replaces an export only with one that passed: after a failure the old file is intact."""
    out = tmp_path / "b.safetensors"
    export_checkpoint(run_dir, fmt="timm", out=out)
    before = out.read_bytes()
    original = timm_format._tensors
    monkeypatch.setattr(timm_format, "_tensors", lambda backbone: _corrupt_one_weight(original(backbone)))
    with pytest.raises(ExportError, match="verification failed"):
        export_checkpoint(run_dir, fmt="timm", out=out, force=True)
    assert out.read_bytes() == before and _leftovers(tmp_path) == []


def test_output_names_and_directories_are_checked_before_loading(tmp_path):
    """A wrong suffix, or --force on a directory that is not an export, fails at once with the
    remedy (the checkpoint path does not even need to exist)."""
    missing = tmp_path / "no-such-run"
    with pytest.raises(ExportError, match=r"\.onnx"):
        export_checkpoint(missing, fmt="onnx", out=tmp_path / "b.pth")
    with pytest.raises(ExportError, match="NAME.safetensors"):
        export_checkpoint(missing, fmt="timm", out=tmp_path / "b.pt")
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not part of a timm export"):
        export_checkpoint(missing, fmt="timm", out=precious, force=True)
    assert (precious / "notes.txt").read_text() == "mine"


def test_onnx_without_its_packages_says_how_to_install(monkeypatch):
    """Without onnxscript (or onnx / onnxruntime), the error names the extra to install."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ExportError, match=r"pip install 'flsl\[onnx\]'"):
        require_onnx()
