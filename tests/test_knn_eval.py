"""`flsl knn-eval`: the k-NN vote, the any-of-grid rule and top-5 on hand-made features with known
answers; box geometry on a non-square image; caching, several processes, exports and
training-time use; every bad input gives one clear message. Whether a briefly pretrained demo
model beats a random one is a measurement (scripts/demo-knn.sh), not a test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import fails, run_flsl
from PIL import Image, ImageDraw

from flsl_cli.eval.geometry import EvalGeometry, cell_token_indices, largest_mapped_box
from flsl_cli.eval.knn import chance_level, count_correct, search_topk, vote_scores
from flsl_cli.eval.samples import parse_annotation

CPU = torch.device("cpu")
EVAL_SIZE = ["--resize", "72", "--crop", "64"]  # demo images are 64 px here; patch 8 -> 8 x 8 tokens


def _unit(*rows: tuple[float, ...]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def _at_cosine(cos: float, sign: float = 1.0) -> tuple[float, float]:
    """A 2-D unit vector at cosine `cos` from (1, 0)."""
    return cos, sign * math.sqrt(1.0 - cos * cos)


# -- the vote ---------------------------------------------------------------------------------


def test_vote_weights_are_exp_sim_over_temperature():
    """Two neighbours of class 0 at cos 0.5 against one of class 1 at cos 0.6: the scores are
    sums of exp(sim / T), so class 1 wins at T = 0.07 and class 0 at T = 1."""
    bank = _unit(_at_cosine(0.5), _at_cosine(0.5, -1.0), _at_cosine(0.6))
    bank_labels = torch.tensor([0, 0, 1])
    query = _unit((1.0, 0.0))
    sims, index = search_topk(query, bank, k=3, device=CPU)
    torch.testing.assert_close(sims, torch.tensor([[0.6, 0.5, 0.5]]))
    for temperature, winner in ((0.07, 1), (1.0, 0)):
        scores = vote_scores(sims, bank_labels[index], k=3, temperature=temperature, num_classes=2)
        expected = torch.tensor([[2 * math.exp(0.5 / temperature), math.exp(0.6 / temperature)]])
        torch.testing.assert_close(scores, expected)
        correct = count_correct(
            sims,
            index,
            bank_labels_n=bank_labels,
            query_labels_i=torch.tensor([winner]),
            features_per_image=1,
            ks=[3],
            temperature=temperature,
            num_classes=2,
        )
        assert correct == {3: (1, 1, 1)}
    # k = 1 sees only the nearest neighbour, whatever T
    one = count_correct(
        sims,
        index,
        bank_labels_n=bank_labels,
        query_labels_i=torch.tensor([1]),
        features_per_image=1,
        ks=[1],
        temperature=1.0,
        num_classes=2,
    )
    assert one == {1: (1, 1, 1)}


def test_an_image_is_correct_if_any_of_its_grid_features_is():
    """Three features per image: one feature near its class suffices for top-1; none, and it is wrong."""
    bank = _unit((1.0, 0.0), (0.0, 1.0))
    bank_labels = torch.tensor([0, 1])
    one_right = _unit((0.1, 1.0), (0.2, 1.0), (1.0, 0.1))  # two vote for class 1, one for class 0
    all_wrong = _unit((0.1, 1.0), (0.2, 1.0), (0.3, 1.0))
    queries = torch.cat([one_right, all_wrong])
    sims, index = search_topk(queries, bank, k=1, device=CPU)
    correct = count_correct(
        sims,
        index,
        bank_labels_n=bank_labels,
        query_labels_i=torch.tensor([0, 0]),
        features_per_image=3,
        ks=[1],
        temperature=0.07,
        num_classes=2,
    )
    # the first image counts, the second does not (2 classes: top-5 = top-2); of the six features
    # only the first image's third is right on its own
    assert correct == {1: (1, 1, 1)}


def test_top5_holds_the_five_best_voted_classes():
    """Six neighbours of six classes with falling similarity: the 5th class is a top-5 hit but not
    top-1, the 6th is neither, and a class that got no vote is never a guess."""
    sims = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    index = torch.arange(6)[None]
    bank_labels = torch.arange(6)
    outcomes = {}
    for label in (0, 4, 5, 6):
        outcomes[label] = count_correct(
            sims,
            index,
            bank_labels_n=bank_labels,
            query_labels_i=torch.tensor([label]),
            features_per_image=1,
            ks=[6],
            temperature=0.07,
            num_classes=7,
        )[6]
    assert outcomes == {0: (1, 1, 1), 4: (0, 1, 0), 5: (0, 0, 0), 6: (0, 0, 0)}


def test_chance_level_of_the_any_of_g_rule():
    """Uniform guesses: 1 - (1 - p)^g per image. With the demo's 7 classes and 9 cells the rule
    alone gives 75% top-1 and 100% top-5; with ImageNet's 1000 classes 0.9% top-1."""
    top1, top5 = chance_level(num_classes=7, features_per_image=9)
    assert top1 == pytest.approx(1 - (6 / 7) ** 9) and 0.74 < top1 < 0.76
    assert top5 == pytest.approx(1 - (2 / 7) ** 9)
    top1, top5 = chance_level(num_classes=1000, features_per_image=9)
    assert top1 == pytest.approx(1 - 0.999**9) and top5 == pytest.approx(1 - 0.995**9)
    assert chance_level(num_classes=4, features_per_image=1) == (0.25, 1.0)
    # simulated: random features of random classes land at the formula's rate
    generator = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(3000, 32, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(2000 * 9, 32, generator=generator), dim=1)
    sims, index = search_topk(queries, bank, k=10, device=CPU)
    correct = count_correct(
        sims,
        index,
        bank_labels_n=torch.randint(0, 7, (3000,), generator=generator),
        query_labels_i=torch.randint(0, 7, (2000,), generator=generator),
        features_per_image=9,
        ks=[10],
        temperature=0.07,
        num_classes=7,
    )[10]
    assert abs(correct.top1 / 2000 - (1 - (6 / 7) ** 9)) < 0.03
    assert abs(correct.feature_top1 / (2000 * 9) - 1 / 7) < 0.02


