"""The views made with batched tensor ops on a device (`augment.device: tensor-cpu | cuda`).

Data workers only read each sample's encoded image and draw its plan (`view_plan.py`, the same
draws from the same per-sample generator as the PIL path), packed by `plan_tensors` into
fixed-shape tensors that collate into a batch. The training process then makes the views of
the whole batch (`DeviceViews`):

1. decode: JPEGs with `torchvision.io.decode_jpeg` on the device (a list at once); anything
   else, or a JPEG the device decoder refuses, on the CPU (torchvision, then PIL); a sample no
   decoder reads is bad: it is reported like a bad sample of the workers and its place in the
   batch is taken by the views of another sample of the batch, so every rank keeps its steps;
2. cut: every view's box (in the original pixels) by one `roi_align` per view size, with as
   many bilinear samples per output pixel as the box has source pixels (an area average, so a
   downscale is antialiased);
3. photometric ops with per-sample parameters (jitter in each view's own order, grayscale,
   Gaussian blur, solarize), each the torchvision.transforms.v2 operation on float images;
4. normalise with the ImageNet mean and std.

Shapes: N samples, V views per sample (teacher, student, locals), S view side.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.ops import roi_align

from flsl_cli.config.schema import Recipe
from flsl_cli.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from flsl_cli.data.view_plan import JITTER_OPS, SamplePlan
from flsl_cli.errors import DataError, RecipeError

PLAN_KEYS = ("plan_size", "plan_boxes", "plan_jitter", "plan_jitter_order", "plan_gray", "plan_blur", "plan_solarize")
_IDENTITY = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
_JPEG_MAGIC = b"\xff\xd8\xff"


def plan_tensors(plan: SamplePlan, *, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """One sample's plan as fixed-shape tensors (V views), ready to collate."""
    views = len(plan.photometric)
    jitter = torch.tensor([[_IDENTITY[name] for name in JITTER_OPS]] * views, dtype=torch.float64)
    order = torch.full((views, len(JITTER_OPS)), -1, dtype=torch.int64)
    for v, choice in enumerate(plan.photometric):
        for position, (name, factor) in enumerate(choice.jitter):
            jitter[v, JITTER_OPS.index(name)] = factor
            order[v, position] = JITTER_OPS.index(name)
    made = {
        "plan_size": torch.tensor(size, dtype=torch.int64),
        "plan_boxes": torch.tensor(plan.crops.boxes, dtype=torch.float64),
        "plan_jitter": jitter,
        "plan_jitter_order": order,
        "plan_gray": torch.tensor([c.grayscale for c in plan.photometric]),
        "plan_blur": torch.tensor([c.blur_sigma or 0.0 for c in plan.photometric], dtype=torch.float64),
        "plan_solarize": torch.tensor([c.solarize for c in plan.photometric]),
        "global_queries": torch.from_numpy(plan.global_queries),
    }
    if plan.local_queries is not None:
        made["local_queries"] = torch.from_numpy(plan.local_queries)
    return made


def device_views_for(recipe: Recipe, *, device: torch.device, source: str) -> DeviceViews | None:
    """The training process's view maker for `augment.device`, None when the data workers make
    the views with PIL (`cpu`)."""
    wanted = recipe.augment.device
    if wanted == "cpu":
        return None
    check_view_device(recipe, trains_on=device.type, source=source)
    return DeviceViews(recipe, device=device if wanted == "cuda" else torch.device("cpu"))


def check_view_device(recipe: Recipe, *, trains_on: str, source: str) -> None:
    """`augment.device: cuda` needs a process that trains on a CUDA GPU."""
    if recipe.augment.device == "cuda" and trains_on != "cuda":
        raise RecipeError(
            [
                f"augment.device: cuda makes the views on the training GPU, but this process trains "
                f"on {trains_on} (no CUDA GPU found); expected cpu or tensor-cpu here, found cuda"
            ],
            source=source,
        )


