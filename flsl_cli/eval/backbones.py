"""The model a k-NN evaluation looks at: a flsl checkpoint (file or run dir), a timm export
(a folder with `config.json` + `model.safetensors`, or a `.safetensors` file), or a plain timm
model (`--model timm:NAME`, for baselines), wrapped to give patch tokens (b, n, d) in row-major
grid order with any class/register tokens removed.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from flsl_cli.config.schema import Recipe
from flsl_cli.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from flsl_cli.errors import CheckpointError, FlslError
from flsl_cli.models.load import load_backbone
from flsl_cli.models.vit import build_backbone

TIMM_PREFIX = "timm:"
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
RANDOM_INIT_SEED = 0
WEIGHTS_PROBE_SECONDS = 5.0  # how long the host of pretrained weights may take to answer
DEFAULT_TRAINING_SIZE = 224  # for a model that does not say its own input size
_SOURCES_FIX = (
    "Pass a flsl checkpoint (RUN_DIR/checkpoints/step-*.pt) or a run directory, a folder written by "
    "`flsl export --format timm`, or a .safetensors file together with --model timm:NAME"
)


@dataclass(frozen=True)
class ModelSpec:
    """What to evaluate, as given on the command line (picklable, for spawned processes)."""

    checkpoint: str | None = None
    model: str | None = None  # "timm:NAME"
    which: str | None = None  # flsl checkpoints only; None: the teacher
    random_init: bool = False


@dataclass
class EvalModel:
    module: nn.Module
    patch_size: int
    embed_dim: int
    prefix_tokens: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: dict[str, Any] = field(default_factory=dict)
    identity: str = ""  # what the cache key says about the weights
    training_size: int = DEFAULT_TRAINING_SIZE  # the image side it was trained at, in pixels

    def tokens(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """Patch tokens (b, n, d), row-major over the (h / patch) x (w / patch) grid."""
        out = self.module.forward_features(images_bchw)  # type: ignore[operator]  # timm's model contract
        if out.ndim == 4:  # a convolutional trunk: (b, d, h, w)
            return out.flatten(2).transpose(1, 2)
        return out[:, self.prefix_tokens :]


def load_eval_model(spec: ModelSpec) -> EvalModel:
    """The model named by `spec`, in eval mode on the CPU, or a CheckpointError saying why not."""
    timm_name = _timm_name(spec.model)
    if spec.checkpoint is None:
        if timm_name is None:
            raise FlslError(
                "no model to evaluate",
                fix="Pass a CHECKPOINT (a flsl checkpoint or run dir, or a "
                "timm export), or --model timm:NAME for a timm model",
            )
        if spec.which is not None:
            raise FlslError(
                "--which applies to flsl checkpoints only (a timm model has no teacher/student)", fix="Drop --which"
            )
        return _plain_timm(timm_name, random_init=spec.random_init)
    path = Path(spec.checkpoint).expanduser()
    if not path.exists():
        raise CheckpointError("the checkpoint does not exist", where=str(path), fix=_SOURCES_FIX)
    if (path.is_dir() and (path / EXPORT_CONFIG).exists()) or path.suffix == ".safetensors":
        if spec.which is not None:
            raise FlslError(
                "--which applies to flsl checkpoints only (an export holds one backbone)",
                where=str(path),
                fix="Drop --which",
            )
        return _timm_export(path, timm_name=timm_name, random_init=spec.random_init)
    return _flsl_checkpoint(path, which=spec.which or "teacher", timm_name=timm_name, random_init=spec.random_init)


def _timm_name(model: str | None) -> str | None:
    if model is None:
        return None
    if not model.startswith(TIMM_PREFIX) or not model[len(TIMM_PREFIX) :].strip():
        raise FlslError(
            f"--model {model!r} is not of the form timm:NAME", fix="Use e.g. --model timm:vit_small_patch16_224.dino"
        )
    return model[len(TIMM_PREFIX) :].strip()


def _flsl_checkpoint(path: Path, *, which: str, timm_name: str | None, random_init: bool) -> EvalModel:
    try:
        loaded = load_backbone(path, which=which)
    except CheckpointError as exc:
        if "not a flsl checkpoint" in exc.what:
            raise CheckpointError(exc.what, where=exc.where, fix=_SOURCES_FIX) from None
        raise
    backbone, recipe = loaded.backbone, loaded.recipe
    arch = recipe.model
    if timm_name is not None:
        _check_same_architecture(backbone, timm_name=timm_name, source=str(loaded.source))
    if random_init:
        backbone = random_init_backbone(recipe)
    stat = loaded.source.stat()
    description = {
        "kind": "flsl",
        "source": str(loaded.source),
        "step": loaded.step,
        "which": which,
        "arch": arch.arch,
        "depth": arch.dims()["depth"],
        "patch_size": arch.patch_size,
        "random_init": random_init,
    }
    identity = f"flsl|{loaded.source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{which}|random={random_init}"
    return wrap_module(
        backbone,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description=description,
        identity=identity,
        training_size=recipe.augment.global_size,
    )


def random_init_backbone(recipe: Recipe) -> VisionTransformer:
    """The recipe's backbone with the random weights every baseline uses (seed RANDOM_INIT_SEED:
    the weights a run with optim.seed 0 starts from); the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        backbone = build_backbone(recipe.model, img_size=recipe.augment.global_size, drop_path=0.0)
    return backbone.eval()


