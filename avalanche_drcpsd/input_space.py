"""The classifier's input space against the generator's pixels.

The generator models pixels in [0, 1] (its own [-1, 1] internally). A benchmark may hand the classifier other
values: Avalanche's classic benchmarks apply ``ToTensor()`` then ``Normalize(mean, std)``, so MNIST's images lie in
about [-0.42, 2.82]. :class:`InputSpace` is the per-channel affine map between the two,
``x = low + u * (high - low)`` (``u`` the pixel in [0, 1], ``x`` the classifier's value): real images go
through :meth:`InputSpace.to_unit` before the generator and CPSD see them, and synthetic images through
:meth:`InputSpace.from_unit` before the classifier does, so replayed images lie exactly where real ones do.

:meth:`InputSpace.resolve` takes it from the configuration (``input_range``, ``input_mean``/``input_std``) or
learns it from the first experience: a torchvision ``Normalize`` in the data set's transforms, else [0, 1] when
the images lie in it, else each channel's minimum and maximum (natural images hold both black and white pixels,
so for an affine normalisation these are exactly pixel 0 and 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["InputSpace", "find_normalize", "UNIT_TOLERANCE"]

#: how far outside [low, high] (as a share of high - low) an image may reach before it is refused: float rounding
#: of a Normalize, not a different range
UNIT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class InputSpace:
    """``x = low[c] + u * (high[c] - low[c])`` per channel ``c``; ``source`` says where it was learned."""

    low: Tuple[float, ...]
    high: Tuple[float, ...]
    source: str = "unit"

    def __post_init__(self):
        if len(self.low) != len(self.high) or not self.low:
            raise ValueError(f"low={self.low!r} and high={self.high!r} need one value per channel each")
        if any(not h > lo for lo, h in zip(self.low, self.high)):
            raise ValueError(f"low={self.low!r} must be < high={self.high!r} in every channel")

    @classmethod
    def unit(cls, channels: int = 1) -> "InputSpace":
        return cls((0.0,) * channels, (1.0,) * channels, "unit")

    @classmethod
    def from_normalize(cls, mean: Sequence[float], std: Sequence[float], channels: int,
                       source: str = "Normalize") -> "InputSpace":
        """The space of ``Normalize(mean, std)`` applied to pixels in [0, 1]."""
        mean, std = _per_channel("mean", mean, channels), _per_channel("std", std, channels)
        return cls(tuple(-m / s for m, s in zip(mean, std)), tuple((1 - m) / s for m, s in zip(mean, std)), source)

    @property
    def channels(self) -> int:
        return len(self.low)

    @property
    def is_unit(self) -> bool:
        return all(lo == 0.0 for lo in self.low) and all(h == 1.0 for h in self.high)

    def _affine(self, like: Tensor) -> Tuple[Tensor, Tensor]:
        shape = (1, self.channels) + (1,) * (like.dim() - 2)
        low = torch.tensor(self.low, dtype=like.dtype, device=like.device).view(shape)
        span = torch.tensor(self.high, dtype=like.dtype, device=like.device).view(shape) - low
        return low, span

    def to_unit(self, x: Tensor) -> Tensor:
        """Classifier images ``(B, C, H, W)`` -> pixels in [0, 1] (clamped; unchanged when the space is [0, 1])."""
        if self.is_unit:
            return x
        x = x.float()
        low, span = self._affine(x)
        return ((x - low) / span).clamp(0.0, 1.0)

    def from_unit(self, u: Tensor) -> Tensor:
        """Pixels in [0, 1] ``(B, C, H, W)`` -> the classifier's space (unchanged when the space is [0, 1])."""
        if self.is_unit:
            return u
        u = u.float()
        low, span = self._affine(u)
        return low + u * span

    def check(self, images: Tensor, where: str) -> None:
        """Refuse images that do not lie in this space (their channel count, or values beyond it by more than
        :data:`UNIT_TOLERANCE` of its span), naming what was seen and the settings that describe the data."""
        from .data import DataError

        if images.dim() != 4 or images.shape[1] != self.channels:
            raise DataError(f"{where}: images of shape {tuple(images.shape)}; the input space "
                            f"({self.source}) has {self.channels} channel(s)")
        seen_low = images.amin(dim=(0, 2, 3)).tolist()
        seen_high = images.amax(dim=(0, 2, 3)).tolist()
        for c, (lo, h, a, b) in enumerate(zip(self.low, self.high, seen_low, seen_high)):
            slack = UNIT_TOLERANCE * (h - lo)
            if a < lo - slack or b > h + slack:
                raise DataError(
                    f"{where}: channel {c} holds values in [{a:.4g}, {b:.4g}], outside the input range "
                    f"[{lo:.4g}, {h:.4g}] ({self.source}). Describe the images with DRCPSDConfig(input_range=(low, "
                    "high)) or input_mean/input_std (the Normalize they went through), or leave all three None "
                    "to learn them from the first experience")

    @classmethod
    def resolve(cls, config: Any, dataset: Any, images: Tensor) -> "InputSpace":
        """The space of ``config`` (a :class:`~avalanche_drcpsd.config.DRCPSDConfig`), else learned from the
        first experience's ``dataset`` (its transforms) and a sample of its ``images`` ``(B, C, H, W)``."""
        channels = int(images.shape[1])
        if config.input_range is not None:
            lo, h = config.input_range
            return cls((float(lo),) * channels, (float(h),) * channels, f"input_range={tuple(config.input_range)}")
        if config.input_mean is not None:
            return cls.from_normalize(config.input_mean, config.input_std, channels,
                                      f"input_mean={config.input_mean}, input_std={config.input_std}")
        found = find_normalize(dataset)
        if found is not None:
            mean, std = found
            return cls.from_normalize(mean, std, channels, f"Normalize(mean={tuple(mean)}, std={tuple(std)}) "
                                                           "in the first experience's transforms")
        low = images.amin(dim=(0, 2, 3)).tolist()
        high = images.amax(dim=(0, 2, 3)).tolist()
        if min(low) >= 0.0 and max(high) <= 1.0:
            return cls.unit(channels)
        if any(not h > lo for lo, h in zip(low, high)):
            from .data import DataError

            raise DataError(f"the first experience's images are constant in a channel (min {low}, max {high}): "
                            "set DRCPSDConfig(input_range=...) or input_mean/input_std")
        return cls(tuple(low), tuple(high), "each channel's min/max in the first experience")