class DeviceViews:
    """Turns a batch of encoded images and plans into the views the training step takes."""

    def __init__(self, recipe: Recipe, *, device: torch.device) -> None:
        self.recipe, self.device = recipe, device
        aug = recipe.augment
        self.sizes = [aug.global_size, aug.global_size] + [aug.local_size] * aug.local_crops
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.blur_max = aug.blur_radius[1]

    def __call__(self, batch: dict) -> dict:
        """The batch with `teacher`, `global` and `locals` made from `encoded` and the plan;
        samples that do not decode are added to `batch["bad"]`."""
        encoded: list[bytes] = batch.pop("encoded")
        shards: list[str] = batch.pop("shard")
        plan = {key: batch.pop(key) for key in PLAN_KEYS}
        images, failures = decode_batch(encoded, device=self.device)
        good = [i for i, image in enumerate(images) if image is not None]
        if not good:
            raise DataError(
                f"no image of a batch of {len(encoded)} decodes ({failures[0][1]})",
                where=str(batch["key"][0]),
                fix="Check the shards with `tar -tf` and regenerate the damaged ones",
            )
        for index, reason in failures:
            stand_in = min(good, key=lambda g: (g < index, abs(g - index)))  # the next good one, else the previous
            images[index] = images[stand_in]
            for key in plan:
                plan[key][index] = plan[key][stand_in]
            for key in ("global_queries", "local_queries"):
                if key in batch:
                    batch[key][index] = batch[key][stand_in]
            batch["bad"].append(
                {"kind": "sample", "shard": shards[index], "key": batch["key"][index], "reason": reason, "samples": 1}
            )
        ready = [image for image in images if image is not None]
        assert len(ready) == len(images), "each image that failed has a stand-in"
        views = self.make(ready, plan)
        batch["teacher"], batch["global"] = views[0], views[1]
        if len(views) > 2:
            batch["locals"] = torch.stack(views[2:], dim=1)
        return batch

    def make(self, images: list[torch.Tensor], plan: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Every view (one (N, 3, S, S) tensor per view index) of decoded uint8 images."""
        device = self.device
        boxes_nv4 = plan["plan_boxes"].to(device)
        # Boxes are in the pixels the plan was drawn for; a decoder may report another size.
        decoded_wh = torch.tensor(
            [[image.shape[2], image.shape[1]] for image in images], dtype=torch.float64, device=device
        )
        ratio_n2 = decoded_wh / plan["plan_size"].to(device, torch.float64)
        boxes_nv4 = boxes_nv4 * ratio_n2.repeat(1, 2)[:, None, :]
        views = cut_views(images, boxes_nv4=boxes_nv4, sizes=self.sizes)
        made = []
        for v, view in enumerate(views):
            view = photometric(
                view,
                jitter_n4=plan["plan_jitter"][:, v].to(device),
                order_n4=plan["plan_jitter_order"][:, v].to(device),
                gray_n=plan["plan_gray"][:, v].to(device),
                blur_n=plan["plan_blur"][:, v].to(device),
                solarize_n=plan["plan_solarize"][:, v].to(device),
                blur_max=self.blur_max,
            )
            made.append((view - self.mean) / self.std)
        return made


def decode_batch(
    encoded: list[bytes], *, device: torch.device
) -> tuple[list[torch.Tensor | None], list[tuple[int, str]]]:
    """Each image as uint8 (3, H, W) on `device`, None where no decoder reads it; and the
    (index, reason) of those."""
    datas = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
    images: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, data in enumerate(encoded) if data[:3] == _JPEG_MAGIC]
    if jpegs:
        try:
            for i, image in zip(jpegs, decode_jpeg([datas[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)):
                images[i] = image
        except RuntimeError:
            pass  # one JPEG the decoder refuses fails the whole list: decode them one by one below
    failures = []
    for i, data in enumerate(encoded):
        if images[i] is None:
            image, reason = _decode_one(datas[i], data, device=device, jpeg=i in jpegs)
            images[i] = image
            if image is None:
                failures.append((i, reason))
    return images, failures


def _decode_one(
    tensor: torch.Tensor, data: bytes, *, device: torch.device, jpeg: bool
) -> tuple[torch.Tensor | None, str]:
    if jpeg and device.type != "cpu":
        try:
            return decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device), ""
        except RuntimeError:
            pass
    try:
        return decode_image(tensor, mode=ImageReadMode.RGB).to(device), ""
    except RuntimeError:
        pass
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).to(device), ""
    except Exception as exc:  # noqa: BLE001 - any decoder failure makes the sample bad
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"image does not decode ({type(exc).__name__}: {first})"


def cut_views(images: list[torch.Tensor], *, boxes_nv4: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Crop-and-resize of every box (left, top, width, height in each image's pixels) to its
    view's side: float (N, 3, S, S) in [0, 1] per view index. Each image is cut on its own, in
    float only while it is cut, so a batch never holds more than one image's float pixels (a
    batch padded to its largest height and width would grow with the largest photo in it)."""
    views = boxes_nv4.shape[1]
    by_size = {size: [v for v in range(views) if sizes[v] == size] for size in sorted(set(sizes))}
    made: list[list[torch.Tensor]] = [[] for _ in range(views)]
    for n, image in enumerate(images):
        pixels = image[None].float().div_(255.0)
        left, top, w, h = boxes_nv4[n].unbind(-1)
        rois_v5 = torch.stack([torch.zeros_like(left), left, top, left + w, top + h], dim=-1).to(pixels.dtype)
        for size, index in by_size.items():
            # sampling_ratio <= 0: ceil(box side / output side) samples per output pixel and axis.
            out = roi_align(pixels, rois_v5[index], output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
            for k, v in enumerate(index):
                made[v].append(out[k])
    return [torch.stack(per_view).clamp_(0.0, 1.0) for per_view in made]


def photometric(
    view: torch.Tensor,
    *,
    jitter_n4: torch.Tensor,
    order_n4: torch.Tensor,
    gray_n: torch.Tensor,
    blur_n: torch.Tensor,
    solarize_n: torch.Tensor,
    blur_max: float,
    masked: bool | None = None,
) -> torch.Tensor:
    """One view index's photometric ops over the batch, each sample with its own parameters.

    Two equal ways: on the CPU each op runs on the samples that take it (`indexed`); on a GPU
    every op runs on the whole batch and a mask keeps its result where it applies (`masked`),
    which costs more arithmetic but never waits for the device to learn which samples those are.
    """
    masked = view.device.type != "cpu" if masked is None else masked
    blur_kernel = blur_kernel_size(blur_max, side=view.shape[-1])
    if masked:
        return _photometric_masked(
            view,
            jitter_n4=jitter_n4,
            order_n4=order_n4,
            gray_n=gray_n,
            blur_n=blur_n,
            solarize_n=solarize_n,
            blur_kernel=blur_kernel,
        )
    view = view.clone()
    for position in range(order_n4.shape[1]):
        for op in range(len(JITTER_OPS)):
            selected = (order_n4[:, position] == op).nonzero().flatten()
            if selected.numel():
                view[selected] = JITTER_FNS[JITTER_OPS[op]](view[selected], jitter_n4[selected, op])
    selected = gray_n.nonzero().flatten()
    if selected.numel():
        view[selected] = grayscale(view[selected])
    selected = (blur_n > 0).nonzero().flatten()
    if selected.numel():
        view[selected] = gaussian_blur(view[selected], sigma_n=blur_n[selected], kernel_size=blur_kernel)
    selected = solarize_n.nonzero().flatten()
    if selected.numel():
        view[selected] = solarize(view[selected])
    return view


def _photometric_masked(
    view: torch.Tensor,
    *,
    jitter_n4: torch.Tensor,
    order_n4: torch.Tensor,
    gray_n: torch.Tensor,
    blur_n: torch.Tensor,
    solarize_n: torch.Tensor,
    blur_kernel: int,
) -> torch.Tensor:
    def where(mask_n: torch.Tensor, made: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return torch.where(mask_n.view(-1, 1, 1, 1), made, kept)

    for position in range(order_n4.shape[1]):
        op_n = order_n4[:, position]
        for op, name in enumerate(JITTER_OPS):
            view = where(op_n == op, JITTER_FNS[name](view, jitter_n4[:, op]), view)
    view = where(gray_n, grayscale(view), view)
    sigma_n = torch.where(blur_n > 0, blur_n, torch.ones_like(blur_n))
    view = where(blur_n > 0, gaussian_blur(view, sigma_n=sigma_n, kernel_size=blur_kernel), view)
    return where(solarize_n, solarize(view), view)


def _per_sample(factor_n: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return factor_n.to(like.dtype).view(-1, 1, 1, 1)


def _blend(image: torch.Tensor, other: torch.Tensor, factor_n: torch.Tensor) -> torch.Tensor:
    ratio = _per_sample(factor_n, image)
    return (image * ratio + other * (1.0 - ratio)).clamp_(0.0, 1.0)


def _luma(image: torch.Tensor) -> torch.Tensor:
    r, g, b = image.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def adjust_brightness(image: torch.Tensor, factor_n: torch.Tensor) -> torch.Tensor:
    return (image * _per_sample(factor_n, image)).clamp_(0.0, 1.0)


def adjust_contrast(image: torch.Tensor, factor_n: torch.Tensor) -> torch.Tensor:
    return _blend(image, _luma(image).mean(dim=(-3, -2, -1), keepdim=True), factor_n)


def adjust_saturation(image: torch.Tensor, factor_n: torch.Tensor) -> torch.Tensor:
    return _blend(image, _luma(image), factor_n)


def adjust_hue(image: torch.Tensor, factor_n: torch.Tensor) -> torch.Tensor:
    h, s, v = _rgb_to_hsv(image).unbind(dim=-3)
    h = (h + factor_n.to(image.dtype).view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


JITTER_FNS = {
    "brightness": adjust_brightness,
    "contrast": adjust_contrast,
    "saturation": adjust_saturation,
    "hue": adjust_hue,
}


def grayscale(image: torch.Tensor) -> torch.Tensor:
    return _luma(image).expand_as(image).clone()


def solarize(image: torch.Tensor) -> torch.Tensor:
    """PIL's solarize at threshold 128 of 255: invert every value at or above one half."""
    return torch.where(image >= 0.5, 1.0 - image, image)


def blur_kernel_size(blur_max: float, *, side: int) -> int:
    """An odd kernel that spans +-3 sigma of the widest blur, within what reflect padding allows."""
    return min(2 * math.ceil(3.0 * blur_max) + 1, 2 * side - 1)


def gaussian_blur(image: torch.Tensor, *, sigma_n: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per sample, reflect padding (torchvision's kernel)."""
    count, channels, height, width = image.shape
    offsets = torch.arange(kernel_size, device=image.device, dtype=image.dtype) - (kernel_size - 1) / 2
    kernel_nk = torch.softmax(-(offsets[None] ** 2) / (2 * sigma_n.to(image.dtype)[:, None] ** 2), dim=1)
    weights = kernel_nk.repeat_interleave(channels, dim=0)  # (N * 3, K)
    flat = image.reshape(1, count * channels, height, width)
    pad = kernel_size // 2
    flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, weights[:, None, None, :], groups=count * channels)
    flat = F.conv2d(flat, weights[:, None, :, None], groups=count * channels)
    return flat.reshape(count, channels, height, width)


def _rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """torchvision's conversion (after Pillow's), for float images in [0, 1]."""
    r, g, _ = image.unbind(dim=-3)
    minc, maxc = torch.aminmax(image, dim=-3)
    eqc = maxc == minc
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, channels_range).unsqueeze(-3)
    rc, gc, bc = ((maxc.unsqueeze(-3) - image) / divisor).unbind(dim=-3)
    maxc_neq_r = maxc != r
    maxc_eq_g = maxc == g
    hg = (rc + 2.0 - bc) * (maxc_eq_g & maxc_neq_r)
    hr = (bc - gc) * ~maxc_neq_r
    hb = (gc + 4.0 - rc) * (maxc_neq_r & ~maxc_eq_g)
    h = ((hr + hg + hb) * (1.0 / 6.0) + 1.0).fmod(1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """The inverse of `_rgb_to_hsv` in closed form: channel c = v - v s clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6 h) mod 6 and n = 5, 3, 1 for red, green, blue (no per-pixel index tensors)."""
    h, s, v = image.unbind(dim=-3)
    h6 = (h * 6).unsqueeze(-3)
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=image.dtype, device=image.device).view(3, 1, 1) + h6).remainder(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    v, s = v.unsqueeze(-3), s.unsqueeze(-3)
    return (v - v * s * ramp).clamp(0.0, 1.0)