def _check_same_architecture(backbone: nn.Module, *, timm_name: str, source: str) -> None:
    """A flsl checkpoint carries its architecture; --model may only name the same one."""
    with torch.device("meta"):
        other = _create_timm(timm_name, pretrained=False, kwargs={})
    ours = _shape_summary(backbone)
    theirs = _shape_summary(other)
    if ours != theirs:
        raise CheckpointError(
            f"the checkpoint's backbone ({_describe(ours)}) contradicts --model timm:{timm_name} ({_describe(theirs)})",
            where=source,
            fix="Drop --model (a flsl checkpoint carries its own architecture), or pass a checkpoint of that "
            "architecture",
        )


def _shape_summary(module: nn.Module) -> dict[str, int]:
    return {
        "embed_dim": int(getattr(module, "embed_dim", getattr(module, "num_features", 0))),
        "depth": len(getattr(module, "blocks", ())),
        "patch_size": _patch_size(module),
    }


def _describe(summary: dict[str, int]) -> str:
    return f"width {summary['embed_dim']}, depth {summary['depth']}, patch {summary['patch_size']}"


def _timm_export(path: Path, *, timm_name: str | None, random_init: bool) -> EvalModel:
    """A timm export (`flsl export --format timm`): a folder with config.json + model.safetensors,
    or one .safetensors file whose metadata carries the same config (key "flsl"). The config is
    timm's hub format: `architecture`, `model_args`, `pretrained_cfg` (mean/std)."""
    weights = path / EXPORT_WEIGHTS if path.is_dir() else path
    if not weights.exists():
        raise CheckpointError(
            f"the export has no {weights.name}",
            where=str(path),
            fix="Export the model again with `flsl export --format timm`",
        )
    config, config_where = _export_config(path, weights)
    if config is not None:
        try:
            architecture = str(config["architecture"])
            model_args = dict(config.get("model_args") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"the export's config has no architecture ({exc})",
                where=config_where,
                fix="Export the model again with `flsl export --format timm`",
            ) from None
        if timm_name is not None and timm_name.split(".")[0] != architecture.split(".")[0]:
            raise CheckpointError(
                f"the export is a {architecture} but --model asks for timm:{timm_name}",
                where=config_where,
                fix="Drop --model (the export's config names its architecture)",
            )
    elif timm_name is not None:
        architecture, model_args = timm_name, {}
    else:
        raise CheckpointError(
            f"the .safetensors file does not say which model it is (no flsl metadata, no {EXPORT_CONFIG} beside it)",
            where=str(path),
            fix="Add --model timm:NAME",
        )
    module = _create_timm(architecture, pretrained=False, kwargs=model_args)
    if not random_init:
        _load_safetensors(module, weights, architecture=architecture)
    stat = weights.stat()
    flsl = (config or {}).get("flsl")
    provenance = flsl if isinstance(flsl, dict) else {}
    cfg = (config or {}).get("pretrained_cfg") or getattr(module, "pretrained_cfg", {}) or {}
    description = {
        "kind": "timm-export",
        "source": str(weights),
        "arch": architecture,
        "random_init": random_init,
        "step": provenance.get("step"),
        "which": provenance.get("which"),
        "exported_from": provenance.get("source"),
    }
    identity = f"export|{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{architecture}|random={random_init}"
    return wrap_module(
        module,
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        description=description,
        identity=identity,
    )


