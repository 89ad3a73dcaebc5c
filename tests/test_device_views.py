"""Views made with batched tensor ops (`augment.device: tensor-cpu | cuda`), checked on the CPU:
the same plan as the PIL path, the same pixels within interpolation tolerance, each photometric
op equal to torchvision's, the random parameters distributed as the recipe says, bad images
replaced and reported, and a training run that resumes bitwise."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF2
from conftest import assert_same_run, final_checkpoint, run_flsl, tiny_overrides
from PIL import Image

from flsl_cli.config.schema import Recipe
from flsl_cli.data import augment as aug_mod
from flsl_cli.data.augment import MultiCropAugment, decode_for, open_image
from flsl_cli.data.device_views import (
    DeviceViews,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    gaussian_blur,
    grayscale,
    photometric,
    plan_tensors,
    solarize,
)
from flsl_cli.data.shards import resolve_shards
from flsl_cli.data.stream import TrainStream, collate, plan_layout
from flsl_cli.data.view_plan import JITTER_OPS, draw_plan

PHOTOMETRIC_OFF = {"color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "alt_blur_p": 0.0, "solarize_p": 0.0}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _recipe(train="x", *, device="tensor-cpu", small=True, **augment) -> Recipe:
    sizes = {"global_size": 32, "local_size": 16} if small else {}
    return Recipe.model_validate(
        {
            "data": {"train": str(train)},
            "model": {"arch": "vit_tiny", "patch_size": 8} if small else {},
            "augment": {**sizes, "device": device, **augment},
            "loss": {"query_window_global": 2, "query_window_local": 2} if small else {},
        }
    )


def _encoded(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A smooth image with edges (upsampled noise), JPEG-friendly like a photograph."""
    base = np.random.default_rng(seed).integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)


def _batch(recipe: Recipe, encoded: list[bytes], *, seeds: list[int]) -> tuple[dict, list]:
    """A collated tensor-path batch as the data workers deliver it, and the plans."""
    samples, plans = [], []
    for seed, data in zip(seeds, encoded):
        size = open_image(data).size
        plan = draw_plan(recipe, size, rng=np.random.default_rng(seed))
        plans.append(plan)
        samples.append(
            {"encoded": data, "shard": "shard.tar", "key": f"k{seed}", "bad": [], **plan_tensors(plan, size=size)}
        )
    return collate(samples), plans


def _pixels(view: torch.Tensor) -> torch.Tensor:
    """A normalised view back in [0, 1] pixel values."""
    return view * STD + MEAN


def test_crop_boxes_and_queries_are_the_same_plan_in_both_paths(demo_data, monkeypatch):
    """The tensor path's workers draw exactly the boxes the PIL path cuts and the same queries."""
    shards = resolve_shards(str(demo_data / "train"))
    layout, _ = plan_layout(shards, world_size=1, num_workers=0, local_batch=4)
    cut = []
    real = aug_mod.crop_resize
    monkeypatch.setattr(
        aug_mod, "crop_resize", lambda image, box, size, **scale: cut.append(box) or real(image, box, size, **scale)
    )

    def samples(device):
        stream = TrainStream(
            shards,
            layout=layout,
            rank=0,
            seed=5,
            shuffle_buffer=8,
            augment=MultiCropAugment(_recipe(demo_data / "train", device=device)),
        )
        stream.set_epoch(1)
        return [sample for _, sample in zip(range(12), stream)]

    pil, tensor = samples("cpu"), samples("tensor-cpu")
    assert [s["key"] for s in pil] == [s["key"] for s in tensor]
    planned = [tuple(box) for s in tensor for box in s["plan_boxes"].tolist()]
    assert len(planned) == len(cut) == 12 * 4
    np.testing.assert_allclose(np.array(cut), np.array(planned), rtol=0, atol=1e-9)
    for a, b in zip(pil, tensor):
        assert torch.equal(a["global_queries"], b["global_queries"])
        assert torch.equal(a["local_queries"], b["local_queries"])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_views_equal_the_pil_views_within_interpolation_tolerance(fmt):
    """With photometric ops off, the paper's 224/96 px views made from the same plan differ from
    PIL's by less than 2/255 on average (PNG: decoded on the CPU fallback)."""
    recipe = _recipe(small=False, **PHOTOMETRIC_OFF)
    encoded = [_encoded(_photo_like(500, 375, seed), fmt) for seed in range(3)]
    encoded.append(_encoded(_photo_like(300, 420, 9), fmt))
    seeds = [11, 12, 13, 14]
    batch, plans = _batch(recipe, encoded, seeds=seeds)
    made = DeviceViews(recipe, device=torch.device("cpu"))(batch)
    augment = MultiCropAugment(recipe)
    for index, (data, plan) in enumerate(zip(encoded, plans)):
        image, scale = decode_for(open_image(data), plan.crops, global_size=224, local_size=96)
        reference = augment.execute(image, plan, scale=scale)
        for key in ("teacher", "global", "locals"):
            difference = (_pixels(made[key][index]) - _pixels(reference[key])).abs().mean().item()
            assert difference < 2 / 255, (index, key, difference * 255)
    assert made["teacher"].shape == (4, 3, 224, 224) and made["locals"].shape == (4, 2, 3, 96, 96)
    assert made["bad"] == []


