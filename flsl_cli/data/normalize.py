"""PIL RGB image -> normalised float tensor (3, H, W), by torchvision's PIL-to-tensor path.

Bitwise equal to the numpy conversion in `data/augment.py` (`to_tensor`: x / 255, minus the
ImageNet mean, over the ImageNet std, all in fp32, in that order) and faster: one uint8 copy into
channel-first layout, then three in-place fp32 passes, with no float32 HWC intermediate and no
transposed copy of it.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_C11 = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD_C11 = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


def normalized_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32: (pixel / 255 - mean) / std per channel, for an RGB image."""
    return pil_to_tensor(image).to(torch.float32).div_(255.0).sub_(_MEAN_C11).div_(_STD_C11)
