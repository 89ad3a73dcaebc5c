"""The torchvision conversion of a view to a normalised tensor gives bitwise the tensor the numpy
conversion gives, for any size, content and the ImageNet statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flsl_cli.data.augment import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from flsl_cli.data.normalize import _MEAN, _STD, normalized_tensor


@pytest.mark.parametrize("height,width", [(224, 224), (96, 96), (33, 57), (1, 1)])
def test_fast_conversion_is_bitwise_the_numpy_one(height, width):
    """Random pixels plus every byte value 0..255 in each channel: identical bits, shape, dtype."""
    rng = np.random.default_rng(height * 1000 + width)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    ramp = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1)[None]
    for array in (pixels, ramp):
        image = Image.fromarray(array)
        fast, reference = normalized_tensor(image), to_tensor(image)
        assert fast.dtype == reference.dtype == torch.float32 and fast.shape == reference.shape
        assert torch.equal(fast, reference)


def test_statistics_are_the_pipelines():
    assert np.array(_MEAN, dtype=np.float32).tolist() == IMAGENET_MEAN.tolist()
    assert np.array(_STD, dtype=np.float32).tolist() == IMAGENET_STD.tolist()
