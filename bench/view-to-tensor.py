#!/usr/bin/env python3
"""Time to convert one view to a normalised tensor: the plain numpy formula (tests/test_normalize.py)
against torchvision's PIL path (data/normalize.py `normalized_tensor`, what the data workers use), one torch thread as in a data worker, 200
conversions per turn, alternating turns, best of 5 each.   python3 bench/view-to-tensor.py"""
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_normalize import numpy_reference as to_tensor  # noqa: E402

from flsl_cli.data.normalize import normalized_tensor  # noqa: E402

torch.set_num_threads(1)
rng = np.random.default_rng(0)
for size in (224, 96):
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    best = {"numpy": 1e9, "torchvision": 1e9}
    for turn in range(5):
        for name, fn in (("numpy", to_tensor), ("torchvision", normalized_tensor)):
            start = time.perf_counter()
            for _ in range(200):
                fn(image)
            best[name] = min(best[name], (time.perf_counter() - start) / 200)
    print(f"{size} px: numpy {best['numpy']*1e6:.0f} us, torchvision {best['torchvision']*1e6:.0f} us, "
          f"ratio {best['numpy']/best['torchvision']:.2f}")