def test_chunked_search_equals_one_full_search():
    """Bank and queries in small chunks with a running top-k merge give exactly the full top-k."""
    generator = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(1000, 16, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(50, 16, generator=generator), dim=1)
    full_sims, full_index = (queries @ bank.T).topk(20, dim=1)
    calls = []
    sims, index = search_topk(
        queries,
        bank.half(),
        k=20,
        device=CPU,
        bank_chunk_rows=37,
        block_bytes=37 * 4 * 7,
        on_progress=lambda done, total: calls.append((done, total)),
    )
    assert calls[-1] == (math.ceil(1000 / 37) * math.ceil(50 / 7),) * 2
    torch.testing.assert_close(sims, full_sims, atol=2e-3, rtol=0)  # the bank is fp16
    assert (index == full_index).float().mean() > 0.97  # near-ties may swap under fp16 rounding
    sims32, index32 = search_topk(queries, bank, k=20, device=CPU, bank_chunk_rows=37, block_bytes=37 * 4 * 7)
    assert torch.equal(index32, full_index)
    torch.testing.assert_close(sims32, full_sims)


# -- geometry ---------------------------------------------------------------------------------


def test_box_in_non_square_image_lands_on_its_patches():
    """A 200 x 100 image, shorter side to 64, center crop 64: the box goes through the same
    scale for x and y and the same crop offset as the pixels; every cell center's token lies on
    the box in the transformed pixels."""
    geometry = EvalGeometry(width=200, height=100, resize=64, crop=64)
    assert geometry.resized == (128, 64) and geometry.offset == (32, 0) and geometry.scale == (0.64, 0.64)
    box = (80.0, 20.0, 120.0, 80.0)
    mapped = geometry.map_box(box)
    assert mapped == pytest.approx((19.2, 12.8, 44.8, 51.2))
    cells = cell_token_indices(mapped, grid=3, patch=8, crop=64)
    # cell centers x: 23.5, 32.0, 40.5 -> columns 2, 4, 5; y: 19.2, 32.0, 44.8 -> rows 2, 4, 5
    assert cells == [r * 8 + c for r in (2, 4, 5) for c in (2, 4, 5)]

    image = Image.new("RGB", (200, 100), (0, 160, 0))
    ImageDraw.Draw(image).rectangle([80, 20, 119, 79], fill=(220, 0, 0))
    pixels = np.asarray(geometry.transform_image(image)).astype(int)
    x0, y0, x1, y1 = mapped
    centers = [(y0 + (r + 0.5) * (y1 - y0) / 3, x0 + (c + 0.5) * (x1 - x0) / 3) for r in range(3) for c in range(3)]
    for index, (y, x) in zip(cells, centers):  # each token holds its cell center, which is red
        row, col = divmod(index, 8)
        assert row * 8 <= y < row * 8 + 8 and col * 8 <= x < col * 8 + 8
        red, green, _ = pixels[int(y), int(x)]
        assert red > 200 and green < 30, (row, col)
    # the released script's separate scales (64 / width, 64 / height) squash the image instead:
    # its box misses the object's left part and its left cells fall on other tokens
    squashed = (80 * 64 / 200, 20 * 64 / 100, 120 * 64 / 200, 80 * 64 / 100)
    assert cell_token_indices(squashed, grid=3, patch=8, crop=64) != cells


