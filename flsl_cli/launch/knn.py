"""`flsl knn-eval`: the evaluation in this process or in N local processes (GPUs, or CPU
processes with gloo); rank 0's results come back to the caller."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flsl_cli.config.schema import KnnEvalConfig
from flsl_cli.distributed import group
from flsl_cli.eval.api import default_workers, run_knn_eval
from flsl_cli.eval.backbones import ModelSpec
from flsl_cli.eval.report import Reporter
from flsl_cli.launch.devices import resolve_devices
from flsl_cli.launch.processes import run_processes


def knn_eval(
    *,
    spec: ModelSpec,
    settings: KnnEvalConfig,
    devices: int | None,
    features_dir: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """The whole evaluation; returns the results dict (see `flsl_cli.eval.api.run_knn_eval`).
    Extracted features are cached in `features_dir` when given."""
    nprocs, use_cuda = resolve_devices(devices)
    if settings.workers is None:
        settings = settings.model_copy(update={"workers": default_workers(nprocs)})
    with tempfile.TemporaryDirectory(prefix="flsl-knn-") as tmp:
        result_path = Path(tmp) / "results.json"
        run_processes(
            knn_process,
            nprocs=nprocs,
            stop_at_step=False,
            kwargs={
                "spec": asdict(spec),
                "settings": settings.model_dump(),
                "features_dir": features_dir,
                "use_cuda": use_cuda,
                "show_progress": show_progress,
                "result_path": str(result_path),
            },
        )
        return json.loads(result_path.read_text())


def knn_process(
    *, spec: dict, settings: dict, features_dir: str | None, use_cuda: bool, show_progress: bool, result_path: str
) -> None:
    """One process's part of the evaluation; the main process writes the results to
    `result_path` (decided while the process group is up: after teardown every process reads
    as rank 0)."""
    env = group.setup(use_cuda=use_cuda)
    try:
        reporter = Reporter(enabled=env.is_main and show_progress)
        results = run_knn_eval(
            spec=ModelSpec(**spec),
            settings=KnnEvalConfig.model_validate(settings),
            features_dir=features_dir,
            device=env.device,
            reporter=reporter,
        )
        if env.is_main:
            Path(result_path).write_text(json.dumps(results))
    finally:
        group.teardown()