def _per_channel(name: str, values: Sequence[float], channels: int) -> Tuple[float, ...]:
    values = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"{name}={values!r}: {len(values)} values for images of {channels} channel(s)")
    return values


def find_normalize(dataset: Any) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """``(mean, std)`` of the torchvision ``Normalize`` in an Avalanche data set's current transforms (searched
    through its nested data sets and transform groups), or None when there is none or more than one kind.

    Avalanche does not expose a data set's transforms publicly; this reads its ``_transform_groups`` and
    ``_datasets`` attributes and returns None where they are absent, so :meth:`InputSpace.resolve` falls back to
    the images' statistics."""
    from torchvision.transforms import Normalize

    found = set()
    for transform in _transforms(dataset, depth=0):
        if isinstance(transform, Normalize):
            # 7 significant digits: the values as written, without a float32 tensor's rounding noise
            mean = tuple(float(f"{v:.7g}") for v in torch.as_tensor(transform.mean).flatten().tolist())
            std = tuple(float(f"{v:.7g}") for v in torch.as_tensor(transform.std).flatten().tolist())
            found.add((mean, std))
    return found.pop() if len(found) == 1 else None


def _transforms(obj: Any, depth: int) -> Iterator[Any]:
    if depth > 12 or obj is None:
        return
    for attr in ("_frozen_transform_groups", "_transform_groups"):
        groups = getattr(obj, attr, None)
        if groups is not None:
            table = getattr(groups, "transform_groups", None) or {}
            yield from _unpack(table.get(getattr(groups, "current_group", "train")), 0)
    yield from _transforms(getattr(obj, "_flat_data", None), depth + 1)
    for sub in getattr(obj, "_datasets", None) or ():
        yield from _transforms(sub, depth + 1)
    yield from _unpack(getattr(obj, "transform", None), 0)  # a torchvision data set's own transform


def _unpack(transform: Any, depth: int) -> Iterator[Any]:
    if transform is None or depth > 8:
        return
    yield transform
    inner = getattr(transform, "transforms", None)  # Compose, TupleTransform
    if isinstance(inner, (list, tuple)):
        for t in inner:
            yield from _unpack(t, depth + 1)
