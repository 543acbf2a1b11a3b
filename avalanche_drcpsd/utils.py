"""Small shared helpers: frozen copies, weight interpolation, atomic writes, phase timing, tensors of a dataset."""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
from collections import defaultdict
from typing import Callable, Dict, Iterator, Mapping, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "frozen_copy",
    "interpolate_state_dicts",
    "atomic_write",
    "PhaseTimer",
    "dataset_tensors",
]

PathLike = Union[str, "os.PathLike[str]"]


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with ``requires_grad=False`` everywhere (a teacher)."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def interpolate_state_dicts(old: Mapping[str, Tensor], new: Mapping[str, Tensor], alpha: float) -> Dict[str, Tensor]:
    r"""Weights :math:`\theta = (1-\alpha)\,\theta_{old} + \alpha\,\theta_{new}` for every floating tensor
    (``alpha=0.5``: the average of the two teachers); integer buffers (BatchNorm's counters) come from ``new``."""
    if old.keys() != new.keys():
        missing = sorted(set(old) ^ set(new))
        raise ValueError(f"the two models have different parameters: {missing[:5]}")
    out = {}
    for k, v_new in new.items():
        v_old = old[k]
        if torch.is_floating_point(v_new):
            out[k] = torch.lerp(v_old.to(v_new.dtype), v_new, alpha)
        else:
            out[k] = v_new.clone()
    return out


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one ``os.replace``: a reader never sees a
    half-written file, and a killed process leaves the previous version intact."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class PhaseTimer:
    """Wall time per (experience, phase), e.g. ``with timer("generator", exp=2): ...``."""

    def __init__(self) -> None:
        self.seconds: Dict[Tuple[int, str], float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str, exp: int) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[(exp, phase)] += time.perf_counter() - start

    def total(self, phase: str) -> float:
        return sum(v for (_, p), v in self.seconds.items() if p == phase)


@torch.no_grad()
def dataset_tensors(dataset: Dataset, batch_size: int = 1024) -> Tuple[Tensor, Tensor]:
    """All ``(x, y)`` of a (small enough) dataset as two tensors, in dataset order."""
    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        xs.append(batch[0])
        ys.append(torch.as_tensor(batch[1]))
    if not xs:
        raise ValueError("the dataset is empty")
    return torch.cat(xs), torch.cat(ys).long()
