"""Optional packages of the pictures: a clear error, naming the pip extra, when one is missing."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from flsl_cli.errors import FlslError

VIZ_INSTALL = "pip install 'flsl[viz]'"


def require_matplotlib() -> ModuleType:
    """matplotlib with the headless Agg backend, or a FlslError saying how to install it."""
    if importlib.util.find_spec("matplotlib") is None:
        raise FlslError("drawing pictures needs matplotlib, which is not installed", fix=f"Run {VIZ_INSTALL}")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt
