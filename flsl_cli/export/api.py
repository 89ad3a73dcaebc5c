"""`export_checkpoint`: load a checkpoint's backbone, write it in one format beside the target,
reload what was written and compare its patch features with the backbone, then move it into
place. Nothing appears at the target unless the comparison passes."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

import flsl_cli
from flsl_cli.config.schema import Recipe
from flsl_cli.export import FORMATS, ExportError, framework_format, keymaps, onnx_format, timm_format
from flsl_cli.export.verify import (
    NOTHING_WRITTEN_FIX,
    RELATIVE,
    TOLERANCE,
    Check,
    check_keys,
    compare_features,
    random_images,
)
from flsl_cli.export.writer import check_target, staged
from flsl_cli.models.load import load_backbone
from flsl_cli.models.vit import timm_kwargs

_SUFFIX = {"onnx": ".onnx", "mmseg": ".pth", "mmdet": ".pth", "detectron2": ".pth"}
_BATCH = 2
_ONNX_BATCH = 3  # not the batch the graph was traced with: shows the batch axis is dynamic


@dataclass(frozen=True)
class ExportResult:
    format: str
    which: str
    step: int
    source: Path
    files: tuple[Path, ...]
    checks: tuple[Check, ...]
    usage: tuple[str, ...]  # lines that load the export


@dataclass(frozen=True)
class _Job:
    """What every format writer needs."""

    backbone: VisionTransformer
    recipe: Recipe
    tmp: Path  # where to write
    out: Path  # where it will be, absolute
    provenance: dict
    folder: bool

    def images(self, batch: int = _BATCH) -> torch.Tensor:
        return random_images(batch=batch, size=self.recipe.augment.global_size)

    def compare(
        self, candidate: Callable, *, label: str, fmt: str, reference: Callable | None = None, batch: int = _BATCH
    ) -> Check:
        return compare_features(
            reference or self.backbone.forward_features,
            candidate,
            self.images(batch),
            label=label,
            tolerance=TOLERANCE[fmt],
            relative=fmt in RELATIVE,
            where=str(self.out),
        )


def _is_folder(fmt: str, out: Path) -> bool:
    """timm: NAME.safetensors is the single-file form, a name without suffix the folder form."""
    if fmt == "timm":
        if out.suffix == ".safetensors":
            return False
        if out.suffix == "":
            return True
        raise ExportError(
            f"--format timm writes NAME.safetensors or a directory, not {out.suffix!r}",
            where=str(out),
            fix="Use --out NAME.safetensors (one file) or --out DIR (config.json + model.safetensors)",
        )
    if out.suffix != _SUFFIX[fmt]:
        raise ExportError(
            f"--format {fmt} writes a {_SUFFIX[fmt]} file", where=str(out), fix=f"Use --out NAME{_SUFFIX[fmt]}"
        )
    return False


def _reload(label: str, load: Callable, *, where: Path):
    """Run a third-party loader on the written file; its failure is a failed verification."""
    try:
        return load()
    except Exception as exc:  # noqa: BLE001 - whatever timm/onnxruntime raise, the export is not loadable
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"verification failed ({label}): the written file does not load: {first}",
            where=str(where),
            fix=NOTHING_WRITTEN_FIX,
        ) from None


def export_checkpoint(
    checkpoint: str | Path,
    *,
    fmt: str,
    out: str | Path,
    which: str = "teacher",
    force: bool = False,
    on_note: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export the `which` backbone of a checkpoint file or run directory as `fmt` to `out`."""
    note = on_note or (lambda message: None)
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}", fix=f"Use one of: {', '.join(FORMATS)}")
    out = Path(out).expanduser().absolute()
    folder = _is_folder(fmt, out)
    check_target(out, force=force, folder=folder)  # before the (slow) load
    if fmt == "onnx":
        onnx_format.require_onnx()
    loaded = load_backbone(checkpoint, which=which)
    backbone = loaded.backbone.float().eval()
    provenance = {
        "exported_by": f"flsl {flsl_cli.__version__}",
        "format": fmt,
        "source": str(loaded.source),
        "which": which,
        "step": loaded.step,
        "arch": loaded.recipe.model.arch,
        "patch_size": loaded.recipe.model.patch_size,
        "img_size": loaded.recipe.augment.global_size,
    }
    note(f"exporting the {which} backbone of {loaded.source} (step {loaded.step}) as {fmt}")
    try:
        with staged(out, force=force, folder=folder) as tmp:
            job = _Job(backbone=backbone, recipe=loaded.recipe, tmp=tmp, out=out, provenance=provenance, folder=folder)
            with torch.no_grad():
                files, checks, usage = _WRITERS[fmt](job, fmt)
    except OSError as exc:
        raise ExportError(
            f"cannot write the export: {exc.strerror or exc}",
            where=str(out),
            fix="Choose a --out in a writable directory with free space",
        ) from None
    return ExportResult(
        format=fmt, which=which, step=loaded.step, source=loaded.source, files=files, checks=checks, usage=usage
    )


# What a writer made: the files, the checks that reloaded them, the lines that load them.
_Written = tuple[tuple[Path, ...], tuple[Check, ...], tuple[str, ...]]


