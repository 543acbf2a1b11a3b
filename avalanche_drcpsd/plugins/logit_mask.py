"""Seen-class logit masking: the classifier's outputs of classes not seen yet take no part in training or
evaluation.

The original CPSD code slices its classifier's logits to the classes seen so far, ``fc(z)[:, :class_range]``
(isaacNingLee/CPSD 769e79b, ``backbone/backbone.py`` l. 257), so neither the cross-entropy nor the prediction
sees a future class. Avalanche's metrics need every output, so here the unseen classes' logits are set to
:data:`MASKED_LOGIT` (a softmax weight of exactly 0 in float32, and a finite loss on an unseen class's test image)
by a forward hook on the model. The hook is a plain object holding the seen classes, so a deep copy of the model
(a teacher) keeps the mask it had when it was copied.

Works with any Avalanche strategy: ``Naive(..., plugins=[SeenClassMaskPlugin()])``.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from ..utils import experience_classes
from .base import StatefulPlugin

__all__ = ["SeenClassMaskPlugin", "SeenClassMask", "MASKED_LOGIT"]

#: the value an unseen class's logit takes
MASKED_LOGIT = -1e4


class SeenClassMask:
    """Forward hook: ``(B, K)`` logits with every column outside ``classes`` set to :data:`MASKED_LOGIT` (no mask
    while ``classes`` is empty)."""

    def __init__(self, classes: Optional[List[int]] = None):
        self.classes: List[int] = list(classes or [])

    def __call__(self, module: nn.Module, inputs, output: Tensor) -> Tensor:
        if not self.classes or not isinstance(output, Tensor) or output.dim() != 2:
            return output
        keep = torch.zeros(output.shape[1], dtype=torch.bool, device=output.device)
        keep[[c for c in self.classes if c < output.shape[1]]] = True
        return output.masked_fill(~keep, MASKED_LOGIT)


class SeenClassMaskPlugin(StatefulPlugin):
    """Masks the logits of the classes not seen yet, from the start of each training experience on (the
    experience's classes count as seen), in training, evaluation and everything else that calls the model."""

    #: the run state (:meth:`state_dict`)
    state_attributes = ("seen",)

    def __init__(self):
        super().__init__()
        #: the classes of every training experience so far (a checkpoint keeps it)
        self.seen: List[int] = []

    def _sync(self, model: nn.Module) -> None:
        mask = next((h for h in model._forward_hooks.values() if isinstance(h, SeenClassMask)), None)
        if mask is None:
            mask = SeenClassMask()
            model.register_forward_hook(mask)
        mask.classes = list(self.seen)

    def before_training_exp(self, strategy, **kwargs):
        new = set(experience_classes(strategy.experience))
        self.seen = sorted(set(self.seen) | new)
        self._sync(strategy.model)

    def before_eval(self, strategy, **kwargs):
        self._sync(strategy.model)

    def after_training_exp(self, strategy, **kwargs):
        self._sync(strategy.model)
