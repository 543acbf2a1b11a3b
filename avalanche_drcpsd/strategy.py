"""``DRCPSD``: the Dream Replay with CLIP Projection Stable Diffusion strategy, assembled from plugins.

* :class:`CPSDGeneratorPlugin`: generator, frozen text encoder, CPSD embeddings and their buffer;
* :class:`DistillPlugin`: the old/new teachers and feature distillation (inactive during real-data training);
* :class:`DreamReplayPlugin`: replay of synthetic old classes after the current experience is learned;
* :class:`MMDPlugin`: the real-vs-synthetic gap per class as a metric.

The classifier phase is the template's ordinary training loop on the current experience's real data.

**Phases.** One experience runs the named phases of :data:`~avalanche_drcpsd.utils.PHASES`: *generation* (the
replay set, in ``before_training_exp``), *classifier*, *generator* and *CPSD* (in ``cpsd_order``), *replay*. The
strategy's :class:`~avalanche_drcpsd.utils.PhaseTimer` times each and announces it to every plugin as
``before_<phase>(strategy, experience=...)`` / ``after_<phase>(strategy, experience=...)``, the way the template
announces its own steps; the wall time of every phase is published as ``PhaseTime/<phase>/Exp<eee>`` metric values.
:meth:`DRCPSD.train_from` finishes an experience from the end of any phase (a resumed run skips the phases it had
done).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from avalanche.evaluation.metric_results import MetricValue
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.utils import trigger_plugins
from safetensors.torch import save_file
from torch import nn

from .config import DRCPSDConfig, check_device
from .plugins.base import DRCPSDPlugin
from .plugins.distill import DistillPlugin
from .plugins.dream_replay import DreamReplayPlugin
from .plugins.generator import CPSDGeneratorPlugin
from .plugins.logit_mask import SeenClassMaskPlugin
from .plugins.mmd import MMDPlugin
from .utils import PHASES, PhaseTimer, atomic_write

__all__ = ["DRCPSD"]

class DRCPSD(SupervisedTemplate):
    """DR-CPSD on any Avalanche class-incremental benchmark.

    Example::

        strategy = DRCPSD(model=model, optimizer=SGD(model.parameters(), lr=0.1),
                          criterion=nn.CrossEntropyLoss(), config=DRCPSDConfig(n_replay_per_class=500),
                          class_names=benchmark.class_names, train_mb_size=64, train_epochs=1,
                          evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[CSVLogger("logs")]))
        for experience in benchmark.train_stream:
            strategy.train(experience)
            strategy.eval(benchmark.test_stream)
    """

    #: the plugins' interface: Avalanche's supervised callbacks and those of DR-CPSD's phases
    PLUGIN_CLASS = DRCPSDPlugin

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion=None,
        config: Optional[DRCPSDConfig] = None,
        class_names: Optional[Sequence[str]] = None,
        generator=None,
        text_encoder=None,
        plugins: Optional[list] = None,
        verbose: bool = True,
        **template_kwargs,
    ):
        self.config = (config or DRCPSDConfig()).validate()
        check_device(self.config.device)
        self.timer = PhaseTimer()
        self.generator_plugin = CPSDGeneratorPlugin(self.config, class_names=class_names, generator=generator,
                                                    text_encoder=text_encoder, timer=self.timer, verbose=verbose)
        self.distill_plugin = DistillPlugin(alpha=self.config.distill_old_weight, pi=self.config.pi,
                                            during_training=False,
                                            targets=self.config.distill_targets)
        self.replay_plugin = DreamReplayPlugin.from_config(self.generator_plugin, self.config,
                                                           distill=self.distill_plugin, timer=self.timer,
                                                           verbose=verbose)
        own = [self.generator_plugin, self.distill_plugin, self.replay_plugin]
        if self.config.logit_mask == "seen":
            own.insert(0, SeenClassMaskPlugin())
        #: the real-vs-synthetic gap metric; None when ``gap_samples_per_class`` < 2 (off)
        self.mmd_plugin: Optional[MMDPlugin] = None
        if self.config.gap_samples_per_class >= 2:
            self.mmd_plugin = MMDPlugin(self.generator_plugin, samples_per_class=self.config.gap_samples_per_class,
                                        seed=self.config.seed)
            own.append(self.mmd_plugin)
        template_kwargs.setdefault("device", self.config.device)
        super().__init__(model=model, optimizer=optimizer,
                         criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
                         plugins=own + list(plugins or []), **template_kwargs)
        self.timer.strategy = self  # the phases are announced to the plugins from now on
        # fail on a bad encoder or generator path now, before any training
        self.generator_plugin.setup()

    @property
    def buffer(self):
        return self.generator_plugin.buffer

    @property
    def generator(self):
        return self.generator_plugin.generator

    def _train_exp(self, experience, eval_streams=None, **kwargs):
        with self.timer("classifier", experience.current_experience):
            super()._train_exp(experience, eval_streams, **kwargs)

    def _after_training_exp(self, **kwargs):
        super()._after_training_exp(**kwargs)
        exp = self.experience.current_experience
        for phase in PHASES:
            seconds = self.timer.seconds.get((exp, phase))
            if seconds is not None:
                self.evaluator.publish_metric_value(
                    MetricValue(self, f"PhaseTime/{phase}/Exp{exp:03d}", seconds, self.clock.train_iterations))

    def train_from(self, experience, phase: str, *, restore: Callable[[], None] = lambda: None,
                   new_classes: Optional[Iterable[int]] = None) -> None:
        """Finish training on ``experience`` from the end of ``phase``: the template's ``train(experience)``
        without the phases before and including ``phase`` (one of :data:`~avalanche_drcpsd.utils.PHASES`), e.g. a
        run resumed from the checkpoint written when ``phase`` ended.

        The strategy is set up for the experience as ``train`` would (data, loader, model and optimiser), without
        the plugin callbacks of the phases done; then ``restore()`` runs (the state of the run at the end of
        ``phase`` goes in there, random states included), then the remaining phases with their callbacks.

        :param experience: the experience being trained.
        :param phase: the last phase done.
        :param restore: puts the run's state at the end of ``phase`` into this strategy.
        :param new_classes: the classes the generator and CPSD phases learn in this experience (those the generator
            plugin had not learned before its classifier phase); needed when ``phase`` is ``"generator"`` or
            ``"cpsd"``, as the plugin's state at that point already holds some of them.
        """
        from avalanche.training.templates.base import _group_experiences_by_stream

        gp = self.generator_plugin
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r}: expected one of {PHASES}")
        order = gp.learning_phases()
        if phase in order and new_classes is None:
            raise ValueError(f"train_from(phase={phase!r}) needs new_classes: the classes this experience learns")
        self.is_training = True
        self._stop_training = False
        self.model.train()
        self.model.to(self.device)
        self._eval_streams = _group_experiences_by_stream([[experience]])
        self.experience = experience
        self.train_dataset_adaptation()
        self.make_train_dataloader()
        self.check_model_and_optimizer()
        gp.setup()
        images = labels = None
        if phase in order:
            images, labels = gp.experience_pixels(experience)
        restore()
        plugins = self.plugins
        after = plugins[plugins.index(gp) + 1:]  # the generator plugin draws the replay set and learns the classes
        if phase == "generation":
            with _only_plugins(self, after):
                trigger_plugins(self, "before_training_exp")
            self._train_exp(experience, [[experience]])
            self._after_training_exp()
        elif phase == "classifier":
            self._after_training_exp()
        elif phase in order:
            gp.learn_classes(images, labels, new=sorted(int(c) for c in new_classes),
                             done=order[:order.index(phase) + 1])
            with _only_plugins(self, after):
                self._after_training_exp()
        else:  # replay
            with _only_plugins(self, plugins[plugins.index(self.replay_plugin) + 1:]):
                self._after_training_exp()
        self._after_training()
        self._train_cleanup()
        self.is_training = False

    def save(self, directory: Union[str, os.PathLike]) -> None:
        """The run's learned state: ``classifier.safetensors``, ``generator/`` and ``embeddings.safetensors``.

        Every file is written atomically (a temporary file moved into place), so a killed process leaves either the
        previous or the new version of each; :meth:`load` reads them back (safetensors only, nothing executed)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        atomic_write(os.path.join(directory, "classifier.safetensors"), lambda tmp: save_file(state, tmp))
        if self.generator is not None:
            _save_generator_atomically(self.generator, os.path.join(directory, "generator"))
        if self.buffer is not None:
            self.buffer.save(os.path.join(directory, "embeddings.safetensors"))

    def load(self, directory: Union[str, os.PathLike]) -> None:
        """Read back what :meth:`save` wrote: the classifier's weights (into ``self.model``), the generator and the
        embedding buffer. Weights are read with safetensors only; a missing or mismatched file raises an error
        naming it."""
        from safetensors.torch import load_file

        from .cpsd import EmbeddingBuffer
        from .sd import load_generator

        directory = os.fspath(directory)
        path = os.path.join(directory, "classifier.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} does not exist; expected a folder written by DRCPSD.save")
        try:
            self.model.load_state_dict(load_file(path), strict=True)
        except Exception as exc:  # safetensors' own error for a corrupt file, RuntimeError for a mismatch
            raise ValueError(f"cannot load the classifier from {path!r}: {str(exc).splitlines()[0]}") from exc
        generator_dir = os.path.join(directory, "generator")
        if os.path.isdir(generator_dir):
            c = self.config
            options = (c.generator_options or {}) if c.generator == "stable_diffusion" else {}
            self.generator_plugin.generator = load_generator(generator_dir, device=c.device, **options)
        buffer_path = os.path.join(directory, "embeddings.safetensors")
        if os.path.isfile(buffer_path):
            self.generator_plugin.buffer = EmbeddingBuffer.load(buffer_path)
        self.generator_plugin.setup()


@contextlib.contextmanager
def _only_plugins(strategy, plugins: Sequence):
    """Run the callbacks of ``plugins`` only (a part of the strategy's list) inside the block."""
    saved = strategy.plugins
    strategy.plugins = list(plugins)
    try:
        yield
    finally:
        strategy.plugins = saved


def _save_generator_atomically(generator, target: str) -> None:
    """``generator.save_pretrained(target)`` with every file moved into place by ``os.replace`` (diffusers writes
    its files in place): the generator is written to a temporary sibling folder first."""
    import shutil
    import tempfile

    from .utils import WriteError, write_error

    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-generator-", dir=parent)
    try:
        generator.save_pretrained(tmp)
        for root, _, files in os.walk(tmp):
            rel = os.path.relpath(root, tmp)
            dest_dir = os.path.normpath(os.path.join(target, rel))
            os.makedirs(dest_dir, exist_ok=True)
            for name in files:
                os.replace(os.path.join(root, name), os.path.join(dest_dir, name))
    except WriteError:
        raise
    except OSError as exc:
        raise write_error(target, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