def _images(count=6, side=20, seed=0) -> torch.Tensor:
    return torch.rand((count, 3, side, side), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("ours", "reference", "factors"),
    [
        (adjust_brightness, TF2.adjust_brightness, [0.6, 0.9, 1.0, 1.2, 1.4, 0.7]),
        (adjust_contrast, TF2.adjust_contrast, [0.6, 0.9, 1.0, 1.2, 1.4, 0.7]),
        (adjust_saturation, TF2.adjust_saturation, [0.8, 0.9, 1.0, 1.1, 1.2, 0.0]),
        (adjust_hue, TF2.adjust_hue, [-0.1, -0.05, 0.0, 0.03, 0.1, 0.5]),
    ],
)
def test_each_jitter_op_equals_torchvision_with_per_sample_factors(ours, reference, factors):
    images = _images()
    made = ours(images.clone(), torch.tensor(factors, dtype=torch.float64))
    for image, factor, out in zip(images, factors, made):
        torch.testing.assert_close(out, reference(image, factor), rtol=0, atol=1e-5)


def test_grayscale_blur_and_solarize_equal_torchvision():
    images = _images(side=24)
    for image, out in zip(images, grayscale(images.clone())):
        torch.testing.assert_close(out, TF2.rgb_to_grayscale(image, num_output_channels=3), rtol=0, atol=1e-6)
    sigmas = [0.1, 0.5, 1.0, 1.5, 2.0, 0.3]
    kernel = blur_kernel_size(2.0, side=24)
    assert kernel == 13
    made = gaussian_blur(images.clone(), sigma_n=torch.tensor(sigmas, dtype=torch.float64), kernel_size=kernel)
    for image, sigma, out in zip(images, sigmas, made):
        torch.testing.assert_close(
            out, TF2.gaussian_blur(image, kernel_size=[kernel, kernel], sigma=[sigma, sigma]), rtol=0, atol=1e-5
        )
    for image, out in zip(images, solarize(images.clone())):
        torch.testing.assert_close(out, TF2.solarize(image, threshold=0.5), rtol=0, atol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_photometric_applies_each_samples_ops_in_its_own_order(masked):
    """Per sample: its jitter ops in its drawn order, then grayscale, blur, solarize, as
    torchvision would apply them one image at a time; alike in the indexed (CPU) and the masked
    (GPU) form."""
    recipe = _recipe(
        small=False, color_jitter_p=1.0, grayscale_p=0.3, blur_branch_p=0.5, blur_p=0.6, alt_blur_p=0.4, solarize_p=0.5
    )
    plans = [draw_plan(recipe, (100, 100), rng=np.random.default_rng(seed)) for seed in range(12)]
    tensors = [plan_tensors(plan, size=(100, 100)) for plan in plans]
    images = _images(count=12, side=24, seed=3)
    made = photometric(
        images,
        jitter_n4=torch.stack([t["plan_jitter"][0] for t in tensors]),
        order_n4=torch.stack([t["plan_jitter_order"][0] for t in tensors]),
        gray_n=torch.stack([t["plan_gray"][0] for t in tensors]),
        blur_n=torch.stack([t["plan_blur"][0] for t in tensors]),
        solarize_n=torch.stack([t["plan_solarize"][0] for t in tensors]),
        blur_max=2.0,
        masked=masked,
    )
    reference_ops = {
        "brightness": TF2.adjust_brightness,
        "contrast": TF2.adjust_contrast,
        "saturation": TF2.adjust_saturation,
        "hue": TF2.adjust_hue,
    }
    orders = set()
    for image, plan, out in zip(images, plans, made):
        choice = plan.photometric[0]
        orders.add(tuple(name for name, _ in choice.jitter))
        for name, factor in choice.jitter:
            image = reference_ops[name](image, factor)
        if choice.grayscale:
            image = TF2.rgb_to_grayscale(image, num_output_channels=3)
        if choice.blur_sigma is not None:
            image = TF2.gaussian_blur(image, kernel_size=[13, 13], sigma=[choice.blur_sigma] * 2)
        if choice.solarize:
            image = TF2.solarize(image, threshold=0.5)
        torch.testing.assert_close(out, image, rtol=0, atol=1e-5)
    assert len(orders) > 3  # the samples really had different orders


def test_random_parameters_follow_the_recipe_over_many_samples():
    """Over 16,000 views: op probabilities, jitter factor ranges, uniform op order and the blur
    sigma range match the recipe, as encoded for the tensor path."""
    recipe = _recipe(small=False)
    aug = recipe.augment
    tensors = [
        plan_tensors(draw_plan(recipe, (500, 375), rng=np.random.default_rng(seed)), size=(500, 375))
        for seed in range(4000)
    ]
    order = torch.cat([t["plan_jitter_order"] for t in tensors])
    jitter = torch.cat([t["plan_jitter"] for t in tensors])
    gray = torch.cat([t["plan_gray"] for t in tensors]).double()
    blur = torch.cat([t["plan_blur"] for t in tensors])
    solarized = torch.cat([t["plan_solarize"] for t in tensors])
    jittered = order[:, 0] >= 0
    assert abs(jittered.double().mean().item() - aug.color_jitter_p) < 0.015
    assert abs(gray.mean().item() - aug.grayscale_p) < 0.015
    blur_p = aug.blur_branch_p * aug.blur_p + (1 - aug.blur_branch_p) * aug.alt_blur_p
    assert abs((blur > 0).double().mean().item() - blur_p) < 0.015
    solarize_p = (1 - aug.blur_branch_p) * aug.solarize_p
    assert abs(solarized.double().mean().item() - solarize_p) < 0.01
    both = ((blur > 0) & solarized).double().mean().item()  # only in the rarer-blur branch
    assert abs(both - (1 - aug.blur_branch_p) * aug.alt_blur_p * aug.solarize_p) < 0.005
    sigmas = blur[blur > 0]
    assert aug.blur_radius[0] <= sigmas.min() and sigmas.max() <= aug.blur_radius[1]
    assert abs(sigmas.mean().item() - sum(aug.blur_radius) / 2) < 0.03
    for op, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        values = jitter[jittered, op]
        assert low <= values.min() and values.max() <= high
        assert values.min() < low + 0.01 and values.max() > high - 0.01
        first = (order[jittered, 0] == op).double().mean().item()
        assert abs(first - 0.25) < 0.02, (JITTER_OPS[op], first)
    assert (jitter[~jittered] == torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)).all()


