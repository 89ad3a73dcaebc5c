"""Tests for the procedurally generated demo dataset and the webdataset shard writer."""

from __future__ import annotations

import gc
import io
import json
import tarfile
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flsl_cli.data.demo import DEMO_CLASSES, write_demo_dataset
from flsl_cli.data.shard_writer import ShardWriter
from flsl_cli.errors import DataError

IMAGES = 120
SAMPLES_PER_SHARD = 10


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    write_demo_dataset(out, images=IMAGES, seed=0, samples_per_shard=SAMPLES_PER_SHARD)
    return out


def _shard_paths(split_dir: Path) -> list[Path]:
    index = json.loads((split_dir / "index.json").read_text())
    return [split_dir / shard["name"] for shard in index["shards"]]


def _read_samples(split_dir: Path) -> list[tuple[str, dict[str, bytes]]]:
    """All samples of a split, in shard order, read with plain `tarfile`."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in _shard_paths(split_dir):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                extracted = tar.extractfile(member)
                assert extracted is not None
                samples.setdefault(key, {})[ext] = extracted.read()
    return list(samples.items())


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_counts_and_no_leftovers(tmp_path: Path) -> None:
    """A small dataset has consistent split counts, complete shard indexes and no temporary files."""
    out = tmp_path / "demo"
    progress: list[tuple[int, int]] = []
    info = write_demo_dataset(
        out, images=IMAGES, seed=3, samples_per_shard=SAMPLES_PER_SHARD,
        on_progress=lambda done, total: progress.append((done, total)),
    )  # fmt: skip

    assert json.loads((out / "dataset.json").read_text()) == info
    assert info["version"] == "demo/1"
    assert info["classes"] == list(DEMO_CLASSES)
    train, val = info["splits"]["train"], info["splits"]["val"]
    assert train["num_samples"] + val["num_samples"] == IMAGES
    assert val["num_samples"] == round(IMAGES * 0.2)
    assert progress[-1] == (IMAGES, IMAGES) and len(progress) == IMAGES

    for split, prefix in (("train", "demo-train"), ("val", "demo-val")):
        index = json.loads((out / split / "index.json").read_text())
        assert index["format"] == "flsl-shards/1"
        assert index["classes"] == list(DEMO_CLASSES)
        assert index["num_samples"] == info["splits"][split]["num_samples"]
        assert sum(shard["samples"] for shard in index["shards"]) == index["num_samples"]
        assert all(shard["samples"] <= SAMPLES_PER_SHARD for shard in index["shards"])
        for i, shard in enumerate(index["shards"]):
            assert shard["name"] == f"{prefix}-{i:06d}.tar"
            assert (out / split / shard["name"]).is_file()
    assert train["num_shards"] >= 4

    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert leftovers == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_small_train_split_still_gets_four_shards(tmp_path: Path) -> None:
    """When the requested shard size would give fewer than 4 train shards, train shards are made smaller."""
    info = write_demo_dataset(tmp_path / "demo", images=20, samples_per_shard=100)
    train = info["splits"]["train"]
    assert train["num_samples"] == 16
    assert train["num_shards"] >= 4
    index = json.loads((tmp_path / "demo" / "train" / "index.json").read_text())
    assert len(index["shards"]) == train["num_shards"]


def test_shards_readable_by_webdataset(demo_dir: Path) -> None:
    """Plain `webdataset.WebDataset` decodes every sample with a jpg image, an integer cls and json."""
    import webdataset as wds

    for split in ("train", "val"):
        urls = [str(p) for p in _shard_paths(demo_dir / split)]
        count = 0
        # webdataset leaves its shard streams for the garbage collector to close.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil")
            for sample in dataset:
                assert sample["__key__"].startswith(f"{split}-")
                image = sample["jpg"]
                assert isinstance(image, Image.Image) and image.size == (96, 96) and image.mode == "RGB"
                annotation = sample["json"]
                assert int(sample["cls"]) == annotation["label"]
                count += 1
            del dataset
            gc.collect()
        index = json.loads((demo_dir / split / "index.json").read_text())
        assert count == index["num_samples"]


def test_samples_and_boxes_are_consistent(demo_dir: Path) -> None:
    """Every sample read with `tarfile` has jpg/cls/json, 1-3 in-image boxes, and cls = class of the largest box."""
    seen_indices: list[int] = []
    for split in ("train", "val"):
        for key, fields in _read_samples(demo_dir / split):
            assert set(fields) == {"jpg", "cls", "json"}
            prefix, number = key.split("-")
            assert prefix == split and len(number) == 7
            seen_indices.append(int(number))

            annotation = json.loads(fields["json"].decode("utf-8"))
            width, height = annotation["width"], annotation["height"]
            with Image.open(io.BytesIO(fields["jpg"])) as image:
                assert image.format == "JPEG" and image.size == (width, height)
            boxes = annotation["boxes"]
            assert 1 <= len(boxes) <= 3
            for box in boxes:
                x0, y0, x1, y1 = box["bbox"]
                assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
                assert box["name"] == DEMO_CLASSES[box["class"]]
            areas = [(b["bbox"][2] - b["bbox"][0]) * (b["bbox"][3] - b["bbox"][1]) for b in boxes]
            largest = boxes[int(np.argmax(areas))]
            assert int(fields["cls"].decode("ascii")) == annotation["label"] == largest["class"]
            assert annotation["class_name"] == largest["name"]
    assert sorted(seen_indices) == list(range(IMAGES))


def test_all_classes_appear_in_train(demo_dir: Path) -> None:
    """Every demo class is the label of some training image, and objects come in varied sizes."""
    labels = set()
    sides = []
    for _, fields in _read_samples(demo_dir / "train"):
        annotation = json.loads(fields["json"])
        labels.add(annotation["label"])
        sides += [max(b["bbox"][2] - b["bbox"][0], b["bbox"][3] - b["bbox"][1]) for b in annotation["boxes"]]
    assert labels == set(range(len(DEMO_CLASSES)))
    assert len(DEMO_CLASSES) >= 6
    assert min(sides) <= 0.25 * 96 and max(sides) >= 0.5 * 96


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    """The same seed twice gives byte-identical files; another seed gives different shards."""
    settings = {"images": 40, "samples_per_shard": 5}
    write_demo_dataset(tmp_path / "a", seed=7, **settings)
    write_demo_dataset(tmp_path / "b", seed=7, **settings)
    write_demo_dataset(tmp_path / "c", seed=8, **settings)
    first, second, other = (_all_files(tmp_path / name) for name in "abc")
    assert any(name.endswith(".tar") for name in first)
    assert first == second
    assert first.keys() == other.keys()
    tars = [name for name in first if name.endswith(".tar")]
    assert all(first[name] != other[name] for name in tars)


def test_refuses_non_empty_out_dir(tmp_path: Path) -> None:
    """An existing non-empty output directory raises DataError and is left exactly as it was."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError) as caught:
        write_demo_dataset(out, images=20)
    assert caught.value.where == str(out)
    assert caught.value.fix
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_existing_empty_out_dir_is_filled(tmp_path: Path) -> None:
    """An existing empty output directory is accepted and replaced by the finished dataset."""
    out = tmp_path / "demo"
    out.mkdir()
    write_demo_dataset(out, images=20, samples_per_shard=3)
    assert (out / "dataset.json").is_file() and (out / "train" / "index.json").is_file()


