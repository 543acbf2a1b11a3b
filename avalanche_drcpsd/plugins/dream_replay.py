r"""Dream replay: generative replay of old classes *after* the current experience is learned on real data.

For experience :math:`t>0`, once the classifier has been trained on the current classes' real data (the *new
teacher*), the plugin

1. asks its synthetic source for ``n_replay_per_class`` images of every old class (with
   ``replay_classes="seen"``, a package option, of every old and current class);
2. initialises the student as the average of the old teacher (the model after :math:`t-1`) and the new teacher
   (or, with ``student_init="ema"``, :math:`(1-\alpha)\theta_{old}+\alpha\theta_{new}`; with ``"fresh"``, newly
   initialised);
3. trains it for ``replay_epochs`` over paired batches (``batch_real`` real + ``batch_syn`` synthetic; one epoch
   is ``max(real, synthetic)`` batches, raised to at least ``min_steps`` optimiser steps in all when set) with

.. math:: \mathcal{L} = CE(f_s(x^{syn}), y^{syn}) + \kappa\,CE(f_s(x^{real}), y^{real})
          + MSE(h_s, h_{old}) + \pi\,MSE(h_s, h_{new}) \;[+\,\beta\,KD_T(z_s, z_{old}; C_{old})]

(by default the old teacher sees the synthetic half and the new teacher the real half, see
:class:`DistillPlugin`), and the student becomes the model. The bracketed term is a package option (``kd_weight``
:math:`\beta`, off by default): the old teacher's old-class logits distilled on the whole paired batch
(:func:`~avalanche_drcpsd.losses.logit_distillation_loss`).

Because replay starts only after the real training ends, no synthetic image ever reaches the classifier while
it learns the current task: the real/synthetic confusion of joint generative replay is avoided. A package option,
``rehearsal_batch`` (off by default), lifts that: the old classes' replay set is also rehearsed during the
classifier phase, ``rehearsal_batch`` of its images appended to every real minibatch (Avalanche's
``GenerativeReplayPlugin`` layout), and dream replay follows as usual.

The source is any object with ``sample_replay(classes, n_per_class) -> (x, y)`` returning images in the
classifier's input format: :class:`CPSDGeneratorPlugin`, or another generator.

Reference: DR-CPSD (Dream Replay with CLIP Projection Stable Diffusion): kappa = 0.05, pi = 1 (the paper; its code
weighs both teachers 0.5), one replay epoch, 16 + 16 paired batches, averaged student. The options that reproduce
the original code (isaacNingLee/CPSD 769e79b) are listed in :data:`avalanche_drcpsd.config.REFERENCE`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Any, Callable, Iterator, List, Optional, Protocol, Sequence, Set, Tuple

import torch
from avalanche.evaluation.metric_results import MetricValue
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ..augment import REPLAY_AUGMENTS
from ..config import ReplayConfig, build_from_fields
from ..features import check_single_task, classify, find_head, forward_with_features
from ..losses import balanced_kappa, isolation_loss, logit_distillation_loss
from ..replay_training import train_student
from ..utils import PhaseTimer, experience_classes, interpolate_state_dicts, lr_schedule, running_stats_kept
from .base import StatefulPlugin
from .distill import DistillPlugin

__all__ = ["SyntheticSource", "DreamReplayPlugin", "replay_epochs_for", "rehearsal_batches", "align_head_norms",
           "FEW_REPLAY_STEPS"]

#: fewer optimiser steps than this in one replay phase draw a warning: on the main job's small experiences,
#: 13 steps left the averaged student unfitted (replay CE 4.6-5.0) and the newest classes erased.
FEW_REPLAY_STEPS = 100


def replay_epochs_for(steps_per_epoch: int, epochs: int, min_steps: int = 0) -> int:
    r"""Replay epochs to run: ``epochs``, raised so that the phase makes at least ``min_steps`` optimiser steps.

    .. math:: E = \max\left(E_0, \left\lceil \frac{S_{min}}{S_{epoch}} \right\rceil\right)
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch!r} must be >= 1")
    return max(epochs, math.ceil(min_steps / steps_per_epoch))


