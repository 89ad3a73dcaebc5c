"""Drawing: one grid PNG per image (one row per model: the image, ASS per layer, probes,
clusters) and an index.html that shows every grid. The PNG's size in pixels is fixed by the
panel count and the image's aspect ratio (`grid_size_px`), not by the text in it."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flsl_cli.viz.extras import require_matplotlib

PANEL_PX = 200  # width of a panel
TITLE_PX = 34  # room for the two-line title above each row of panels
HEADER_PX = 24  # the image's name, above the rows
DPI = 100
HEAT_ALPHA = 0.6
CLUSTER_COLORS = 20


@dataclass
class Panel:
    title: str
    kind: str = "image"  # image | heat (values in [0, 1]) | clusters (integers)
    values_hw: np.ndarray | None = None
    low: float = 0.0  # the value drawn coldest (heat); higher values run to 1.0, the hottest
    marks: list[tuple[float, float]] = field(default_factory=list)  # (x, y) in resized pixels


def grid_size_px(*, columns: int, rows: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(width, height) in pixels of a grid of `rows` x `columns` panels for an image of that shape."""
    return columns * PANEL_PX, HEADER_PX + rows * (panel_height(image_hw) + TITLE_PX)


def panel_height(image_hw: tuple[int, int]) -> int:
    return max(1, round(PANEL_PX * image_hw[0] / image_hw[1]))


def render_grid(rows: list[list[Panel]], *, image_hw3: np.ndarray, heading: str, path: Path) -> None:
    plt = require_matplotlib()
    columns = max(len(row) for row in rows)
    height_px = panel_height(image_hw3.shape[:2])
    width, height = grid_size_px(columns=columns, rows=len(rows), image_hw=image_hw3.shape[:2])
    figure = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    try:
        figure.text(0.5, 1 - (HEADER_PX / 2) / height, heading, ha="center", va="center", fontsize=9)
        for r, row in enumerate(rows):
            top = HEADER_PX + r * (height_px + TITLE_PX) + TITLE_PX
            for c, panel in enumerate(row):
                axes = figure.add_axes(
                    (c * PANEL_PX / width, 1 - (top + height_px) / height, PANEL_PX / width, height_px / height)
                )
                _draw(axes, panel, image_hw3=image_hw3)
        figure.savefig(path, dpi=DPI, format="png")
    finally:
        plt.close(figure)


def _draw(axes, panel: Panel, *, image_hw3: np.ndarray) -> None:
    h, w = image_hw3.shape[:2]
    axes.imshow(image_hw3, extent=(0, w, h, 0))
    if panel.kind == "heat":
        assert panel.values_hw is not None, "a heat panel carries its values"
        axes.imshow(
            np.clip(panel.values_hw, panel.low, 1.0),
            cmap="inferno",
            vmin=panel.low,
            vmax=1.0,
            alpha=HEAT_ALPHA,
            extent=(0, w, h, 0),
            interpolation="bilinear",
        )
    elif panel.kind == "clusters":
        assert panel.values_hw is not None, "a clusters panel carries its values"
        axes.imshow(
            panel.values_hw % CLUSTER_COLORS,
            cmap="tab20",
            vmin=0,
            vmax=CLUSTER_COLORS - 1,
            alpha=HEAT_ALPHA,
            extent=(0, w, h, 0),
            interpolation="nearest",
        )
    for x, y in panel.marks:
        axes.plot([x], [y], marker="x", color="cyan", markersize=8, markeredgewidth=2)
    axes.set_xlim(0, w)
    axes.set_ylim(h, 0)
    axes.set_title(panel.title, fontsize=7, pad=2)
    axes.set_axis_off()


def write_index(path: Path, *, entries: list[tuple[str, str]], heading: str) -> None:
    """index.html showing every grid: entries are (PNG file name, caption)."""
    figures = "\n".join(
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption in entries
    )
    path.write_text(
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(heading)}</title>"
        "<style>body{font-family:sans-serif;margin:1em}img{max-width:100%}figure{margin:0 0 2em}</style>"
        f"</head><body><h1>{html.escape(heading)}</h1>\n{figures}\n</body></html>\n",
        encoding="utf-8",
    )
