"""How much memory one training process needs, estimated from the recipe before anything is
allocated, and the check that refuses a recipe the machine cannot hold.

The estimate is arithmetic on the recipe (no torch), in fp32 bytes, per process:

    model state  parameters x 4 copies (weights, gradients, two AdamW moments) x 2 networks.
                 The teacher really holds only its weights, so this over-counts it on purpose.
    prototypes   per student query: its K logits, kept several times over (student logits,
                 log-probabilities, teacher probabilities and their gradients).
    activations  what backward keeps of the student views: per token and block about
                 ACTIVATION_FLOATS_PER_DIM x embed_dim floats plus the attention maps
                 (heads x tokens per view), over local batch x tokens x depth.
    inputs       the views of a batch, held by the loader and the step.

The parts are deliberately simple and err high: against the peak memory of real CPU training
steps (vit_tiny and vit_small, batches 8-64, K 32-65536) the estimate came out 1.15-1.55 times
the measured peak. The check refuses a run only when the estimate exceeds the machine's memory,
so a refused run would at best have filled the machine, and a run it lets through may still need
a smaller batch on a busy machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from flsl_cli.config.schema import Recipe
from flsl_cli.errors import RecipeError

FLOAT_BYTES = 4
STATE_COPIES = 4  # weights, gradients, AdamW exp_avg and exp_avg_sq
NETWORKS = 2  # student and teacher, both counted as trained
ACTIVATION_FLOATS_PER_DIM = 24  # per token per block: qkv, attention out, MLP (4 x dim) in and out, norms
ATTENTION_MAPS = 3  # per head and token pair: scores, softmax, dropout/grad buffer
LOGIT_COPIES = 6  # per query and prototype: logits, log-softmax, probabilities, gradients
GB = 1e9


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one process needs, by part."""

    parameters: int
    model_state: int
    prototypes: int
    activations: int
    inputs: int

    @property
    def total(self) -> int:
        return self.model_state + self.prototypes + self.activations + self.inputs

    def describe(self) -> str:
        return (
            f"activations {gb(self.activations)}, prototype logits {gb(self.prototypes)}, model state "
            f"{gb(self.model_state)} for {self.parameters / 1e6:.4g} M parameters, inputs {gb(self.inputs)}"
        )


def gb(size: float) -> str:
    value = size / GB
    return f"{value:,.0f} GB" if value >= 100 else f"{value:.3g} GB"


def count_parameters(recipe: Recipe) -> int:
    """Trainable parameters of one network (backbone + projection head)."""
    model = recipe.model
    dims = model.dims()
    dim, depth = dims["embed_dim"], dims["depth"]
    patch = model.patch_size
    backbone = (3 * patch * patch * dim + dim) + depth * (12 * dim * dim + 13 * dim) + 2 * dim
    widths = [dim] + [model.head_hidden_dim] * (model.head_layers - 1) + [model.head_bottleneck_dim]
    mlp = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    prototypes = model.head_out_dim * model.head_bottleneck_dim
    return backbone + mlp + prototypes


def estimate_memory(recipe: Recipe, *, world_size: int = 1) -> MemoryEstimate:
    """What one of `world_size` processes needs for the recipe's model and its share of the batch."""
    model, augment, loss = recipe.model, recipe.augment, recipe.loss
    dims = model.dims()
    dim, depth, heads = dims["embed_dim"], dims["depth"], dims["num_heads"]
    batch = max(1, recipe.optim.global_batch_size // max(1, world_size))
    patch = model.patch_size
    global_tokens = (augment.global_size // patch) ** 2
    local_tokens = (augment.local_size // patch) ** 2
    views = [global_tokens] + [local_tokens] * augment.local_crops  # student views, with gradients
    queries = ((augment.global_size // patch) // loss.query_window_global) ** 2 + augment.local_crops * (
        (augment.local_size // patch) // loss.query_window_local
    ) ** 2

    parameters = count_parameters(recipe)
    model_state = parameters * STATE_COPIES * NETWORKS * FLOAT_BYTES
    per_query = model.head_out_dim * LOGIT_COPIES + 2 * model.head_hidden_dim * max(1, model.head_layers - 1)
    prototypes = batch * queries * per_query * FLOAT_BYTES
    per_image = sum(
        depth * (tokens * dim * ACTIVATION_FLOATS_PER_DIM + ATTENTION_MAPS * heads * tokens * tokens)
        for tokens in views
    )
    per_image += global_tokens * dim * 2  # the teacher's tokens, kept for the inter-view modes
    activations = batch * per_image * FLOAT_BYTES
    pixels = 2 * augment.global_size**2 + augment.local_crops * augment.local_size**2  # teacher + views
    inputs = 3 * batch * pixels * FLOAT_BYTES * 3  # the step's copy and two prefetched batches
    return MemoryEstimate(
        parameters=parameters, model_state=model_state, prototypes=prototypes, activations=activations, inputs=inputs
    )


def host_memory_bytes() -> int | None:
    """Physical memory of this machine (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(
    recipe: Recipe,
    *,
    world_size: int,
    source: str,
    device_bytes: int | None,
    device_name: str,
    processes_per_device: int = 1,
) -> MemoryEstimate:
    """Refuse the recipe when `processes_per_device` processes of a `world_size` run need more
    than `device_bytes` (a GPU's memory, or the host's for CPU processes, which share it)."""
    estimate = estimate_memory(recipe, world_size=world_size)
    if device_bytes is None or estimate.total * processes_per_device <= device_bytes:
        return estimate
    batch = max(1, recipe.optim.global_batch_size // max(1, world_size))
    per_image = (estimate.total - estimate.model_state) / batch
    fitting = int((device_bytes / processes_per_device - estimate.model_state) // per_image) * world_size
    if fitting >= world_size:
        key = "optim.global_batch_size"
        fix = (
            f"lower optim.global_batch_size to at most {fitting}, or model.head_out_dim or the view sizes "
            "(augment.*), or spread the batch over more GPUs"
        )
    else:
        key = "model.head_out_dim" if estimate.prototypes > estimate.activations else "model.arch"
        fix = "use a smaller model (model.arch, model.depth) or head (model.head_out_dim, model.head_hidden_dim)"
    processes = "" if processes_per_device == 1 else f" x {processes_per_device} processes"
    raise RecipeError(
        [
            f"{key}: the run needs about {gb(estimate.total)} per process{processes} ({estimate.describe()}; "
            f"{batch} images per process) but {device_name} has {gb(device_bytes)}; {fix}"
        ],
        source=source,
    )
