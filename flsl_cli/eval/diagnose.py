"""`flsl diagnose`: the collapse diagnostics of a flsl checkpoint's network (see
`diagnostics.py`) on the first images of a split, beside a random init of the same architecture.

Images are resized (shorter side, bicubic) and center-cropped as the k-NN evaluation does, by
default at the checkpoint's own training size (crop = augment.global_size, resize = crop x
256 / 224, the paper's ratio).
"""

from __future__ import annotations

from typing import Any

import torch

from flsl_cli.config.schema import Recipe, eval_sizes
from flsl_cli.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from flsl_cli.data.shards import resolve_shards
from flsl_cli.errors import DataError
from flsl_cli.eval.backbones import RANDOM_INIT_SEED
from flsl_cli.eval.diagnostics import feature_diagnostics
from flsl_cli.eval.samples import EvalSamples, ReadPlan, SampleSettings
from flsl_cli.models.flsl import Network
from flsl_cli.models.load import load_network

RESULTS_FORMAT = "flsl-diagnose/1"
BATCH = 64


def read_images(val: str, *, images: int, resize: int, crop: int, patch_size: int) -> torch.Tensor:
    """The first `images` images of `val`, resized, cropped and normalized: (b, 3, crop, crop)."""
    shards = resolve_shards(val, key="--val")
    settings = SampleSettings(
        mode="global", grid=1, resize=resize, crop=crop, patch_size=patch_size, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    dataset = EvalSamples(ReadPlan.from_shards(shards, limit=images), rank=0, world_size=1, settings=settings)
    pixels = []
    for item in dataset:
        if "error" in item:
            raise item["error"]
        pixels.append(item["image"])
    if not pixels:
        raise DataError(
            "the split has no images to look at",
            where=val,
            fix="Pass shards that hold images (e.g. the val split of `flsl data demo`)",
        )
    return torch.stack(pixels)


@torch.no_grad()
def network_diagnostics(network: Network, images_bchw: torch.Tensor, *, teacher_temp: float) -> dict[str, float]:
    tokens = torch.cat([network.tokens(images_bchw[i : i + BATCH]) for i in range(0, len(images_bchw), BATCH)])
    return feature_diagnostics(tokens, head=network.head, teacher_temp=teacher_temp)


def random_init_network(recipe: Recipe) -> Network:
    """The recipe's network (backbone and head) as a run with optim.seed 0 starts it; the global
    RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return Network(recipe, drop_path=0.0).eval()


def diagnose(
    checkpoint: str,
    *,
    val: str,
    images: int,
    which: str = "teacher",
    resize: int | None = None,
    crop: int | None = None,
) -> dict[str, Any]:
    """The diagnostics of the checkpoint's network and of a random init, on the same images."""
    network, recipe, step, source = load_network(checkpoint, which=which)
    resize, crop = eval_sizes(recipe.augment.global_size, resize=resize, crop=crop)
    pixels = read_images(val, images=images, resize=resize, crop=crop, patch_size=recipe.model.patch_size)
    temp = recipe.loss.teacher_temp
    return {
        "format": RESULTS_FORMAT,
        "checkpoint": str(source),
        "step": step,
        "which": which,
        "val": val,
        "images": len(pixels),
        "resize": resize,
        "crop": crop,
        "teacher_temp": temp,
        "embed_dim": recipe.model.dims()["embed_dim"],
        "prototypes": recipe.model.head_out_dim,
        "trained": network_diagnostics(network, pixels, teacher_temp=temp),
        "random_init": network_diagnostics(random_init_network(recipe), pixels, teacher_temp=temp),
    }
