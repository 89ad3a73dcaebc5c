"""What a DAVIS evaluation shows: the overall figures (as the official evaluation prints them)
and one row per sequence, in percent."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

OVERALL_COLUMNS = (
    ("J&F mean", "JF_mean"),
    ("J mean", "J_mean"),
    ("J recall", "J_recall"),
    ("J decay", "J_decay"),
    ("F mean", "F_mean"),
    ("F recall", "F_recall"),
    ("F decay", "F_decay"),
)


def results_table(results: dict[str, Any]) -> Group:
    settings, model, figures = results["settings"], results["model"], results["overall"]
    step = f" step {model['step']}" if model.get("step") is not None else ""
    which = f" {model['which']}" if model.get("which") else ""
    random = " (random init)" if model.get("random_init") else ""
    header = Text.assemble(
        (f"DAVIS 2017 {settings['split']}, label propagation", "bold"),
        f": {figures['sequences']} sequences, {figures['objects']} objects, {figures['frames']} frames; short side "
        f"{settings['short_side']} px, patch {settings['patch_size']}, context first + {settings['n_last_frames']}, "
        f"window {settings['size_mask_neighborhood']}, top-{settings['topk']}, T={settings['temperature']}\n"
        f"{model.get('source', '')}{step}{which}{random}",
    )
    per_sequence = Table(show_header=True)
    per_sequence.add_column("sequence", style="bold")
    for title in ("objects", "frames", "J&F", "J", "F"):
        per_sequence.add_column(title, justify="right")
    for name, row in results["sequences"].items():
        per_sequence.add_row(
            name,
            str(row["objects"]),
            str(row["frames"]),
            f"{row['JF_mean']:.1f}",
            f"{row['J_mean']:.1f}",
            f"{row['F_mean']:.1f}",
        )
    totals = Table(show_header=True, title="overall (means over objects, %)")
    for title, _ in OVERALL_COLUMNS:
        totals.add_column(title, justify="right")
    totals.add_row(*(f"{figures[key]:.1f}" for _, key in OVERALL_COLUMNS))
    return Group(header, per_sequence, totals)
