"""Entry points of the k-NN evaluation: `run_knn_eval` (one process of a job; started in one or
N local processes by `flsl_cli.launch.knn`), and `evaluate_during_training` (called by the
training loop every N epochs with the live teacher backbone).

Flow of one process: load the model; extract the train features (this rank's shards), gather
them on every rank (the bank: fp16, on the device when it fits, else in host memory); extract
and gather the val features; search this rank's share of the val images against the bank once
for top-max(k); score every k from that one search; sum the counts over ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from flsl_cli.config.schema import KnnEvalConfig
from flsl_cli.data.shards import ShardSet, resolve_shards
from flsl_cli.distributed.env import usable_cpus
from flsl_cli.distributed.ops import all_reduce_sum, rank, world_size
from flsl_cli.errors import DataError, FlslError
from flsl_cli.eval.backbones import EvalModel, ModelSpec, live_backbone, load_eval_model
from flsl_cli.eval.features import (
    SplitFeatures,
    bank_fits_on,
    cache_key,
    cache_path,
    extract_local,
    gather,
    load_cache,
    save_cache,
)
from flsl_cli.eval.knn import chance_level, compute_dtype, count_correct, search_topk
from flsl_cli.eval.report import Reporter
from flsl_cli.eval.samples import ReadPlan, SampleSettings

RESULTS_FORMAT = "flsl-knn-eval/1"


def default_workers(processes: int) -> int:
    """Loader workers per process: up to 4, no more than the CPUs each process has to itself."""
    return max(1, min(4, usable_cpus() // max(1, processes)))


def check_model_fits(model: EvalModel, settings: KnnEvalConfig) -> None:
    """The options (resize and crop filled in) must agree with the model's architecture."""
    assert settings.resize is not None and settings.crop is not None, "sizes are filled in first"
    if settings.resize < settings.crop:
        raise FlslError(
            f"--resize {settings.resize} is smaller than the crop ({settings.crop} px)",
            where=model.description.get("source"),
            fix=f"Use --resize {settings.crop} or more, or a smaller --crop",
        )
    if settings.crop % model.patch_size:
        raise FlslError(
            f"--crop {settings.crop} is not a multiple of the model's patch size ({model.patch_size})",
            where=model.description.get("source"),
            fix=f"Use a crop that is a multiple of {model.patch_size}, e.g. "
            f"--crop {settings.crop // model.patch_size * model.patch_size or model.patch_size}",
        )


