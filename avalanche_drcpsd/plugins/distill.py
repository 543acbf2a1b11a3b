r"""Old/new teacher feature distillation (DR-CPSD's :math:`\mathcal{L}_{Distill}`).

.. math:: \mathcal{L}_{Distill} = \alpha\,MSE(h_s, h_{old}) + \pi\,MSE(h_s, h_{new})

where :math:`h` are penultimate features (the input of the classifier's last linear layer), the *old teacher* is
the model after the previous experience and the *new teacher* the model after learning the current experience
on real data.

On its own (``during_training=True``) the plugin adds ``alpha * MSE(h_s, h_old)`` to every training minibatch's
loss of any Avalanche strategy (e.g. ``Replay``), a feature-level counterpart of LwF. Inside DR-CPSD
(``during_training=False``) the classifier phase stays pure CE on real data and :class:`DreamReplayPlugin`
calls :meth:`replay_loss` with both teachers during replay.

Reference: DR-CPSD (Dream Replay with CLIP Projection Stable Diffusion), distillation on 512-d ResNet-18 features
with alpha = pi = 1 in the paper; the original code (isaacNingLee/CPSD 769e79b, ``backbone/backbone.py`` l. 436)
weighs both terms 0.5 and gives both teachers the whole paired batch (``targets="both"``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..features import FeatureRecorder, check_single_task, forward_with_features
from ..losses import feature_distillation_loss
from ..utils import frozen_copy
from .base import StatefulPlugin

__all__ = ["DistillPlugin"]


class DistillPlugin(StatefulPlugin):
    """Keeps the teachers and computes feature distillation losses."""

    #: the run state (:meth:`state_dict`); the teachers are saved by the phase checkpoint as weights
    state_attributes = ("_snapshot_of",)

    def __init__(self, *, alpha: float = 1.0, pi: float = 1.0, during_training: bool = True,
                 targets: str = "split", feature_layer: Optional[str] = None):
        """
        :param alpha: weight of the old-teacher term, in replay and (standalone) in ordinary training (the paper:
            1; the original code: 0.5).
        :param pi: weight of the new-teacher term.
        :param during_training: add the old-teacher term to every training minibatch (standalone use).
        :param targets: ``split``: in replay, the old teacher distils on the synthetic (old-class) half and the new
            teacher on the real (current-class) half, each teacher on what it knows; ``both``: each teacher on the
            whole paired batch.
        :param feature_layer: name of the module whose input are the features (default: the last nn.Linear).
        """
        super().__init__()
        if targets not in ("split", "both"):
            raise ValueError(f"targets={targets!r}; expected 'split' or 'both'")
        if alpha < 0 or pi < 0:
            raise ValueError(f"alpha={alpha!r} and pi={pi!r} must be >= 0")
        self.alpha = alpha
        self.pi = pi
        self.during_training = during_training
        self.targets = targets
        self.feature_layer = feature_layer
        self.old_teacher: Optional[nn.Module] = None
        self.new_teacher: Optional[nn.Module] = None
        self._snapshot_of: Optional[int] = None
        self._recorder: Optional[FeatureRecorder] = None

    # --- teachers ---------------------------------------------------------------------------------------
    def snapshot_old_teacher(self, strategy) -> None:
        """Freeze a copy of the model as it enters a new experience (the model after the previous one).
        Idempotent within an experience, so several plugins may ask for it."""
        exp = strategy.experience.current_experience
        if self._snapshot_of == exp:
            return
        self._snapshot_of = exp
        self.new_teacher = None
        self.old_teacher = frozen_copy(strategy.model) if strategy.clock.train_exp_counter > 0 else None

    def set_new_teacher(self, model: nn.Module) -> None:
        self.new_teacher = frozen_copy(model)

    @torch.no_grad()
    def teacher_features(self, teacher: nn.Module, x: Tensor) -> Tensor:
        return forward_with_features(teacher, x, self.feature_layer)[1]

    def replay_loss(self, h_syn: Tensor, x_syn: Tensor, h_real: Tensor, x_real: Tensor) -> Tensor:
        """:math:`\\alpha MSE(h_s, h_{old}) + \\pi MSE(h_s, h_{new})` for a paired batch, given the student's features
        ``h_syn``/``h_real`` on ``x_syn``/``x_real``. Needs both teachers."""
        if self.old_teacher is None or self.new_teacher is None:
            raise RuntimeError("replay_loss needs the old and the new teacher (call snapshot_old_teacher and "
                               "set_new_teacher first)")
        if self.targets == "split":
            return feature_distillation_loss(
                h_syn, self.teacher_features(self.old_teacher, x_syn),
                h_real, self.teacher_features(self.new_teacher, x_real), self.pi, self.alpha)
        h_s = torch.cat([h_syn, h_real])
        x = torch.cat([x_syn, x_real])
        return feature_distillation_loss(h_s, self.teacher_features(self.old_teacher, x),
                                         h_s, self.teacher_features(self.new_teacher, x), self.pi, self.alpha)

    # --- hooks -----------------------------------------------------------------------------------------
    def before_training_exp(self, strategy, **kwargs):
        check_single_task(strategy.model, strategy.experience)
        self.snapshot_old_teacher(strategy)
        if self.during_training:  # again at every experience: a growing head (IncrementalClassifier) is replaced
            if self._recorder is not None:
                self._recorder.remove()
            self._recorder = FeatureRecorder(strategy.model, self.feature_layer)

    def before_backward(self, strategy, **kwargs):
        if not self.during_training or self.old_teacher is None or self._recorder is None:
            return
        h_s = self._recorder.features
        x = strategy.mb_x
        loss = self.alpha * F.mse_loss(h_s, self.teacher_features(self.old_teacher, x))
        if self.new_teacher is not None and self.pi > 0:
            loss = loss + self.pi * F.mse_loss(h_s, self.teacher_features(self.new_teacher, x))
        strategy.loss += loss

    def after_training_exp(self, strategy, **kwargs):
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None