def test_pixel_transform_is_torchvisions_resize_and_center_crop():
    """The pixels the model sees equal torchvision's Resize(shorter, bicubic) + CenterCrop."""
    from torchvision import transforms

    rng = np.random.default_rng(0)
    for width, height in ((97, 61), (61, 97), (80, 80), (333, 250)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        reference = transforms.Compose(
            [transforms.Resize(56, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(48)]
        )(image)
        ours = EvalGeometry(width=width, height=height, resize=56, crop=48).transform_image(image)
        assert np.array_equal(np.asarray(ours), np.asarray(reference)), (width, height)


def test_boxes_are_clipped_and_the_largest_kept():
    """Clipping to the crop decides which box is largest; a box outside the crop is dropped."""
    geometry = EvalGeometry(width=100, height=50, resize=50, crop=50)  # crop x from 25 to 75
    outside = (0.0, 0.0, 20.0, 50.0)
    mostly_outside = (0.0, 0.0, 30.0, 50.0)  # large, but 5 px of it are left
    inside = (40.0, 10.0, 60.0, 30.0)
    assert geometry.map_box(outside) is None
    assert largest_mapped_box([outside, mostly_outside, inside], geometry) == pytest.approx((15.0, 10.0, 35.0, 30.0))
    assert largest_mapped_box([outside], geometry) is None


def test_boxes_of_the_image_class_are_preferred():
    """The label's own boxes are used when the boxes say their class; otherwise all boxes."""
    fields = {
        "json": json.dumps(
            {"label": 2, "boxes": [{"bbox": [0, 0, 50, 50], "class": 1}, {"bbox": [5, 5, 9, 9], "class": 2}]}
        ).encode()
    }
    label, boxes, _ = parse_annotation(fields, where="test")
    assert label == 2 and boxes == [(5.0, 5.0, 9.0, 9.0)]
    fields = {"json": json.dumps({"boxes": [{"bbox": [0, 0, 50, 50]}]}).encode(), "cls": b"4"}
    assert parse_annotation(fields, where="test")[:2] == (4, [(0.0, 0.0, 50.0, 50.0)])


# -- end to end -------------------------------------------------------------------------------


def _evaluate(*args, expect: int = 0):
    result = run_flsl("knn-eval", *map(str, args))
    assert result.returncode == expect, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    return result


def _results(path) -> dict:
    return json.loads(path.read_text())


def test_sizes_default_to_the_checkpoints_training_size(tiny_run, demo_data, tmp_path):
    """Without --resize/--crop, knn-eval evaluates a checkpoint at its own training size (crop =
    the run's augment.global_size, 32 px here; resize = 32 x 256 / 224 = 37); a flag overrides its
    own size only, and a resize below the training size is refused. The recipe's eval.knn section
    resolves the same way for in-training k-NN."""
    from flsl_cli.config.load import load_recipe

    data = ["--train", demo_data / "train", "--val", demo_data / "val", "--k", "5", "--workers", "0"]
    _evaluate(tiny_run, *data, "--max-train-images", 48, "--out", tmp_path / "default.json")
    settings = _results(tmp_path / "default.json")["settings"]
    assert (settings["resize"], settings["crop"]) == (37, 32)
    _evaluate(tiny_run, *data, "--max-train-images", 48, "--crop", 48, "--out", tmp_path / "crop.json")
    settings = _results(tmp_path / "crop.json")["settings"]
    assert (settings["resize"], settings["crop"]) == (55, 48)
    refused = _evaluate(tiny_run, *data, "--resize", 30, "--out", tmp_path / "small.json", expect=2)
    assert "expected at least crop (32, the training size), found 30" in " ".join(refused.stderr.split())
    assert not (tmp_path / "small.json").exists()
    run_recipe = load_recipe(tiny_run / "recipe.yaml")
    assert run_recipe.augment.global_size == 32
    assert (run_recipe.eval.knn.resize, run_recipe.eval.knn.crop) == (37, 32)
    demo = load_recipe("recipes/demo.yaml")
    assert (demo.eval.knn.resize, demo.eval.knn.crop) == (73, 64)
    explicit = load_recipe("recipes/demo.yaml", overrides=["eval.knn.resize=100", "eval.knn.crop=96"])
    assert (explicit.eval.knn.resize, explicit.eval.knn.crop) == (100, 96)


def _copy_shards(source, target, *, keep_boxes=lambda index: True, limit: int | None = None) -> None:
    """Rewrite a split's shards, dropping the boxes of the samples `keep_boxes` refuses."""
    from flsl_cli.data.shard_writer import ShardWriter
    from flsl_cli.data.shards import iter_samples, resolve_shards

    index = 0
    with ShardWriter(target, prefix="copy", samples_per_shard=16) as writer:
        for shard in resolve_shards(str(source)).shards:
            for key, fields in iter_samples(shard.url):
                if limit is not None and index >= limit:
                    return
                if not keep_boxes(index):
                    annotation = json.loads(fields["json"])
                    annotation["boxes"] = []
                    fields = {**fields, "json": json.dumps(annotation).encode()}
                writer.write(key, fields)
                index += 1


def test_results_table_json_and_feature_cache(tiny_run, demo_data, tmp_path):
    """The table and the JSON carry top-1/top-5 per k, the image counts and every setting; with
    --features-dir the second run reuses the features and gets the same numbers."""
    cache = tmp_path / "features"
    args = [
        tiny_run,
        "--train",
        demo_data / "train",
        "--val",
        demo_data / "val",
        *EVAL_SIZE,
        "--k",
        "5,20",
        "--workers",
        "0",
        "--features-dir",
        cache,
    ]
    first = _evaluate(*args)
    [written] = (tiny_run / "eval").glob("knn-bbox-step-*-teacher.json")  # the default place: beside the run
    results = _results(written)
    assert "top-1 %" in first.stdout and "bank: 192 train images (1728 features)" in first.stdout
    assert set(results["results"]) == {"5", "20"}
    for row in results["results"].values():
        assert 0 <= row["top1"] <= row["top5"] <= 100
        assert row["top1"] == pytest.approx(100 * row["correct_top1"] / results["val"]["images"])
        assert row["feature_top1"] == pytest.approx(
            100 * row["correct_feature_top1"] / (9 * results["val"]["images"]), abs=1e-4
        )
        assert row["feature_top1"] <= row["top1"]  # a right feature makes its image right
    n = results["settings"]["num_classes"]
    assert results["chance"] == pytest.approx(
        {"top1": 100 * (1 - (1 - 1 / n) ** 9), "top5": 100 * (1 - (1 - min(5, n) / n) ** 9), "feature_top1": 100 / n},
        abs=1e-3,
    )
    assert "feature top-1 %" in first.stdout and f"chance level ({n} classes, any of 9)" in first.stdout
    settings = results["settings"]
    assert (settings["mode"], settings["grid"], settings["features_per_image"]) == ("bbox", 3, 9)
    assert (settings["temperature"], settings["interpolation"]) == (0.07, "bicubic")
    assert (settings["resize"], settings["crop"], settings["patch_size"]) == (72, 64, 8)
    assert settings["mean"] == pytest.approx([0.485, 0.456, 0.406]) and settings["bank"]["dtype"] == "float16"
    assert results["train"] == {"samples": 192, "images": 192, "features": 1728, "skipped": {}, "cached": False}
    assert results["val"]["images"] == 48
    assert results["model"]["which"] == "teacher" and results["model"]["kind"] == "flsl"
    assert len(list(cache.glob("*.pt"))) == 2

    second = _evaluate(*args, "--output", tmp_path / "again.json")
    again = _results(tmp_path / "again.json")
    assert "reusing" in second.stderr
    assert again["train"]["cached"] and again["val"]["cached"]
    assert again["results"] == results["results"]


def test_global_mode_needs_no_boxes(tiny_run, demo_data, tmp_path):
    """Global mode: one mean-pooled feature per image, and shards without any box are fine."""
    _copy_shards(demo_data / "train", tmp_path / "train", keep_boxes=lambda index: False)
    _evaluate(
        tiny_run,
        "--train",
        tmp_path / "train",
        "--val",
        demo_data / "val",
        *EVAL_SIZE,
        "--mode",
        "global",
        "--k",
        "10",
        "--workers",
        "0",
        "--output",
        tmp_path / "global.json",
    )
    results = _results(tmp_path / "global.json")
    assert results["settings"]["features_per_image"] == 1 and results["settings"]["grid"] is None
    assert results["train"]["features"] == 192 and results["train"]["skipped"] == {}


def test_two_processes_count_what_one_does(tiny_run, demo_data, tmp_path):
    """`--devices 2`: two gloo processes, each extracting its shards and searching its share of
    the val images, give exactly the single process's counts."""
    common = [
        tiny_run,
        "--train",
        demo_data / "train",
        "--val",
        demo_data / "val",
        *EVAL_SIZE,
        "--k",
        "10,50",
        "--workers",
        "0",
    ]
    _evaluate(*common, "--output", tmp_path / "one.json")
    _evaluate(*common, "--devices", "2", "--output", tmp_path / "two.json")
    one, two = _results(tmp_path / "one.json"), _results(tmp_path / "two.json")
    assert (one["settings"]["world_size"], two["settings"]["world_size"]) == (1, 2)
    assert two["results"] == one["results"] and two["train"] == one["train"] and two["val"] == one["val"]


def test_timm_export_evaluates_like_its_checkpoint(tiny_run, demo_data, tmp_path):
    """A `flsl export --format timm` folder and single file give the checkpoint's numbers."""
    # At the size the run trained at (32 px): at other sizes flsl resamples the position table
    # as the authors' release does and timm its own way (README, "Exporting backbones").
    common = [
        "--train",
        demo_data / "train",
        "--val",
        demo_data / "val",
        "--resize",
        "36",
        "--crop",
        "32",
        "--k",
        "10",
        "--workers",
        "0",
    ]
    _evaluate(tiny_run, *common, "--output", tmp_path / "checkpoint.json")
    reference = _results(tmp_path / "checkpoint.json")["results"]
    for target in (tmp_path / "export", tmp_path / "export.safetensors"):
        exported = run_flsl("export", tiny_run, "--format", "timm", "--out", target)
        assert exported.returncode == 0, exported.stderr
        _evaluate(target, *common, "--output", tmp_path / "export.json")
        results = _results(tmp_path / "export.json")
        assert results["model"]["kind"] == "timm-export" and results["model"]["patch_size"] == 8
        assert results["results"] == reference, target


def test_images_without_boxes_are_skipped_and_counted(tiny_run, demo_data, tmp_path):
    """In bbox mode a val image without boxes is left out of the accuracy and counted."""
    _copy_shards(demo_data / "val", tmp_path / "val", keep_boxes=lambda index: index % 3 != 0)
    _evaluate(
        tiny_run,
        "--train",
        demo_data / "train",
        "--val",
        tmp_path / "val",
        *EVAL_SIZE,
        "--k",
        "10",
        "--workers",
        "0",
        "--output",
        tmp_path / "out.json",
    )
    val = _results(tmp_path / "out.json")["val"]
    assert val == {"samples": 48, "images": 32, "features": 288, "skipped": {"no boxes": 16}, "cached": False}


def test_evaluate_during_training(tiny_run, demo_data, tmp_path):
    """The loop's entry point: flat metrics from the live backbone, the same numbers as the CLI,
    and the backbone's training mode left as it was."""
    from flsl_cli.config.schema import KnnEvalConfig
    from flsl_cli.eval.api import evaluate_during_training
    from flsl_cli.models.load import load_backbone

    settings = KnnEvalConfig(
        train=str(demo_data / "train"), val=str(demo_data / "val"), k=[10], resize=72, crop=64, workers=0
    )
    backbone = load_backbone(tiny_run).backbone.train()
    metrics = evaluate_during_training(backbone=backbone, settings=settings, device=CPU)
    assert backbone.training and all(p.requires_grad for p in backbone.parameters() if p is not backbone.pos_embed)
    _evaluate(
        tiny_run,
        "--train",
        demo_data / "train",
        "--val",
        demo_data / "val",
        *EVAL_SIZE,
        "--k",
        "10",
        "--workers",
        "0",
        "--output",
        tmp_path / "cli.json",
    )
    results = _results(tmp_path / "cli.json")
    cli, chance = results["results"]["10"], results["chance"]
    assert metrics == {
        "knn_bbox_images": 48.0,
        "knn_bbox_top1_k10": cli["top1"],
        "knn_bbox_top5_k10": cli["top5"],
        "knn_bbox_feature_top1_k10": cli["feature_top1"],
        "knn_bbox_chance_top1": chance["top1"],
        "knn_bbox_chance_feature_top1": chance["feature_top1"],
    }


# -- bad input --------------------------------------------------------------------------------


def _knn(*args):
    return run_flsl("knn-eval", *map(str, args))


def test_checkpoint_missing_or_not_a_model(demo_data, tmp_path):
    """A missing path, and a file that is neither a flsl checkpoint nor a timm export."""
    data = ["--train", demo_data / "train", "--val", demo_data / "val"]
    fails(_knn(tmp_path / "nowhere.pt", *data), "the checkpoint does not exist", "nowhere.pt")
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(2)}, junk)
    fails(_knn(junk, *data), "not a flsl checkpoint", "flsl export --format timm")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    fails(_knn(bad, *data), "cannot read the .safetensors file")


