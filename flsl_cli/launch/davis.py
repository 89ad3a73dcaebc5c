"""`flsl eval davis`: the DAVIS evaluation in this process or in N local processes (GPUs, or CPU
processes with gloo), the predicted PNGs staged and published into `--out` only when every
process has finished, and the pictures drawn from them when asked."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flsl_cli.config.schema import DavisEvalConfig
from flsl_cli.distributed import group
from flsl_cli.eval.backbones import ModelSpec
from flsl_cli.eval.davis.api import run_davis_eval
from flsl_cli.eval.davis.layout import read_layout
from flsl_cli.eval.davis.output import discard, open_staging, publish
from flsl_cli.eval.report import Reporter
from flsl_cli.launch.devices import resolve_devices
from flsl_cli.launch.processes import run_processes

PICTURES_DIR = "pictures"


def davis_eval(
    *,
    spec: ModelSpec,
    settings: DavisEvalConfig,
    devices: int | None,
    out: Path | None = None,
    draw: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """The whole evaluation; returns the results dict (see `flsl_cli.eval.davis.api`). With
    `out`, the predicted masks (and, with `draw`, one picture per sequence) end up there."""
    read_layout(
        settings.davis, split=settings.split, sequences=settings.sequences, max_sequences=settings.max_sequences
    )  # a bad folder fails before processes start
    nprocs, use_cuda = resolve_devices(devices)
    staging = open_staging(out) if out is not None else None
    try:
        with tempfile.TemporaryDirectory(prefix="flsl-davis-") as tmp:
            result_path = Path(tmp) / "results.json"
            run_processes(
                davis_process,
                nprocs=nprocs,
                stop_at_step=False,
                kwargs={
                    "spec": asdict(spec),
                    "settings": settings.model_dump(),
                    "use_cuda": use_cuda,
                    "show_progress": show_progress,
                    "staging": str(staging) if staging else None,
                    "progress_dir": tmp,
                    "result_path": str(result_path),
                },
            )
            results = json.loads(result_path.read_text())
        if staging is not None and out is not None:
            if draw:
                from flsl_cli.viz.davis import draw_sequences

                draw_sequences(
                    settings, predictions=staging, out=staging / PICTURES_DIR, names=list(results["sequences"])
                )
            publish(staging, out)
            staging = None
        return results
    finally:
        discard(staging)


def davis_process(
    *,
    spec: dict,
    settings: dict,
    use_cuda: bool,
    show_progress: bool,
    staging: str | None,
    progress_dir: str,
    result_path: str,
) -> None:
    """One process's part; the main process writes the results to `result_path`."""
    env = group.setup(use_cuda=use_cuda)
    try:
        reporter = Reporter(enabled=env.is_main and show_progress)
        results = run_davis_eval(
            spec=ModelSpec(**spec),
            settings=DavisEvalConfig.model_validate(settings),
            device=env.device,
            staging=staging,
            reporter=reporter,
            progress_dir=progress_dir,
        )
        if env.is_main:
            Path(result_path).write_text(json.dumps(results))
    finally:
        group.teardown()
