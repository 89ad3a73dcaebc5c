"""The timm format: the backbone's own state dict as safetensors, plus what `timm.create_model`
needs to rebuild it (a registered architecture name and keyword arguments).

Two forms:
- a single `NAME.safetensors` (the config rides in its metadata), loaded with
  `timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=PATH, ...), **KWARGS)`;
- a folder with `config.json` + `model.safetensors`, loaded with
  `timm.create_model("local-dir:PATH", pretrained=True)`.

The overlay sets `num_classes=0` so that timm loads strictly (missing or unexpected keys are
errors, not log lines), and ImageNet mean/std, which FLSL normalizes with (the registered
configs of some ViTs say 0.5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from flsl_cli.config.schema import Recipe
from flsl_cli.models.vit import timm_kwargs

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class TimmSpec:
    """A registered timm architecture and the kwargs that turn it into the FLSL backbone."""

    architecture: str
    model_args: dict
    img_size: int


def timm_spec(recipe: Recipe) -> TimmSpec:
    """`vit_small_patch16_224` and friends where timm registers the arch + patch size; otherwise
    the arch's patch-16 name. The kwargs always carry every dimension, so depth overrides and
    unregistered patch sizes build the right model either way."""
    model = recipe.model
    registered = f"{model.arch}_patch{model.patch_size}_224"
    architecture = registered if timm.is_model(registered) else f"{model.arch}_patch16_224"
    size = recipe.augment.global_size
    return TimmSpec(architecture=architecture, model_args=timm_kwargs(model, img_size=size), img_size=size)


def overlay(file: Path) -> dict:
    """The `pretrained_cfg_overlay` that points timm at the weights file."""
    return {
        "file": str(file),
        "num_classes": 0,
        "mean": tuple(IMAGENET_DEFAULT_MEAN),
        "std": tuple(IMAGENET_DEFAULT_STD),
    }


def config_json(spec: TimmSpec, *, provenance: dict) -> dict:
    """timm's hub/local-dir `config.json` (architecture, model_args, pretrained_cfg)."""
    return {
        "architecture": spec.architecture,
        "num_classes": 0,
        "num_features": spec.model_args["embed_dim"],
        "global_pool": spec.model_args["global_pool"],
        "model_args": spec.model_args,
        "pretrained_cfg": {
            "tag": "flsl",
            "custom_load": False,
            "input_size": [3, spec.img_size, spec.img_size],
            "fixed_input_size": False,
            "mean": list(IMAGENET_DEFAULT_MEAN),
            "std": list(IMAGENET_DEFAULT_STD),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "flsl": provenance,
    }


def _literal(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_literal(item) for item in value) + ")"
    return repr(value)


def _keywords(values: dict) -> str:
    return ", ".join(f"{key}={_literal(value)}" for key, value in values.items())


def file_load_line(spec: TimmSpec, *, file: Path) -> str:
    """The Python line that loads a single-file export; `load_from_file` runs exactly this."""
    return (
        f"model = timm.create_model({_literal(spec.architecture)}, pretrained=True, "
        f"pretrained_cfg_overlay=dict({_keywords(overlay(file))}), {_keywords(spec.model_args)})"
    )


def folder_load_line(folder: Path) -> str:
    return f"model = timm.create_model({_literal('local-dir:' + str(folder))}, pretrained=True)"


def _tensors(backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().contiguous().clone() for key, value in backbone.state_dict().items()}


def _save(backbone: torch.nn.Module, path: Path, *, metadata: dict[str, str]) -> None:
    # serialized here and written with open(), so the file gets the usual permissions
    path.write_bytes(safetensors.torch.save(_tensors(backbone), metadata=metadata))


def write_file(backbone: torch.nn.Module, path: Path, *, spec: TimmSpec, provenance: dict) -> None:
    _save(backbone, path, metadata={"format": "pt", "flsl": json.dumps(config_json(spec, provenance=provenance))})


def write_folder(backbone: torch.nn.Module, folder: Path, *, spec: TimmSpec, provenance: dict) -> None:
    folder.mkdir()
    _save(backbone, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config_json(spec, provenance=provenance), indent=2) + "\n")


def load_from_file(spec: TimmSpec, *, file: Path) -> torch.nn.Module:
    model = timm.create_model(
        spec.architecture, pretrained=True, pretrained_cfg_overlay=overlay(file), **spec.model_args
    )
    return model.eval()


def load_from_folder(folder: Path) -> torch.nn.Module:
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
