"""The typed recipe schema: one small model per section, defaults from FLSL-method.md.

Every section forbids unknown keys, so a typo fails before any work starts. Cross-field rules
(local crop not larger than the global one, ...) live on the section that owns both fields;
rules that need the process count live in `config.load.check_for_world`, and the memory a run
needs in `config.memory`.

Values are typed strictly enough that YAML's surprises fail here: an integer setting takes no
boolean (`true` would be 1) and no fractional number, a float setting takes no boolean and no
`.inf`/`.nan`, and every size and count has an upper bound a machine can meet, and every learning rate,
weight decay and loss coefficient one far above any value that trains.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

ARCHS: dict[str, dict[str, int]] = {
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}


MAX_SEED = 2**32 - 1
# Far above any value that trains (the paper: base_lr 5e-4 per 256 images, loss weights up to 5),
# low enough that a typo such as 1e30 is refused before it diverges.
MAX_LR = 1.0
MAX_COEFFICIENT = 1000.0
MAX_WEIGHT_DECAY = 10.0


def _whole_number(value: Any) -> Any:
    """A whole number for an integer setting: 10 or 10.0, never a boolean or 2.5."""
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, found {value} (a boolean)")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _real_number(value: Any) -> Any:
    """A number for a float setting, never a boolean (finiteness is the section's rule)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, found {value} (a boolean)")
    return value


Int = Annotated[int, BeforeValidator(_whole_number)]
Float = Annotated[float, BeforeValidator(_real_number)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


class ModelConfig(Section):
    arch: Literal["vit_tiny", "vit_small", "vit_base", "vit_large"] = Field(
        "vit_small", description="ViT size: vit_tiny, vit_small, vit_base or vit_large."
    )
    patch_size: Annotated[Literal[8, 14, 16], BeforeValidator(_whole_number)] = Field(
        16, description="Patch size in pixels."
    )
    depth: Int | None = Field(None, ge=1, le=48, description="Override the number of blocks (None: the arch's own).")
    drop_path: Float = Field(0.1, ge=0.0, lt=1.0, description="Stochastic depth of the student.")
    head_out_dim: Int = Field(4096, ge=2, le=131_072, description="K: number of prototypes (centroids).")
    head_hidden_dim: Int = Field(2048, ge=8, le=16_384, description="Hidden width of the projection head.")
    head_bottleneck_dim: Int = Field(256, ge=8, le=4096, description="Bottleneck width before the prototypes.")
    head_layers: Int = Field(3, ge=1, le=8, description="Linear layers before the bottleneck.")

    def dims(self) -> dict[str, int]:
        dims = dict(ARCHS[self.arch])
        if self.depth is not None:
            dims["depth"] = self.depth
        return dims


class DemoDataConfig(Section):
    images: Int = Field(2000, ge=20, le=1_000_000, description="Number of demo images to generate.")
    seed: Int = Field(0, ge=0, le=MAX_SEED, description="Seed of the demo generator.")
    image_size: Int = Field(96, ge=32, le=1024, description="Side of the demo images in pixels.")


class DataConfig(Section):
    train: str = Field(
        ...,
        min_length=1,
        description="Training shards: a directory with index.json, a .tar file, a brace pattern, "
        "or a list of files separated by commas.",
    )
    num_workers: Int = Field(4, ge=0, le=64, description="Data-loader worker processes per rank.")
    shuffle_buffer: Int = Field(1000, ge=0, le=100_000, description="Samples held in the shuffle buffer.")
    max_bad_fraction: Float = Field(
        0.001,
        ge=0.0,
        le=1.0,
        description="Stop when more than this fraction of the samples seen were bad (corrupt, missing, unreadable).",
    )
    demo: DemoDataConfig | None = Field(
        None, description="If set and data.train does not exist, generate the demo data there."
    )


Scale = tuple[Float, Float]


class AugmentConfig(Section):
    global_size: Int = Field(224, ge=16, le=1024, description="Side of teacher and global views.")
    local_size: Int = Field(96, ge=8, le=1024, description="Side of the local student views.")
    local_crops: Int = Field(2, ge=0, le=16, description="Number of local student views.")
    teacher_scale: Scale = Field((0.8, 1.0), description="Teacher crop area range (of the image).")
    student_scale: Scale = Field((0.5, 1.0), description="Student global crop area (of the teacher crop).")
    local_scale: Scale = Field((0.05, 0.4), description="Local crop area range (of the teacher crop).")
    color_jitter_p: Float = Field(0.8, ge=0.0, le=1.0)
    brightness: Float = Field(0.4, ge=0.0)
    contrast: Float = Field(0.4, ge=0.0)
    saturation: Float = Field(0.2, ge=0.0)
    hue: Float = Field(0.1, ge=0.0, le=0.5)
    grayscale_p: Float = Field(0.2, ge=0.0, le=1.0)
    blur_branch_p: Float = Field(0.5, ge=0.0, le=1.0, description="Chance of the blur-only branch.")
    blur_p: Float = Field(0.5, ge=0.0, le=1.0, description="Blur chance in the blur-only branch.")
    alt_blur_p: Float = Field(0.1, ge=0.0, le=1.0, description="Blur chance in the other branch.")
    solarize_p: Float = Field(0.2, ge=0.0, le=1.0, description="Solarize chance in the other branch.")
    blur_radius: Scale = Field((0.1, 2.0), description="Gaussian blur radius range.")
    device: Literal["cpu", "tensor-cpu", "cuda"] = Field(
        "cpu",
        description="Where the views are made. cpu: with PIL in the data workers. tensor-cpu / cuda: the "
        "workers only read the images and draw each sample's random plan; the training process decodes the batch "
        "and makes its views with batched tensor ops on the CPU / on the training GPU (cuda needs GPU training).",
    )

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        if self.local_size > self.global_size:
            raise ValueError(
                f"local_size: expected at most global_size ({self.global_size}), found {self.local_size}; "
                "local crops must not be larger than the global ones"
            )
        for name in ("teacher_scale", "student_scale", "local_scale"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"{name}: expected 0 < low <= high <= 1, found {[low, high]}")
        if self.blur_radius[0] <= 0 or self.blur_radius[0] > self.blur_radius[1]:
            raise ValueError(f"blur_radius: expected 0 < low <= high, found {list(self.blur_radius)}")
        return self


class LossConfig(Section):
    upsilon: Float = Field(0.03, ge=0.0, le=MAX_COEFFICIENT, description="Weight of the intra-view term L1.")
    eta: Float = Field(1.0, ge=0.0, le=MAX_COEFFICIENT, description="Weight of the inter-view term L2.")
    gamma: Float = Field(5.0, ge=0.0, le=MAX_COEFFICIENT, description="Weight of the volume-maximization term L3.")
    sa_scale: Float = Field(0.1, gt=0.0, le=MAX_COEFFICIENT, description="beta_sa = sa_scale / sqrt(scale_dim).")
    ca_scale: Float = Field(0.2, gt=0.0, le=MAX_COEFFICIENT, description="beta_ca = ca_scale / sqrt(scale_dim).")
    scale_dim: Int | None = Field(
        None,
        ge=1,
        le=65_536,
        description="The d under the square root of beta_sa and beta_ca (None: the model's embed dim). "
        "The authors' release fixes it at 384 for every width.",
    )
    student_temp: Float = Field(0.1, ge=1e-3, le=100.0, description="Student softmax temperature T_s.")
    teacher_temp: Float = Field(0.07, ge=1e-3, le=100.0, description="Teacher temperature T_t after warmup.")
    warmup_teacher_temp: Float = Field(0.04, ge=1e-3, le=100.0, description="Teacher temperature at step 0.")
    warmup_teacher_temp_epochs: Float = Field(30, ge=0.0, le=10_000, description="Epochs of teacher-temp warmup.")
    query_window_global: Int = Field(3, ge=1, le=128, description="Query window w on global views.")
    query_window_local: Int = Field(2, ge=1, le=128, description="Query window w on local views.")


class OptimConfig(Section):
    epochs: Int = Field(300, ge=1, le=10_000, description="Training epochs.")
    global_batch_size: Int = Field(512, ge=1, le=65_536, description="Images per step over all processes.")
    base_lr: Float = Field(5e-4, gt=0.0, le=MAX_LR, description="Peak learning rate per 256 images.")
    min_lr: Float = Field(1e-6, ge=0.0, le=MAX_LR, description="Final learning rate of the cosine.")
    warmup_epochs: Float = Field(10, ge=0.0, le=10_000, description="Linear learning-rate warmup.")
    weight_decay: Float = Field(0.04, ge=0.0, le=MAX_WEIGHT_DECAY, description="Weight decay at the start.")
    weight_decay_end: Float = Field(0.4, ge=0.0, le=MAX_WEIGHT_DECAY, description="Weight decay at the end.")
    momentum_teacher: Float = Field(0.996, ge=0.0, le=1.0, description="EMA momentum at the start.")
    clip_grad: Float = Field(3.0, ge=0.0, description="Global gradient-norm clip (0: off).")
    freeze_last_layer_epochs: Float = Field(1, ge=0.0, le=10_000, description="Epochs with the last head layer frozen.")
    betas: tuple[Float, Float] = Field((0.9, 0.999), description="AdamW betas.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "fp32",
        description="fp32 (the default until bf16 autocast has run on a GPU: see README, Benchmarks); "
        "auto: bf16 on CUDA GPUs that support it, fp16 on older ones, fp32 on CPU.",
    )
    seed: Int = Field(0, ge=0, le=MAX_SEED, description="Seed of every random choice in the run.")
    fused_modes: bool = Field(
        False,
        description="Compute the mean-shift modes with scaled_dot_product_attention (same math, equal "
        "within fp32 rounding, faster where a fused kernel exists).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the student's and teacher's backbones (static shapes; the first "
        "steps of each view size are slow while it compiles).",
    )
    max_steps: Int | None = Field(
        None, ge=1, le=1_000_000_000, description="Stop after this many steps (schedules still span all epochs)."
    )

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs: expected at most epochs ({self.epochs}), found {self.warmup_epochs}")
        if self.min_lr > self.base_lr:
            raise ValueError(f"min_lr: expected at most base_lr ({self.base_lr}), found {self.min_lr}")
        for beta in self.betas:
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas: expected values in [0, 1), found {list(self.betas)}")
        return self


class CheckpointConfig(Section):
    every_steps: Int | None = Field(500, ge=1, le=1_000_000_000, description="Save every N steps (None: off).")
    every_minutes: Float | None = Field(30.0, gt=0.0, le=1_000_000, description="Save every M minutes (None: off).")
    keep_last: Int = Field(3, ge=1, le=1000, description="Checkpoints kept on disk.")


# The paper's evaluation resizes the shorter side to 256 and crops 224.
EVAL_RESIZE_RATIO = 256 / 224


class KnnEvalConfig(Section):
    """A k-NN evaluation: the options of `flsl knn-eval`, and the recipe's `eval.knn` section
    (run during pretraining)."""

    train: str = Field(..., min_length=1, description="Shards of the memory bank (with boxes for bbox mode).")
    val: str = Field(..., min_length=1, description="Shards of the evaluated images.")
    mode: Literal["bbox", "global"] = Field("bbox", description="bbox: the paper's; global: instance k-NN.")
    k: list[Annotated[Int, Field(ge=1, le=10_000)]] = Field(
        [10, 20, 100, 200], min_length=1, max_length=32, description="Neighbour counts."
    )
    temperature: Float = Field(0.07, ge=1e-3, le=100.0)
    grid: Int = Field(3, ge=1, le=32, description="Features per box side in bbox mode.")
    resize: Int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Shorter side after resizing (None: crop x 256 / 224, the paper's ratio).",
    )
    crop: Int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Center crop side (None: the size the model trained at, augment.global_size).",
    )
    batch_size: Int = Field(64, ge=1, le=4096, description="Images per forward pass and process.")
    workers: Int | None = Field(
        None,
        ge=0,
        le=64,
        description="Data-loader processes per process (None: up to 4, no more than the CPUs each process has).",
    )
    max_train_images: Int | None = Field(
        None, ge=1, le=1_000_000_000, description="Use only the first N train samples."
    )
    max_val_images: Int | None = Field(None, ge=1, le=1_000_000_000, description="Use only the first N val samples.")
    bank: Literal["auto", "device", "host"] = Field(
        "auto", description="Where the fp16 memory bank lives: auto (the GPU when it fits), device or host."
    )

    @model_validator(mode="after")
    def _check(self) -> KnnEvalConfig:
        if self.resize is not None and self.crop is not None and self.resize < self.crop:
            raise ValueError(f"resize: expected at least crop ({self.crop}), found {self.resize}")
        return self

    def at_training_size(self, training_size: int) -> KnnEvalConfig:
        """These settings with resize and crop filled in for a model trained at `training_size`
        px (given values are kept); a given resize below that crop is a ValueError."""
        resize, crop = eval_sizes(training_size, resize=self.resize, crop=self.crop)
        if resize < crop:
            raise ValueError(f"resize: expected at least crop ({crop}, the training size), found {resize}")
        return self.model_copy(update={"resize": resize, "crop": crop})


def eval_sizes(training_size: int, *, resize: int | None = None, crop: int | None = None) -> tuple[int, int]:
    """(resize, crop) of an evaluation of a model trained at `training_size` px: the crop is the
    training size and the shorter side is resized in the paper's ratio of 256 to 224; a value
    given is kept (a resize is never below the crop it feeds)."""
    crop = crop or training_size
    return resize or max(crop, round(crop * EVAL_RESIZE_RATIO)), crop


class DavisEvalConfig(Section):
    """DAVIS 2017 video object segmentation by label propagation (DINO's protocol): the options
    of `flsl eval davis`, and the recipe's `eval.davis` section (run during pretraining)."""

    davis: str = Field(
        ...,
        min_length=1,
        description="DAVIS 2017 root (JPEGImages/480p, Annotations/480p, ImageSets/2017), on any storage.",
    )
    split: str = Field("val", min_length=1, description="The sequence list ImageSets/2017/SPLIT.txt.")
    sequences: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, max_length=10_000, description="Only these sequences of the split (None: all)."
    )
    max_sequences: Int | None = Field(None, ge=1, le=100_000, description="Only the first N sequences.")
    short_side: Int = Field(480, ge=16, le=4096, description="Short side of the frames the model sees, in pixels.")
    n_last_frames: Int = Field(7, ge=0, le=1000, description="Previous frames used as context besides the first.")
    size_mask_neighborhood: Int = Field(
        12, ge=0, le=10_000, description="Window radius in tokens around each target token (0: the whole frame)."
    )
    topk: Int = Field(5, ge=1, le=10_000, description="Source tokens whose labels each target token takes.")
    temperature: Float = Field(0.1, ge=1e-3, le=100.0, description="Affinity exp(cosine / T).")
    batch_size: Int = Field(8, ge=1, le=1024, description="Frames per forward pass and process.")


