"""Grid random query sampling ("random pooling").

The token grid of a student view is split into non-overlapping w x w windows over the largest
block of whole windows, placed at a random corner of the grid; one random token per window is
a query. Only queries enter the loss; all tokens still act as keys and values.
"""

from __future__ import annotations

import numpy as np


def grid_query_indices(*, grid: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """Flat (row-major) token indices of one query per window: shape ((grid // window) ** 2,)."""
    windows = grid // window
    if windows < 1:
        raise ValueError(f"window {window} does not fit a {grid}x{grid} token grid")
    slack = grid - windows * window
    top, left = (rng.integers(0, 2, size=2) * slack).tolist()
    starts = np.arange(windows) * window
    rows = top + starts[:, None] + rng.integers(0, window, size=(windows, windows))
    cols = left + starts[None, :] + rng.integers(0, window, size=(windows, windows))
    return (rows * grid + cols).reshape(-1).astype(np.int64)