def run_knn_eval(
    *,
    spec: ModelSpec,
    settings: KnnEvalConfig,
    device: torch.device,
    features_dir: str | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """One process's part of the evaluation (every rank of a job calls it); the results dict,
    the same on every rank: model, settings, image counts, top-1/top-5 per k."""
    shard_sets = resolve_eval_shards(settings)  # before the (slow) model load
    model = load_eval_model(spec)
    settings = _at_training_size(settings, model)
    check_model_fits(model, settings)
    model.module.to(device)
    return evaluate_model(
        model,
        settings=settings,
        device=device,
        reporter=reporter or Reporter(enabled=False),
        shard_sets=shard_sets,
        features_dir=features_dir,
    )


def resolve_eval_shards(
    settings: KnnEvalConfig, *, names: tuple[str, str] = ("--train", "--val")
) -> dict[str, ShardSet]:
    """The train and val shard sets, or a DataError naming the option."""
    return {
        split: resolve_shards(spec, key=name)
        for split, spec, name in (("train", settings.train, names[0]), ("val", settings.val, names[1]))
    }


def evaluate_during_training(
    *, backbone: torch.nn.Module, settings: KnnEvalConfig, device: torch.device, show_progress: bool = False
) -> dict[str, float]:
    """k-NN accuracy of a live flsl backbone (the teacher's), for metrics.jsonl.

    Every rank of the training job must call it (features are gathered and counts summed over
    ranks); it returns the same dict on every rank, e.g. {"knn_bbox_top1_k20": 41.2,
    "knn_bbox_top5_k20": 80.3, "knn_bbox_images": 48.0}. The backbone's train/eval mode is
    restored; features are never cached (the weights change).
    """
    with live_backbone(backbone) as model:
        settings = _at_training_size(settings, model)
        check_model_fits(model, settings)
        results = evaluate_model(
            model,
            settings=settings,
            device=device,
            reporter=Reporter(enabled=show_progress and rank() == 0),
            names=("eval.knn.train", "eval.knn.val"),
        )
    mode = settings.mode
    metrics = {f"knn_{mode}_images": float(results["val"]["images"])}
    for k, row in results["results"].items():
        metrics[f"knn_{mode}_top1_k{k}"] = row["top1"]
        metrics[f"knn_{mode}_top5_k{k}"] = row["top5"]
        if mode == "bbox":
            metrics[f"knn_{mode}_feature_top1_k{k}"] = row["feature_top1"]
    metrics[f"knn_{mode}_chance_top1"] = results["chance"]["top1"]
    if mode == "bbox":
        metrics[f"knn_{mode}_chance_feature_top1"] = results["chance"]["feature_top1"]
    return metrics


def evaluate_model(
    model: EvalModel,
    *,
    settings: KnnEvalConfig,
    device: torch.device,
    reporter: Reporter,
    names: tuple[str, str] = ("--train", "--val"),
    shard_sets: dict[str, ShardSet] | None = None,
    features_dir: str | None = None,
) -> dict[str, Any]:
    """The evaluation of a loaded model (on `device`, eval mode): see `run_knn_eval`."""
    started = time.monotonic()
    assert settings.resize is not None and settings.crop is not None, "sizes are filled in first"
    shard_sets = shard_sets or resolve_eval_shards(settings, names=names)
    sample_settings = SampleSettings(
        mode=settings.mode,
        grid=settings.grid,
        resize=settings.resize,
        crop=settings.crop,
        patch_size=model.patch_size,
        mean=model.mean,
        std=model.std,
    )
    g = settings.grid**2 if settings.mode == "bbox" else 1
    limits = {"train": settings.max_train_images, "val": settings.max_val_images}
    seconds: dict[str, float] = {}
    splits: dict[str, SplitFeatures] = {}
    cached: dict[str, bool] = {}

    def place_bank(nbytes: int) -> torch.device:
        return _bank_device(settings.bank, device=device, bytes_needed=nbytes)

    for split in ("train", "val"):
        t0 = time.monotonic()
        plan = ReadPlan.from_shards(shard_sets[split], limit=limits[split])
        features, cached[split] = _split_features(
            model,
            plan,
            split=split,
            settings=settings,
            sample_settings=sample_settings,
            device=device,
            reporter=reporter,
            place=place_bank if split == "train" else _host,
            features_dir=features_dir,
        )
        _check_split(features, split=split, name=names[split == "val"], mode=settings.mode)
        if split == "train":
            bank_rows = features.images * g
            if max(settings.k) > bank_rows:
                raise FlslError(
                    f"--k {max(settings.k)} is larger than the memory bank ({features.images} train images x {g} "
                    f"= {bank_rows} features)",
                    where=names[0],
                    fix=f"Use k values of at most {bank_rows}, or a larger train set",
                )
            if cached[split]:  # extracted features were gathered straight to their place
                features.features_igd = features.features_igd.to(place_bank(features.features_igd.numel() * 2))
        splits[split] = features
        seconds[f"extract_{split}"] = round(time.monotonic() - t0, 3)

    t0 = time.monotonic()
    train, val = splits["train"], splits["val"]
    bank_nd = train.features_igd.view(-1, train.features_igd.shape[-1])
    bank_labels_n = train.labels_i.repeat_interleave(g).to(device)
    num_classes = int(max(train.labels_i.max(), val.labels_i.max())) + 1
    mine = torch.arange(rank(), val.images, world_size())  # this rank's share of the val images
    queries_qd = val.features_igd[mine].reshape(-1, val.features_igd.shape[-1])
    with reporter.stage("k-NN search", total=1, unit="blocks") as stage:
        sims_qk, index_qk = search_topk(
            queries_qd,
            bank_nd,
            k=max(settings.k),
            device=device,
            on_progress=lambda done, total: stage.set(done, total),
        )
    correct = count_correct(
        sims_qk,
        index_qk,
        bank_labels_n=bank_labels_n,
        query_labels_i=val.labels_i[mine],
        features_per_image=g,
        ks=sorted(set(settings.k)),
        temperature=settings.temperature,
        num_classes=num_classes,
    )
    seconds["search"] = round(time.monotonic() - t0, 3)
    seconds["total"] = round(time.monotonic() - started, 3)
    results = {}
    for k, counts in correct.items():
        top1, top5, feature_top1 = all_reduce_sum(torch.tensor(list(counts), device=device)).tolist()
        results[str(k)] = {
            "top1": round(100.0 * top1 / val.images, 4),
            "top5": round(100.0 * top5 / val.images, 4),
            "feature_top1": round(100.0 * feature_top1 / (val.images * g), 4),
            "correct_top1": int(top1),
            "correct_top5": int(top5),
            "correct_feature_top1": int(feature_top1),
        }
    chance_top1, chance_top5 = chance_level(num_classes=num_classes, features_per_image=g)
    return {
        "format": RESULTS_FORMAT,
        "model": model.description,
        "settings": {
            "mode": settings.mode,
            "k": sorted(set(settings.k)),
            "temperature": settings.temperature,
            "grid": settings.grid if settings.mode == "bbox" else None,
            "features_per_image": g,
            "resize": settings.resize,
            "crop": settings.crop,
            "interpolation": "bicubic",
            "patch_size": model.patch_size,
            "mean": list(model.mean),
            "std": list(model.std),
            "train": settings.train,
            "val": settings.val,
            "max_train_images": settings.max_train_images,
            "max_val_images": settings.max_val_images,
            "num_classes": num_classes,
            "bank": {
                "placement": "device" if train.features_igd.device.type == "cuda" else "host",
                "dtype": "float16",
                "search_dtype": str(compute_dtype(device)).replace("torch.", ""),
            },
            "world_size": world_size(),
            "device": device.type,
        },
        "train": _split_summary(train, g=g, cached=cached["train"]),
        "val": _split_summary(val, g=g, cached=cached["val"]),
        "results": results,
        "chance": {
            "top1": round(100.0 * chance_top1, 4),
            "top5": round(100.0 * chance_top5, 4),
            "feature_top1": round(100.0 / num_classes, 4),
        },
        "seconds": seconds,
    }


def _split_features(
    model: EvalModel,
    plan: ReadPlan,
    *,
    split: str,
    settings: KnnEvalConfig,
    sample_settings: SampleSettings,
    device: torch.device,
    reporter: Reporter,
    place: Callable[[int], torch.device],
    features_dir: str | None,
) -> tuple[SplitFeatures, bool]:
    """A split's gathered features from the cache (host memory, memory-mapped) or the model (on
    the device `place` picks); (features, cached)."""
    path = None
    if features_dir:
        key = cache_key(model=model, plan=plan, settings=sample_settings)
        path = cache_path(Path(features_dir), split=split, mode=settings.mode, key=key)
        found = load_cache(path)
        everyone = int(all_reduce_sum(torch.tensor([int(found is not None)], device=device)).item())
        if everyone == world_size() and found is not None:  # found here, as on every rank
            reporter.note(f"{split} features: reusing {path}")
            return found, True
    expected = plan.expected(slot=rank(), slots=world_size())
    with reporter.stage(f"{split} features", total=expected, unit="images") as stage:
        local = extract_local(
            model,
            plan,
            settings=sample_settings,
            device=device,
            batch_size=settings.batch_size,
            workers=default_workers(world_size()) if settings.workers is None else settings.workers,
            on_progress=stage.advance,
        )
    features = gather(local, device=device, place=place)
    del local
    if path is not None and rank() == 0:
        save_cache(
            path, features, meta={"model": model.description, "split": split, "settings": asdict(sample_settings)}
        )
        reporter.note(f"{split} features cached in {path}")
    return features, False


def _check_split(features: SplitFeatures, *, split: str, name: str, mode: str) -> None:
    if features.images:
        return
    if mode == "bbox" and features.seen:
        raise DataError(
            f"none of the {features.seen} images of the {split} set has a usable box "
            f"({', '.join(f'{n} {why}' for why, n in features.skipped.items())})",
            where=name,
            fix="bbox mode needs boxes in each sample's json, as written by `flsl data demo` or "
            "`flsl data shards --boxes`; use --mode global for images without boxes",
        )
    raise DataError(f"the {split} set yielded no images", where=name, fix="Check the shards (and --max-*-images)")


def _host(nbytes: int) -> torch.device:
    return torch.device("cpu")


def _bank_device(choice: str, *, device: torch.device, bytes_needed: int) -> torch.device:
    if choice == "host" or device.type != "cuda":
        return torch.device("cpu")
    if choice == "device" or bank_fits_on(device, bytes_needed=bytes_needed):
        return device
    return torch.device("cpu")


def _split_summary(features: SplitFeatures, *, g: int, cached: bool) -> dict[str, Any]:
    return {
        "samples": features.seen,
        "images": features.images,
        "features": features.images * g,
        "skipped": dict(features.skipped),
        "cached": cached,
    }


def _at_training_size(settings: KnnEvalConfig, model: EvalModel) -> KnnEvalConfig:
    """The settings with the model's training size filled in; a resize below it is refused."""
    try:
        return settings.at_training_size(model.training_size)
    except ValueError as exc:
        raise FlslError(
            str(exc),
            where="--resize (eval.knn.resize)",
            fix="Give a resize of at least the crop, or leave it out: it follows the crop",
        ) from None
