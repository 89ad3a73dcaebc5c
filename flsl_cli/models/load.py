"""Loading a trained backbone from a flsl checkpoint file or a run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from timm.models.vision_transformer import VisionTransformer

from flsl_cli.checkpoint.store import load_file, newest_valid
from flsl_cli.config.load import validate_recipe
from flsl_cli.config.schema import Recipe
from flsl_cli.errors import CheckpointError
from flsl_cli.models.flsl import Network


@dataclass(frozen=True)
class LoadedBackbone:
    backbone: VisionTransformer
    recipe: Recipe
    step: int
    source: Path


def resolve_checkpoint(path: str | Path) -> tuple[Path, dict]:
    """A checkpoint file, or a run directory's newest valid checkpoint, loaded safely."""
    path = Path(path)
    if path.is_dir():
        ref, payload = newest_valid(path)
        return ref.path, payload
    if not path.exists():
        raise CheckpointError(
            "the checkpoint does not exist",
            where=str(path),
            fix="Pass a file from RUN_DIR/checkpoints/ or a run directory",
        )
    return path, load_file(path)


def load_network(path: str | Path, *, which: str = "teacher") -> tuple[Network, Recipe, int, Path]:
    """The student or teacher Network (backbone + head) of a checkpoint, in eval mode."""
    if which not in ("teacher", "student"):
        raise CheckpointError(f"unknown network {which!r}", fix="Use --which teacher or --which student")
    file, payload = resolve_checkpoint(path)
    recipe = validate_recipe(yaml.safe_load(payload["recipe_yaml"]), source=f"{file} (embedded recipe)")
    network = Network(recipe, drop_path=0.0)
    try:
        network.load_state_dict(payload[which])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"the {which} weights do not match the architecture in the checkpoint's recipe "
            f"({' '.join(line.strip() for line in first[:3])})",
            where=str(file),
            fix="The file was written by an incompatible flsl version or edited; use a checkpoint of this version",
        ) from None
    network.eval()
    return network, recipe, int(payload["step"]), file


def load_backbone(path: str | Path, *, which: str = "teacher") -> LoadedBackbone:
    """The ViT backbone of a checkpoint (default: the teacher, as in the paper), in eval mode."""
    network, recipe, step, file = load_network(path, which=which)
    return LoadedBackbone(backbone=network.backbone, recipe=recipe, step=step, source=file)
