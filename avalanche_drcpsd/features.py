"""Penultimate features of any classifier, without asking the model to expose them.

The penultimate features ``h`` are the input of the classifier's last ``nn.Linear`` (an Avalanche
``IncrementalClassifier`` or a plain head alike). A forward pre-hook records them during the ordinary forward
pass, so the strategy's own forward is reused and nothing is computed twice.

:func:`classify` is the forward every plugin uses: ``model(x)``, or for an Avalanche ``MultiTaskModule`` (e.g.
``MTSimpleMLP``) Avalanche's own ``avalanche_forward`` with task label 0, the one task of a class-incremental
stream (the replayed images of old classes carry no other task label).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from avalanche.models import MultiTaskModule
from avalanche.models.utils import avalanche_forward
from avalanche.training.utils import get_last_fc_layer
from torch import Tensor, nn

__all__ = ["find_head", "FeatureRecorder", "forward_with_features", "classify", "check_single_task"]


def check_single_task(model: nn.Module, experience) -> None:
    """Refuse a ``MultiTaskModule`` on an experience whose task labels are not all 0: replay and distillation
    forward mixed batches of old and new classes through task 0's head (:func:`classify`), so a task-incremental
    stream would train the wrong heads. A single-head model ignores task labels and needs no check."""
    if not isinstance(model, MultiTaskModule):
        return
    labels = sorted(set(int(t) for t in getattr(experience, "task_labels", None) or [0]))
    if labels != [0]:
        raise ValueError(f"experience {experience.current_experience} has task labels {labels}, and the model "
                         f"({type(model).__name__}) is a MultiTaskModule: DR-CPSD's replay and distillation run "
                         "task 0's head on the replayed old classes, so only class-incremental streams (task label "
                         "0) are supported with a multi-head model; use a single-head model")


def classify(model: nn.Module, x: Tensor) -> Tensor:
    """The logits of ``model`` on ``x``: ``model(x)``, or task 0's head of a ``MultiTaskModule``."""
    if isinstance(model, MultiTaskModule):
        return avalanche_forward(model, x, torch.zeros(len(x), dtype=torch.long, device=x.device))
    return model(x)


def find_head(model: nn.Module, name: Optional[str] = None) -> nn.Module:
    """The module whose input are the penultimate features: ``model.get_submodule(name)`` when a name is given,
    else the last ``nn.Linear`` registered in the model."""
    if name is not None:
        try:
            return model.get_submodule(name)
        except AttributeError:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(f"feature_layer={name!r} is not a submodule of the model; "
                             f"linear layers: {names}") from None
    try:
        return get_last_fc_layer(model)[1]
    except ValueError:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer; pass feature_layer= the name of the module whose "
            "input are the penultimate features"
        ) from None


class FeatureRecorder:
    """Records the input of the head on every forward pass: ``recorder.features`` after ``model(x)``."""

    def __init__(self, model: nn.Module, layer: Optional[str] = None):
        self.model = model
        self.features: Optional[Tensor] = None
        self._handle = find_head(model, layer).register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Tuple[Tensor, ...]) -> None:
        self.features = inputs[0].flatten(1)

    def remove(self) -> None:
        self._handle.remove()


def forward_with_features(model: nn.Module, x: Tensor, layer: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """``(logits, h)`` of one forward pass of ``model`` on ``x``."""
    recorder = FeatureRecorder(model, layer)
    try:
        logits = classify(model, x)
    finally:
        recorder.remove()
    assert recorder.features is not None
    return logits, recorder.features
