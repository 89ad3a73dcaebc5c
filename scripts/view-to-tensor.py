#!/usr/bin/env python3
"""Time to convert one view to a normalised tensor: the plain numpy formula (the one
tests/test_normalize.py checks the data workers' conversion against, written out below) against
torchvision's PIL path (data/normalize.py `normalized_tensor`, what the data workers use), one
torch thread as in a data worker, 200 conversions per turn, alternating turns, best of 5 each.

    python3 scripts/view-to-tensor.py
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flsl_cli.data.normalize import IMAGENET_MEAN, IMAGENET_STD, normalized_tensor  # noqa: E402 - after the path


def numpy_formula(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


torch.set_num_threads(1)
rng = np.random.default_rng(0)
for size in (224, 96):
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    best = {"numpy": 1e9, "torchvision": 1e9}
    for _ in range(5):
        for name, fn in (("numpy", numpy_formula), ("torchvision", normalized_tensor)):
            start = time.perf_counter()
            for _ in range(200):
                fn(image)
            best[name] = min(best[name], (time.perf_counter() - start) / 200)
    print(
        f"{size} px: numpy {best['numpy'] * 1e6:.0f} us, torchvision {best['torchvision'] * 1e6:.0f} us, "
        f"ratio {best['numpy'] / best['torchvision']:.2f}"
    )
