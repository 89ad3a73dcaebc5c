"""The data workers' conversion of a view to a normalised tensor (torchvision's PIL path) gives
bitwise the tensor of the plain numpy formula (x / 255 - mean) / std in fp32, for any size and
content."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flsl_cli.data.augment import to_tensor
from flsl_cli.data.normalize import IMAGENET_MEAN, IMAGENET_STD


def numpy_reference(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


@pytest.mark.parametrize("height,width", [(224, 224), (96, 96), (33, 57), (1, 1)])
def test_conversion_is_bitwise_the_numpy_formula(height, width):
    """Random pixels plus every byte value 0..255 in each channel: identical bits, shape, dtype."""
    rng = np.random.default_rng(height * 1000 + width)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    ramp = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1)[None]
    for array in (pixels, ramp):
        image = Image.fromarray(array)
        fast, reference = to_tensor(image), numpy_reference(image)
        assert fast.dtype == reference.dtype == torch.float32 and fast.shape == reference.shape
        assert torch.equal(fast, reference)


def test_statistics_are_imagenets():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
