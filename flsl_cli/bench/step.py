"""`flsl bench step`: the training step alone, flsl's against an eager baseline, in one run.

Both variants train the same networks (built from the recipe with the same seed) on the same
synthetic batch, resident on the device, so only the step differs:

* flsl: `StepRunner` as `flsl pretrain` builds it: timm's fused attention in the backbone, the
  recipe's precision (`auto`: bf16 autocast without a gradient scaler on GPUs that have it, fp32
  on CPU), the recipe's `optim.fused_modes`, `optim.compile` (or `--compile`), the fused AdamW on
  CUDA, and one host sync per step.
* eager baseline: the step the way the authors' release runs it: explicit softmax attention in
  every block and in the mean-shift modes, fp16 autocast with a gradient scaler on CUDA (fp32 on
  CPU), the unfused AdamW, and every loss term read with `.item()` after every step.

The FLOPs of one step (forward and backward of teacher and student, loss included) are counted
by `torch.utils.flop_counter.FlopCounterMode` on the baseline's first step; model-FLOPs
utilisation divides them by the measured step time and by a peak the output states (a table of
vendor dense bf16/fp16 figures for known GPUs, or `--peak-tflops`). The first steps of each
variant (`warmup`, and compilation) are not timed; the timed steps run in alternating turns
(baseline, flsl, baseline, flsl) so a change in a shared machine's load weighs on both.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from flsl_cli.config.schema import Recipe
from flsl_cli.distributed.env import cpu_threads, usable_cpus
from flsl_cli.errors import FlslError
from flsl_cli.losses.queries import grid_query_indices
from flsl_cli.models.vit import set_fused_attention
from flsl_cli.train.loop import build_runner
from flsl_cli.train.optim import parameter_groups
from flsl_cli.train.step import TERMS, StepRunner, autocast_dtype

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
TURNS = 2  # timed turns per variant, alternating
VARIANT_NAMES = {"baseline": "the eager baseline", "flsl": "flsl's step"}
NOTE = (
    "Both variants ran in the same invocation on the same networks, batch and device, in alternating "
    "turns; the batch is synthetic and already on the device, so no data loading is included."
)


@dataclass(frozen=True)
class StepBenchSettings:
    steps: int = 20
    warmup: int = 3
    batch: int | None = None  # None: the recipe's global batch, at most 64 (one GPU's share in the paper)
    device: str | None = None  # None: cuda when torch sees a GPU, else cpu
    compile: bool = False
    peak_tflops: float | None = None


class EagerBaseline(StepRunner):
    """The same step, reading every loss term with `.item()` (one host sync each), as the
    release logs them, instead of one collective read once per step."""

    def _reduce(self, terms: dict[str, torch.Tensor], counters: dict[str, float]) -> dict[str, float]:
        values = {name: terms[name].item() for name in TERMS}
        self.totals = {**counters, "stop": 0.0}
        self.stop_agreed = False
        return values


def synthetic_batch(recipe: Recipe, *, images: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch shaped as the data pipeline makes it (normalised views and query indices)."""
    aug, patch, loss = recipe.augment, recipe.model.patch_size, recipe.loss
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)

    def views(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    def queries(size: int, window: int, count: int) -> torch.Tensor:
        return torch.from_numpy(
            np.stack([grid_query_indices(grid=size // patch, window=window, rng=rng) for _ in range(count)])
        )

    batch = {
        "teacher": views(images, 3, aug.global_size, aug.global_size),
        "global": views(images, 3, aug.global_size, aug.global_size),
        "global_queries": queries(aug.global_size, loss.query_window_global, images),
    }
    if aug.local_crops:
        batch["locals"] = views(images, aug.local_crops, 3, aug.local_size, aug.local_size)
        batch["local_queries"] = queries(aug.local_size, loss.query_window_local, images * aug.local_crops).unflatten(
            0, (images, aug.local_crops)
        )
    return {name: tensor.to(device) for name, tensor in batch.items()}


def variant_recipe(recipe: Recipe, *, name: str, device: torch.device, compile_: bool) -> Recipe:
    """The recipe of one variant: flsl's as given (compile added by --compile), the baseline's
    with fp16 on CUDA / fp32 on CPU, explicit modes and no compilation."""
    optim = recipe.optim.model_dump()
    if name == "baseline":
        optim.update(precision="fp16" if device.type == "cuda" else "fp32", fused_modes=False, compile=False)
    else:
        optim.update(compile=recipe.optim.compile or compile_)
    return recipe.model_copy(update={"optim": type(recipe.optim).model_validate(optim)})


def build_variant(recipe: Recipe, *, name: str, device: torch.device, compile_: bool) -> StepRunner:
    runner = build_runner(
        variant_recipe(recipe, name=name, device=device, compile_=compile_),
        device=device,
        rank=0,
        world_size=1,
        steps_per_epoch=1_000_000,
    )
    if name != "baseline":
        return runner
    for network in (runner.student, runner.teacher):
        set_fused_attention(network.backbone, enabled=False)
    optim = runner.recipe.optim
    runner.optimizer = torch.optim.AdamW(parameter_groups(runner.student), lr=0.0, betas=optim.betas, weight_decay=0.0)
    return EagerBaseline(**{field.name: getattr(runner, field.name) for field in dataclasses.fields(StepRunner)})


def count_step_flops(runner: StepRunner, batch: dict[str, torch.Tensor], *, step: int) -> int:
    """FLOPs of one whole step (forward, backward, loss), as counted by torch on the ops it runs."""
    counter = FlopCounterMode(display=False)
    with counter:
        runner.run(batch, step=step)
    return int(counter.get_total_flops())


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resident_bytes(device: torch.device) -> int:
    sync_device(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def warm_up(runner: StepRunner, batch: dict[str, torch.Tensor], *, steps: int, first_step: int) -> None:
    """Untimed steps (compilation, allocator, optimizer state), then the gradients dropped so that
    only weights and optimizer state stay resident between turns."""
    for step in range(first_step, first_step + steps):
        runner.run(batch, step=step)
    runner.optimizer.zero_grad(set_to_none=True)


def timed_turn(
    runner: StepRunner,
    batch: dict[str, torch.Tensor],
    *,
    steps: int,
    first_step: int,
    device: torch.device,
    others_resident: int,
) -> tuple[float, int | None]:
    """Seconds for `steps` steps, and the peak memory of this variant alone (the peak during the
    turn less what the other variant keeps resident)."""
    sync_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for step in range(first_step, first_step + steps):
        runner.run(batch, step=step)
    sync_device(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - others_resident if device.type == "cuda" else None
    runner.optimizer.zero_grad(set_to_none=True)
    return seconds, peak


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FlslError(
            "--device cuda was asked for but torch sees no CUDA GPU",
            fix="Run on a machine with a GPU, or pass --device cpu",
        )
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def peak_for(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The peak TFLOP/s MFU divides by, and where it comes from."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value, f"data-sheet dense bf16/fp16 peak of {key}"
        return None, f"unknown for {name}: pass --peak-tflops"
    return None, "unknown for a CPU: pass --peak-tflops"


def machine_info(device: torch.device) -> dict:
    info = {
        "cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def training_threads(recipe: Recipe, device: torch.device) -> int | None:
    """The torch threads `flsl pretrain` computes with on this machine: on a CPU, what its data
    workers (the recipe's data.num_workers) leave of the CPUs; None on a GPU (torch's own)."""
    return cpu_threads(data_workers=recipe.data.num_workers) if device.type == "cpu" else None


def threads_reason(recipe: Recipe, device: torch.device) -> str:
    """Why the step ran with the threads it did, in words."""
    if device.type != "cpu":
        return "torch's default (the step runs on the GPU)"
    if os.environ.get("OMP_NUM_THREADS", "").split(",")[0].isdigit():
        return "OMP_NUM_THREADS, as `flsl pretrain` would use"
    return (
        f"as `flsl pretrain` would: {usable_cpus()} usable CPUs less {recipe.data.num_workers} data worker(s) "
        "(data.num_workers), at least 1"
    )


def run_step_bench(
    recipe: Recipe, settings: StepBenchSettings, *, on_stage: Callable[[str], None] = lambda message: None
) -> dict:
    """Both variants built side by side in this process and timed in alternating turns, with the
    torch threads training would use (`training_threads`); their figures and ratio. `on_stage`
    hears a line as each phase begins."""
    device = resolve_device(settings.device)
    threads = torch.get_num_threads()
    chosen = training_threads(recipe, device)
    if chosen is not None:
        torch.set_num_threads(chosen)
    try:
        return _run_step_bench(recipe, settings, device=device, on_stage=on_stage)
    finally:
        torch.set_num_threads(threads)


def _run_step_bench(
    recipe: Recipe, settings: StepBenchSettings, *, device: torch.device, on_stage: Callable[[str], None]
) -> dict:
    images = settings.batch or min(recipe.optim.global_batch_size, 64)
    batch = synthetic_batch(recipe, images=images, device=device, seed=recipe.optim.seed)
    peak, peak_source = peak_for(device, settings.peak_tflops)
    names = ("baseline", "flsl")
    runners: dict[str, StepRunner] = {}
    resident: dict[str, int] = {}
    flops = 0
    for name in names:
        before = _resident_bytes(device)
        torch.manual_seed(recipe.optim.seed)
        runners[name] = build_variant(recipe, name=name, device=device, compile_=settings.compile)
        if name == "baseline":
            on_stage("counting the FLOPs of one step (an untimed baseline step)")
            flops = count_step_flops(runners[name], batch, step=0)
        on_stage(f"{VARIANT_NAMES[name]}: {settings.warmup} untimed warm-up step(s)")
        warm_up(runners[name], batch, steps=settings.warmup, first_step=1)
        resident[name] = _resident_bytes(device) - before
    # Turns alternate (baseline, flsl, baseline, flsl) so a change in the machine's load weighs
    # on both variants alike.
    seconds = dict.fromkeys(names, 0.0)
    steps_done = dict.fromkeys(names, 0)
    peaks: dict[str, int | None] = dict.fromkeys(names)
    first = 1 + settings.warmup
    for turn in range(TURNS):
        steps = settings.steps // TURNS + (1 if turn < settings.steps % TURNS else 0)
        for name in names:
            if not steps:
                continue
            other = sum(value for key, value in resident.items() if key != name)
            on_stage(f"turn {turn + 1}/{TURNS}, {VARIANT_NAMES[name]}: {steps} timed step(s)")
            elapsed, peak_bytes = timed_turn(
                runners[name],
                batch,
                steps=steps,
                first_step=first + steps_done[name],
                device=device,
                others_resident=other,
            )
            seconds[name] += elapsed
            steps_done[name] += steps
            if peak_bytes is not None:
                peaks[name] = max(peaks[name] or 0, peak_bytes)
    variants: dict[str, dict] = {}
    for name in names:
        step_seconds = seconds[name] / steps_done[name]
        optim = runners[name].recipe.optim
        variants[name] = {
            "steps": steps_done[name],
            "seconds": round(seconds[name], 4),
            "step_seconds": step_seconds,
            "images_per_second": images / step_seconds,
            "tflops_per_second": flops / step_seconds / 1e12,
            "mfu": flops / step_seconds / 1e12 / peak if peak else None,
            "peak_memory_bytes": peaks[name],
            "resident_memory_bytes": resident[name] if device.type == "cuda" else None,
            "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 + grad scaler"}[
                autocast_dtype(optim.precision, device)
            ],
            "compile": optim.compile,
            "fused_modes": optim.fused_modes,
        }
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {
        "settings": {
            "images": images,
            "steps": settings.steps,
            "warmup": settings.warmup,
            "global_size": recipe.augment.global_size,
            "local_size": recipe.augment.local_size,
            "local_crops": recipe.augment.local_crops,
            "arch": recipe.model.arch,
            "patch_size": recipe.model.patch_size,
            "depth": recipe.model.dims()["depth"],
            "torch_threads": torch.get_num_threads(),
            "threads_chosen_as": threads_reason(recipe, device),
        },
        "flops_per_step": flops,
        "flops_per_image": flops / images,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "variants": variants,
        "speedup": variants["baseline"]["step_seconds"] / variants["flsl"]["step_seconds"],
        "process_peak_rss_bytes": peak_rss,
        "machine": machine_info(device),
        "note": NOTE,
    }
