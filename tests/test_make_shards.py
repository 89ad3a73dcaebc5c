"""`flsl data shards`: webdataset shards from a tiny ImageNet-style tree (ImageFolder train/,
flat val/, VOC XML and LOC CSV boxes), read back with plain tarfile, webdataset and `tar -tf`."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import fails, run_flsl
from PIL import Image

from flsl_cli.data.make_shards import make_shards
from flsl_cli.data.shards import resolve_shards

SYNSETS = ("n01440764", "n01443537", "n01484850")
NAMES = ("tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark, white shark")
PER_CLASS = 5
# Boxes of some train images (file stem -> [(synset, x0, y0, x1, y1)]), written as VOC XML and as LOC CSV.
TRAIN_BOXES = {
    "n01440764_0": [("n01440764", 1, 2, 30, 25), ("n01440764", 5, 5, 12, 14)],
    "n01440764_3": [("n01440764", 0, 0, 40, 30)],
    "n01443537_1": [("n01443537", 3, 4, 20, 21)],
    "n01484850_4": [("n01484850", 10, 8, 33, 28)],
}
VAL_LABELS = {f"ILSVRC2012_val_{i:08d}": SYNSETS[(i * 2) % 3] for i in range(1, 7)}


def _jpeg(path: Path, rng: np.random.Generator, width: int, height: int) -> None:
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels, mode="RGB").save(path, format="JPEG", quality=85)


def _voc_xml(stem: str, boxes: list[tuple]) -> str:
    objects = "".join(
        f"<object><name>{s}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
        f"<ymax>{y1}</ymax></bndbox></object>"
        for s, x0, y0, x1, y1 in boxes
    )
    size = "<size><width>48</width><height>40</height></size>"
    return f"<annotation><filename>{stem}</filename>{size}{objects}</annotation>"


def _loc_csv(boxes: dict[str, list[tuple]]) -> str:
    rows = [f"{stem}," + " ".join(" ".join(map(str, box)) for box in items) for stem, items in boxes.items()]
    return "ImageId,PredictionString\n" + "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ (3 synsets x 5 JPEGs, one PNG, one corrupt file), val/ (6 JPEGs), boxes and labels."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c, synset in enumerate(SYNSETS):
        folder = root / "train" / synset
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            _jpeg(folder / f"{synset}_{i}.JPEG", rng, 40 + 2 * i + c, 30 + i)
        (root / "Annotation" / synset).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / "train" / SYNSETS[0] / "extra.png")
    (root / "train" / SYNSETS[1] / f"{SYNSETS[1]}_broken.JPEG").write_bytes(b"this is not an image")
    (root / "train" / SYNSETS[2] / "notes.txt").write_text("ignored: not an image name")
    for stem, boxes in TRAIN_BOXES.items():
        (root / "Annotation" / stem.split("_")[0] / f"{stem}.xml").write_text(_voc_xml(stem, boxes))
    (root / "LOC_train_solution.csv").write_text(_loc_csv(TRAIN_BOXES))
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{s} {n}\n" for s, n in zip(SYNSETS, NAMES)))

    (root / "val").mkdir()
    for stem in VAL_LABELS:
        _jpeg(root / "val" / f"{stem}.JPEG", rng, 36, 28)
    val_boxes = {stem: [(synset, 2, 3, 20, 18)] for stem, synset in VAL_LABELS.items()}
    (root / "LOC_val_solution.csv").write_text(_loc_csv(val_boxes))
    (root / "val_labels.txt").write_text("".join(f"{stem}.JPEG {s}\n" for stem, s in VAL_LABELS.items()))
    return root


@pytest.fixture(scope="module")
def reference(imagenet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of train/ with XML boxes and class names, made by the CLI with one worker."""
    dest = tmp_path_factory.mktemp("ref") / "shards"
    result = _shards(imagenet, dest, "--boxes", imagenet / "Annotation", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "wrote 4 shards" in result.stdout and "16 samples" in result.stdout and "1 skipped" in result.stdout
    return dest


def _shards(imagenet: Path, dest: Path | str, *extra: object, src: Path | None = None):
    return run_flsl(
        "data",
        "shards",
        src or imagenet / "train",
        dest,
        "--samples-per-shard",
        "5",
        "--class-names",
        imagenet / "LOC_synset_mapping.txt",
        *extra,
    )


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def _samples(dest: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of every shard in the index, read with plain tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in json.loads((dest / "index.json").read_text())["shards"]:
        with tarfile.open(dest / shard["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                handle = tar.extractfile(member)
                assert handle is not None
                samples.setdefault(key, {})[ext] = handle.read()
    return samples


# -- what is written --------------------------------------------------------------------------


def test_index_lists_shards_classes_settings_and_skipped(reference: Path, imagenet: Path) -> None:
    """index.json has the reader's format plus synsets, human class names, settings and the skipped file."""
    index = json.loads((reference / "index.json").read_text())
    assert index["format"] == "flsl-shards/1"
    assert index["num_samples"] == 16  # 15 JPEGs + 1 PNG; the corrupt file is skipped
    assert [s["name"] for s in index["shards"]] == [f"train-{i:06d}.tar" for i in range(4)]
    assert [s["samples"] for s in index["shards"]] == [5, 5, 4, 2]  # planned 5/5/5/2, one skipped in shard 2
    assert all(s["bytes"] == (reference / s["name"]).stat().st_size for s in index["shards"])
    assert index["synsets"] == list(SYNSETS)
    assert index["classes"] == list(NAMES)
    assert index["skipped"] == [
        {
            "file": f"{SYNSETS[1]}/{SYNSETS[1]}_broken.JPEG",
            "reason": "not a readable image (PIL cannot identify its format)",
        }
    ]
    settings = index["settings"]
    assert settings["source"] == str((imagenet / "train").resolve())
    assert settings["boxes"] == str((imagenet / "Annotation").resolve())
    assert settings["samples_per_shard"] == 5 and settings["shard_size"] is None
    assert settings["flsl_version"] and settings["layout"] == "imagefolder"
    assert index["meta"]["plan"].startswith("sha256:")
    assert not [p for p in reference.iterdir() if p.name.endswith(".tmp")]

    shard_set = resolve_shards(str(reference))
    assert shard_set.num_samples == 16 and len(shard_set.shards) == 4
    assert shard_set.classes == NAMES


def test_samples_hold_original_bytes_labels_and_boxes(reference: Path, imagenet: Path) -> None:
    """Image bytes equal the source files, cls/json give the label, size and boxes mapped to labels."""
    samples = _samples(reference)
    assert len(samples) == 16
    for key, fields in samples.items():
        info = json.loads(fields["json"])
        source = imagenet / "train" / info["file"]
        image_field = "png" if source.suffix == ".png" else "jpg"
        assert set(fields) == {image_field, "cls", "json"}
        assert fields[image_field] == source.read_bytes()
        label = SYNSETS.index(source.parent.name)
        assert int(fields["cls"]) == info["label"] == label
        assert (info["synset"], info["class_name"]) == (SYNSETS[label], NAMES[label])
        with Image.open(source) as image:
            assert (info["width"], info["height"]) == image.size
        expected = [
            {"bbox": [x0, y0, x1, y1], "class": SYNSETS.index(s), "name": NAMES[SYNSETS.index(s)], "synset": s}
            for s, x0, y0, x1, y1 in TRAIN_BOXES.get(source.stem, [])
        ]
        assert info["boxes"] == expected, key
    assert "extra" in samples and "n01440764_0" in samples


def test_loc_csv_boxes_equal_voc_xml_boxes(reference: Path, imagenet: Path, tmp_path: Path) -> None:
    """Boxes from LOC_train_solution.csv give the same shards as the same boxes in VOC XML files."""
    make_shards(
        imagenet / "train",
        str(tmp_path / "csv"),
        boxes=imagenet / "LOC_train_solution.csv",
        class_names=imagenet / "LOC_synset_mapping.txt",
        samples_per_shard=5,
    )
    tars = {name: data for name, data in _files(tmp_path / "csv").items() if name.endswith(".tar")}
    assert tars == {name: data for name, data in _files(reference).items() if name.endswith(".tar")}

    subset = tmp_path / "subset"  # rows of images outside SRC (other classes) are ignored
    shutil.copytree(imagenet / "train" / SYNSETS[1], subset / SYNSETS[1])
    report = make_shards(subset, str(tmp_path / "subset-shards"), boxes=imagenet / "LOC_train_solution.csv")
    assert (report.classes, report.samples) == (1, PER_CLASS)


def test_deterministic_and_independent_of_workers(reference: Path, imagenet: Path, tmp_path: Path) -> None:
    """Another run with 1 worker and one with 2 workers write byte-identical shards and index."""
    for name, workers in (("again", 1), ("two", 2)):
        report = make_shards(
            imagenet / "train",
            str(tmp_path / name),
            boxes=imagenet / "Annotation",
            class_names=imagenet / "LOC_synset_mapping.txt",
            samples_per_shard=5,
            workers=workers,
        )
        assert (report.shards, report.samples, report.skipped, report.written) == (4, 16, 1, 4)
        assert _files(tmp_path / name) == _files(reference)


def test_shard_size_cuts_by_bytes(imagenet: Path, tmp_path: Path) -> None:
    """--shard-size cuts shards by estimated tar size: several shards, none far over the target."""
    result = run_flsl("data", "shards", imagenet / "train", tmp_path / "out", "--shard-size", "12KB", "--workers", "1")
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert len(index["shards"]) >= 3 and index["num_samples"] == 16
    assert index["settings"]["shard_size"] == "12KB" and index["settings"]["shard_bytes"] == 12_000
    assert all(shard["bytes"] <= 12_000 + 10_240 for shard in index["shards"])  # + tar's final record padding
    assert index["classes"] == list(SYNSETS)  # no --class-names: the synset ids


# -- resuming ---------------------------------------------------------------------------------


def test_rerun_writes_only_what_is_missing(reference: Path, imagenet: Path, tmp_path: Path) -> None:
    """After losing a shard and the index, with a half-written .tmp left, a rerun rewrites only those;
    a further rerun finds the set complete and touches nothing."""
    dest = tmp_path / "shards"
    shutil.copytree(reference, dest)
    old = 1_000_000_000
    for path in dest.iterdir():
        os.utime(path, (old, old))
    (dest / "train-000001.tar").unlink()
    (dest / "index.json").unlink()
    (dest / "train-000002.tar.tmp").write_bytes(b"half a shard")  # a partial from the interrupted run

    result = _shards(imagenet, dest, "--boxes", imagenet / "Annotation", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "3 kept from an earlier run" in result.stdout
    assert _files(dest) == _files(reference)
    mtimes = {p.name: p.stat().st_mtime for p in dest.iterdir()}
    assert {name for name, t in mtimes.items() if t == old} == {
        "train-000000.tar",
        "train-000002.tar",
        "train-000003.tar",
    }

    again = _shards(imagenet, dest, "--boxes", imagenet / "Annotation")
    assert again.returncode == 0, again.stderr
    assert "already holds these 4 shards" in again.stdout and "nothing to do" in again.stdout
    assert {p.name: p.stat().st_mtime for p in dest.iterdir()} == mtimes


def test_rerun_with_other_settings_is_refused(reference: Path, imagenet: Path, tmp_path: Path) -> None:
    """An unfinished DEST of another plan is refused with the changed setting named; nothing changes."""
    dest = tmp_path / "shards"
    shutil.copytree(reference, dest)
    (dest / "index.json").unlink()
    before = _files(dest)
    fails(
        run_flsl(
            "data",
            "shards",
            imagenet / "train",
            dest,
            "--samples-per-shard",
            "4",
            "--class-names",
            imagenet / "LOC_synset_mapping.txt",
            "--boxes",
            imagenet / "Annotation",
        ),
        "another plan",
        "samples_per_shard was 5, now 4",
        "new DEST",
    )
    assert _files(dest) == before
    fails(run_flsl("data", "shards", imagenet / "val", dest, "--labels", imagenet / "val_labels.txt"), "another plan")
    (dest / "progress.json").unlink()
    fails(_shards(imagenet, dest), "not empty", "was not made by `flsl data shards`")


# -- other sources and destinations -----------------------------------------------------------


def test_flat_val_with_labels(imagenet: Path, tmp_path: Path) -> None:
    """A flat val/ labelled by LOC_val_solution.csv or a 'FILENAME SYNSET' file: same labels, sorted by name."""
    from_csv = make_shards(
        imagenet / "val",
        str(tmp_path / "csv"),
        labels=imagenet / "LOC_val_solution.csv",
        boxes=imagenet / "LOC_val_solution.csv",
        class_names=imagenet / "LOC_synset_mapping.txt",
        samples_per_shard=4,
    )
    assert (from_csv.shards, from_csv.samples, from_csv.classes) == (2, 6, 3)
    samples = _samples(tmp_path / "csv")
    assert list(samples) == sorted(VAL_LABELS)
    for key, fields in samples.items():
        info = json.loads(fields["json"])
        assert info["synset"] == VAL_LABELS[key] and int(fields["cls"]) == SYNSETS.index(VAL_LABELS[key])
        assert info["boxes"] == [
            {"bbox": [2, 3, 20, 18], "class": info["label"], "name": info["class_name"], "synset": VAL_LABELS[key]}
        ]
        assert fields["jpg"] == (imagenet / "val" / f"{key}.JPEG").read_bytes()
    assert json.loads((tmp_path / "csv" / "index.json").read_text())["settings"]["layout"] == "flat"

    from_text = make_shards(
        imagenet / "val",
        str(tmp_path / "txt"),
        labels=imagenet / "val_labels.txt",
        class_names=imagenet / "LOC_synset_mapping.txt",
        samples_per_shard=4,
    )
    assert from_text.samples == 6
    labels = {key: fields["cls"] for key, fields in _samples(tmp_path / "txt").items()}
    assert labels == {key: fields["cls"] for key, fields in samples.items()}


def test_memory_destination(reference: Path, imagenet: Path) -> None:
    """A memory:// DEST (fsspec) receives the same shards and index as a local one, with 1 or 2 workers."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for workers in (1, 2):
        url = f"memory://flsl-test-{workers}/train"
        make_shards(
            imagenet / "train",
            url,
            boxes=imagenet / "Annotation",
            class_names=imagenet / "LOC_synset_mapping.txt",
            samples_per_shard=5,
            workers=workers,
        )
        written = {
            path.rsplit("/", 1)[-1]: fs.cat_file(path) for path in fs.ls(f"/flsl-test-{workers}/train", detail=False)
        }
        expected = _files(reference)
        assert set(written) == set(expected)
        assert all(written[name] == expected[name] for name in expected if name != "index.json")
        index, local = json.loads(written["index.json"]), json.loads(expected["index.json"])
        assert index == local
        fs.rm(f"/flsl-test-{workers}", recursive=True)


def test_s3_destination_with_moto(reference: Path, imagenet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An s3:// DEST (s3fs against a local moto server) gets the shards, and a missing bucket is refused."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import fsspec

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}",
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://{host}:{port}"})
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("flsl-bucket")
        make_shards(
            imagenet / "train",
            "s3://flsl-bucket/in1k/train",
            boxes=imagenet / "Annotation",
            class_names=imagenet / "LOC_synset_mapping.txt",
            samples_per_shard=5,
            workers=2,
        )
        fs.invalidate_cache()
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("flsl-bucket/in1k/train", detail=False))
        assert names == sorted(_files(reference))
        assert fs.cat_file("flsl-bucket/in1k/train/train-000001.tar") == (reference / "train-000001.tar").read_bytes()

        fails(
            _shards(imagenet, "s3://no-such-bucket/train"),
            "bucket 'no-such-bucket' does not exist",
            "s3://no-such-bucket/train",
        )
    finally:
        server.stop()


def test_plain_webdataset_and_tar_read_the_shards(reference: Path) -> None:
    """Plain `webdataset.WebDataset` decodes every sample, and `tar -tf` lists key.ext members."""
    import webdataset as wds

    urls = [str(reference / shard["name"]) for shard in json.loads((reference / "index.json").read_text())["shards"]]
    keys = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil")
        for sample in dataset:
            image = sample.get("jpg", sample.get("png"))
            assert isinstance(image, Image.Image)
            assert (image.width, image.height) == (sample["json"]["width"], sample["json"]["height"])
            assert int(sample["cls"]) == sample["json"]["label"]
            keys.append(sample["__key__"])
        del dataset
        gc.collect()
    assert len(keys) == len(set(keys)) == 16

    listing = subprocess.run(["tar", "-tf", urls[0]], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:6] == [
        "extra.cls",
        "extra.json",
        "extra.png",
        "n01440764_0.cls",
        "n01440764_0.jpg",
        "n01440764_0.json",
    ]  # sorted by file name within a class, fields by extension
    assert len(listing) == 15


# -- bad input --------------------------------------------------------------------------------


def test_src_without_images(tmp_path: Path) -> None:
    """SRC with no images: clear error naming SRC, DEST not created."""
    (tmp_path / "src" / "n01440764").mkdir(parents=True)
    (tmp_path / "src" / "n01440764" / "readme.txt").write_text("no images here")
    fails(run_flsl("data", "shards", tmp_path / "src", tmp_path / "dest"), "SRC holds no images", str(tmp_path / "src"))
    fails(run_flsl("data", "shards", tmp_path / "missing", tmp_path / "dest"), "SRC does not exist")
    assert not (tmp_path / "dest").exists()


def test_unknown_protocol_and_missing_backend(imagenet: Path) -> None:
    """An unknown protocol, or one whose fsspec backend is not installed, names the URL and the remedy."""
    fails(
        _shards(imagenet, "foo://bucket/train"),
        "foo://bucket/train",
        "cannot open foo:// URLs",
        "protocol fsspec knows",
    )
    fails(_shards(imagenet, "gs://bucket/train"), "gs://bucket/train", "install gcsfs", "pip install gcsfs")
    result = _shards(imagenet, "foo://me:s3cr3t@bucket/train")
    fails(result, "foo://***@bucket/train")
    assert "s3cr3t" not in result.stderr + result.stdout


def test_malformed_annotations_name_file_and_line(imagenet: Path, tmp_path: Path) -> None:
    """A broken XML file, a bad CSV row and an unknown box class each name the file and line or element."""
    dest = tmp_path / "dest"
    boxes = tmp_path / "Annotation"
    shutil.copytree(imagenet / "Annotation", boxes)
    bad_xml = boxes / SYNSETS[0] / f"{SYNSETS[0]}_3.xml"
    bad_xml.write_text("<annotation>\n<object><name>n01440764</name>\n<bndbox><xmin>1</xmin></object>\n")
    fails(_shards(imagenet, dest, "--boxes", boxes), f"{bad_xml}:3", "malformed XML")

    bad_xml.write_text(
        "<annotation><object><name>n01440764</name><bndbox><xmin>1</xmin><ymin>2</ymin>"
        "<xmax>oops</xmax><ymax>4</ymax></bndbox></object></annotation>"
    )
    fails(_shards(imagenet, dest, "--boxes", boxes), f"{bad_xml} <object> #1 <xmax>", "'oops' is not a number")

    bad_csv = tmp_path / "LOC_train_solution.csv"
    bad_csv.write_text("ImageId,PredictionString\nn01440764_0,n01440764 1 2 30 25\nn01440764_3,n01440764 1 2 30\n")
    fails(_shards(imagenet, dest, "--boxes", bad_csv), f"{bad_csv}:3", "groups of 5")

    bad_csv.write_text("ImageId,PredictionString\nn01440764_0,n01440764 1 2 30 25\nn01443537_1,n09999999 1 2 3 4\n")
    fails(_shards(imagenet, dest, "--boxes", bad_csv), f"{bad_csv}:3", "'n09999999' is not in the class map")

    fails(
        _shards(imagenet, dest, "--boxes", imagenet / "LOC_val_solution.csv"),
        "none of the 17 images",
        str(imagenet / "LOC_val_solution.csv"),
    )

    bad_names = tmp_path / "names.txt"
    bad_names.write_text(f"{SYNSETS[0]} tench\n{SYNSETS[1]}\n")
    fails(run_flsl("data", "shards", imagenet / "train", dest, "--class-names", bad_names), f"{bad_names}:2")
    assert not dest.exists()


def test_bad_labels_for_flat_val(imagenet: Path, tmp_path: Path) -> None:
    """A flat SRC without --labels, with an incomplete labels file, or with numeric labels and no class list."""
    dest = tmp_path / "dest"
    fails(run_flsl("data", "shards", imagenet / "val", dest), "flat directory", "--labels")
    partial = tmp_path / "labels.txt"
    partial.write_text(f"ILSVRC2012_val_00000001.JPEG {SYNSETS[0]}\n")
    fails(
        run_flsl("data", "shards", imagenet / "val", dest, "--labels", partial),
        "5 image(s) of SRC have no label",
        str(partial),
    )
    numeric = tmp_path / "numeric.txt"
    numeric.write_text("".join(f"{stem}.JPEG 1\n" for stem in VAL_LABELS))
    fails(run_flsl("data", "shards", imagenet / "val", dest, "--labels", numeric), "--class-names")
    assert not dest.exists()


def test_dest_not_writable(imagenet: Path, tmp_path: Path) -> None:
    """A DEST that cannot be created (under a regular file) gives a clear error and writes nothing."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a directory")
    fails(_shards(imagenet, blocker / "shards"), "DEST is not writable", str(blocker / "shards"))
    fails(_shards(imagenet, blocker), "DEST is a file")
    fails(_shards(imagenet, imagenet / "train" / "shards"), "DEST is inside SRC")
    assert not (imagenet / "train" / "shards").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    assert blocker.read_text() == "a file, not a directory"


def test_training_and_knn_readers_read_the_same_samples(reference: Path) -> None:
    """The training stream and the k-NN reader, each with data workers, read every sample of the
    shards `flsl data shards` writes (with `webdataset.TarWriter`) once, the same ones tarfile lists."""
    from torch.utils.data import DataLoader

    from flsl_cli.config.schema import Recipe
    from flsl_cli.data.augment import MultiCropAugment
    from flsl_cli.data.stream import TrainStream, build_loader, plan_layout
    from flsl_cli.eval.samples import EvalSamples, ReadPlan, SampleSettings, collate

    shards = resolve_shards(str(reference))
    listed = _samples(reference)
    ordered = [
        key
        for shard in json.loads((reference / "index.json").read_text())["shards"]
        for key in dict.fromkeys(m.name.split(".", 1)[0] for m in tarfile.open(reference / shard["name"]))
    ]

    recipe = Recipe.model_validate(
        {
            "data": {"train": str(reference)},
            "model": {"arch": "vit_tiny", "patch_size": 8},
            "augment": {"global_size": 32, "local_size": 16},
            "loss": {"query_window_global": 2, "query_window_local": 2},
        }
    )
    layout, _ = plan_layout(shards, world_size=1, num_workers=1, local_batch=4)
    stream = TrainStream(shards, layout=layout, rank=0, seed=0, shuffle_buffer=8, augment=MultiCropAugment(recipe))
    stream.set_epoch(0)
    training = [key for batch in build_loader(stream, pin_memory=False) for key in batch["key"]]

    settings = SampleSettings(
        mode="global", grid=2, resize=36, crop=32, patch_size=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    evaluation = EvalSamples(ReadPlan.from_shards(shards), rank=0, world_size=1, settings=settings)
    knn: dict[str, int] = {}
    for batch in DataLoader(evaluation, batch_size=4, num_workers=2, collate_fn=collate):
        assert "error" not in batch
        for sample_id, label in zip(batch["id"].tolist(), batch["label"].tolist()):
            shard_number, position = sample_id >> 32, sample_id & 0xFFFFFFFF
            offset = sum(s.samples for s in shards.shards[:shard_number])
            knn[ordered[offset + position]] = label

    assert len(training) == len(set(training)) == len(listed) == 16
    assert sorted(training) == sorted(knn) == sorted(listed)
    assert all(label == int(listed[key]["cls"]) for key, label in knn.items())