def test_images_are_not_trivial(demo_dir: Path) -> None:
    """Images are busy, objects stand out from the background, and class textures really differ."""
    edge_energy: dict[str, list[float]] = defaultdict(list)
    disc_contrast = []
    for split in ("train", "val"):
        for _, fields in _read_samples(demo_dir / split):
            image = np.asarray(Image.open(io.BytesIO(fields["jpg"])).convert("RGB"), dtype=np.float32)
            assert image.std() > 20.0  # fails on blank or constant images

            annotation = json.loads(fields["json"])
            largest = max(
                annotation["boxes"], key=lambda b: (b["bbox"][2] - b["bbox"][0]) * (b["bbox"][3] - b["bbox"][1])
            )
            x0, y0, x1, y1 = largest["bbox"]
            cx, cy, rx, ry = (x0 + x1) // 2, (y0 + y1) // 2, max(2, (x1 - x0) // 6), max(2, (y1 - y0) // 6)
            centre = image[cy - ry : cy + ry, cx - rx : cx + rx]
            gradient = np.abs(np.diff(centre, axis=0)).mean() + np.abs(np.diff(centre, axis=1)).mean()
            edge_energy[largest["name"]].append(float(gradient))

            if largest["name"] == "disc":
                outside = np.ones(image.shape[:2], dtype=bool)
                for box in annotation["boxes"]:
                    bx0, by0, bx1, by1 = box["bbox"]
                    outside[by0:by1, bx0:bx1] = False
                if outside.sum() > 200:
                    difference = centre.reshape(-1, 3).mean(0) - image[outside].mean(0)
                    disc_contrast.append(float(np.linalg.norm(difference)))

    mean_energy = {name: float(np.mean(values)) for name, values in edge_energy.items()}
    for textured in ("square", "cross", "star", "hexagon"):
        assert mean_energy["disc"] < 0.5 * mean_energy[textured], mean_energy
    assert len(disc_contrast) >= 3
    assert float(np.median(disc_contrast)) > 40.0, disc_contrast


def test_shard_writer_rolls_over_and_cleans_up_on_error(tmp_path: Path) -> None:
    """ShardWriter starts a new shard every N samples, and an exception leaves no .tmp file or index."""
    good = tmp_path / "good"
    with ShardWriter(good, prefix="x", samples_per_shard=2, classes=["a"], meta={"k": 1}) as writer:
        for i in range(5):
            writer.write(f"s-{i:03d}", {"cls": b"0", "txt": f"{i}".encode()})
    index = json.loads((good / "index.json").read_text())
    assert index == {
        "format": "flsl-shards/1",
        "num_samples": 5,
        "shards": [
            {"name": "x-000000.tar", "samples": 2},
            {"name": "x-000001.tar", "samples": 2},
            {"name": "x-000002.tar", "samples": 1},
        ],
        "classes": ["a"],
        "meta": {"k": 1},
    }
    with tarfile.open(good / "x-000000.tar") as tar:
        member = tar.getmember("s-000.cls")
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (0, 0, 0, "", "")
        assert member.mode == 0o444

    bad = tmp_path / "bad"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(bad, prefix="x", samples_per_shard=2) as writer:
            for i in range(3):
                writer.write(f"s-{i:03d}", {"cls": b"0"})
            raise RuntimeError("boom")
    names = sorted(p.name for p in bad.iterdir())
    assert names == ["x-000000.tar"]  # the complete shard stays, the partial one and the index do not
