"""`flsl eval davis` on synthetic DAVIS 2017 folders (moving, occluding shapes on a textured
background, palette PNGs): tracking with features that see the shapes and failing without,
the files it writes, several processes, the recipe's `eval.davis` during pretraining, and every
bad input the command refuses or notes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fails, run_flsl, tiny_overrides
from davis_support import ColourBackbone, NoiseBackbone, palette_png, write_davis
from PIL import Image

from flsl_cli.config.schema import DavisEvalConfig
from flsl_cli.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from flsl_cli.eval.backbones import wrap_module
from flsl_cli.eval.davis.api import evaluate_model
from flsl_cli.eval.report import Reporter

RANDOM_VIT = ["--model", "timm:vit_tiny_patch16_224", "--random-init"]
SMALL = ["--short-side", "64"]


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory) -> Path:
    return write_davis(tmp_path_factory.mktemp("davis") / "DAVIS")


def evaluate(backbone, root: Path | str, staging: Path | None = None) -> dict:
    model = wrap_module(backbone, mean=IMAGENET_MEAN, std=IMAGENET_STD, description={"kind": "test"}, identity="")
    return evaluate_model(
        model,
        settings=DavisEvalConfig(davis=str(root), short_side=64),
        device=torch.device("cpu"),
        reporter=Reporter(enabled=False),
        staging=str(staging) if staging else None,
    )


def test_features_that_see_the_shapes_track_them(davis_root, tmp_path):
    """With features that tell the shapes' colours apart, every object is tracked through the
    motion and the occlusion (J&F above 75 overall and in each sequence); with noise features
    the propagation fails (J&F below 20). The first frame's PNG is the annotation, unchanged;
    every predicted PNG keeps the annotation's palette and holds only the first frame's ids."""
    results = evaluate(ColourBackbone(), davis_root, staging=tmp_path)
    assert results["overall"]["JF_mean"] > 75, results["overall"]
    assert all(row["JF_mean"] > 70 for row in results["sequences"].values()), results["sequences"]
    assert results["overall"]["objects"] == 5 and results["overall"]["sequences"] == 2
    noise = evaluate(NoiseBackbone(), davis_root)
    assert noise["overall"]["JF_mean"] < 20, noise["overall"]
    for name, objects in (("shapes-a", 2), ("shapes-b", 3)):
        annotations = sorted((davis_root / "Annotations" / "480p" / name).iterdir())
        written = sorted((tmp_path / name).iterdir())
        assert [p.name for p in written] == [p.name for p in annotations]
        assert written[0].read_bytes() == annotations[0].read_bytes()
        for path in written[1:]:
            image = Image.open(path)
            assert image.mode == "P" and image.getpalette() == Image.open(annotations[0]).getpalette()
            assert set(np.unique(np.asarray(image)).tolist()) <= set(range(objects + 1))
            assert image.size == (128, 64)


def test_whole_sequence_equals_dinos_pipeline(davis_root, tmp_path):
    """Given the same frame features, the PNGs written for every frame equal what DINO's script
    computes from them: its `read_seg` (the first mask resized to the token grid by PIL's
    nearest, one-hot over its ids), its loop over frames (`label_propagation` with the queue of
    the first and the 7 previous frames), upsampling, `norm_mask`, argmax and the final nearest
    resize; the first frame is the annotation itself."""
    from test_davis_measures import dino_track

    from flsl_cli.eval.davis.frames import frame_tensor, read_image

    backbone = ColourBackbone()
    evaluate(backbone, davis_root, staging=tmp_path)
    model = wrap_module(backbone, mean=IMAGENET_MEAN, std=IMAGENET_STD, description={}, identity="")
    for name in ("shapes-a", "shapes-b"):
        frames = sorted((davis_root / "JPEGImages" / "480p" / name).glob("*.jpg"))
        with torch.no_grad():
            features = [
                model.tokens(frame_tensor(read_image(str(f)), size_hw=(64, 128), mean=model.mean, std=model.std)[None])[
                    0
                ]
                for f in frames
            ]
        seg = Image.open(davis_root / "Annotations" / "480p" / name / "00000.png")
        small = torch.from_numpy(np.array(seg.resize((128 // 8, 64 // 8), 0)).copy()).long()
        first_seg = torch.nn.functional.one_hot(small, int(small.max()) + 1).permute(2, 0, 1)[None].float()
        args = {"n_last_frames": 7, "size_mask_neighborhood": 12, "topk": 5}
        _, ids = dino_track(args, features, first_seg, patch=8)
        for index, predicted in enumerate(ids, start=1):
            expected = np.array(Image.fromarray(predicted.numpy().astype(np.uint8)).resize((128, 64), 0))
            assert np.array_equal(np.array(Image.open(tmp_path / name / f"{index:05d}.png")), expected), (name, index)


def test_remote_davis_folder_reads_as_a_local_one(davis_root, tmp_path):
    """A DAVIS folder on remote storage (fsspec's memory://) gives the same masks and figures
    as the same folder on disk."""
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in davis_root.rglob("*"):
        if path.is_file():
            memory.pipe_file(f"/davis-remote/{path.relative_to(davis_root).as_posix()}", path.read_bytes())
    local = evaluate(ColourBackbone(), davis_root, staging=tmp_path / "local")
    remote = evaluate(ColourBackbone(), "memory://davis-remote", staging=tmp_path / "remote")
    assert remote["overall"] == local["overall"]
    for name, row in local["sequences"].items():
        assert {k: v for k, v in remote["sequences"][name].items() if k != "seconds"} == {
            k: v for k, v in row.items() if k != "seconds"
        }
    for path in sorted((tmp_path / "local").rglob("*.png")):
        assert (tmp_path / "remote" / path.relative_to(tmp_path / "local")).read_bytes() == path.read_bytes()


def test_command_writes_masks_pictures_and_results(davis_root, tmp_path):
    """`flsl eval davis --out DIR --draw`: a table, DIR/SEQ/*.png in DAVIS's layout, one picture
    per sequence, DIR/results.json with every setting; `--devices 2` gives the same masks and
    figures and shows every process's sequences as they finish; nothing is left beside DIR."""
    out = tmp_path / "masks"
    result = run_flsl("eval", "davis", *RANDOM_VIT, "--davis", davis_root, "--out", out, "--draw", *SMALL)
    assert result.returncode == 0, result.stderr
    assert "J&F" in result.stdout and "shapes-b" in result.stdout
    assert "shapes-a: J&F" in result.stderr  # a line per sequence as it finishes
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == "flsl-davis-eval/1"
    assert results["settings"]["n_last_frames"] == 7 and results["settings"]["size_mask_neighborhood"] == 12
    assert results["settings"]["topk"] == 5 and results["settings"]["temperature"] == 0.1
    assert results["settings"]["patch_size"] == 16 and results["model"]["random_init"] is True
    assert sorted(results["sequences"]) == ["shapes-a", "shapes-b"]
    assert len(list((out / "shapes-b").glob("*.png"))) == 10
    picture = Image.open(out / "pictures" / "shapes-a.png")
    assert picture.size[0] == 5 * 320 and picture.size[1] > 2 * 64
    assert [p.name for p in tmp_path.iterdir()] == ["masks"]

    two = tmp_path / "two"
    result = run_flsl("eval", "davis", *RANDOM_VIT, "--davis", davis_root, "--out", two, "--devices", "2", *SMALL)
    assert result.returncode == 0, result.stderr
    parallel = json.loads((two / "results.json").read_text())
    assert parallel["overall"] == results["overall"] and parallel["settings"]["world_size"] == 2
    assert "shapes-a: J&F" in result.stderr and "shapes-b: J&F" in result.stderr  # either process's sequences
    for name in ("shapes-a", "shapes-b"):
        for path in sorted((out / name).iterdir()):
            assert (two / name / path.name).read_bytes() == path.read_bytes()


def test_a_flsl_run_is_evaluated_beside_it(tiny_run, davis_root, tmp_path):
    """A flsl run dir (its newest checkpoint's teacher, patch 8) is evaluated, and without
    --out or --output the results land in RUN_DIR/eval/davis-val-step-N-teacher.json."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = run_flsl("eval", "davis", run, "--davis", davis_root, *SMALL, "--max-sequences", "1")
    assert result.returncode == 0, result.stderr
    written = sorted((run / "eval").glob("davis-val-step-*-teacher.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())
    assert results["model"]["kind"] == "flsl" and results["settings"]["patch_size"] == 8
    assert results["sequences"]["shapes-a"]["model_size"] == [128, 64] and results["overall"]["sequences"] == 1


def test_knn_eval_is_also_under_eval(flsl):
    """`flsl eval knn` is `flsl knn-eval`; the old name keeps working."""
    for args in (("eval", "knn", "--help"), ("knn-eval", "--help")):
        result = flsl(*args)
        assert result.returncode == 0 and "--mode" in result.stdout


def copy_root(davis_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "DAVIS"
    shutil.copytree(davis_root, root)
    return root


def refused(root: Path, tmp_path: Path, *needles: str, extra: tuple[str, ...] = ()) -> None:
    out = tmp_path / "out"
    result = run_flsl("eval", "davis", *RANDOM_VIT, "--davis", root, "--out", out, *SMALL, *extra)
    fails(result, *needles)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*")), "something was written"


def test_not_a_davis_folder(davis_root, tmp_path):
    """A folder without Annotations/480p is refused, naming what is missing; so is a split with
    no sequence list."""
    root = copy_root(davis_root, tmp_path)
    shutil.rmtree(root / "Annotations")
    refused(root, tmp_path, "not a DAVIS 2017 folder: Annotations/480p is missing")
    result = run_flsl("eval", "davis", *RANDOM_VIT, "--davis", davis_root, "--split", "test", *SMALL)
    fails(result, "no sequence list for the split 'test'", "one of: val")


def test_frames_and_masks_disagree_in_count(davis_root, tmp_path):
    """A frame without its annotation: refused before any work."""
    root = copy_root(davis_root, tmp_path)
    (root / "Annotations" / "480p" / "shapes-b" / "00004.png").unlink()
    refused(root, tmp_path, "sequence shapes-b has 10 frames but 9 annotations", "no annotation for 00004")


@pytest.mark.parametrize("devices", ["1", "2"])
def test_frame_of_another_size_leaves_nothing_written(davis_root, tmp_path, devices):
    """A frame of another size in shapes-b: refused once it is reached, and the masks of
    shapes-a, finished before (one process) or beside it (two: the other process, waiting for
    the failed one, stops too), are not left in --out."""
    root = copy_root(davis_root, tmp_path)
    Image.new("RGB", (100, 50)).save(root / "JPEGImages" / "480p" / "shapes-b" / "00006.jpg")
    refused(
        root,
        tmp_path,
        "sequence shapes-b: the frame is 100 x 50 px but the first annotation is 128 x 64",
        extra=("--devices", devices),
    )


def test_first_mask_not_a_palette_png(davis_root, tmp_path):
    """A first annotation saved as RGB is refused: the ids and the palette come from it."""
    root = copy_root(davis_root, tmp_path)
    path = root / "Annotations" / "480p" / "shapes-a" / "00000.png"
    Image.open(path).convert("RGB").save(path)
    refused(root, tmp_path, "the first frame's annotation is not a palette PNG")


def test_first_mask_without_objects(davis_root, tmp_path):
    """A first annotation with no object is refused."""
    root = copy_root(davis_root, tmp_path)
    (root / "Annotations" / "480p" / "shapes-a" / "00000.png").write_bytes(palette_png(np.zeros((64, 128), np.uint8)))
    refused(root, tmp_path, "the first frame's annotation has no object")


def test_later_object_and_patch_notes(davis_root, tmp_path):
    """An object id that appears only after the first frame is noted once and ignored (as the
    benchmark does); a short side the patch size does not divide is noted and floored to whole
    patches. Both still evaluate; the options reach the settings recorded in the results."""
    root = copy_root(davis_root, tmp_path)
    for index in (3, 4):
        path = root / "Annotations" / "480p" / "shapes-a" / f"{index:05d}.png"
        ids = np.array(Image.open(path))
        ids[:4, :4] = 7
        path.write_bytes(palette_png(ids))
    result = run_flsl(
        "eval",
        "davis",
        *RANDOM_VIT,
        "--davis",
        root,
        "--short-side",
        "72",
        "--sequences",
        "shapes-a",
        "--n-last-frames",
        "2",
        "--size-mask-neighborhood",
        "3",
        "--topk",
        "3",
        "--temperature",
        "0.2",
        "--output",
        tmp_path / "r.json",
    )
    assert result.returncode == 0, result.stderr
    flat = " ".join(result.stderr.split())
    assert flat.count("object id(s) 7 appear after the first frame but not in it; the benchmark ignores them") == 1
    assert "the patch size 16 does not divide --short-side 72" in flat
    results = json.loads((tmp_path / "r.json").read_text())
    assert list(results["sequences"]) == ["shapes-a"] and results["settings"]["sequences"] == ["shapes-a"]
    assert {
        key: results["settings"][key]
        for key in ("n_last_frames", "size_mask_neighborhood", "topk", "temperature", "short_side")
    } == {"n_last_frames": 2, "size_mask_neighborhood": 3, "topk": 3, "temperature": 0.2, "short_side": 72}
    assert results["sequences"]["shapes-a"]["objects"] == 2 and results["sequences"]["shapes-a"]["model_size"] == [
        128,
        64,
    ]


def test_bad_options(davis_root, flsl):
    """Option values out of the schema's bounds and --draw without --out are refused by name."""
    fails(flsl("eval", "davis", *RANDOM_VIT, "--davis", davis_root, "--topk", "0"), "--topk")
    fails(flsl("eval", "davis", *RANDOM_VIT, "--davis", davis_root, "--draw"), "--draw needs --out")
    fails(
        flsl("eval", "davis", *RANDOM_VIT, "--davis", davis_root, "--sequences", "nope"),
        "sequence(s) nope are not in the val split",
    )


def test_davis_every_epoch_lands_in_metrics(demo_data, davis_root, tmp_path):
    """The recipe's eval.davis runs on the teacher during pretraining and logs J&F."""
    run = tmp_path / "run"
    extra = [
        "--set",
        "eval.every_epochs=1",
        "--set",
        f"eval.davis={{davis: {davis_root}, short_side: 64, max_sequences: 1}}",
    ]
    result = run_flsl(
        "pretrain", "recipes/demo.yaml", *tiny_overrides(demo_data / "train", optim__epochs=1), *extra, "--run-dir", run
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "davis_JF_mean" in line]
    assert len(evals) == 1 and 0.0 <= evals[0]["davis_JF_mean"] <= 100.0 and evals[0]["davis_sequences"] == 1


def test_bad_davis_folder_in_the_recipe_fails_before_training(demo_data, tmp_path):
    """A recipe whose eval.davis names a folder that is not DAVIS fails before any step."""
    run = tmp_path / "run"
    result = run_flsl(
        "pretrain",
        "recipes/demo.yaml",
        *tiny_overrides(demo_data / "train"),
        "--set",
        "eval.every_epochs=1",
        "--set",
        f"eval.davis={{davis: {tmp_path}}}",
        "--run-dir",
        run,
    )
    fails(result, "not a DAVIS 2017 folder")
    assert not (run / "metrics.jsonl").exists()
