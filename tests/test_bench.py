"""`flsl bench data`: both pipelines measured in one run, figures and ratio in the JSON."""

from __future__ import annotations

import json

import pytest

from flsl_cli.data.shards import Shard, ShardSet


def test_bench_data_reports_both_pipelines_and_their_ratio(flsl, demo_data, tmp_path):
    """The shard pipeline and the ImageFolder reference both run and report images/s; the ratio
    is their quotient (no timing is asserted: the machine is shared)."""
    out = tmp_path / "bench.json"
    result = flsl(
        "bench", "data", demo_data / "train", "--seconds", "2", "--max-images", "64", "--workers", "1", "--out", out
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    flsl_run, reference = figures["pipelines"]["flsl"], figures["pipelines"]["reference"]
    for run in (flsl_run, reference):
        assert run["workers"] == 1
        assert run["images"] > 0 and run["images_per_second"] > 0
        assert run["images_per_second_per_worker"] == pytest.approx(run["images_per_second"])
    assert figures["ratio"] == pytest.approx(flsl_run["images_per_second"] / reference["images_per_second"])
    settings = figures["settings"]
    assert settings["samples"] <= 64 and settings["reference_samples"] == settings["samples"]
    assert "flsl / reference" in result.stdout and "pillow-simd" in result.stdout


def test_bench_data_keeps_the_imagefolder_copy_it_is_given(flsl, demo_data, tmp_path):
    """With --imagefolder DIR (absent), the reference copy is written there as DIR/<label>/<key>.jpg
    with one file per sample measured, and kept for the next run."""
    copy, out = tmp_path / "copy", tmp_path / "bench.json"
    result = flsl(
        "bench",
        "data",
        demo_data / "train",
        "--seconds",
        "1",
        "--max-images",
        "48",
        "--workers",
        "1",
        "--imagefolder",
        copy,
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    files = sorted(copy.glob("*/*.jpg"))
    assert len(files) == figures["settings"]["samples"] == 48
    assert {f.parent.name for f in files} <= set("0123456") and not figures["settings"]["imagefolder_reused"]


def test_bench_data_missing_shards_is_a_short_error(flsl, tmp_path):
    """A URL with no shards ends with the usual one-line error and exit code 2, no traceback."""
    result = flsl("bench", "data", tmp_path / "nowhere", "--seconds", "1")
    assert result.returncode == 2
    assert "URL does not exist" in result.stderr and "Traceback" not in result.stderr


def test_max_images_limits_the_samples_read():
    """--max-images takes whole leading shards when they fit, else the first samples of one shard
    per worker, so the reference copy holds exactly what the shard pipeline reads."""
    from flsl_cli.bench.data import select_samples

    shards = ShardSet(shards=tuple(Shard(url=f"s{i}.tar", samples=24) for i in range(8)))
    assert [s.samples for s in select_samples(shards, max_images=64, workers=1).shards] == [24, 24]
    big = ShardSet(shards=tuple(Shard(url=f"b{i}.tar", samples=1000) for i in range(4)))
    assert [s.samples for s in select_samples(big, max_images=300, workers=2).shards] == [150, 150]
    assert [s.url for s in select_samples(big, max_images=300, workers=2).shards] == ["b0.tar", "b1.tar"]