@torch.no_grad()
def align_head_norms(head: torch.nn.Linear, old_classes: Sequence[int], new_classes: Sequence[int]) -> float:
    r"""Weight aligning (Zhao et al., CVPR 2020): the head's rows of ``new_classes`` (weights and bias) scaled by

    .. math:: \gamma = \frac{\operatorname{mean}_{c \in old} \lVert w_c \rVert}{\operatorname{mean}_{c \in new}
              \lVert w_c \rVert}

    so that the new classes' logits are :math:`\gamma` times what they were; returns :math:`\gamma` (1.0, and no
    change, when either set is empty)."""
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"head alignment needs an nn.Linear head, got {type(head).__name__}")
    if not old_classes or not new_classes:
        return 1.0
    old = torch.as_tensor(list(old_classes), device=head.weight.device)
    new = torch.as_tensor(list(new_classes), device=head.weight.device)
    norms = head.weight.norm(dim=1)
    gamma = float(norms[old].mean() / norms[new].mean())
    head.weight[new] *= gamma
    if head.bias is not None:
        head.bias[new] *= gamma
    return gamma


#: the ``rehearsal_target`` values whose rehearsed images join the minibatch (its CE on their labels), and those whose
#: images the old teacher distils
_REHEARSAL_JOINS = frozenset({"label", "label_teacher"})
_REHEARSAL_DISTILS = frozenset({"teacher", "teacher_seen", "label_teacher"})


def rehearsal_batches(x: Tensor, y: Tensor, batch: int, *, seed: int) -> Iterator[Tuple[Tensor, Tensor]]:
    """Endless ``batch``-sized batches of ``(x, y)``: shuffled passes (a ``torch.Generator`` seeded with ``seed``,
    the global random state untouched), each image once per pass, a pass continuing into the next."""
    if len(y) == 0:
        raise ValueError("rehearsal_batches: the replay set is empty")
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    while True:
        while len(order) < batch:
            order = torch.cat([order, torch.randperm(len(y), generator=g)])
        take, order = order[:batch], order[batch:]
        yield x[take], y[take]


class SyntheticSource(Protocol):
    def sample_replay(self, classes: Sequence[int], n_per_class: int) -> Tuple[Tensor, Tensor]: ...