def test_options_that_contradict_the_architecture(tiny_run, demo_data):
    """A crop that is not a multiple of the patch size, --model naming another architecture,
    --which on a timm model."""
    data = ["--train", demo_data / "train", "--val", demo_data / "val", "--workers", "0"]
    fails(
        _knn(tiny_run, *data, "--resize", "72", "--crop", "60"),
        "--crop 60 is not a multiple of the model's patch size (8)",
    )
    fails(
        _knn(tiny_run, *data, "--model", "timm:vit_small_patch16_224"),
        "contradicts --model timm:vit_small_patch16_224",
        "width 192, depth 2, patch 8",
    )
    fails(
        _knn(*data, "--model", "timm:vit_tiny_patch16_224", "--which", "student"),
        "--which applies to flsl checkpoints only",
    )


def test_no_boxes_at_all_in_bbox_mode(tiny_run, demo_data, tmp_path):
    """Train shards without any box: a clear error that points to --mode global."""
    _copy_shards(demo_data / "train", tmp_path / "train", keep_boxes=lambda index: False, limit=40)
    fails(
        _knn(tiny_run, "--train", tmp_path / "train", "--val", demo_data / "val", *EVAL_SIZE, "--workers", "0"),
        "none of the 40 images of the train set has a usable box (40 no boxes)",
        "--mode global",
    )


