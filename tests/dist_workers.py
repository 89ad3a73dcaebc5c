"""Functions that tests run inside spawned training processes (importable by the children)."""

from __future__ import annotations

import torch

from flsl_cli.config.schema import Recipe
from flsl_cli.distributed import group
from flsl_cli.train.loop import build_runner


def train_on_fixed_batches(*, recipe_data: dict, batches_path: str, out_path: str) -> None:
    """Run the real training step on given global batches, each rank taking its share."""
    env = group.setup(use_cuda=False)
    try:
        recipe = Recipe.model_validate(recipe_data)
        runner = build_runner(recipe, device=env.device, rank=env.rank, world_size=env.world_size, steps_per_epoch=10)
        batches = torch.load(batches_path, weights_only=True)
        history = []
        for step, batch in enumerate(batches):
            share = {k: v.chunk(env.world_size)[env.rank] for k, v in batch.items()}
            history.append(runner.run(share, step=step))
        if env.is_main:
            torch.save(
                {"history": history, "student": runner.student.state_dict(), "teacher": runner.teacher.state_dict()},
                out_path,
            )
    finally:
        group.teardown()


def fail_on_rank(*, rank: int, error: str) -> None:
    """Raise a user error of the kind named by `error` on process `rank`; the others return."""
    import os

    from flsl_cli import errors

    if int(os.environ["RANK"]) == rank:
        if error == "RunStopped":
            raise errors.RunStopped("stopped by SIGTERM at step 7", step=7, signal_name="SIGTERM")
        raise getattr(errors, error)(f"a {error} on rank {rank}", where="somewhere", fix="Do this")
