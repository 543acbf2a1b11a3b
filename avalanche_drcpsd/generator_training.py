r"""The generator phase's training loop as a function, beside :func:`~avalanche_drcpsd.cpsd.train_cpsd_projection`.

:func:`train_generator` trains a :class:`~avalanche_drcpsd.generator.Generator` on the new classes' real images
(:math:`\mathcal{L}_{LDM}` with min-SNR weights and condition dropout) and, given a :class:`DistillationSource`,
learns old-class inputs (images of a replay pool, or fresh few-step teacher samples): it distils a frozen
teacher's noise predictions on them (generative distillation, Masip et al. 2023) or denoises them as it does real
images (deep generative replay, Shin et al. 2017). The
:class:`~avalanche_drcpsd.plugins.generator.CPSDGeneratorPlugin` decides what to train on and with which teacher;
this module only runs the steps. The optimiser (AdamW), the learning-rate schedule (diffusers' ``get_scheduler``)
and the weight EMA (diffusers' ``EMAModel``) follow the config's ``generator_*`` fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .config import CHOICES, DRCPSDConfig
from .generator import Generator
from .losses import generative_distillation_loss, ldm_loss
from .utils import lr_schedule

__all__ = ["DistillationSource", "train_generator", "drop_conditions", "lr_schedule", "weight_ema"]


@dataclass
class DistillationSource:
    """How the generator phase learns the old classes: their ``classes`` with their ``embeddings``
    ``(n_old, L, D)`` (in the order of ``classes``) and a frozen ``teacher``. With ``images``/``labels`` (pixels in
    [0, 1] of the old classes: the replay pool) the replay inputs are those images, encoded; without them, every
    step the teacher draws a fresh batch with ``teacher_steps`` DDIM steps (eta 0, no guidance), uniformly over
    ``classes``. ``loss``: ``distill`` regresses the student's noise predictions onto the teacher's; ``ldm``
    trains on the inputs as on real images (then a pool needs no ``teacher``)."""

    teacher: Optional[Generator]
    classes: List[int]
    embeddings: Tensor
    images: Optional[Tensor] = None
    labels: Optional[Tensor] = None
    teacher_steps: int = 2
    loss: str = "distill"

    def __post_init__(self):
        if self.loss not in CHOICES["generator_replay_loss"]:
            raise ValueError(f"DistillationSource loss={self.loss!r}; expected one of "
                             f"{list(CHOICES['generator_replay_loss'])}")
        if self.teacher is None and (self.fresh or self.loss == "distill"):
            raise ValueError("DistillationSource needs a teacher for fresh inputs or loss='distill'")

    @property
    def fresh(self) -> bool:
        return self.images is None


def drop_conditions(cond: Tensor, null: Tensor, p: float, rng: torch.Generator) -> Tensor:
    """Classifier-free guidance training: each condition of ``cond`` ``(B, L, D)`` replaced by ``null``
    ``(L, D)`` with probability ``p``."""
    if p <= 0:
        return cond
    mask = (torch.rand(cond.shape[0], generator=rng) < p).to(cond.device).view(-1, 1, 1)
    return torch.where(mask, null.expand_as(cond), cond)


def weight_ema(params: Sequence[torch.nn.Parameter], decay: float):
    """diffusers' ``EMAModel`` over ``params`` with warm-up (decay ``1 - (1 + step)^(-2/3)``, capped at ``decay``);
    None when ``decay`` is 0."""
    if decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)


def train_generator(gen: Generator, images: Tensor, labels: Tensor, cond_new: Dict[int, Tensor], null: Tensor,
                    config: DRCPSDConfig, *, steps: int, split: Tuple[int, int, float, float],
                    rng: torch.Generator, distill: Optional[DistillationSource] = None,
                    desc: str = "generator", verbose: bool = False,
                    on_error: Callable[[int], str] = lambda step: f"at step {step}") -> None:
    """``steps`` AdamW steps of ``gen`` (in place) on the classes of ``cond_new`` (class id -> condition
    ``(L, D)``): each step draws ``split[0]`` of their real ``images`` (pixels in [0, 1], labels ``labels``) and,
    with ``distill``, ``split[1]`` old-class inputs; the loss is ``split[2] * LDM + split[3] * distillation``
    (:meth:`CPSDGeneratorPlugin.replay_split <avalanche_drcpsd.plugins.generator.CPSDGeneratorPlugin.replay_split>`).
    Every random draw comes from ``rng``. With an EMA (``generator_ema_decay``) the generator ends on the averaged
    weights. A non-finite loss raises :class:`FloatingPointError` (its message ends with ``on_error(step)``)."""
    c = config
    device = c.device
    b_new, b_old, w_new, w_old = split
    new_ids = sorted(cond_new)
    emb_new = torch.stack([cond_new[k] for k in new_ids]).to(device)
    lookup_new = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    lookup_new[torch.tensor(new_ids)] = torch.arange(len(new_ids))
    null = null.to(device)
    if distill is not None:
        emb_old = distill.embeddings.to(device)
        lookup_old = torch.full((max(distill.classes) + 1,), -1, dtype=torch.long)
        lookup_old[torch.tensor(distill.classes)] = torch.arange(len(distill.classes))
    real_idx = torch.nonzero(lookup_new[labels] >= 0).flatten()
    params = list(gen.unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=c.generator_lr, weight_decay=0.0)
    schedule = lr_schedule(optimizer, c.generator_lr_schedule, c.generator_warmup_steps, steps)
    ema = weight_ema(params, c.generator_ema_decay)
    gen.train()
    bar = tqdm(range(steps), desc=desc, disable=not verbose, leave=False)
    for step in bar:
        pick = real_idx[torch.randint(len(real_idx), (b_new,), generator=rng)]
        x = images[pick].to(device)
        cond = drop_conditions(emb_new[lookup_new[labels[pick]].to(device)], null, c.cond_dropout, rng)
        z_t, noise, t = gen.noisy(gen.encode(x), rng, offset=c.generator_noise_offset)
        loss_new = ldm_loss(gen.predict_noise(z_t, t, cond), noise, gen.snr(t), c.snr_gamma)
        loss = loss_new * w_new
        if distill is not None:
            if distill.fresh:
                cls = torch.tensor(distill.classes)[torch.randint(len(distill.classes), (b_old,), generator=rng)]
                z0 = distill.teacher.sample_latents(emb_old[lookup_old[cls]], null, guidance_scale=1.0,
                                                    num_inference_steps=distill.teacher_steps, sampler="ddim",
                                                    generator=rng)
            else:
                pick = torch.randint(len(distill.labels), (b_old,), generator=rng)
                cls = distill.labels[pick]
                z0 = gen.encode(distill.images[pick].to(device))
            cond_o = drop_conditions(emb_old[lookup_old[cls].to(device)], null, c.cond_dropout, rng)
            z_t, noise_o, t = gen.noisy(z0, rng, offset=c.generator_noise_offset)
            pred_o = gen.predict_noise(z_t, t, cond_o)
            if distill.loss == "ldm":
                loss_gd = ldm_loss(pred_o, noise_o, gen.snr(t), c.snr_gamma)
            else:
                with torch.no_grad():
                    target = distill.teacher.predict_noise(z_t, t, cond_o)
                loss_gd = generative_distillation_loss(pred_o, target)
            loss = loss + loss_gd * w_old
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite generator loss ({loss.item()}) {on_error(step)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.generator_grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, c.generator_grad_clip)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if ema is not None:
            ema.step(params)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    if ema is not None:
        ema.copy_to(params)  # the averaged weights are the generator from now on
    gen.eval()
