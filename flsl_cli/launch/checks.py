"""What is checked before any training process starts: the recipe against the processes that
will run it (batch split, memory), the data, and the demo data a recipe may ask for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from flsl_cli import storage
from flsl_cli.config.load import check_for_world
from flsl_cli.config.memory import check_memory
from flsl_cli.config.schema import Recipe
from flsl_cli.data.demo import write_demo_dataset
from flsl_cli.data.device_views import check_view_device
from flsl_cli.data.shards import resolve_shards
from flsl_cli.data.stream import plan_layout
from flsl_cli.distributed.env import usable_cpus
from flsl_cli.errors import FlslError, RecipeError
from flsl_cli.eval.davis.layout import read_layout
from flsl_cli.launch.devices import device_memory
from flsl_cli.train.tensorboard import check_tensorboard

T = TypeVar("T")


def ensure_demo_data(recipe: Recipe, *, on_progress: Callable[[int, int], None] | None = None) -> bool:
    """Generate the demo data set at data.train's parent if the recipe asks for it and it is missing."""
    demo = recipe.data.demo
    if demo is None or not demo_data_pending(recipe):
        return False
    train = Path(recipe.data.train).expanduser()
    write_demo_dataset(
        train.parent, images=demo.images, seed=demo.seed, image_size=demo.image_size, on_progress=on_progress
    )
    return True


def check_data(
    recipe: Recipe, *, world_size: int, on_unreachable: Callable[[str, FlslError], None] | None = None
) -> list[str]:
    """The training shards and the k-NN evaluation's shards can be read; the notes on how the
    training shards spread over the processes' data workers. With `on_unreachable`, a remote
    location that cannot be read from here is passed to it (the key and the error) instead of
    raising: it may be reachable where the run trains."""

    def checked(key: str, location: str, check: Callable[[], T]) -> T | None:
        try:
            return check()
        except FlslError as exc:
            if on_unreachable is None or storage.is_local(location):
                raise
            on_unreachable(key, exc)
            return None

    train = recipe.data.train
    shards = checked("data.train", train, lambda: resolve_shards(train))
    knn = recipe.eval.knn
    if knn is not None and (recipe.eval.every_epochs or recipe.eval.at_end):
        checked("eval.knn.train", knn.train, lambda: resolve_shards(knn.train, key="eval.knn.train"))
        checked("eval.knn.val", knn.val, lambda: resolve_shards(knn.val, key="eval.knn.val"))
    davis = recipe.eval.davis
    if davis is not None:  # a bad DAVIS folder fails now, not at the first evaluation
        checked(
            "eval.davis.davis",
            davis.davis,
            lambda: read_layout(
                davis.davis, split=davis.split, sequences=davis.sequences, max_sequences=davis.max_sequences
            ),
        )
    if shards is None:
        return []
    _, notes = plan_layout(
        shards,
        world_size=world_size,
        num_workers=recipe.data.num_workers,
        local_batch=recipe.optim.global_batch_size // world_size,
    )
    return notes


def demo_data_pending(recipe: Recipe) -> bool:
    """The recipe asks for the demo data set and it is not there yet (`flsl pretrain` writes it)."""
    train = recipe.data.train
    return recipe.data.demo is not None and storage.is_local(train) and not Path(train).expanduser().exists()


def check_recipe(recipe: Recipe, *, source: str, world_size: int, use_cuda: bool) -> None:
    """The recipe against the processes that will train it on this machine: the global batch
    splits evenly, and the model, head and batch fit in memory. Every problem at once."""
    device_bytes, device_name, sharing = device_memory(devices=world_size, use_cuda=use_cuda)
    problems = []
    for check in (
        lambda: check_for_world(recipe, world_size=world_size, source=source),
        lambda: check_memory(
            recipe,
            world_size=world_size,
            source=source,
            device_bytes=device_bytes,
            device_name=device_name,
            processes_per_device=sharing,
        ),
        lambda: check_tensorboard(recipe, source=source),
        lambda: check_view_device(recipe, trains_on="cuda" if use_cuda else "cpu", source=source),
    ):
        try:
            check()
        except RecipeError as exc:
            problems.extend(exc.problems)
    if problems:
        raise RecipeError(problems, source=source)


def note_worker_count(recipe: Recipe, *, on_note: Callable[[str], None]) -> None:
    cpus = usable_cpus()
    if recipe.data.num_workers > cpus:
        on_note(
            f"data.num_workers is {recipe.data.num_workers}, more than the {cpus} CPUs each process may use: "
            "the worker processes will share them"
        )