def _export_config(path: Path, weights: Path) -> tuple[dict | None, str]:
    """The export's config: the folder's config.json, else the file's "flsl" metadata, else a
    config.json beside a file named model.safetensors; (None, "") if there is none."""
    config_file = (path if path.is_dir() else path.parent) / EXPORT_CONFIG
    if path.is_dir() or (weights.name == EXPORT_WEIGHTS and config_file.exists()):
        try:
            return json.loads(config_file.read_text()), str(config_file)
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"the export's config.json is unreadable ({exc})",
                where=str(config_file),
                fix="Export the model again with `flsl export --format timm`",
            ) from None
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any reader failure: not a safetensors file
        raise CheckpointError(
            f"cannot read the .safetensors file ({str(exc).strip() or type(exc).__name__})",
            where=str(weights),
            fix=_SOURCES_FIX,
        ) from None
    if "flsl" in metadata:
        try:
            return json.loads(metadata["flsl"]), f"{weights} (metadata)"
        except ValueError:
            pass
    return None, ""


def _load_safetensors(module: nn.Module, weights: Path, *, architecture: str) -> None:
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:  # noqa: BLE001 - any reader failure: a damaged or foreign file
        raise CheckpointError(
            f"cannot read the weights ({str(exc).strip() or type(exc).__name__})",
            where=str(weights),
            fix="Export the model again with `flsl export --format timm`",
        ) from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = " ".join(line.strip() for line in str(exc).strip().splitlines()[:3])
        raise CheckpointError(
            f"the weights do not fit the architecture {architecture} ({lines[:400]})",
            where=str(weights),
            fix="Pass the export whole (its config names the architecture), or the matching --model timm:NAME",
        ) from None