class DreamReplayPlugin(StatefulPlugin):
    """Replay of synthetic old classes with an averaged student, isolation loss and teacher distillation."""

    #: the run state (:meth:`state_dict`); the teachers are the distillation plugin's
    state_attributes = ("seen_classes", "stats", "effective_kappa", "epochs_used", "replayed_batches")

    def __init__(
        self,
        source: SyntheticSource,
        config: Optional[ReplayConfig] = None,
        *,
        distill: Optional[DistillPlugin] = None,
        syn_transform: Optional[Callable[[Tensor], Tensor]] = None,
        timer: Optional[PhaseTimer] = None,
        verbose: bool = True,
        **settings: Any,
    ):
        """
        :param source: gives synthetic old-class images (``sample_replay``).
        :param config: the settings (:class:`~avalanche_drcpsd.config.ReplayConfig`, validated there); the
            keyword ``settings`` (the same names) override its fields, e.g. ``DreamReplayPlugin(gen,
            n_replay_per_class=500)``. The settings:
        :param replay_classes: ``old`` (the paper's description) draws synthetic images of the old classes only;
            ``seen`` (the original code) of the old and the current classes (the source must know the current ones
            by the end of the experience, as :class:`CPSDGeneratorPlugin` placed before this plugin does).
        :param replay_filter: ``teacher`` drops the synthetic images their teacher misclassifies (old classes: the
            old teacher; current classes: the new teacher), keeping a class whole when none would survive; the kept
            share is ``stats[experience]["filter_kept"]``. ``none`` (the reference) keeps every image.
        :param distill: the feature-distillation plugin holding the teachers; a private one (``pi``,
            ``distill_old_weight``, split targets, not active during ordinary training) when None.
        :param min_steps: *package*: run at least this many optimiser steps per replay phase, by adding epochs
            (:func:`replay_epochs_for`); 0 (off, the reference) keeps exactly ``replay_epochs``. The epochs used
            are kept in ``epochs_used[experience]``.
        :param student_bn: the initial student's BatchNorm running statistics: ``average`` (interpolated like the
            weights) or ``new`` (the new teacher's, as the original code leaves them).
        :param step_ema: after every optimiser step, :math:`\theta \\leftarrow a\\,\theta + (1-a)\\,\theta_{before}`
            with this ``a`` (the original code's ``--c_ema``, 0.1); None: off.
        :param epoch_length: ``longer``: an epoch is as many paired batches as the longer set has, the other
            cycling; ``shorter``: as many as the shorter one (the original code's ``zip``).
        :param bn: ``joint`` (the original code): the synthetic and real halves of a paired batch go through the
            student in one forward pass, normalised by their joint BatchNorm statistics; ``split`` (*package*):
            apart, each normalised by its own, and only the real half updates the running statistics.
        :param augment: ``reference``: the original classifier's training transforms on every synthetic image
            of every batch (:func:`~avalanche_drcpsd.augment.reference_classifier_augment`), before
            ``syn_transform``; ``shift`` / ``shift_flip``: a translation by up to 2 pixels per axis (and a
            left-right flip with probability 0.5) of every synthetic image of every batch
            (:func:`~avalanche_drcpsd.augment.random_shift`); ``none``: off.
        :param teacher_mode: ``eval``: the teachers run in eval mode; ``student``: in the student's mode (the
            original code, where they are submodules of the student: in train mode their BatchNorm uses and
            updates batch statistics).
        :param optimizer: ``fresh``: a new optimiser of the strategy optimiser's class and settings;
            ``continue``: the strategy's optimiser itself, with its state (the original code).
        :param rehearsal_batch: *package*: this many images of the old classes' replay set (the kept sets with
            ``replay_draw="once"``) appended to every minibatch of the classifier phase (after ``augment`` and
            ``syn_transform``); 0 (the reference): the classifier phase sees real images alone.
        :param rehearsal_target: ``label``: the rehearsed images join the minibatch with their labels (its CE);
            ``teacher``: they go through the model apart and are trained towards the old teacher's old-class
            logits (:func:`~avalanche_drcpsd.losses.logit_distillation_loss` at ``kd_temperature``);
            ``label_teacher``: both, the images joined to the minibatch (its CE) and their outputs there distilled;
            ``teacher_seen``: like ``teacher`` over every seen class, the current experience's included (the old
            teacher's low logits for the classes it never saw say "not a new class", softly).
        :param rehearsal_kd_weight: *package*: the weight of that distillation (1: like the minibatch's CE).
        :param head_align: *package*: ``weight_norm`` rescales the new classes' head rows after each replay phase
            (:func:`align_head_norms`; the factor is ``stats[experience]["head_gamma"]``); ``none``: off.
        :param replay_lr: learning rate of the fresh replay optimiser (same class and settings as the
            strategy's); None keeps the strategy optimiser's own.
        :param lr_schedule: ``constant`` (the reference) or ``cosine``: the replay optimiser's rate annealed to 0
            over the phase's optimiser steps; the strategy optimiser's rates are restored after the phase when it
            is the one replay continues (``optimizer="continue"``).
        :param grad_clip: clip the student's gradient norm at this value during replay (None: no clipping).
        :param kappa_schedule: ``constant`` (reference) or ``balanced``: ``kappa * |new| / |old|`` classes at
            each experience (:func:`~avalanche_drcpsd.losses.balanced_kappa`); the value used is kept in
            ``effective_kappa[experience]``.
        :param kd_weight: weight of the old teacher's logit distillation over the old classes (0: off).
        :param kd_temperature: its temperature.
        :param seed: with ``student_init="fresh"``, the student of experience ``t`` is initialised under
            ``torch.manual_seed(seed + t)`` in a forked random state (the global stream is not touched).
        :param syn_transform: applied to synthetic batches (e.g. the benchmark's normalisation).
        """
        super().__init__()
        base = config if config is not None else ReplayConfig()
        #: the plugin's settings (:class:`~avalanche_drcpsd.config.ReplayConfig`)
        self.config = build_from_fields(ReplayConfig, {**dataclasses.asdict(base), **settings}, "DreamReplayPlugin") \
            if settings else base
        c = self.config
        self.source = source
        #: per experience: mean and max of the isolation and distillation terms and of the gradient norm
        self.stats: dict = {}
        #: per experience: the isolation weight actually used
        self.effective_kappa: dict = {}
        #: per experience: the replay epochs actually run (``replay_epochs`` raised by ``min_steps``)
        self.epochs_used: dict = {}
        self.distill = distill if distill is not None else DistillPlugin(alpha=c.distill_old_weight, pi=c.pi,
                                                                         during_training=False)
        self.syn_transform = syn_transform
        self.timer = timer if timer is not None else PhaseTimer()
        self.verbose = verbose
        self.seen_classes: Set[int] = set()
        self.replayed_batches = 0  # synthetic batches seen by the classifier (for tests and reports)
        self._rehearsal: Optional[Iterator[Tuple[Tensor, Tensor]]] = None  # the classifier phase's, when on
        self._pending: Optional[Tensor] = None  # this iteration's rehearsed images, when the old teacher distils them
        self._kd_classes: List[int] = []  # the classes it distils them over

    @classmethod
    def from_config(cls, source: SyntheticSource, config, **kwargs) -> "DreamReplayPlugin":
        """The plugin with the dream-replay group of a :class:`~avalanche_drcpsd.config.DRCPSDConfig`."""
        return cls(source, ReplayConfig.from_config(config), **kwargs)

    # --- hooks -----------------------------------------------------------------------------------------
    def before_training_exp(self, strategy, **kwargs):
        check_single_task(strategy.model, strategy.experience)
        self.distill.snapshot_old_teacher(strategy)
        self._rehearsal = None
        if self.config.rehearsal_batch > 0 and self.seen_classes:
            x_syn, y_syn = self.source.sample_replay(sorted(self.seen_classes), self.config.n_replay_per_class)
            exp = strategy.experience.current_experience
            self._rehearsal = rehearsal_batches(x_syn, y_syn, self.config.rehearsal_batch,
                                                seed=self.config.seed * 1_000_003 + exp)
            self._kd_classes = sorted(self.seen_classes | set(experience_classes(strategy.experience))) \
                if self.config.rehearsal_target == "teacher_seen" else sorted(self.seen_classes)

    def before_training_iteration(self, strategy, **kwargs):
        """With ``rehearsal_batch``: the next batch of old-class synthetic images appended to the minibatch."""
        if self._rehearsal is None:
            return
        xs, ys = next(self._rehearsal)
        xs = xs.to(strategy.device)
        transform = self.synthetic_transform()
        if transform is not None:
            xs = transform(xs)
        target = self.config.rehearsal_target
        if target in _REHEARSAL_DISTILS:
            self._pending = xs  # distilled in before_backward
        if target not in _REHEARSAL_JOINS:
            return  # outside the minibatch's CE
        mb = strategy.mbatch
        mb[0] = torch.cat([mb[0], xs.to(mb[0].dtype)])
        mb[1] = torch.cat([mb[1], ys.to(mb[1].device, mb[1].dtype)])
        mb[-1] = torch.cat([mb[-1], mb[-1][:1].expand(len(ys))])

    def before_backward(self, strategy, **kwargs):
        """With ``rehearsal_target`` ``teacher``, ``teacher_seen`` or ``label_teacher``: the old teacher's logits
        distilled on the rehearsed images of this iteration (``label_teacher``: on the minibatch's own outputs for them,
        whose CE the strategy already has)."""
        if self._pending is None:
            return
        xs, self._pending = self._pending, None
        with torch.no_grad():
            z_old = classify(self.distill.old_teacher, xs)
        z = strategy.mb_output[-len(xs):] if self.config.rehearsal_target in _REHEARSAL_JOINS \
            else classify(strategy.model, xs)
        strategy.loss += self.config.rehearsal_kd_weight * logit_distillation_loss(
            z, z_old, self._kd_classes, self.config.kd_temperature)

    def after_training_exp(self, strategy, **kwargs):
        self._rehearsal = self._pending = None
        old_classes = sorted(self.seen_classes)
        self.seen_classes.update(experience_classes(strategy.experience))
        if not old_classes or self.distill.old_teacher is None:
            return
        drawn = old_classes if self.config.replay_classes == "old" else sorted(self.seen_classes)
        x_syn, y_syn = self.source.sample_replay(drawn, self.config.n_replay_per_class)
        with self.timer("replay", strategy.experience.current_experience):
            self.replay(strategy, x_syn, y_syn, old_classes)
        if self.config.head_align == "weight_norm":
            new_classes = sorted(set(experience_classes(strategy.experience)) - set(old_classes))
            gamma = align_head_norms(find_head(strategy.model, self.distill.feature_layer), old_classes, new_classes)
            self.stats[strategy.experience.current_experience]["head_gamma"] = gamma

    # --- the replay phase ------------------------------------------------------------------------------
    def replay(self, strategy, x_syn: Tensor, y_syn: Tensor, old_classes: Optional[Sequence[int]] = None) -> None:
        """Train the averaged student on paired batches; ``old_classes`` (default: the labels of ``x_syn``) are
        the classes whose logits the optional logit distillation covers."""
        if old_classes is None:
            old_classes = sorted(set(int(c) for c in y_syn.tolist()))
        kappa = self.config.kappa
        if self.config.kappa_schedule == "balanced":
            new_classes = set(experience_classes(strategy.experience)) - set(old_classes)
            kappa = balanced_kappa(self.config.kappa, len(new_classes), len(old_classes))
        self.effective_kappa[strategy.experience.current_experience] = kappa
        model = strategy.model
        device = strategy.device
        exp = strategy.experience.current_experience
        self.distill.set_new_teacher(model)
        kept = None
        if self.config.replay_filter == "teacher":
            x_syn, y_syn, kept = self.filter_by_teachers(x_syn, y_syn, old_classes, device)
        if self.config.student_init == "fresh":
            model.load_state_dict(self.fresh_student(self.distill.new_teacher, self.config.seed + exp))
        else:
            model.load_state_dict(self.initial_student(self.distill.old_teacher, self.distill.new_teacher))
        model.train()
        teachers = (self.distill.old_teacher, self.distill.new_teacher)
        for teacher in teachers:
            teacher.train(self.config.teacher_mode == "student")
        optimizer = strategy.optimizer if self.config.optimizer == "continue" else self._make_optimizer(strategy)

        real = DataLoader(strategy.experience.dataset.train(), batch_size=self.config.batch_real, shuffle=True,
                          drop_last=len(strategy.experience.dataset) > self.config.batch_real)
        syn = DataLoader(TensorDataset(x_syn, y_syn), batch_size=self.config.batch_syn, shuffle=True,
                         drop_last=len(y_syn) > self.config.batch_syn)
        steps = max(len(real), len(syn)) if self.config.epoch_length == "longer" else min(len(real), len(syn))
        epochs = self.epochs_used[exp] = replay_epochs_for(steps, self.config.replay_epochs, self.config.min_steps)
        if steps * epochs < FEW_REPLAY_STEPS:
            warnings.warn(
                f"experience {exp}: dream replay makes only {steps * epochs} optimiser steps ({epochs} epoch(s) of "
                f"{steps} paired batches); under {FEW_REPLAY_STEPS} the averaged student may not fit and may erase "
                f"the newest classes. Raise replay_epochs or set replay_min_steps (e.g. {FEW_REPLAY_STEPS}).",
                stacklevel=2)
        def loss(xs, ys, xr, yr):
            logits, h = self.student_forward(model, xs, xr)
            n = xs.shape[0]
            ce = isolation_loss(logits[:n], ys, logits[n:], yr, kappa)
            kd = self.distill.replay_loss(h[:n], xs, h[n:], xr)
            terms = {"isolation": ce, "distill": kd}
            if self.config.kd_weight > 0:
                with torch.no_grad():
                    z_old = classify(self.distill.old_teacher, torch.cat([xs, xr]))
                terms["logit_kd"] = logit_distillation_loss(logits, z_old, old_classes, self.config.kd_temperature)
            return ce + kd + self.config.kd_weight * terms.get("logit_kd", 0.0), terms

        rates = [group["lr"] for group in optimizer.param_groups]
        trace = train_student(model, real, syn, loss, optimizer, steps=steps, epochs=epochs, device=device,
                              syn_transform=self.synthetic_transform(), grad_clip=self.config.grad_clip,
                              step_ema=self.config.step_ema, desc=f"exp {exp} replay", verbose=self.verbose,
                              on_error=f" in experience {exp}",
                              scheduler=lr_schedule(optimizer, self.config.lr_schedule, 0, steps * epochs))
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        self.replayed_batches += steps * epochs
        for teacher in teachers:
            teacher.eval()
        self.stats[exp] = {f"{k}_{name}": agg(v) for k, v in trace.items()
                           for name, agg in (("mean", lambda v: sum(v) / len(v)), ("max", max))}
        if kept is not None:
            self.stats[exp]["filter_kept"] = kept
        for key, value in self.stats[exp].items():
            strategy.evaluator.publish_metric_value(
                MetricValue(self, f"Replay/{key}/Exp{exp:03d}", value, strategy.clock.train_iterations))

    def student_forward(self, model: torch.nn.Module, xs: Tensor, xr: Tensor) -> Tuple[Tensor, Tensor]:
        """``(logits, h)`` of the student on the paired batch ``cat([xs, xr])``: one forward pass with ``bn=
        "joint"``; with ``"split"`` the synthetic half apart, normalised by its own batch statistics and leaving
        the running statistics as they were (:func:`~avalanche_drcpsd.utils.running_stats_kept`), then the real
        half, which alone updates them."""
        layer = self.distill.feature_layer
        if self.config.bn == "joint":
            return forward_with_features(model, torch.cat([xs, xr]), layer)
        with running_stats_kept(model):
            logits_syn, h_syn = forward_with_features(model, xs, layer)
        logits_real, h_real = forward_with_features(model, xr, layer)
        return torch.cat([logits_syn, logits_real]), torch.cat([h_syn, h_real])

    def synthetic_transform(self) -> Optional[Callable[[Tensor], Tensor]]:
        """What the synthetic half of each paired batch goes through: the augmentation ``augment`` names (the
        original code's classifier augmentation for ``"reference"``), then ``syn_transform``."""
        augment = REPLAY_AUGMENTS.get(self.config.augment)
        if augment is None:
            return self.syn_transform
        then = self.syn_transform

        def transform(x: Tensor) -> Tensor:
            x = augment(x)
            return then(x) if then is not None else x

        return transform

    def initial_student(self, old_teacher, new_teacher) -> dict:
        """The student's initial state: :math:`(1-\alpha)\theta_{old} + \alpha\theta_{new}` for the weights
        (``alpha`` 0.5 for ``student_init="average"``, ``ema_alpha`` for ``"ema"``); BatchNorm's running statistics
        likewise, or the new teacher's with ``student_bn="new"``; integer buffers from the new teacher."""
        new = new_teacher.state_dict()
        out = interpolate_state_dicts(old_teacher.state_dict(), new, self.config.alpha)
        if self.config.student_bn == "new":
            buffers = {name for name, _ in new_teacher.named_buffers()}
            out.update({k: new[k].clone() for k in buffers if k in new})
        return out

    @staticmethod
    def fresh_student(model: torch.nn.Module, seed: int) -> dict:
        """A newly initialised state of ``model``'s architecture: every submodule's ``reset_parameters`` (and
        BatchNorm's ``reset_running_stats``) on a copy, under ``torch.manual_seed(seed)`` in a forked random
        state. A model with parameters that no submodule resets is refused (it would keep trained weights)."""
        fresh = copy.deepcopy(model)
        owned = set()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in fresh.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                    owned.update(id(p) for p in module.parameters(recurse=False))
        left = [name for name, p in fresh.named_parameters() if id(p) not in owned]
        if left:
            raise ValueError(f"student_init='fresh': no reset_parameters() re-initialises {left[:5]}; "
                             "use student_init='average' for this model")
        return fresh.state_dict()

    @torch.no_grad()
    def filter_by_teachers(self, x_syn: Tensor, y_syn: Tensor, old_classes: Sequence[int],
                           device) -> Tuple[Tensor, Tensor, float]:
        """The synthetic images their teacher assigns to their class (old classes: the old teacher, the others:
        the new teacher), every image of a class none of whose images pass, and the share kept."""
        old = torch.isin(y_syn, torch.tensor(list(old_classes), dtype=y_syn.dtype))
        keep = torch.zeros(len(y_syn), dtype=torch.bool)
        for teacher, mask in ((self.distill.old_teacher, old), (self.distill.new_teacher, ~old)):
            index = torch.nonzero(mask).flatten()
            for chunk in index.split(512):
                xs = x_syn[chunk].to(device)
                if self.syn_transform is not None:
                    xs = self.syn_transform(xs)
                keep[chunk] = classify(teacher, xs).argmax(1).cpu() == y_syn[chunk]
        for k in y_syn.unique():
            if not keep[y_syn == k].any():
                keep[y_syn == k] = True
        return x_syn[keep], y_syn[keep], float(keep.float().mean())

    def _make_optimizer(self, strategy) -> torch.optim.Optimizer:
        """A fresh optimiser of the strategy's class and settings on the student (lr overridable)."""
        opt = strategy.optimizer
        group = opt.param_groups[0] if opt.param_groups else {}
        defaults = {k: group.get(k, v) for k, v in opt.defaults.items()}
        if self.config.replay_lr is not None:
            defaults["lr"] = self.config.replay_lr
        return type(opt)(strategy.model.parameters(), **defaults)
