"""Feature extraction for the k-NN evaluation: every rank runs the model on its share of the
shards, the features are gathered (in bounded pieces) into one array in sample order, and can be
cached in `--features-dir` under a key over the weights, the shards and every setting that
changes them.

Features are L2-normalized and stored in fp16: (images, g, d), g = grid^2 box-cell features in
bbox mode, 1 mean-pooled feature in global mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from flsl_cli import storage
from flsl_cli.distributed.ops import all_gather_rows, all_reduce_max, all_reduce_sum, rank, world_size
from flsl_cli.errors import FlslError
from flsl_cli.eval.backbones import EvalModel
from flsl_cli.eval.samples import SKIP_NO_BOXES, SKIP_OUTSIDE_CROP, EvalSamples, ReadPlan, SampleSettings, collate
from flsl_cli.models.precision import autocast_dtype

CACHE_FORMAT = "flsl-knn-features/1"
GATHER_ROWS_BYTES = 256 << 20  # bytes of features sent per gather round
SKIP_REASONS = (SKIP_NO_BOXES, SKIP_OUTSIDE_CROP)


@dataclass
class SplitFeatures:
    features_igd: torch.Tensor  # fp16, L2-normalized
    labels_i: torch.Tensor
    ids_i: torch.Tensor
    seen: int  # samples read
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return int(self.labels_i.shape[0])


@torch.no_grad()
def extract_local(
    model: EvalModel,
    plan: ReadPlan,
    *,
    settings: SampleSettings,
    device: torch.device,
    batch_size: int,
    workers: int,
    on_progress: Callable[[int], None] | None = None,
) -> SplitFeatures:
    """Features of the samples this rank owns (host memory), in the order read."""
    dataset = EvalSamples(plan, rank=rank(), world_size=world_size(), settings=settings)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    with warnings.catch_warnings():  # more workers than CPUs: the CLI says so once, in its own words
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        batches = iter(loader)
    per_side = settings.crop // settings.patch_size
    amp = autocast_dtype("auto", device)
    features, labels, ids = [], [], []
    seen, skipped = 0, Counter[str]()
    for batch in batches:
        if "error" in batch:
            raise batch["error"]
        seen += batch["seen"]
        skipped.update(batch["skipped"])
        if batch["images"].shape[0]:
            images = batch["images"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                tokens_bnd = model.tokens(images)
            if tokens_bnd.shape[1] != per_side * per_side:
                raise FlslError(
                    f"the model gives {tokens_bnd.shape[1]} tokens for a {settings.crop} px crop, not "
                    f"({settings.crop} / patch {settings.patch_size})^2 = {per_side**2}",
                    fix="Evaluate a ViT-like model whose token grid follows its patch size",
                )
            features.append(
                select_features(tokens_bnd.float(), batch["cells"].to(device), mode=settings.mode).to(
                    "cpu", torch.float16
                )
            )
            labels.append(batch["label"])
            ids.append(batch["id"])
        if on_progress is not None:
            on_progress(batch["seen"])
    dim = model.embed_dim
    g = settings.grid**2 if settings.mode == "bbox" else 1
    return SplitFeatures(
        features_igd=torch.cat(features) if features else torch.zeros((0, g, dim), dtype=torch.float16),
        labels_i=torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
        ids_i=torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64),
        seen=seen,
        skipped=dict(skipped),
    )


def select_features(tokens_bnd: torch.Tensor, cells_bg: torch.Tensor, *, mode: str) -> torch.Tensor:
    """(b, g, d) L2-normalized: the tokens under the box cells (bbox) or the token mean (global)."""
    if mode == "bbox":
        picked_bgd = tokens_bnd.gather(1, cells_bg[:, :, None].expand(-1, -1, tokens_bnd.shape[2]))
    else:
        picked_bgd = tokens_bnd.mean(dim=1, keepdim=True)
    return F.normalize(picked_bgd, dim=-1)


def gather(
    local: SplitFeatures,
    *,
    device: torch.device,
    place: Callable[[int], torch.device] = lambda nbytes: torch.device("cpu"),
) -> SplitFeatures:
    """Every rank's features in one array in sample order, on every rank, on the device
    `place(bytes of the result)` picks (the same on every rank).

    Sent in rounds of at most GATHER_ROWS_BYTES per rank, written straight into the result, so
    a rank holds the result, its own features and one round; `device` is where the backend
    communicates.
    """
    ids_all = all_gather_rows(local.ids_i.to(device)).cpu()
    labels_all = all_gather_rows(local.labels_i.to(device)).cpu()
    sorted_ids, order = ids_all.sort()
    _, g, dim = local.features_igd.shape
    out_device = place(ids_all.shape[0] * g * dim * 2)
    out = torch.empty((ids_all.shape[0], g, dim), dtype=torch.float16, device=out_device)
    rows_per_round = max(1, GATHER_ROWS_BYTES // (g * dim * 2))
    most = int(all_reduce_max(torch.tensor([local.images], device=device)).item())
    for start in range(0, most, rows_per_round):
        piece = local.features_igd[start : start + rows_per_round].to(device)
        piece_ids = local.ids_i[start : start + rows_per_round].to(device)
        got = all_gather_rows(piece)
        positions = torch.searchsorted(sorted_ids, all_gather_rows(piece_ids).cpu())
        out[positions.to(out_device)] = got.to(out_device)
    counts = all_reduce_sum(
        torch.tensor([local.seen, *(local.skipped.get(r, 0) for r in SKIP_REASONS)], device=device)
    ).tolist()
    skipped = {reason: int(n) for reason, n in zip(SKIP_REASONS, counts[1:]) if n}
    return SplitFeatures(
        features_igd=out, labels_i=labels_all[order], ids_i=sorted_ids, seen=int(counts[0]), skipped=skipped
    )


def cache_key(*, model: EvalModel, plan: ReadPlan, settings: SampleSettings) -> str:
    """A hash over everything the features depend on: weights, shards (url, size, mtime or ETag),
    settings."""
    shards = [[url, *_fingerprint(url)] for url in plan.urls]
    data = {
        "format": CACHE_FORMAT,
        "model": model.identity,
        "shards": shards,
        "limit": plan.limit,
        "settings": settings.__dict__,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()


def _fingerprint(url: str) -> tuple:
    """(size, modification time or ETag) of a shard, local or remote; (None, None) if unknown."""
    try:
        if storage.is_local(url):
            stat = os.stat(storage.local_path(url))
            return stat.st_size, stat.st_mtime_ns
        info = storage.info(url)
        stamp = next(
            (info[key] for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "updated") if key in info), None
        )
        return info.get("size"), str(stamp) if stamp is not None else None
    except Exception:  # noqa: BLE001 - an unknown fingerprint only makes the key less specific
        return None, None


def cache_path(features_dir: Path, *, split: str, mode: str, key: str) -> Path:
    return Path(features_dir) / f"{split}-{mode}-{key[:20]}.pt"


def load_cache(path: Path) -> SplitFeatures | None:
    """Cached features (memory-mapped), or None if the file is missing or unusable."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if payload.get("format") != CACHE_FORMAT:
            return None
        return SplitFeatures(
            features_igd=payload["features"],
            labels_i=payload["labels"],
            ids_i=payload["ids"],
            seen=int(payload["seen"]),
            skipped=json.loads(payload["skipped"]),
        )
    except Exception:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
        return None


def save_cache(path: Path, features: SplitFeatures, *, meta: dict[str, Any]) -> None:
    """Write the cache atomically (see `storage.write_atomic`)."""
    payload = {
        "format": CACHE_FORMAT,
        "features": features.features_igd.cpu(),
        "labels": features.labels_i,
        "ids": features.ids_i,
        "seen": features.seen,
        "skipped": json.dumps(features.skipped),
        "meta": json.dumps(meta),
    }
    storage.write_atomic(path, lambda handle: torch.save(payload, handle))


def bank_fits_on(device: torch.device, *, bytes_needed: int, fraction: float = 0.6) -> bool:
    """Whether `bytes_needed` fits in `fraction` of the device's free memory (always on a CPU)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return bytes_needed <= fraction * free