def _export_timm(job: _Job, fmt: str) -> _Written:
    spec = timm_format.timm_spec(job.recipe)
    if job.folder:
        timm_format.write_folder(job.backbone, job.tmp, spec=spec, provenance=job.provenance)
        weights = job.tmp / timm_format.WEIGHTS_NAME
        from_dir = _reload("timm local-dir", lambda: timm_format.load_from_folder(job.tmp), where=job.out)
        from_file = _reload("timm file", lambda: timm_format.load_from_file(spec, file=weights), where=job.out)
        checks: tuple[Check, ...] = (
            job.compare(from_dir.forward_features, label="timm local-dir", fmt=fmt),
            job.compare(from_file.forward_features, label="timm file", fmt=fmt),
        )
        final_weights = job.out / timm_format.WEIGHTS_NAME
        files = (job.out / timm_format.CONFIG_NAME, final_weights)
        usage = (timm_format.folder_load_line(job.out), timm_format.file_load_line(spec, file=final_weights))
        return files, checks, usage
    timm_format.write_file(job.backbone, job.tmp, spec=spec, provenance=job.provenance)
    model = _reload("timm file", lambda: timm_format.load_from_file(spec, file=job.tmp), where=job.out)
    checks = (job.compare(model.forward_features, label="timm file", fmt=fmt),)
    return (job.out,), checks, (timm_format.file_load_line(spec, file=job.out),)


def _export_onnx(job: _Job, fmt: str) -> _Written:
    size = job.recipe.augment.global_size
    metadata = {key: str(value) for key, value in job.provenance.items()}
    metadata["input"] = f"images: float32 (batch, 3, {size}, {size}), normalized with ImageNet mean/std"
    onnx_format.write(job.backbone, job.tmp, img_size=size, metadata=metadata)
    session = _reload("onnxruntime", lambda: onnx_format.session(job.tmp), where=job.out)
    check = job.compare(
        lambda images: onnx_format.run_tokens(session, images), label="onnxruntime", fmt=fmt, batch=_ONNX_BATCH
    )
    usage = (
        f"session = onnxruntime.InferenceSession({json.dumps(str(job.out))})",
        f'tokens = session.run(["{onnx_format.OUTPUT_NAME}"], {{"{onnx_format.INPUT_NAME}": images}})[0]  '
        f"# images: float32 (batch, 3, {size}, {size})",
    )
    return (job.out,), (check,), usage


def _pre_norm_tokens(model: VisionTransformer) -> Callable:
    """The tokens that enter the final norm: what detectron2's ViT (no final norm) returns."""

    def run(images: torch.Tensor) -> torch.Tensor:
        captured = []
        handle = model.norm.register_forward_hook(lambda module, args, output: captured.append(args[0]))
        try:
            model.forward_features(images)
        finally:
            handle.remove()
        return captured[0]

    return run


def _export_framework(job: _Job, fmt: str) -> _Written:
    config = job.recipe.model
    dims = config.dims()
    size = job.recipe.augment.global_size
    framework_format.write(job.backbone, job.tmp, framework=fmt, meta=job.provenance)
    state = _reload(f"{fmt} keys", lambda: framework_format.read(job.tmp, framework=fmt), where=job.out)
    expected = keymaps.expected_shapes(
        framework=fmt,
        depth=dims["depth"],
        embed_dim=dims["embed_dim"],
        patch_size=config.patch_size,
        tokens=(size // config.patch_size) ** 2,
    )
    check_keys(
        {key: tuple(value.shape) for key, value in state.items()}, expected, label=f"{fmt} keys", where=str(job.out)
    )
    rebuilt = VisionTransformer(**timm_kwargs(config, img_size=size)).eval()
    result = rebuilt.load_state_dict(keymaps.to_timm(state, framework=fmt), strict=False)
    dropped = keymaps.dropped_keys(framework=fmt)
    if set(result.missing_keys) != dropped or result.unexpected_keys:
        raise ExportError(
            f"verification failed ({fmt} keys): mapped back to timm, missing "
            f"{sorted(set(result.missing_keys) - dropped)}, unexpected {result.unexpected_keys}",
            where=str(job.out),
            fix=NOTHING_WRITTEN_FIX,
        )
    if dropped:  # detectron2: compare what ViTDet computes, the last block's tokens
        check = job.compare(
            _pre_norm_tokens(rebuilt),
            reference=_pre_norm_tokens(job.backbone),
            fmt=fmt,
            label=f"{fmt} keys mapped back to timm, last-block tokens",
        )
    else:
        check = job.compare(rebuilt.forward_features, fmt=fmt, label=f"{fmt} keys mapped back to timm")
    return (job.out,), (check,), (_framework_usage(fmt, job, dims),)


def _framework_usage(fmt: str, job: _Job, dims: dict) -> str:
    patch = job.recipe.model.patch_size
    size = job.recipe.augment.global_size
    if fmt == "detectron2":
        return (
            f"model.backbone.net.update(patch_size={patch}, embed_dim={dims['embed_dim']}, depth={dims['depth']}, "
            f"num_heads={dims['num_heads']}, pretrain_img_size={size}, pretrain_use_cls_token=True); "
            f"train.init_checkpoint = {json.dumps(str(job.out))}"
        )
    kind = "VisionTransformer" if fmt == "mmseg" else "mmseg.VisionTransformer"
    return (
        f'backbone=dict(type="{kind}", img_size={size}, patch_size={patch}, embed_dims={dims["embed_dim"]}, '
        f"num_layers={dims['depth']}, num_heads={dims['num_heads']}, with_cls_token=False, output_cls_token=False, "
        f'final_norm=True, norm_cfg=dict(type="LN", eps=1e-6), '
        f'init_cfg=dict(type="Pretrained", checkpoint={json.dumps(str(job.out))}))'
    )


_WRITERS = {
    "timm": _export_timm,
    "onnx": _export_onnx,
    "mmseg": _export_framework,
    "mmdet": _export_framework,
    "detectron2": _export_framework,
}
