"""The strategies DR-CPSD is compared with, built from Avalanche 0.6.0 with one shared recipe.

Every strategy receives the same classifier, optimiser, epochs, minibatch sizes and evaluator (the ``common``
keyword arguments of :func:`make_strategy`); only what defines the method differs:

================  ===========================================================================  ==================
name              method                                                                       stored real images
================  ===========================================================================  ==================
``naive``         fine-tuning (lower bound)                                                    0
``joint``         joint training on the whole stream at once (upper bound)                     all
``er200/er500``   Experience Replay (Avalanche ``Replay``, experience-balanced buffer)          200 / 500
``gdumb``         GDumb (Prabhu et al., ECCV 2020), memory 200                                 200
``lwf``           Learning without Forgetting (Li & Hoiem, 2016), alpha 1, T = 2               0
``genreplay``     Avalanche ``GenerativeReplay`` with its MLP VAE (Shin et al., 2017)          0
``rehearsal_kd``  class-balanced rehearsal (200) + logit distillation (T = 2, alpha 0.5), as   200
                  in the GTSRB rehearsal+KD seed
``drcpsd``        this package's :class:`~avalanche_drcpsd.DRCPSD`                             0
================  ===========================================================================  ==================
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Sequence

import torch

__all__ = ["BASELINES", "STRATEGIES", "make_baseline", "stored_real_images", "generator_parameters", "is_joint",
           "names"]


def _naive(common, spec):
    from avalanche.training import Naive

    return Naive(**common)


def _joint(common, spec):
    from avalanche.training import JointTraining

    return JointTraining(**common)


def _er(mem_size: int) -> Callable:
    def build(common, spec):
        from avalanche.training import Replay

        return Replay(mem_size=mem_size, **common)

    return build


def _gdumb(common, spec):
    from avalanche.training import GDumb

    return GDumb(mem_size=200, **common)


def _lwf(common, spec):
    from avalanche.training import LwF

    return LwF(alpha=1.0, temperature=2.0, **common)


def _genreplay(common, spec):
    """Avalanche's GenerativeReplay with its default generator recipe (MLP VAE, 2 hidden units, Adam 0.01),
    built for the benchmark's image shape (the wrapper's own default is hard-wired to 1x28x28)."""
    from avalanche.models.generator import MlpVAE, VAE_loss
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training import GenerativeReplay, VAETraining
    from avalanche.training.plugins import GenerativeReplayPlugin

    device = common.get("device", "cpu")
    vae = MlpVAE(tuple(spec.image_shape), nhid=2, device=device)
    generator_strategy = VAETraining(
        model=vae, optimizer=torch.optim.Adam(vae.parameters(), lr=0.01, weight_decay=1e-4), criterion=VAE_loss,
        train_mb_size=common["train_mb_size"], train_epochs=common["train_epochs"],
        eval_mb_size=common["eval_mb_size"], device=device, plugins=[GenerativeReplayPlugin()],
        evaluator=EvaluationPlugin())  # no metric, no logger: the VAE's own training is not reported
    return GenerativeReplay(generator_strategy=generator_strategy, **common)


def _rehearsal_kd(common, spec):
    from avalanche.training import Naive
    from avalanche.training.plugins import LwFPlugin, ReplayPlugin
    from avalanche.training.storage_policy import ClassBalancedBuffer

    buffer = ClassBalancedBuffer(max_size=200, adaptive_size=True)
    plugins = [ReplayPlugin(mem_size=200, storage_policy=buffer), LwFPlugin(alpha=0.5, temperature=2.0)]
    return Naive(plugins=plugins, **common)


#: name -> (builder, stored real images as a function of the number of training images)
BASELINES: Dict[str, tuple] = {
    "naive": (_naive, lambda n: 0),
    "joint": (_joint, lambda n: n),
    "er200": (_er(200), lambda n: min(200, n)),
    "er500": (_er(500), lambda n: min(500, n)),
    "gdumb": (_gdumb, lambda n: min(200, n)),
    "lwf": (_lwf, lambda n: 0),
    "genreplay": (_genreplay, lambda n: 0),
    "rehearsal_kd": (_rehearsal_kd, lambda n: min(200, n)),
}
STRATEGIES = ("drcpsd",) + tuple(BASELINES)


def make_baseline(name: str, common: Dict[str, Any], spec: Any):
    """The baseline ``name`` on ``common`` (model, optimizer, criterion, train_mb_size, train_epochs,
    eval_mb_size, evaluator, device); ``spec`` is the benchmark spec (``image_shape``)."""
    if name not in BASELINES:
        raise ValueError(f"strategy={name!r}; expected one of {list(STRATEGIES)}")
    return BASELINES[name][0](common, spec)


def stored_real_images(name: str, n_train_images: int) -> int:
    """Real training images the strategy keeps for later experiences (0 for DR-CPSD, LwF, Naive, VAE replay)."""
    if name == "drcpsd":
        return 0
    return int(BASELINES[name][1](n_train_images))


def generator_parameters(strategy: Any) -> int:
    """Parameters of the generative model a strategy keeps instead of real images: DR-CPSD's diffusion generator,
    GenerativeReplay's VAE; 0 for the others."""
    model = getattr(strategy, "generator", None)  # DRCPSD
    if model is None and hasattr(strategy, "generator_strategy"):  # Avalanche GenerativeReplay
        model = strategy.generator_strategy.model
    return int(sum(p.numel() for p in model.parameters())) if isinstance(model, torch.nn.Module) else 0


def is_joint(name: str) -> bool:
    """Joint training sees the whole stream in one ``train`` call, so it has one evaluation, at the end."""
    return name == "joint"


def names(selection: str | Sequence[str]) -> list:
    """Parse ``"drcpsd,er200"`` (or a list); ``"all"`` is every strategy. Unknown names raise ``ValueError``."""
    items = selection.split(",") if isinstance(selection, str) else list(selection)
    items = [s.strip() for s in items if s.strip()]
    if items == ["all"]:
        return list(STRATEGIES)
    bad = [s for s in items if s not in STRATEGIES]
    if bad or not items:
        raise ValueError(f"strategies {bad or items!r}; expected a comma-separated subset of {list(STRATEGIES)} "
                         "or 'all'")
    return items