class EvalConfig(Section):
    every_epochs: Int | None = Field(
        None, ge=1, le=10_000, description="Run the evaluations (k-NN, DAVIS) every N epochs (None: off)."
    )
    at_end: bool = Field(
        False,
        description="When training ends, evaluate the teacher and a random init of the same architecture "
        "with the k-NN section and print both beside the chance level.",
    )
    knn: KnnEvalConfig | None = None
    davis: DavisEvalConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.every_epochs and self.knn is None and self.davis is None:
            raise ValueError(
                "knn: expected a k-NN section (train, val, ...) or a davis section (davis: ROOT, ...) "
                "when every_epochs is set, found neither"
            )
        if self.at_end and self.knn is None:
            raise ValueError("knn: expected a k-NN section (train, val, ...) when at_end is set, found none")
        return self


class LoggingConfig(Section):
    every_steps: Int = Field(10, ge=1, le=1_000_000_000, description="Write metrics.jsonl every N steps.")
    tensorboard: bool = Field(
        False,
        description="Also write the logged scalars and k-NN results to "
        "RUN_DIR/tensorboard/ (needs pip install 'flsl[tensorboard]').",
    )


class SlurmConfig(Section):
    """Defaults for `flsl pretrain --nodes`; command-line flags override them. Nothing
    cluster-specific is built in: what a cluster needs beyond these goes in `extra_sbatch` and
    `setup`."""

    nodes: Int = Field(1, ge=1, le=10_000, description="Nodes of the job.")
    gpus_per_node: Int = Field(8, ge=0, le=64, description="GPUs per node, one process each (0: CPU processes).")
    tasks_per_node: Int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Processes per node when gpus_per_node is 0 (default 1); with GPUs it must equal gpus_per_node.",
    )
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = Field(None, description="Time limit: minutes, HH:MM:SS or D-HH:MM:SS.")
    constraint: str | None = None
    mem: str | None = Field(None, description="Memory per node, as sbatch --mem takes it (e.g. 200G).")
    cpus_per_task: Int | None = Field(None, ge=1, le=4096)
    exclusive: bool = False
    signal_minutes_before_end: Float = Field(
        5.0,
        gt=0.0,
        le=1092.0,
        description="Ask SLURM for SIGUSR2 this long before the time limit, to checkpoint and requeue.",
    )
    max_requeues: Int = Field(20, ge=0, le=10_000, description="Requeues of one job before it stops for good.")
    requeue_on_failure: Int = Field(
        0,
        ge=0,
        le=10_000,
        description="Requeues of one job after a task died (killed, crashed) rather than "
        "stopped on request; it resumes from its newest checkpoint. 0: a failure ends the job, so a bug does not loop.",
    )
    collective_timeout_minutes: Float = Field(
        5.0,
        gt=0.0,
        le=1440.0,
        description="How long a process waits in a collective (all-reduce, barrier) for "
        "a peer before it gives up with an error, in every multi-process training run (also --devices): a rank "
        "whose peer died does not hang.",
    )
    extra_sbatch: dict[str, str | int | bool] = Field(
        default_factory=dict,
        description="More sbatch options, e.g. {gres: 'gpu:8', reservation: big} -> #SBATCH --gres=gpu:8.",
    )
    setup: list[str] = Field(
        default_factory=list, description="Shell lines run in the job before srun (module load ...)."
    )
    python: str | None = Field(None, description="Python command on the nodes (default: the interpreter that submits).")

    @staticmethod
    def time_limit_seconds(text: str) -> int | None:
        """Seconds in a SLURM time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS);
        None for UNLIMITED. ValueError when `text` is none of these."""
        value = str(text).strip()
        if value.upper() in ("UNLIMITED", "INFINITE"):
            return None
        days, dash, rest = value.partition("-")
        if not dash:
            days, rest = "0", value
        parts = rest.split(":")
        numbers = [days, *parts]
        if not all(p.isdigit() for p in numbers) or len(parts) > 3:
            raise ValueError(f"expected a time limit like 2-00:00:00, 12:00:00 or 90 (minutes), found {text!r}")
        d, p = int(days), [int(x) for x in parts]
        if dash:  # D-HH, D-HH:MM, D-HH:MM:SS
            h, m, s = (p + [0, 0])[:3]
        elif len(p) == 1:  # minutes
            h, m, s = 0, p[0], 0
        elif len(p) == 2:  # MM:SS
            h, m, s = 0, p[0], p[1]
        else:
            h, m, s = p
        seconds = ((d * 24 + h) * 60 + m) * 60 + s
        if seconds <= 0:
            raise ValueError(f"expected a time limit above zero, found {text!r}")
        return seconds

    @model_validator(mode="before")
    @classmethod
    def _minutes_as_text(cls, data):
        """`time: 90` in YAML is an int: SLURM reads it as minutes, so keep it as text."""
        if isinstance(data, dict) and isinstance(data.get("time"), int) and not isinstance(data["time"], bool):
            data = {**data, "time": str(data["time"])}
        return data

    @model_validator(mode="after")
    def _check(self) -> SlurmConfig:
        if self.time is not None:
            try:
                limit = self.time_limit_seconds(self.time)
            except ValueError as exc:
                raise ValueError(f"time: {exc}") from None
            if limit is not None and self.signal_minutes_before_end * 60 >= limit:
                raise ValueError(
                    f"time: the time limit {self.time} is not longer than slurm.signal_minutes_before_end "
                    f"({self.signal_minutes_before_end} min), so the job would be told to stop as it starts; "
                    "ask for more time, or lower slurm.signal_minutes_before_end"
                )
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError(
                f"tasks_per_node: expected {self.gpus_per_node} (one process per GPU) or null with "
                f"gpus_per_node {self.gpus_per_node}, found {self.tasks_per_node}"
            )
        return self