def test_the_executor_applies_the_drawn_grayscale_and_solarize():
    """The made views are grey exactly where the plan says (solarize keeps a grey view grey)."""
    recipe = _recipe(color_jitter_p=0.0, blur_p=0.0, alt_blur_p=0.0)
    encoded = [_encoded(_photo_like(64, 48, seed)) for seed in range(40)]
    batch, plans = _batch(recipe, encoded, seeds=list(range(40)))
    made = DeviceViews(recipe, device=torch.device("cpu"))(batch)
    for index, plan in enumerate(plans):
        views = [made["teacher"][index], made["global"][index], *made["locals"][index]]
        for view, choice in zip(views, plan.photometric):
            pixels = _pixels(view)
            grey = bool(((pixels[0] - pixels[1]).abs().max() < 1e-5) and ((pixels[1] - pixels[2]).abs().max() < 1e-5))
            assert grey == choice.grayscale


def test_an_image_that_does_not_decode_is_reported_and_replaced():
    """A JPEG whose header reads but whose data is cut short fails every decoder in the training
    process: it is reported as a bad sample, and another sample's views take its place."""
    recipe = _recipe(**PHOTOMETRIC_OFF)
    encoded = [_encoded(_photo_like(64, 48, seed)) for seed in range(4)]
    encoded[1] = encoded[1][: len(encoded[1]) // 2]
    batch, _ = _batch(recipe, encoded, seeds=[1, 2, 3, 4])
    made = DeviceViews(recipe, device=torch.device("cpu"))(batch)
    assert [(r["kind"], r["key"], r["shard"], r["samples"]) for r in made["bad"]] == [("sample", "k2", "shard.tar", 1)]
    assert "does not decode" in made["bad"][0]["reason"]
    assert made["teacher"].shape[0] == 4
    assert torch.equal(made["teacher"][1], made["teacher"][2]) and torch.equal(made["locals"][1], made["locals"][2])
    assert torch.equal(made["global_queries"][1], made["global_queries"][2])
    assert torch.isfinite(made["global"]).all()


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_with_tensor_views_resumes_bitwise(demo_data, tmp_path):
    """A stop in mid-epoch and `flsl resume` give the same losses and weights as a straight run
    when the views are made by the tensor path (2 data workers)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = tiny_overrides(demo_data / "train", augment__device="tensor-cpu")
    done = run_flsl("pretrain", "recipes/demo.yaml", *common, "--run-dir", straight)
    assert done.returncode == 0, done.stderr
    total = _metrics(straight)[-1]["step"]
    stop = total // 2 + 1
    first = run_flsl("pretrain", "recipes/demo.yaml", *common, "--set", f"optim.max_steps={stop}", "--run-dir", split)
    assert first.returncode == 0, first.stderr
    assert final_checkpoint(split)["step"] == stop
    resumed = run_flsl("resume", split, "--set", "optim.max_steps=null")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(straight, split)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given where no CUDA GPU exists")
def test_cuda_views_without_a_gpu_are_a_recipe_error(demo_data, tmp_path):
    result = run_flsl(
        "pretrain",
        "recipes/demo.yaml",
        *tiny_overrides(demo_data / "train", augment__device="cuda"),
        "--run-dir",
        tmp_path / "run",
    )
    assert result.returncode == 2, result.stderr
    assert "augment.device" in result.stderr and "tensor-cpu" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_view_cost_reports_both_paths_and_their_ratio(demo_data):
    """`flsl bench data --device`'s measurement: worker CPU time per image of both paths (same
    samples), their ratio, and the training process's share; cuda without a GPU is refused."""
    from flsl_cli.bench.view_cost import run_view_cost, worker_samples
    from flsl_cli.errors import FlslError

    recipe = _recipe(demo_data / "train", device="cpu")
    shards = resolve_shards(str(demo_data / "train"))
    cost = run_view_cost(recipe, shards, device="tensor-cpu", images=8, batch=4)
    assert cost["images"] == 8 and set(cost["worker_cpu_ms_per_image"]) == {"cpu", "tensor-cpu"}
    per_image = cost["worker_cpu_ms_per_image"]
    assert cost["worker_cpu_ratio"] == pytest.approx(per_image["tensor-cpu"] / per_image["cpu"])
    assert cost["training_process_ms_per_image"]["wall"] > 0
    tensor_recipe = _recipe(demo_data / "train")
    assert [s["key"] for s in worker_samples(recipe, shards, images=8)] == [
        s["key"] for s in worker_samples(tensor_recipe, shards, images=8)
    ]
    assert "encoded" in next(worker_samples(tensor_recipe, shards, images=1))
    if not torch.cuda.is_available():
        with pytest.raises(FlslError, match="--device tensor-cpu"):
            run_view_cost(recipe, shards, device="cuda", images=2, batch=2)