def test_k_larger_than_the_bank(tiny_run, demo_data):
    """k beyond the number of bank features is refused with the bank's size."""
    fails(
        _knn(
            tiny_run,
            "--train",
            demo_data / "train",
            "--val",
            demo_data / "val",
            *EVAL_SIZE,
            "--workers",
            "0",
            "--max-train-images",
            "10",
            "--k",
            "20,100",
        ),
        "--k 100 is larger than the memory bank (10 train images x 9 = 90 features)",
    )


def test_empty_or_missing_shard_sets(tiny_run, demo_data, tmp_path):
    (tmp_path / "empty").mkdir()
    """An empty directory of shards, and a path that does not exist: named with the option."""
    fails(_knn(tiny_run, "--train", tmp_path / "empty", "--val", demo_data / "val"), "--train", "no .tar shards")
    fails(
        _knn(tiny_run, "--train", demo_data / "train", "--val", tmp_path / "none"),
        "--val",
        str(tmp_path / "none"),
        "flsl data demo",
    )


def test_truncated_shard_stops_the_evaluation(tiny_run, demo_data, tmp_path):
    """A shard that cannot be read to its end is named; no numbers over part of the set."""
    _copy_shards(demo_data / "val", tmp_path / "val")
    shard = sorted((tmp_path / "val").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    fails(
        _knn(tiny_run, "--train", demo_data / "train", "--val", tmp_path / "val", *EVAL_SIZE, "--workers", "0"),
        str(shard),
        "could not be read to its end",
    )


def test_unreachable_timm_weights_fail_at_once(demo_data, tmp_path):
    """Pretrained timm weights that are not cached, on a hub that does not answer, are one error
    naming the model within seconds, not after the hub client's minute of retries."""
    import os
    import subprocess
    import sys
    import time

    from conftest import REPO
    from servers import free_port

    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "flsl_cli", "knn-eval", "--model", "timm:vit_small_patch16_224.dino"]
        + ["--train", str(demo_data / "train"), "--val", str(demo_data / "val")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - started
    fails(result, "cannot download the pretrained weights of timm model 'vit_small_patch16_224.dino'", "127.0.0.1")
    assert "Retrying" not in result.stderr and seconds < 45, (seconds, result.stderr)
