"""The picture of `flsl compare --out compare.png`: one panel per swept (or differing) key with
the chosen metric of each run against that key's value, and one panel of the metric's curves
over steps, one line per run (where the metric was logged more than once)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flsl_cli import storage
from flsl_cli.errors import FlslError
from flsl_cli.viz.extras import require_matplotlib

MAX_KEY_PANELS = 6


def plot_comparison(
    *,
    metric: str,
    by_key: Mapping[str, Sequence[tuple[Any, float]]],
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    out: Path,
) -> Path:
    """Write the PNG to `out` (whole or not at all). `by_key`: key -> (its value, the metric) of
    each run; `curves`: run name -> (steps, metric values)."""
    plt = require_matplotlib()
    out = Path(out).expanduser()
    if out.is_dir():
        raise FlslError("--out is a folder", where=str(out), fix="Pass a file name, e.g. --out compare.png")
    keys = list(by_key)[:MAX_KEY_PANELS]
    drawn_curves = {name: c for name, c in curves.items() if len(c[0]) > 1}
    panels = len(keys) + (1 if drawn_curves else 0)
    if panels == 0:
        raise FlslError(
            f"nothing to plot: no key differs between the runs and {metric} was logged at most once per run",
            fix="Compare runs that differ in some key, or choose a --metric logged over steps (e.g. loss)",
        )
    figure, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.8), squeeze=False)
    for axis, key in zip(axes[0], keys):
        points = by_key[key]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in points)
        if numeric:
            ordered = sorted(points, key=lambda p: p[0])
            axis.plot([v for v, _ in ordered], [m for _, m in ordered], "o")
            spread = sorted({v for v, _ in points})
            if len(spread) > 2 and spread[0] > 0 and spread[-1] / spread[0] >= 10:
                axis.set_xscale("log")
        else:
            names = list(dict.fromkeys(str(v) for v, _ in points))
            axis.plot([names.index(str(v)) for v, _ in points], [m for _, m in points], "o")
            axis.set_xticks(range(len(names)), names, rotation=20)
        axis.set_xlabel(key)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    if drawn_curves:
        axis = axes[0][-1]
        for name, (steps, series) in drawn_curves.items():
            axis.plot(steps, series, label=name, linewidth=1)
        axis.set_xlabel("step")
        axis.set_ylabel(metric)
        axis.set_title(f"{metric} over steps")
        axis.legend(fontsize=6)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    try:  # the picture appears whole or not at all
        storage.replace_local(out, lambda handle: figure.savefig(handle, dpi=100, format="png"))
    finally:
        plt.close(figure)
    return out
