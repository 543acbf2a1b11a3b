r"""The real-vs-synthetic distribution gap per class, reported as an Avalanche metric.

After every evaluated experience, for each of its classes that the generator has learned, the plugin compares
``samples_per_class`` real evaluation images with as many synthetic images of the class as dream replay sees
them (the source's ``replayed_samples``, once per training experience, with a fixed seed: with
``replay_draw="once"`` an old class's kept set, not what the generator has since become) by the squared kernel
MMD of :func:`avalanche_drcpsd.losses.mmd_gaussian` on pixels:

.. math:: \mathrm{MMD}^2(P_c^{real}, P_c^{syn}) = \mathbb{E}k(x,x') + \mathbb{E}k(y,y') - 2\mathbb{E}k(x,y)

The values are published through the strategy's evaluator as ``RealSynMMD/eval_phase/<stream>/Class<ccc>``
(x = the number of training experiences seen), so every logger receives them; :class:`MetricsCSVLogger`
writes them to ``metrics.csv``. The MMD term of the CPSD loss (Real-Fake, Yuan et al., ICLR 2024) is what
DR-CPSD uses to shrink this gap; this plugin measures it.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from avalanche.evaluation.metric_results import MetricValue
from torch import Tensor

from ..losses import mmd_gaussian
from ..utils import dataset_tensors, experience_classes
from .base import StatefulPlugin

__all__ = ["MMDPlugin"]


class MMDPlugin(StatefulPlugin):
    """Publishes the per-class real-vs-synthetic MMD of a class-conditioned source at evaluation time."""

    #: the run state (:meth:`state_dict`)
    state_attributes = ("values", "_synthetic", "_synthetic_of")

    def __init__(self, source, *, samples_per_class: int = 64, seed: int = 0):
        """
        :param source: an object with ``replayed_samples(classes, n_per_class, seed=...) -> (x, y)`` (pixels in
            [0, 1]: the images replay trains on),
            ``learned_classes`` and ``input_space`` (:class:`~avalanche_drcpsd.input_space.InputSpace`, which maps
            the real images to pixels: the gap is measured in pixels), e.g. :class:`CPSDGeneratorPlugin`.
        """
        super().__init__()
        if not isinstance(samples_per_class, int) or samples_per_class < 2:
            raise ValueError(f"samples_per_class={samples_per_class!r} must be an integer >= 2")
        self.source = source
        self.samples_per_class = samples_per_class
        self.seed = seed
        self.values: Dict[Tuple[int, int], float] = {}  # (trained experiences, class) -> MMD^2
        self._synthetic: Dict[int, Tensor] = {}
        self._synthetic_of: Optional[int] = None

    def use_samples(self, x: Tensor, y: Tensor, trained: int) -> None:
        """Take the synthetic side of the next evaluation (after ``trained`` training experiences) from ``x, y``
        (pixels in [0, 1], labels): the first ``samples_per_class`` of each class that has that many; the classes it
        lacks are still sampled by the plugin. It lets one draw per experience serve every measurement of a run
        (:func:`avalanche_drcpsd.experiments.run.run_experiment`: the FID/KID samples and the sample grid)."""
        if len(x) != len(y):
            raise ValueError(f"use_samples: {len(x)} images but {len(y)} labels")
        self._synthetic, self._synthetic_of = {}, trained
        for cls in y.unique().tolist():
            xs = x[y == cls]
            if len(xs) >= self.samples_per_class:
                self._synthetic[int(cls)] = xs[: self.samples_per_class]

    def _synthetic_for(self, cls: int, trained: int) -> Tensor:
        if self._synthetic_of != trained:
            self._synthetic, self._synthetic_of = {}, trained
        if cls not in self._synthetic:
            x, _ = self.source.replayed_samples([cls], self.samples_per_class, seed=self.seed + 104729 * trained)
            self._synthetic[cls] = x
        return self._synthetic[cls]

    def after_eval_exp(self, strategy, **kwargs):
        learned = set(self.source.learned_classes)
        classes = [c for c in experience_classes(strategy.experience) if c in learned]
        if not classes:
            return
        trained = strategy.clock.train_exp_counter
        x, y = dataset_tensors(strategy.experience.dataset.eval())
        x = self.source.input_space.to_unit(x)
        stream = strategy.experience.origin_stream.name
        for cls in classes:
            real = x[y == cls][: self.samples_per_class]
            if len(real) < 2:
                continue
            value = float(mmd_gaussian(real, self._synthetic_for(cls, trained)))
            self.values[(trained, cls)] = value
            strategy.evaluator.publish_metric_value(
                MetricValue(self, f"RealSynMMD/eval_phase/{stream}_stream/Class{cls:03d}", value, trained))
