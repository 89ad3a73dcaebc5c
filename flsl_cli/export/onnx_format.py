"""The ONNX format: the backbone as a graph from images to patch tokens.

Signature: input `images` float32 (batch, 3, S, S), normalized with ImageNet mean/std, S the
pretraining size (augment.global_size); output `tokens` float32 (batch, (S/P)**2, D), the patch
tokens after the final LayerNorm. The batch size is dynamic, the image size fixed. Written with
torch's dynamo exporter (needs onnxscript), checked with onnx and run with onnxruntime.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from flsl_cli.export import ExportError

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

INPUT_NAME = "images"
OUTPUT_NAME = "tokens"
_NEEDED = ("onnx", "onnxruntime", "onnxscript")


def require_onnx() -> None:
    """Fail early, with the install line, if the optional ONNX packages are missing."""
    missing = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"the onnx format needs {', '.join(missing)}, which is not installed",
            fix="Install the extra: pip install 'flsl[onnx]'",
        )


class PatchTokens(nn.Module):
    """The backbone's `forward_features` as `forward`, which is what the exporter traces."""

    def __init__(self, backbone: VisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images_bchw: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images_bchw)


def write(backbone: VisionTransformer, path: Path, *, img_size: int, metadata: dict[str, str]) -> None:
    import onnx

    module = PatchTokens(backbone).eval()
    example = torch.zeros(2, 3, img_size, img_size)
    chatter = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; the user needs the message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"torch could not export the backbone to ONNX: {first}",
            fix="Try another torch / onnxscript version, or export --format timm",
        ) from None
    if program is None:  # torch returns None only for the legacy (dynamo=False) exporter
        raise ExportError("torch's ONNX exporter returned no program", fix="Try another torch / onnxscript version")
    model = program.model_proto
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def session(path: Path) -> Any:
    """An onnxruntime session on the CPU; call `run_tokens(session, images)` on it."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_tokens(ort_session: Any, images: torch.Tensor) -> Any:
    return ort_session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
