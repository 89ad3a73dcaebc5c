"""Bad data during training: corrupt images, samples without an image, truncated and
unreadable shards are skipped, counted and logged; too many stop the run with a clear error."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
from conftest import run_flsl, tiny_overrides

from flsl_cli.config.schema import Recipe
from flsl_cli.data.augment import MultiCropAugment
from flsl_cli.data.shards import resolve_shards
from flsl_cli.data.stream import TrainStream, build_loader, plan_layout


def _rewrite(shard, edit) -> list[str]:
    """Rewrite a tar shard, letting `edit(key, ext, data)` return new bytes or None to drop."""
    members = []
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            members.append((member.name, tar.extractfile(member).read()))
    touched = []
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            key, ext = name.split(".", 1)
            new = edit(key, ext, data)
            if new is not data:
                touched.append(key)
            if new is None:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(new)
            tar.addfile(info, io.BytesIO(new))
    return sorted(set(touched))


@pytest.fixture
def damaged(demo_data, tmp_path):
    """A copy of the demo train shards with one corrupt JPEG, one sample without its image and
    one truncated shard; returns (path, expected bad keys, truncated shard)."""
    data = tmp_path / "train"
    shutil.copytree(demo_data / "train", data)
    shards = sorted(data.glob("*.tar"))
    first_key = {}

    def corrupt(key, ext, payload):
        if ext == "jpg" and not first_key:
            first_key["corrupt"] = key
            return b"\xff\xd8\xff\xe0 definitely not a jpeg"
        return payload

    def drop_image(key, ext, payload):
        if ext == "jpg" and "dropped" not in first_key:
            first_key["dropped"] = key
            return None
        return payload

    _rewrite(shards[0], corrupt)
    _rewrite(shards[1], drop_image)
    raw = shards[2].read_bytes()
    shards[2].write_bytes(raw[: len(raw) // 2])
    return data, {first_key["corrupt"], first_key["dropped"]}, str(shards[2])


def test_bad_samples_are_skipped_counted_and_logged(damaged, tmp_path):
    data, bad_keys, truncated = damaged
    run = tmp_path / "run"
    result = run_flsl(
        "pretrain",
        "recipes/demo.yaml",
        *tiny_overrides(data, optim__epochs=1, data__max_bad_fraction=0.5, data__num_workers=2),
        "--run-dir",
        run,
    )
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in (run / "bad_samples.jsonl").read_text().splitlines()]
    keys = {r["key"] for r in reports if r["kind"] == "sample"}
    assert keys <= bad_keys and keys  # each logged with its key (those in this epoch's take)
    for report in reports:
        assert report["shard"].endswith(".tar") and report["reason"] and report["step"] >= 1
    reasons = " ".join(r["reason"] for r in reports)
    assert "does not decode" in reasons or "no image field" in reasons
    assert any(r["kind"] == "shard" and r["shard"] == truncated and "truncated" in r["reason"] for r in reports)
    checkpoint = sorted((run / "checkpoints").glob("*.pt"))[-1]
    import torch

    health = torch.load(checkpoint, weights_only=True)["data_health"]
    assert health["bad"] == sum(r["samples"] for r in reports) and health["seen"] > health["bad"]


def test_too_many_bad_samples_stop_the_run(damaged, tmp_path):
    data, _, _ = damaged
    run = tmp_path / "run"
    result = run_flsl(
        "pretrain",
        "recipes/demo.yaml",
        *tiny_overrides(data, optim__epochs=1, data__max_bad_fraction=0.01),
        "--run-dir",
        run,
    )
    assert result.returncode == 2, result.stderr
    assert "data.max_bad_fraction" in result.stderr and "bad_samples.jsonl" in result.stderr
    assert "Traceback" not in result.stderr
    assert list((run / "checkpoints").glob("*.json"))  # the last good step was kept


def test_bad_samples_keep_batches_full_and_resume_exact(damaged):
    """Replacements keep every batch full, and a resumed reader makes the same choices."""
    data, _, _ = damaged
    recipe = Recipe.model_validate(
        {
            "data": {"train": str(data)},
            "model": {"arch": "vit_tiny", "patch_size": 8},
            "augment": {"global_size": 32, "local_size": 16},
            "loss": {"query_window_global": 2, "query_window_local": 2},
        }
    )
    shards = resolve_shards(str(data))
    layout, _ = plan_layout(shards, world_size=1, num_workers=2, local_batch=4)

    def batches(skip):
        stream = TrainStream(shards, layout=layout, rank=0, seed=5, shuffle_buffer=8, augment=MultiCropAugment(recipe))
        stream.set_epoch(0, skip_batches=skip)
        return [(list(b["key"]), b["global"].sum().item()) for b in build_loader(stream, pin_memory=False)]

    full = batches(0)
    assert len(full) == layout.steps_per_epoch and all(len(keys) == 4 for keys, _ in full)
    assert batches(3) == full[3:]
