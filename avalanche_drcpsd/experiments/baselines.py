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

from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import torch

__all__ = ["BASELINES", "STRATEGIES", "make_baseline", "stored_real_images", "generator_parameters", "memory_bytes",
           "memory_info", "MEMORY_PARTS", "is_joint", "names"]


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
    from avalanche.training import GenerativeReplay, VAETraining
    from avalanche.training.plugins import EvaluationPlugin, GenerativeReplayPlugin

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


#: the parts of :func:`memory_bytes`, in the order of its breakdown (``total`` follows them)
MEMORY_PARTS = ("real_images", "generator", "embeddings", "synthetic", "teacher")


def memory_bytes(strategy: Any, name: str, image_shape: Sequence[int],
                 n_train_images: Optional[int] = None) -> Dict[str, int]:
    """Bytes a strategy keeps from one experience to the next beyond the classifier every strategy has, measured
    on ``strategy`` as it stands (call it after the last experience).

    Returns one entry per :data:`MEMORY_PARTS` and their sum, ``total``:

    * ``real_images``: stored real training images at one byte per value (uint8, the images' native storage):
      images x C*H*W of ``image_shape``. The images are counted in the strategy's replay buffers (``ER``'s,
      GDumb's, rehearsal+KD's ``storage_policy``); a strategy without a buffer keeps
      :func:`stored_real_images` of ``n_train_images`` (Joint: all; the others: none);
    * ``generator``: the weights (parameters and buffers, at their element size) of the generative model kept
      instead of images: DR-CPSD's ``strategy.generator``, GenerativeReplay's VAE;
    * ``embeddings``: DR-CPSD's CPSD embedding buffer, every class's projected embedding plus the null one;
    * ``synthetic``: DR-CPSD's kept synthetic sets (``generator_plugin.kept``, class -> uint8 images; empty
      unless the replay sets are drawn once) and the real pixel histograms they are matched to
      (``generator_plugin.pixel_histograms``, with ``replay_pixel_match`` on) and mean images
      (``generator_plugin.pixel_means``, with ``replay_pixel_match="class_mean_histogram"``);
    * ``teacher``: a copy of a previous classifier kept for distillation (parameters and buffers): LwF's and
      rehearsal+KD's previous model and DR-CPSD's old teacher (the classifier after the previous experience,
      which its replay distils; absent after a single experience).

    Working copies a strategy makes only within an experience are not counted: DR-CPSD's new teacher and the
    previous generator of its generative distillation, GenerativeReplay's copies of its VAE and classifier that
    draw and label the replay of the next experience. Nor is DR-CPSD's frozen text encoder, which encodes the
    prompts of new classes only (an old class lives in the embedding buffer)."""
    shape = tuple(int(d) for d in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape={image_shape!r}; expected (C, H, W) of positive integers")
    images = _buffered_images(strategy)
    if images is None:  # no replay buffer: what the strategy keeps by definition
        images = stored_real_images(name, n_train_images) if n_train_images is not None else 0
    parts = {
        "real_images": int(images) * shape[0] * shape[1] * shape[2],
        "generator": _module_bytes(_generator_module(strategy)),
        "embeddings": _embedding_bytes(strategy),
        "synthetic": sum(_tensor_bytes(getattr(getattr(strategy, "generator_plugin", None), part, {}).values())
                         for part in ("kept", "pixel_histograms", "pixel_means")),
        "teacher": _module_bytes(_teacher_module(strategy)),
    }
    parts["total"] = sum(parts[k] for k in MEMORY_PARTS)
    return parts


def memory_info(parts: Dict[str, int]) -> Dict[str, int]:
    """:func:`memory_bytes`'s breakdown as ``run_info.csv`` keys: ``memory_bytes`` (the total), then
    ``memory_<part>_bytes`` for each part."""
    return {"memory_bytes": int(parts["total"]), **{f"memory_{k}_bytes": int(parts[k]) for k in MEMORY_PARTS}}


def _tensor_bytes(tensors: Iterable[Any]) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


def _module_bytes(module: Any) -> int:
    """Parameters and buffers of ``module`` at their element size (0 for anything that is not a module)."""
    if not isinstance(module, torch.nn.Module):
        return 0
    return _tensor_bytes(module.parameters()) + _tensor_bytes(module.buffers())


def _generator_module(strategy: Any) -> Any:
    model = getattr(strategy, "generator", None)  # DRCPSD
    if model is None and hasattr(strategy, "generator_strategy"):  # Avalanche GenerativeReplay
        model = strategy.generator_strategy.model
    return model


def _embedding_bytes(strategy: Any) -> int:
    buffer = getattr(getattr(strategy, "generator_plugin", None), "buffer", None)
    if buffer is None:
        return 0
    return _tensor_bytes(list(getattr(buffer, "embeddings", {}).values()) + [getattr(buffer, "null", None)])


def _plugins(strategy: Any) -> list:
    return list(getattr(strategy, "plugins", None) or [])


def _buffered_images(strategy: Any) -> Optional[int]:
    """Images in the strategy's replay buffers (Avalanche ``storage_policy.buffer``), None without any."""
    counts = [len(p.storage_policy.buffer) for p in _plugins(strategy)
              if getattr(getattr(p, "storage_policy", None), "buffer", None) is not None]
    return sum(counts) if counts else None


def _teacher_module(strategy: Any) -> Any:
    distill = getattr(strategy, "distill_plugin", None)  # DRCPSD: the old teacher
    if distill is not None:
        return getattr(distill, "old_teacher", None)
    for plugin in _plugins(strategy):  # Avalanche LwFPlugin (LwF, rehearsal+KD): the previous model
        previous = getattr(getattr(plugin, "lwf", None), "prev_model", None)
        if previous is not None:
            return previous
    return None


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