def test_a_jpeg_that_fails_in_the_training_process_is_logged_and_counted(demo_data, tmp_path):
    """A JPEG cut short (its header reads, so the worker plans it) fails to decode in the training
    process: the run goes on, bad_samples.jsonl names its shard and key, the checkpoint counts it."""
    import shutil
    import tarfile

    data = tmp_path / "train"
    shutil.copytree(demo_data / "train", data)
    shard = sorted(data.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    cut_key = next(name.split(".", 1)[0] for name, _ in members if name.endswith(".jpg"))
    with tarfile.open(shard, "w") as tar:
        for name, payload in members:
            if name == f"{cut_key}.jpg":
                payload = payload[: len(payload) // 2]
                assert open_image(payload).size == (64, 64)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    run = tmp_path / "run"
    result = run_flsl(
        "pretrain",
        "recipes/demo.yaml",
        *tiny_overrides(data, optim__epochs=1, data__max_bad_fraction=0.5, augment__device="tensor-cpu"),
        "--run-dir",
        run,
    )
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in (run / "bad_samples.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["key"], r["shard"]) for r in reports] == [("sample", cut_key, str(shard))]
    assert "does not decode" in reports[0]["reason"]
    health = final_checkpoint(run)["data_health"]
    assert health["bad"] == 1 and health["seen"] > 1
