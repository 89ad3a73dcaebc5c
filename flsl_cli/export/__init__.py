"""`flsl export`: a pretrained backbone written in a format other tools load as-is (timm,
ONNX, mmdetection / mmsegmentation, detectron2), reloaded and compared with the source before
the file appears.

Modules: `keymaps` (the mmdet/mmseg/detectron2 key mappings, as data), `timm_format`,
`onnx_format`, `framework_format` (the .pth files), `verify` (feature comparison), `writer`
(staging and atomic commit), `api` (`export_checkpoint`, the one entry point).
"""

from __future__ import annotations

from flsl_cli.errors import FlslError

FORMATS = ("timm", "onnx", "mmdet", "mmseg", "detectron2")


class ExportError(FlslError):
    """An export cannot be written, or the written file does not reproduce the backbone."""