def _plain_timm(name: str, *, random_init: bool) -> EvalModel:
    module = _create_timm(name, pretrained=not random_init, kwargs={})
    pretrained_cfg = getattr(module, "pretrained_cfg", {}) or {}
    description = {"kind": "timm", "source": f"timm:{name}", "arch": name, "random_init": random_init}
    return wrap_module(
        module,
        mean=tuple(pretrained_cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(pretrained_cfg.get("std", IMAGENET_STD)),
        description=description,
        identity=f"timm|{name}|random={random_init}",
    )


def _create_timm(name: str, *, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    base = name.split(".")[0]
    if not timm.is_model(base):
        raise FlslError(
            f"timm has no model named {name!r}",
            fix="Pick a name from `python -c \"import timm; print(timm.list_models('vit_*'))\"`",
        )
    if pretrained:
        _check_weights_reachable(name)
    args = {"num_classes": 0, **kwargs}
    torch.manual_seed(RANDOM_INIT_SEED)  # random inits (and heads) are the same on every rank and run
    try:
        try:  # ViTs take any input size that is a multiple of the patch size with this
            return timm.create_model(name, pretrained=pretrained, **{"dynamic_img_size": True, **args})
        except TypeError:
            return timm.create_model(name, pretrained=pretrained, **args)
    except (RuntimeError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        weights = " with pretrained weights" if pretrained else ""
        raise CheckpointError(
            f"could not create timm model {name!r}{weights} ({reason})",
            fix="Check the name and your network access to the weights, or add --random-init for an untrained baseline",
        ) from None


def _check_weights_reachable(name: str, *, timeout: float = WEIGHTS_PROBE_SECONDS) -> None:
    """Pretrained weights that are neither in the local cache nor on a host that answers within
    `timeout` seconds are an error at once (the hub's client retries for about a minute)."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants, try_to_load_from_cache

    config = timm.models.get_pretrained_cfg(name)
    if config is None:
        return  # timm itself says what is missing
    if config.hf_hub_id:
        repo = config.hf_hub_id.split("@")[0]
        files = [config.hf_hub_filename] if config.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, file), str) for file in files):
            return
        url = constants.ENDPOINT
    elif isinstance(config.url, str) and config.url:
        url = config.url
    else:
        return
    host = urlsplit(url).hostname or url
    port = urlsplit(url).port or (443 if url.startswith("https") else 80)
    if constants.HF_HUB_OFFLINE and config.hf_hub_id:
        reason = "HF_HUB_OFFLINE is set and they are not in the local cache"
    else:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return
        except OSError as exc:
            reason = f"{host} cannot be reached from here ({exc.strerror or exc}) and they are not in the local cache"
    raise CheckpointError(
        f"cannot download the pretrained weights of timm model {name!r}: {reason}",
        fix="Run where the network reaches them once (they are cached), point HF_ENDPOINT at a mirror, "
        "or add --random-init for an untrained baseline",
    )


def _patch_size(module: nn.Module) -> int:
    patch_embed = getattr(module, "patch_embed", None)
    if patch_embed is not None:
        size = patch_embed.patch_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if size[0] != size[1]:
            raise CheckpointError(
                f"the model's patches are not square ({size[0]} x {size[1]})",
                fix="Evaluate a model with square patches",
            )
        return int(size[0])
    feature_info = getattr(module, "feature_info", None)
    if feature_info:
        return int(feature_info[-1]["reduction"])
    raise CheckpointError(
        "cannot tell the model's patch size (no patch_embed, no feature_info)",
        fix="Evaluate a ViT (or a timm model with feature_info)",
    )


def _rgb(values: Iterable[float]) -> tuple[float, float, float]:
    red, green, blue = (float(v) for v in values)
    return red, green, blue


def wrap_module(
    module: nn.Module,
    *,
    mean: Iterable[float],
    std: Iterable[float],
    description: dict[str, Any],
    identity: str,
    training_size: int | None = None,
) -> EvalModel:
    """`module` (eval mode, frozen) as an EvalModel; patch size and width read from the module,
    and the training size too unless given (timm's `patch_embed.img_size`, else 224)."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    embed_dim = int(getattr(module, "num_features", 0) or module.embed_dim)  # type: ignore[arg-type]  # a number
    patch = _patch_size(module)
    description = {**description, "patch_size": patch, "embed_dim": embed_dim}
    return EvalModel(
        module=module,
        patch_size=patch,
        embed_dim=embed_dim,
        prefix_tokens=int(getattr(module, "num_prefix_tokens", 0)),
        mean=_rgb(mean),
        std=_rgb(std),
        description=description,
        identity=identity,
        training_size=training_size or _input_size(module),
    )


def _input_size(module: nn.Module) -> int:
    """The image side a timm model was built for (its patch embedding's img_size), else 224."""
    size = getattr(getattr(module, "patch_embed", None), "img_size", None)
    if isinstance(size, (tuple, list)) and size and isinstance(size[-1], int):
        return size[-1]
    return size if isinstance(size, int) else DEFAULT_TRAINING_SIZE


@contextmanager
def live_backbone(backbone: nn.Module) -> Iterator[EvalModel]:
    """A training network's backbone (flsl's: ImageNet normalisation) wrapped for an evaluation;
    its train/eval mode and its parameters' requires_grad flags are restored afterwards."""
    was_training = backbone.training
    requires_grad = [p.requires_grad for p in backbone.parameters()]
    try:
        yield wrap_module(
            backbone,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            description={"kind": "flsl", "source": "training"},
            identity="",
        )
    finally:
        backbone.train(was_training)
        for parameter, flag in zip(backbone.parameters(), requires_grad):
            parameter.requires_grad_(flag)
