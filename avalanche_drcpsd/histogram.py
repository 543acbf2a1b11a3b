"""Per-class pixel-histogram matching of synthetic images (*package*, ``DRCPSDConfig(replay_pixel_match=
"class_histogram")``, issue 13).

The offline generator's samples are brighter, hazier and flatter than the real images of their class (a faint
speckle where the data set's background is black: 10-14% of a Split-FMNIST kept set's pixels are exactly 0 against
35-65% of its real images'); a classifier tells a class's kept set from its real images at 82-99% held out
(``results/generator/README.md``, "kept sets brighter and hazier"). Histogram matching maps each synthetic pixel
value through the monotone function that gives the class's set the pixel-value distribution of the class's real
training images (per channel): ``F_real^-1(F_set(v))``, with ``F_set(v)`` taken at the middle of the set's
probability mass on level ``v`` (Gonzalez & Woods, "histogram specification"). It keeps each image's ordering of
its pixels and changes no shape; what a class needs kept is its 256-bin histogram per channel, 2 KB, recorded while
its real images are at hand (the generator phase).

``replay_pixel_match="class_mean_histogram"`` shifts the set first (:func:`shift_to_mean`): every image by the
difference between the class's real mean image and the set's own, pixel by pixel, so that the set's mean image is
the real one (up to clipping to [0, 1]); the histogram then fixes the pixel values' distribution. The histogram
says how bright a class's pixels are, the mean image where they are bright on average; the shift keeps each image's
differences from its set's mean. A class then keeps its mean image too (``C x H x W`` float32).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pixel_histogram", "match_histogram", "pixel_mean", "shift_to_mean"]

LEVELS = 256


def _levels(images: Tensor) -> Tensor:
    """Images in [0, 1] (``(B, C, H, W)``, any float dtype) or uint8 -> int64 levels 0..255 on the CPU."""
    if images.dim() != 4:
        raise ValueError(f"images of shape {tuple(images.shape)}; expected (B, C, H, W)")
    if images.dtype == torch.uint8:
        return images.cpu().long()
    return (images.detach().float().cpu().clamp(0.0, 1.0) * (LEVELS - 1)).round().long()


def _counts(levels: Tensor) -> Tensor:
    """Per-channel counts of int64 levels ``(B, C, H, W)``: ``(C, 256)``."""
    channels = levels.transpose(0, 1).reshape(levels.shape[1], -1)
    return torch.stack([torch.bincount(ch, minlength=LEVELS) for ch in channels])


def pixel_histogram(images: Tensor) -> Tensor:
    """Per-channel counts of the 256 pixel levels of ``images`` (in [0, 1], or uint8): int64 ``(C, 256)``."""
    levels = _levels(images)
    if levels.shape[0] == 0:
        raise ValueError("pixel_histogram of an empty batch: a class needs at least one image")
    return _counts(levels)


def match_histogram(images: Tensor, target: Tensor) -> Tensor:
    """``images`` (in [0, 1], ``(B, C, H, W)``) with each channel's values mapped so that their distribution over
    the whole batch follows ``target`` (:func:`pixel_histogram` counts, ``(C, 256)``), as images in [0, 1] at 8-bit
    levels. The map is one look-up table per channel (monotone: equal inputs stay equal, brighter stays at least as
    bright), built from the batch's own histogram: level ``v`` goes to the target's quantile at the middle of the
    batch's mass on ``v``."""
    levels = _levels(images)
    target = torch.as_tensor(target)
    if target.shape != (levels.shape[1], LEVELS):
        raise ValueError(f"target histogram of shape {tuple(target.shape)}; expected ({levels.shape[1]}, {LEVELS}) "
                         "for images of that many channels")
    if (target < 0).any() or (target.sum(1) <= 0).any():
        raise ValueError("target histogram: every channel needs non-negative counts with a positive total")
    source = _counts(levels)
    out = torch.empty_like(levels)
    for c in range(levels.shape[1]):
        f_src = source[c].cumsum(0).double() / source[c].sum()
        middle = f_src - source[c].double() / source[c].sum() / 2
        f_tgt = target[c].cumsum(0).double() / target[c].sum()
        table = torch.searchsorted(f_tgt, middle).clamp(max=LEVELS - 1)
        out[:, c] = table[levels[:, c]]
    return (out.float() / (LEVELS - 1)).to(images.device)


def pixel_mean(images: Tensor) -> Tensor:
    """The mean image of ``images`` (in [0, 1], or uint8, ``(B, C, H, W)``), in [0, 1]: float32 ``(C, H, W)``."""
    if images.dim() != 4:
        raise ValueError(f"images of shape {tuple(images.shape)}; expected (B, C, H, W)")
    if images.shape[0] == 0:
        raise ValueError("pixel_mean of an empty batch: a class needs at least one image")
    x = images.detach().cpu()
    x = x.float() / (LEVELS - 1) if x.dtype == torch.uint8 else x.float()
    return x.mean(0)


def shift_to_mean(images: Tensor, target: Tensor) -> Tensor:
    """``images`` (in [0, 1], ``(B, C, H, W)``) shifted pixel by pixel by ``target - pixel_mean(images)``, so that
    their mean image becomes ``target`` (a :func:`pixel_mean`, ``(C, H, W)``) wherever clipping to [0, 1] allows."""
    target = torch.as_tensor(target)
    if images.dim() != 4 or target.shape != images.shape[1:]:
        raise ValueError(f"target mean image of shape {tuple(target.shape)}; expected {tuple(images.shape[1:])}, the "
                         f"shape of the images {tuple(images.shape)}")
    shift = (target.float() - pixel_mean(images)).to(images.device)
    return (images.float() + shift).clamp(0.0, 1.0).to(images.dtype)
