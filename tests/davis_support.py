"""Synthetic DAVIS 2017 folders for the tests: sequences of coloured shapes that move and
occlude each other on a textured background, JPEG frames and palette-PNG annotations in the
DAVIS layout (JPEGImages/480p, Annotations/480p, ImageSets/2017); and two stand-in backbones,
one whose features see the shapes (the colour of each patch) and one whose features are noise."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

HEIGHT, WIDTH = 64, 128
COLOURS = {1: (220, 30, 30), 2: (30, 200, 40), 3: (40, 60, 230)}


def davis_palette() -> list[int]:
    """The PASCAL VOC colour map DAVIS's annotations use (davis2017/utils.py `color_map`)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def palette_png(ids_hw: np.ndarray, *, palette: list[int] | None = None) -> bytes:
    image = Image.frombytes("P", (ids_hw.shape[1], ids_hw.shape[0]), np.ascontiguousarray(ids_hw, np.uint8).tobytes())
    image.putpalette(palette or davis_palette())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def background(rng: np.random.Generator) -> np.ndarray:
    """A grey texture: smoothed noise and faint stripes."""
    noise = rng.normal(0, 1, (HEIGHT // 4, WIDTH // 4))
    noise = np.kron(noise, np.ones((4, 4)))
    stripes = np.sin(np.arange(WIDTH) / 3.0)[None, :] * 10
    grey = 120 + 12 * noise + stripes
    return np.repeat(grey[..., None], 3, axis=2)


def sequence_frames(*, frames: int, objects: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(RGB frames, id maps): `objects` shapes moving across a fixed background; the last one
    drawn passes in front of the others (occlusion)."""
    rng = np.random.default_rng(seed)
    back = background(rng)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    starts = [(16 + 14 * (o % 3), 20 + 30 * o) for o in range(objects)]
    velocities = [(1 if o % 2 else -1, 3 if o % 2 == 0 else -2) for o in range(objects)]
    images, masks = [], []
    for t in range(frames):
        image, ids = back.copy(), np.zeros((HEIGHT, WIDTH), np.uint8)
        for o in range(objects):
            cy, cx = starts[o][0] + velocities[o][0] * t, starts[o][1] + velocities[o][1] * t
            if o % 2 == 0:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= 11**2
            else:
                inside = (abs(yy - cy) <= 9) & (abs(xx - cx) <= 12)
            image[inside] = COLOURS[o + 1]
            ids[inside] = o + 1
        images.append(image.clip(0, 255).astype(np.uint8))
        masks.append(ids)
    return images, masks


def write_davis(
    root: Path, *, sequences: dict[str, tuple[int, int]] | None = None, split: str = "val", seed: int = 0
) -> Path:
    """A DAVIS folder at `root`: sequences {name: (frames, objects)} listed in ImageSets/2017/SPLIT.txt."""
    sequences = sequences or {"shapes-a": (8, 2), "shapes-b": (10, 3)}
    for index, (name, (frames, objects)) in enumerate(sequences.items()):
        images, masks = sequence_frames(frames=frames, objects=objects, seed=seed + index)
        frame_dir = root / "JPEGImages" / "480p" / name
        mask_dir = root / "Annotations" / "480p" / name
        frame_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for t, (image, ids) in enumerate(zip(images, masks)):
            Image.fromarray(image).save(frame_dir / f"{t:05d}.jpg", quality=95)
            (mask_dir / f"{t:05d}.png").write_bytes(palette_png(ids))
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / f"{split}.txt").write_text("".join(f"{name}\n" for name in sequences))
    return root


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int) -> None:
        super().__init__()
        self.patch_size = (patch, patch)


class ColourBackbone(nn.Module):
    """Features that see the shapes: each patch's mean colour (undoing the ImageNet
    normalisation) and a constant, so that cosine similarity tells red, green, blue and grey apart."""

    def __init__(self, patch: int = 8) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(patch)
        self.embed_dim = self.num_features = 4
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406])[None, :, None, None])
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225])[None, :, None, None])

    def forward_features(self, images_bchw: torch.Tensor) -> torch.Tensor:
        patch = self.patch_embed.patch_size[0]
        rgb = images_bchw * self.std + self.mean
        pooled = nn.functional.avg_pool2d(rgb, patch)  # (b, 3, h, w)
        tokens = pooled.flatten(2).transpose(1, 2)
        return torch.cat([tokens - 0.45, torch.full_like(tokens[..., :1], 0.1)], dim=-1)


class NoiseBackbone(ColourBackbone):
    """Features that carry no information: fresh noise for every frame."""

    def __init__(self, patch: int = 8, *, seed: int = 0) -> None:
        super().__init__(patch)
        self.generator = torch.Generator().manual_seed(seed)
        self.embed_dim = self.num_features = 16

    def forward_features(self, images_bchw: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images_bchw.shape
        patch = self.patch_embed.patch_size[0]
        return torch.randn((b, (h // patch) * (w // patch), 16), generator=self.generator)
