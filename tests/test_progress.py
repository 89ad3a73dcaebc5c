"""The training progress display: on an 80-column terminal the bar keeps the step count, the
speed and the ETA readable and shows every loss term on its own line; off a terminal it prints
plain log lines."""

from __future__ import annotations

import io
import re

from rich.console import Console

from flsl_cli.train.progress import TrainProgress

VALUES = {"loss": 3.1946, "intra": 0.1653, "inter": 3.1435, "volume": 0.0092, "lr": 1e-3}


def _show(*, terminal: bool) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=80, color_system=None)
    progress = TrainProgress(
        total_steps=192, start_step=0, epochs=8, steps_per_epoch=24, enabled=True, log_every=24, console=console
    )
    for step in range(1, 151):
        progress.update(step=step, values=VALUES, images_per_s=96.8)
    progress.close()
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())


def test_terminal_bar_fits_80_columns_with_every_term():
    last = [line for line in _show(terminal=True).replace("\r", "\n").splitlines() if line.strip()][-2:]
    assert all(len(line) <= 80 for line in last), last
    bar, terms = last
    assert "epoch 7/8" in bar and "150/192" in bar and "96.8 img/s" in bar and "eta" in bar and "…" not in bar
    assert terms.strip() == "loss 3.1946  L1 0.1653  L2 3.1435  L3 0.0092"


def test_plain_log_lines_off_a_terminal():
    lines = _show(terminal=False).splitlines()
    assert lines[0].startswith("epoch 1/8  step 24/192  96.8 img/s  loss 3.1946  L1 0.1653")
    assert len(lines) == 6 and lines[-1].startswith("epoch 6/8  step 144/192")


def test_progress_never_lands_after_the_final_table_in_a_file(tmp_path):
    """`flsl pretrain ... > log 2>&1` on a recipe that generates its demo data: the demo-data bar
    is written where the generation happened, before training; after the final tables (the run
    summary, then the k-NN comparison) come no progress lines."""
    import os
    import subprocess
    import sys

    from conftest import REPO, tiny_overrides

    data = tmp_path / "demo"
    args = [
        *tiny_overrides(data / "train", optim__max_steps=2),
        *["--set", "data.demo={images: 40, seed: 0, image_size: 64}", "--set", "eval.at_end=true"],
        *["--set", "eval.knn={k: [5], workers: 0}", "--set", "data.num_workers=0"],
    ]
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        result = subprocess.run(
            [sys.executable, "-m", "flsl_cli", "pretrain", "recipes/demo.yaml", *args, "--run-dir", tmp_path / "run"],
            cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log.read_text()
    assert result.returncode == 0, text
    bar, table = text.index("generating demo data"), text.index("flsl pretrain: ")
    assert bar < text.index("step 1/2") < table, text
    after = text[table:]
    assert "generating" not in after and "step 2/2" not in after, after
    assert "random init" in after  # the k-NN comparison is the last table