class Recipe(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig
    augment: AugmentConfig = AugmentConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()
    slurm: SlurmConfig = SlurmConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_eval_splits(cls, data: Any) -> Any:
        """eval.knn.train defaults to data.train, and eval.knn.val to the folder named `val` beside
        the training shards' folder (the layout `flsl data demo` and `flsl data shards` write)."""
        if not isinstance(data, dict):
            return data
        section, evaluation = data.get("data"), data.get("eval")
        if not isinstance(evaluation, dict):
            return data
        knn = evaluation.get("knn")
        train = section.get("train") if isinstance(section, dict) else None
        if not (isinstance(train, str) and train.strip() and isinstance(knn, dict)):
            return data
        first = train.split(",")[0].strip().rstrip("/")
        folder = first.rpartition("/")[0] if first.endswith(".tar") or "{" in first else first
        parent = folder.rpartition("/")[0]
        filled = {"train": train, "val": f"{parent}/val" if parent else "val"}
        return {**data, "eval": {**evaluation, "knn": {**filled, **knn}}}

    @model_validator(mode="after")
    def _knn_at_training_size(self) -> Recipe:
        """eval.knn evaluates at the training size unless it names resize and crop."""
        knn = self.eval.knn
        if knn is not None and (knn.resize is None or knn.crop is None):
            self.eval.knn = knn.at_training_size(self.augment.global_size)
        return self

    @model_validator(mode="after")
    def _check_geometry(self) -> Recipe:
        patch = self.model.patch_size
        for key, size in (
            ("augment.global_size", self.augment.global_size),
            ("augment.local_size", self.augment.local_size),
        ):
            if size % patch:
                raise ValueError(f"{key} ({size}) is not a multiple of model.patch_size ({patch})")
        for key, size, window in (
            ("loss.query_window_global", self.augment.global_size, self.loss.query_window_global),
            ("loss.query_window_local", self.augment.local_size, self.loss.query_window_local),
        ):
            if window > size // patch:
                raise ValueError(f"{key} ({window}) is larger than the token grid ({size // patch} tokens per side)")
        return self

    def beta_sa(self) -> float:
        return self.loss.sa_scale / math.sqrt(self._scale_dim())

    def beta_ca(self) -> float:
        return self.loss.ca_scale / math.sqrt(self._scale_dim())

    def _scale_dim(self) -> int:
        return self.loss.scale_dim or self.model.dims()["embed_dim"]


# Keys whose change alters tensor shapes (or their meaning) in a checkpoint.
SHAPE_KEYS = (
    "model.arch",
    "model.patch_size",
    "model.depth",
    "model.head_out_dim",
    "model.head_hidden_dim",
    "model.head_bottleneck_dim",
    "model.head_layers",
    "augment.global_size",
)

# Keys whose change on resume alters the run's schedule (its length, warm-ups, the steps each
# epoch has) or the order in which it reads its data. `optim.max_steps` only moves where the run
# stops and `data.num_workers` is noted by the run itself, so neither is listed.
SCHEDULE_KEYS = (
    "optim.epochs",
    "optim.global_batch_size",
    "optim.warmup_epochs",
    "optim.freeze_last_layer_epochs",
    "loss.warmup_teacher_temp_epochs",
    "optim.seed",
    "data.train",
    "data.shuffle_buffer",
    "data.demo",
)
