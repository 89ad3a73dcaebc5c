"""The mmdet / mmseg and detectron2 formats: `.pth` files of plain tensors (and a `meta` dict of
strings and numbers), so `torch.load(weights_only=True)` reads them, keyed as `keymaps` says.

- mmdet / mmseg: `{"state_dict": ..., "meta": ...}`, backbone keys without a prefix, for the
  backbone's `init_cfg=dict(type="Pretrained", checkpoint=PATH)`.
- detectron2: `{"model": ..., "meta": ...}`, keys under `backbone.net.`, for
  `DetectionCheckpointer(model).load(PATH)` / `train.init_checkpoint = PATH`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flsl_cli.export.keymaps import to_framework

_CONTAINER = {"mmseg": "state_dict", "mmdet": "state_dict", "detectron2": "model"}


def write(backbone: torch.nn.Module, path: Path, *, framework: str, meta: dict) -> None:
    tensors = to_framework(backbone.state_dict(), framework=framework)
    with open(path, "wb") as handle:
        torch.save({_CONTAINER[framework]: tensors, "meta": meta}, handle)


def read(path: Path, *, framework: str) -> dict[str, torch.Tensor]:
    """The state dict of a written file, loaded without unpickling code."""
    return torch.load(path, map_location="cpu", weights_only=True)[_CONTAINER[framework]]
