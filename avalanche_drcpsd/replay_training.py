r"""Dream replay's training loop as a function, beside :func:`~avalanche_drcpsd.cpsd.train_cpsd_projection` and
:func:`~avalanche_drcpsd.generator_training.train_generator`.

:func:`train_student` runs the optimiser steps of the replay phase over paired batches (real images of the current
experience with synthetic images), with a loss the caller builds (:class:`~avalanche_drcpsd.plugins.dream_replay.
DreamReplayPlugin`: isolation loss, the teachers' feature distillation, optional logit distillation), optional
gradient clipping and the original code's per-step student EMA. It returns the per-step trace of every loss term
and of the gradient norm.
"""

from __future__ import annotations

import itertools
from typing import Callable, Dict, List, Optional, Tuple

import torch
from avalanche.training.utils import cycle
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

__all__ = ["ReplayLoss", "train_student"]

#: ``loss(x_syn, y_syn, x_real, y_real) -> (total loss, {term name: term})`` on one paired batch (on the device)
ReplayLoss = Callable[[Tensor, Tensor, Tensor, Tensor], Tuple[Tensor, Dict[str, Tensor]]]


def train_student(model: nn.Module, real: DataLoader, syn: DataLoader, loss: ReplayLoss,
                  optimizer: torch.optim.Optimizer, *, steps: int, epochs: int, device: torch.device,
                  syn_transform: Optional[Callable[[Tensor], Tensor]] = None, grad_clip: Optional[float] = None,
                  step_ema: Optional[float] = None, desc: str = "replay", verbose: bool = False,
                  on_error: str = "", scheduler=None) -> Dict[str, List[float]]:
    r"""``epochs`` x ``steps`` optimiser steps of ``model`` (in train mode, in place) on paired batches of the
    ``real`` and ``syn`` loaders, each cycled (reshuffled at every pass) and zipped; ``syn_transform`` is applied to
    the synthetic half. After each step with ``step_ema`` :math:`a`:
    :math:`\theta \leftarrow a\,\theta + (1-a)\,\theta_{before}`. ``grad_clip`` clips the gradient norm (the norm
    is traced either way); ``scheduler`` (a learning-rate scheduler of ``optimizer``, or None) steps after every
    optimiser step. A non-finite loss raises :class:`FloatingPointError` (``on_error`` ends its message).
    Returns ``{term: [value per step]}`` for every term of ``loss`` and ``grad_norm``."""
    bar = tqdm(total=steps * epochs, desc=desc, disable=not verbose, leave=False)
    trace: Dict[str, List[float]] = {}
    for _ in range(epochs):
        for (xr, yr, *_), (xs, ys) in itertools.islice(zip(cycle(real), cycle(syn)), steps):
            xr, yr = xr.to(device), yr.to(device)
            xs, ys = xs.to(device), ys.to(device)
            if syn_transform is not None:
                xs = syn_transform(xs)
            total, terms = loss(xs, ys, xr, yr)
            if not torch.isfinite(total):
                raise FloatingPointError(f"non-finite replay loss ({total.item()}){on_error}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
            before = [p.detach().clone() for p in model.parameters()] if step_ema is not None else None
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if before is not None:
                with torch.no_grad():
                    for p, b in zip(model.parameters(), before):
                        p.lerp_(b, 1.0 - step_ema)  # a * after + (1 - a) * before
            for name, value in {**terms, "grad_norm": norm}.items():
                trace.setdefault(name, []).append(float(value.detach()))
            bar.update(1)
    bar.close()
    return trace
