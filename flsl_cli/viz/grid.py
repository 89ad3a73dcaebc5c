"""Drawing: one grid PNG per image (one row per model: the image, ASS per layer, probes,
clusters, and the colour bar of the row's similarity maps) and an index.html that shows every
grid. The PNG's size in pixels is fixed by the panel count and the image's aspect ratio
(`grid_size_px`), not by the text in it."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flsl_cli.viz.extras import require_matplotlib

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PANEL_PX = 200  # width of a panel
TITLE_PX = 34  # room for the two-line title above each row of panels
HEADER_PX = 24  # the image's name, above the rows
DPI = 100
DEFAULT_OPACITY = 0.8  # of the maps over the photograph (at 0.6 the photograph dominated)
HEAT_CMAP = "inferno"
CLUSTER_COLORS = 20
COLORBAR_PX = 70  # the column right of the panels that holds each row's colour bar
COLORBAR_LABEL = "colour bar"  # the label of a colour bar's axes (row N: "colour bar N")


@dataclass
class Panel:
    title: str
    kind: str = "image"  # image | heat (values in [0, 1]) | clusters (integers)
    values_hw: np.ndarray | None = None
    low: float = 0.0  # the value drawn coldest (heat); higher values run to 1.0, the hottest
    marks: list[tuple[float, float]] = field(default_factory=list)  # (x, y) in resized pixels


def grid_size_px(*, columns: int, rows: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(width, height) in pixels of a grid of `rows` x `columns` panels for an image of that
    shape, with the colour bars' column."""
    return columns * PANEL_PX + COLORBAR_PX, HEADER_PX + rows * (panel_height(image_hw) + TITLE_PX)


def panel_height(image_hw: tuple[int, int]) -> int:
    return max(1, round(PANEL_PX * image_hw[0] / image_hw[1]))


def render_grid(
    rows: list[list[Panel]], *, image_hw3: np.ndarray, heading: str, path: Path, opacity: float = DEFAULT_OPACITY
) -> None:
    """Draw the grid (`grid_figure`) and write it as a PNG."""
    plt = require_matplotlib()
    figure = grid_figure(rows, image_hw3=image_hw3, heading=heading, opacity=opacity)
    try:
        figure.savefig(path, dpi=DPI, format="png")
    finally:
        plt.close(figure)


def grid_figure(
    rows: list[list[Panel]], *, image_hw3: np.ndarray, heading: str, opacity: float = DEFAULT_OPACITY
) -> Figure:
    """The grid as a matplotlib Figure: a row of panels per model, the maps drawn over the image
    at `opacity`, and at the right of each row with a similarity map its colour bar."""
    plt = require_matplotlib()
    columns = max(len(row) for row in rows)
    height_px = panel_height(image_hw3.shape[:2])
    width, height = grid_size_px(columns=columns, rows=len(rows), image_hw=image_hw3.shape[:2])
    figure = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    figure.text(0.5, 1 - (HEADER_PX / 2) / height, heading, ha="center", va="center", fontsize=9)
    for r, row in enumerate(rows):
        top = HEADER_PX + r * (height_px + TITLE_PX) + TITLE_PX
        for c, panel in enumerate(row):
            axes = figure.add_axes(
                (c * PANEL_PX / width, 1 - (top + height_px) / height, PANEL_PX / width, height_px / height)
            )
            _draw(axes, panel, image_hw3=image_hw3, opacity=opacity)
        if any(panel.kind == "heat" for panel in row):
            box = (columns * PANEL_PX + 8, top + 4, 12, height_px - 12)  # room below for the bottom tick's label
            _colour_bar(figure, row=r, box=box, size=(width, height))
    return figure


def _colour_bar(figure, *, row: int, box: tuple[int, int, int, int], size: tuple[int, int]) -> None:
    """The colour scale of a row's similarity maps: each map runs from its own lowest value
    (an ASS map's minimum; 0 for a probe) at the coldest colour to 1 at the hottest."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    left, top, bar_width, bar_height = box
    width, height = size
    axes = figure.add_axes(
        (left / width, 1 - (top + bar_height) / height, bar_width / width, bar_height / height),
        label=f"{COLORBAR_LABEL} {row + 1}",
    )
    bar = figure.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=HEAT_CMAP), cax=axes)
    bar.set_ticks([0.0, 1.0], labels=["lowest", "1"])
    bar.ax.tick_params(labelsize=6)
    bar.set_label("similarity", fontsize=7, labelpad=-4)


def _draw(axes, panel: Panel, *, image_hw3: np.ndarray, opacity: float) -> None:
    h, w = image_hw3.shape[:2]
    axes.imshow(image_hw3, extent=(0, w, h, 0))
    if panel.kind == "heat":
        assert panel.values_hw is not None, "a heat panel carries its values"
        axes.imshow(
            np.clip(panel.values_hw, panel.low, 1.0),
            cmap=HEAT_CMAP,
            vmin=panel.low,
            vmax=1.0,
            alpha=opacity,
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
            alpha=opacity,
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
