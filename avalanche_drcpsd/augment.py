"""The original CPSD code's image augmentations, as batch functions on images in [0, 1] (``(B, C, H, W)``).

They are what ``DRCPSDConfig(cpsd_augment="reference")`` and ``replay_augment="reference"`` apply (isaacNingLee/CPSD
at 769e79b): the CPSD phase's random resized crop and flip (``cpsd/train_cpsd.py`` l. 256-264), the JPEG files its
synthetic images pass through (``manager/manager.py`` l. 598-603, PIL's default quality 75), and its classifier's
training transforms (``manager/manager.py`` l. 57-62). Random draws come from ``generator`` (None: torch's global
generator), one set per image, as torchvision's per-sample transforms draw them. The images keep their size: the
original resizes to 256 px (CPSD) or to the classifier's resolution with Lanczos first.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

__all__ = ["random_resized_crop_flip", "color_jitter", "jpeg_round_trip", "reference_cpsd_augment",
           "reference_classifier_augment", "random_shift", "REPLAY_AUGMENTS"]


def _uniform(generator: Optional[torch.Generator], low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def random_resized_crop_flip(images: Tensor, scale: Sequence[float] = (0.6, 1.0),
                             ratio: Sequence[float] = (3 / 4, 4 / 3), flip: float = 0.5,
                             generator: Optional[torch.Generator] = None) -> Tensor:
    """Per image: a crop of ``scale`` of the area with a log-uniform aspect ratio in ``ratio`` (torchvision's
    ``RandomResizedCrop`` rule, ten tries, then the whole image), resized back to the image's size (bilinear,
    antialiased), then flipped left-right with probability ``flip``."""
    b, _, h, w = images.shape
    out = torch.empty_like(images)
    for i in range(b):
        ch, cw = h, w
        for _ in range(10):
            area = h * w * _uniform(generator, *scale)
            r = math.exp(_uniform(generator, math.log(ratio[0]), math.log(ratio[1])))
            tw, th = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
            if 0 < tw <= w and 0 < th <= h:
                ch, cw = th, tw
                break
        top = int(_uniform(generator) * (h - ch + 1))
        left = int(_uniform(generator) * (w - cw + 1))
        crop = images[i:i + 1, :, top:top + ch, left:left + cw]
        img = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        out[i] = img.flip(-1) if _uniform(generator) < flip else img
    return out.clamp(0.0, 1.0)


def color_jitter(images: Tensor, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.2,
                 hue: float = 0.1, generator: Optional[torch.Generator] = None) -> Tensor:
    """torchvision's ``ColorJitter`` per image: factors drawn from [1 - b, 1 + b] (hue from [-h, h]), applied in
    a random order. Saturation and hue leave one-channel images unchanged, as in torchvision."""
    out = torch.empty_like(images)
    for i in range(images.shape[0]):
        img = images[i]
        ops = [(TF.adjust_brightness, _uniform(generator, 1 - brightness, 1 + brightness)),
               (TF.adjust_contrast, _uniform(generator, 1 - contrast, 1 + contrast)),
               (TF.adjust_saturation, _uniform(generator, 1 - saturation, 1 + saturation)),
               (TF.adjust_hue, _uniform(generator, -hue, hue))]
        for k in torch.randperm(4, generator=generator).tolist():
            fn, factor = ops[k]
            img = fn(img, factor)
        out[i] = img
    return out.clamp(0.0, 1.0)


def random_shift(images: Tensor, max_shift: int = 2, flip: float = 0.0,
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """Per image: a translation by whole pixels drawn uniformly from [-max_shift, max_shift] on each axis (the image
    padded by replicating its border, then cropped back to its size: no value outside the image's own range, so it
    suits normalised inputs too), then a left-right flip with probability ``flip``. *Package*, not in the original
    code: the usual random-crop augmentation of small-image classifiers (pad and crop)."""
    if max_shift < 0:
        raise ValueError(f"max_shift={max_shift}: expected a number of pixels >= 0")
    b, _, h, w = images.shape
    s = max_shift
    padded = F.pad(images, (s, s, s, s), mode="replicate") if s else images
    offsets = torch.randint(0, 2 * s + 1, (b, 2), generator=generator).tolist()
    flips = (torch.rand(b, generator=generator) < flip).tolist()
    out = torch.empty_like(images)
    for i, ((dy, dx), flipped) in enumerate(zip(offsets, flips)):
        img = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = img.flip(-1) if flipped else img
    return out


def jpeg_round_trip(images: Tensor, quality: int = 75) -> Tensor:
    """Each image encoded as a JPEG of ``quality`` (libjpeg, PIL's default 75) and decoded again, in [0, 1]."""
    from torchvision.io import decode_jpeg, encode_jpeg

    from .synthetic_cache import to_uint8

    if images.shape[1] not in (1, 3):
        raise ValueError(f"images of shape {tuple(images.shape)}: JPEG holds 1 or 3 channels")
    encoded = encode_jpeg(list(to_uint8(images.cpu())), quality=quality)
    return torch.stack(decode_jpeg(encoded)).to(images.device, torch.float32) / 255.0


def reference_cpsd_augment(images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """The CPSD phase's augmentation: a random resized crop of 60-100% of the area and a horizontal flip."""
    return random_resized_crop_flip(images, (0.6, 1.0), generator=generator)


def reference_classifier_augment(images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """The classifier's training augmentation: ColorJitter(0.4, 0.4, 0.2, 0.1), a horizontal flip, a random
    resized crop of 60-100% of the area (in the original's order: jitter, flip, crop)."""
    x = color_jitter(images, generator=generator)
    flipped = torch.rand(x.shape[0], generator=generator) < 0.5
    x = torch.where(flipped.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    return random_resized_crop_flip(x, (0.6, 1.0), flip=0.0, generator=generator)


#: the batch augmentations of synthetic replay images, by their ``replay_augment`` name (``"none"``: no entry)
REPLAY_AUGMENTS = {
    "reference": reference_classifier_augment,
    "shift": partial(random_shift, max_shift=2),
    "shift_flip": partial(random_shift, max_shift=2, flip=0.5),
}
