"""One typed, validated configuration object for DR-CPSD.

Fields that exist only in this package (the offline generator, the CPU budget knobs, measured alternatives) are
marked *package*. The defaults are not all the original code's: :data:`REFERENCE` (``DRCPSDConfig.reference()``)
holds every value the original DR-CPSD code (isaacNingLee/CPSD) sets, and README's parameter table gives each
field's default beside the original's. Profiles (``experiments/*.json``) override fields for a machine or a
benchmark.

All validation happens in ``__post_init__``: an invalid value raises :class:`ConfigError`, which names the
field, the bad value and what was expected, before any model is built or any data is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import string
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Tuple, Union

__all__ = ["ConfigError", "DRCPSDConfig", "ReplayConfig", "CHOICES", "check_prompt_template", "check_device",
           "REFERENCE", "PRESETS", "LR_SCHEDULES"]


class ConfigError(ValueError):
    """An invalid configuration value (the message names the field, the value and what was expected)."""


#: the learning-rate schedules of :func:`~avalanche_drcpsd.utils.lr_schedule`: the choices of every schedule
#: field here and of the CAS classifier's (:func:`~avalanche_drcpsd.experiments.fidelity.classification_accuracy_score`)
LR_SCHEDULES = ("constant", "cosine")

#: the valid values of every choice field, the one table the config and the plugins validate against
CHOICES = {
    "generator": ("unet", "stable_diffusion"),
    "projection": ("token", "hidden", "reference"),
    "cpsd_augment": ("none", "reference"),
    "replay_augment": ("none", "reference", "shift", "shift_flip"),
    "replay_head_align": ("none", "weight_norm"),
    "rehearsal_target": ("label", "teacher", "teacher_seen", "label_teacher"),
    "replay_epoch_length": ("longer", "shorter"),
    "student_bn": ("average", "new"),
    "replay_bn": ("joint", "split"),
    "logit_mask": ("none", "seen"),
    "teacher_mode": ("eval", "student"),
    "replay_optimizer": ("fresh", "continue"),
    "replay_lr_schedule": LR_SCHEDULES,
    "mmd_kind": ("mean", "gaussian"),
    "sampler": ("dpm", "dpm_sde", "ddim"),
    "student_init": ("average", "ema", "fresh"),
    "distill_targets": ("split", "both"),
    "cpsd_order": ("after_generator", "before_generator"),
    "kappa_schedule": ("constant", "balanced"),
    "generator_lr_schedule": LR_SCHEDULES,
    "generator_replay_weighting": ("fraction", "balanced", "task"),
    "generator_distill_source": ("pool", "fresh"),
    "generator_replay_loss": ("distill", "ldm"),
    "replay_draw": ("redraw", "once"),
    "replay_pixel_match": ("none", "class_histogram", "class_mean_histogram"),
    "replay_classes": ("old", "seen"),
    "replay_filter": ("none", "teacher"),
    "generator_memory_format": ("contiguous", "channels_last"),
    "generator_last_experience": ("train", "skip"),
    "generator_scope": ("continual", "per_experience"),
    "guidance_draw": ("image", "batch"),
}


#: What the original DR-CPSD code sets (isaacNingLee/CPSD at 769e79b, read line by line on 2026-12-02: its
#: ``main.py``, ``manager/manager.py``, ``backbone/backbone.py``, ``backbone/train.py``, ``cpsd/train_cpsd.py``,
#: ``cpsd/cpsd.py`` and ``scripts/run_cifar10.sh``, the CIFAR-10 run: the ``anneal`` trainer with
#: ``--anti_discrim --shared_gen_replay``, 6000 images per class). Every field with a counterpart there; the
#: fields of the offline generator's training (``generator_*``, ``unet_*``, ``patch_size``, ...) have none, since
#: the original samples a frozen Stable Diffusion, and keep their defaults. How the code was read where it does
#: not run as written:
#:
#: * ``cpsd_lr``: ``learning_rate`` is assigned only under ``--cpsd_scale_lr`` (1e-4 x batch 4 = 4e-4); without it
#:   ``cpsd/train_cpsd.py`` stops with an ``UnboundLocalError`` (l. 202-218).
#: * ``--method=cpsd`` builds ``CosineContrastiveLoss``, whose class is commented out (l. 89-118, 358): the loss is
#:   read as the min-SNR LDM loss plus 0.003 x the batch-sum match (l. 403-423), the terms that do run; the
#:   contrastive term is off by default (``--cpsd_contrastive_loss``).
#: * Its CIFAR scripts pass ``--method=ti`` or ``sd``, not ``cpsd``; the preset is the CPSD method (the paper's),
#:   with the replay and classifier settings of ``run_cifar10.sh``.
#:
#: Not options here, so still differences (README, the notes under the parameter table): per-image BLIP-2 captions
#: (no captioning model offline: ``captions_file`` takes captions per class from the user, which CPSD and sampling
#: use as the original does, :mod:`~avalanche_drcpsd.captions`); the guidance scale drawn once per generation batch
#: (here per image); VAE latents sampled (with Stable
#: Diffusion: ``generator_options={"vae_latent": "sample"}``, which the preset cannot set for the offline
#: generator); its classifier's own recipe (ResNet-18, SGD lr 0.1 without momentum), which is the
#: strategy's, not this config's; and its bugs (duplicate file names halve the synthetic set, ``manager.py`` l.
#: 598-605).
REFERENCE: Dict[str, Any] = {
    "prompt_template": "{}",  # the class name (plus a BLIP-2 caption, not available offline)
    "projection": "reference", "cpsd_epochs": 1, "cpsd_lr": 4e-4, "cpsd_weight_decay": 0.01, "cpsd_batch_size": 4,
    "cpsd_max_images_per_class": None, "cpsd_augment": "reference", "lambda_mmd": 0.003, "mmd_kind": "mean",
    "snr_gamma": 5.0, "cpsd_order": "before_generator",
    "sampler": "dpm", "sampling_steps": 20, "guidance_scale": (5.0, 9.0), "guidance_draw": "batch",
    "replay_draw": "once", "replay_pixel_match": "none", "replay_classes": "seen", "replay_filter": "none",
    "n_replay_per_class": 6000,
    "replay_augment": "reference", "replay_bn": "joint", "replay_epochs": 1, "replay_epoch_length": "shorter",
    "replay_min_steps": 0,
    "replay_batch_real": 16, "replay_batch_syn": 16, "rehearsal_batch_syn": 0, "replay_lr": None,
    "replay_optimizer": "continue", "replay_lr_schedule": "constant",
    "replay_grad_clip": None, "kappa": 0.05, "kappa_schedule": "constant", "pi": 0.5, "distill_old_weight": 0.5,
    "distill_targets": "both", "replay_kd_weight": 0.0, "student_init": "average", "student_bn": "new",
    "replay_step_ema": None, "logit_mask": "seen", "teacher_mode": "student",
}

#: named starting points for :meth:`DRCPSDConfig.from_dict` (``"preset": "<name>"``)
PRESETS: Dict[str, Dict[str, Any]] = {"reference": REFERENCE}


@dataclass
class DRCPSDConfig:
    """Hyper-parameters of DR-CPSD (strategy-level knobs such as epochs and batch size stay on the strategy).

    Groups: *CPSD embedding* (projection of the frozen text encoder's token states), *generator* (the
    class-conditioned diffusion model), *sampling*, *dream replay* (student, isolation and distillation losses).
    """

    # --- CPSD embedding -------------------------------------------------------------------------------
    prompt_template: str = "a photo of a {}"
    #: *package* (the original captions every image with BLIP-2): a JSON or tab-separated text file of captions per
    #: class (:mod:`~avalanche_drcpsd.captions`). CPSD trains each class's projection on "<class prompt>,
    #: <caption>" prompts (a random caption per image and step) and sampling draws one caption per image. None: one
    #: prompt per class. Read when the generator plugin is built.
    captions_file: Optional[str] = None
    #: ``token``: Linear(L, L) across the token positions (the paper's description); ``hidden``: Linear(D, D) per
    #: token; ``reference``: the original code's ``Linear(77, 77)`` on ``h.reshape(-1, 77)``, runs of 77
    #: consecutive hidden values (:class:`~avalanche_drcpsd.cpsd.CPSDProjection`).
    projection: str = "token"
    cpsd_epochs: int = 1
    #: *package*: at least this many CPSD optimiser steps per class, whatever ``cpsd_epochs`` makes of the class's
    #: images (the passes go on over reshuffled images and stop at the step); 0: ``cpsd_epochs`` passes only. A
    #: few-shot class (5 images, batch 64) is one step per epoch: count its training in steps instead.
    cpsd_min_steps: int = 0
    #: AdamW learning rate of the projection. The original code's is ``--cpsd_learning_rate`` (1e-4) times the
    #: batch size (4) under ``--cpsd_scale_lr``, 4e-4; without that flag its ``learning_rate`` is never assigned and
    #: training stops with an error (``cpsd/train_cpsd.py`` l. 202-218 at 769e79b), so 4e-4 is how it runs.
    cpsd_lr: float = 1e-4
    #: AdamW weight decay of the projection (the original code: 0.01).
    cpsd_weight_decay: float = 0.0
    cpsd_batch_size: int = 4
    #: ``reference``: the original code's CPSD training augmentation (random resized crop of 60-100% of the area,
    #: horizontal flip; :func:`~avalanche_drcpsd.augment.reference_cpsd_augment`); ``none``: the images as they are.
    cpsd_augment: str = "none"
    #: *package*: cap on the real images of a class seen by the CPSD phase (None: all of them).
    cpsd_max_images_per_class: Optional[int] = None
    #: lambda in L_CPSD = L_LDM + lambda * L_MMD (Real-Fake, Yuan et al. 2024).
    lambda_mmd: float = 0.003
    #: ``mean``: the reference's mean match (linear-kernel MMD); ``gaussian``: multi-bandwidth RBF MMD^2.
    mmd_kind: str = "mean"
    #: gamma of the min-SNR loss weighting (Hang et al. 2023).
    snr_gamma: float = 5.0
    #: *package*: run the CPSD phase after the generator phase (a from-scratch generator must first learn the
    #: class for the projection to have a denoiser to fit) or before it (the paper's order, for a frozen SD).
    cpsd_order: str = "after_generator"

    # --- generator ----------------------------------------------------------------------------------
    #: ``unet``: the offline class-conditioned diffusion model trained on the stream (*package*);
    #: ``stable_diffusion``: a frozen pretrained pipeline loaded from ``generator_path``.
    generator: str = "unet"
    #: Load a saved generator (``save_pretrained`` directory) instead of building a fresh one.
    generator_path: Optional[str] = None
    #: Text encoder spec for :func:`avalanche_drcpsd.text_encoders.load_text_encoder` (None: offline default, or
    #: the pipeline's own ``text_encoder/`` + ``tokenizer/`` with ``generator="stable_diffusion"``).
    text_encoder: Optional[Dict[str, Any]] = None
    #: *package*, ``stable_diffusion`` only: options of ``StableDiffusionGenerator.from_pretrained`` (``torch_dtype``
    #: e.g. ``"bfloat16"``, ``resolution``, ``compile_unet``, ``offload``, ``attention``, ``variant``,
    #: ``vae_batch_size``). None: float32, the pipeline's native resolution, no compile, no offload.
    generator_options: Optional[Dict[str, Any]] = None
    #: *package*: space-to-depth factor of the pixel-space UNet (1: plain pixels; 2: 2x2 patches as channels).
    patch_size: int = 2
    unet_block_out_channels: Tuple[int, ...] = (32, 64, 64)
    unet_layers_per_block: int = 1
    unet_attention_head_dim: int = 8
    num_train_timesteps: int = 1000
    #: *package*: DDPM's linear schedule; the cosine one ends at abar_T = 2.4e-9, whose 1/sqrt(abar_T) = 20 000
    #: amplifies epsilon errors at the first sampling step beyond what x0 clipping can save.
    beta_schedule: str = "linear"
    #: *package*: optimiser steps of the generator phase per experience.
    generator_steps: int = 500
    #: *package*: steps of the first generator phase, which trains a generator from scratch (the later phases
    #: start from a trained one and learn only their new classes); None: ``generator_steps``.
    generator_first_steps: Optional[int] = None
    #: *package*: ``continual``: one generator learns every experience in turn (each phase starts from the
    #: weights the last one left); ``per_experience``: each experience's classes are learned by a generator built
    #: from scratch for them (seeded by ``seed`` plus the experience index; ``generator_first_steps`` steps each)
    #: and frozen after its classes' sets are drawn: nothing to forget and no teacher, the design alternative of
    #: issue 13. It needs ``replay_draw="once"`` (an old class's set is drawn from the generator that learned it,
    #: before the next one replaces it; a later experience could not redraw it), no generative distillation and
    #: ``cpsd_order="after_generator"`` (the new classes' embeddings are fitted on their own generator). Only the
    #: newest generator is held: the older ones are represented by their kept sets, which the run's memory counts.
    generator_scope: str = "continual"
    generator_batch_size: int = 128
    generator_lr: float = 1e-3
    #: weight of generative distillation (Masip et al.): MSE between the new and the previous generator's
    #: noise predictions on old-class samples and embeddings.
    generator_distill_weight: float = 1.0
    #: *package*: share of each generator batch taken by old-class replay samples (when there are old classes);
    #: matching a teacher needs fewer samples than learning a class, so the new classes keep half the batch.
    generator_replay_fraction: float = 0.5
    #: *package*: how each generator step splits its batch between the new classes' real images and the old
    #: classes' replay: ``fraction`` (``generator_replay_fraction`` of one batch, whatever the class counts);
    #: ``balanced`` (every seen class an equal share of one batch: |old|/|seen| of it is replay); ``task`` (a
    #: replay batch as large as the real one, the terms weighted 1/(t+1) and (1 - 1/(t+1)) *
    #: ``generator_distill_weight`` at experience t, the generative-distillation recipe as issue 13 describes it).
    generator_replay_weighting: str = "fraction"
    #: *package*: where the distilled old-class inputs come from: ``pool`` (the replay set drawn once at the
    #: start of the experience, with the sampling settings) or ``fresh`` (the frozen teacher generates a new
    #: batch at every step with ``generator_teacher_steps`` DDIM steps, eta 0, no guidance).
    generator_distill_source: str = "pool"
    generator_teacher_steps: int = 2
    #: *package*: how the generator learns the old classes' replay inputs (the replay term, weighted
    #: ``generator_distill_weight``): ``distill`` regresses its noise predictions onto the frozen teacher's
    #: (generative distillation, Masip et al. 2023); ``ldm`` trains on them as on real images, the denoising loss
    #: towards the noise that was added (deep generative replay, Shin et al. 2017): with ``pool`` inputs no
    #: teacher is built.
    generator_replay_loss: str = "distill"
    #: *package*: clip the generator's gradient norm at this value (None: no clipping).
    generator_grad_clip: Optional[float] = None
    #: *package*: learning-rate schedule of each generator phase: ``constant``, or ``cosine`` decay to 0 after
    #: ``generator_warmup_steps`` linear warm-up steps.
    generator_lr_schedule: str = "constant"
    generator_warmup_steps: int = 0
    #: *package*: exponential moving average of the generator's weights during each generator phase (diffusers'
    #: ``EMAModel`` with warm-up; this is its largest decay; 0: off). At the end of the phase the averaged weights
    #: replace the live ones: they are the weights sampled, saved, and used as the next experience's teacher.
    generator_ema_decay: float = 0.0
    #: *package*: memory format of the generator's UNet weights (``channels_last``: NHWC, the layout cuDNN's
    #: tensor cores and oneDNN prefer; the values and the saved files do not change). On a 2-core CPU
    #: a training step of the CPU profiles' UNet took 1.5% less time, within the noise (interleaved steps,
    #: ``results/generator/README.md``), so the CPU profiles keep ``contiguous``; a GPU figure is owed.
    generator_memory_format: str = "contiguous"
    #: *package*: ``skip`` leaves out the generator and CPSD phases of the last experience of the stream being
    #: trained (the one whose ``current_experience`` is its ``origin_stream``'s last): with ``replay_classes="old"``
    #: nothing replays its classes, so the classifier is the same bit for bit and the run saves a generator phase.
    #: Its classes then stay unknown to the generator (no samples, no kept set, no real-vs-synthetic gap), and an
    #: experience trained after it is refused. ``train``: every experience's classes are learned (a generator that
    #: can continue, or be used on its own, after the stream).
    generator_last_experience: str = "train"
    #: probability of replacing the condition by the empty prompt's embedding (classifier-free guidance).
    cond_dropout: float = 0.1
    #: *package*: offset noise in the generator phase (diffusers' training scripts' ``--noise_offset``, Guttenberg
    #: 2023): each training image's noise gains ``generator_noise_offset`` times one normal draw per image and colour
    #: channel, constant over the image (:meth:`~avalanche_drcpsd.generator.Generator.constant_noise`), so the
    #: denoiser learns to move an image's overall brightness, which white noise alone barely perturbs. 0: none.
    generator_noise_offset: float = 0.0

    # --- sampling -------------------------------------------------------------------------------------
    #: ``dpm`` (DPM-Solver++ 2M), *package* ``dpm_sde`` (its stochastic form: fresh noise at every step, from
    #: each class's sampling stream) or ``ddim`` (eta 0).
    sampler: str = "dpm"
    sampling_steps: int = 20
    #: a fixed scale, or ``(low, high)``: a scale drawn from U(low, high) per image (reference: U(5, 9)).
    guidance_scale: Union[float, Tuple[float, float]] = (5.0, 9.0)
    #: with a ``(low, high)`` guidance scale: ``image`` draws one scale per sampled image (*package*), ``batch``
    #: one per generation batch of ``sample_batch_size`` images, as the original code does (``np.random.uniform(5,
    #: 9)`` per pipeline call, ``manager/manager.py`` l. 587).
    guidance_draw: str = "image"
    #: *package*: ``(low, high)``: guidance only at the sampling steps whose timestep ``t`` has ``low <= t / T <=
    #: high`` (``T`` = ``num_train_timesteps``), the conditional prediction alone at the others (Kynkaanniemi et al.,
    #: 2024: guidance at the noisiest steps narrows the samples); None: every step (the reference).
    guidance_interval: Optional[Tuple[float, float]] = None
    sample_batch_size: int = 256
    #: *package*: directory of the synthetic-set cache (``<dir>/task_<k>/<class>/<idx>.png`` + ``manifest.json``,
    #: see :mod:`avalanche_drcpsd.synthetic_cache`); a replay set is reused when its manifest matches. None: off.
    synthetic_cache_dir: Optional[str] = None
    #: ``once``: a class's set is drawn once, at the start of the experience after it was learned (from the
    #: generator as it was right after learning it), and kept for every later experience (the kept sets count in
    #: the run's memory), as the original code's ``--shared_gen_replay`` keeps each task's samples in one folder;
    #: ``redraw``: at every experience each old class's set is drawn again from the generator as it now is (the
    #: original without that flag; this package's default until 2026-12-05). ``once`` measured better: the
    #: generator forgets, the sets it drew right after learning a class do not (``results/generator/README.md``,
    #: ``once_ema_heads1`` against ``profile``; ``results/split_mnist/notes.md``).
    replay_draw: str = "once"
    #: *package*: ``class_histogram`` maps each class's drawn replay set, channel by channel, onto the pixel-value
    #: histogram of that class's real training images, recorded in the generator phase that learned it (2 KB per
    #: class, counted with the kept sets in the run's memory; :mod:`avalanche_drcpsd.histogram`). The offline
    #: generator's sets are brighter and hazier than the real images, and a classifier tells them apart; matched,
    #: they are harder to tell apart, which is what lets old classes' sets be rehearsed in the classifier phase
    #: (``rehearsal_batch_syn``; ``results/replay/README.md``, "Histogram-matched kept sets"). ``class_mean_histogram``
    #: first shifts each class's set, pixel by pixel, so that its mean image is the mean image of the class's real
    #: training images (recorded with the histogram: 4 bytes per pixel and channel, 3 KB for a 28 x 28 class), then
    #: matches the histogram: the histogram fixes how bright the pixels are, the mean image where they are bright on
    #: average. ``none`` (the reference): the sets as the generator drew them.
    replay_pixel_match: str = "none"

    # --- dream replay ---------------------------------------------------------------------------------
    #: which classes the synthetic half of the replay batches holds: ``old`` (the classes of earlier experiences,
    #: as DR-CPSD's description and this package's REFERENCE.md state it) or *package* ``seen`` (old and current
    #: classes, drawn after the generator learned the current ones, so the CE on synthetic images covers every
    #: seen class: the original code's ``--shared_gen_replay`` mode, README's parameter table).
    replay_classes: str = "old"
    #: *package*: ``teacher`` drops each synthetic image that its teacher does not assign to its class (the old
    #: teacher judges old classes, the new teacher, trained on the current real data, current ones) before
    #: replay; a class none of whose images survive keeps them all. ``none``: every image is replayed.
    replay_filter: str = "none"
    n_replay_per_class: int = 6000
    #: *package* ``none``: synthetic images replayed as the generator made them; ``reference``: what the original
    #: code does to them, a JPEG round trip at PIL's default quality 75 when they are drawn (it saves its samples
    #: as .jpeg) and, in every replay batch, its classifier's training transforms per image (ColorJitter(0.4,
    #: 0.4, 0.2, 0.1), horizontal flip, random resized crop of 60-100%; ``manager/manager.py`` l. 57-62). The
    #: original applies the same transforms to its real images; here real images get the benchmark's own train
    #: transform. *Package* ``shift``: each synthetic image of every replay batch translated by up to 2 pixels on
    #: each axis (border replicated, :func:`~avalanche_drcpsd.augment.random_shift`), ``shift_flip``: that and a
    #: left-right flip with probability 0.5 (for classes a mirror does not change, not digits); no JPEG step.
    replay_augment: str = "none"
    #: how BatchNorm sees each paired replay batch. ``joint``: one forward pass of the synthetic and real images
    #: together, whose batch statistics normalise both halves and update the running statistics (the original
    #: code: ``self(x_cat)`` on ``torch.cat([x, gen_x])``, ``backbone/backbone.py`` ``observe``). *Package*
    #: ``split``: the two halves forwarded apart, each normalised by its own batch statistics, and only the real
    #: half updating the running statistics that test images are normalised with (domain-specific normalisation
    #: of the synthetic images, as in AdaBN, Li et al. 2016); no difference for a model without BatchNorm.
    replay_bn: str = "joint"
    replay_epochs: int = 1
    #: one replay epoch is ``longer``: as many paired batches as the longer of the two sets (the other cycles), or
    #: ``shorter``: the original code's ``zip(real, synthetic)`` (``backbone/train.py`` l. 372), which stops with the
    #: shorter one.
    replay_epoch_length: str = "longer"
    #: *package*: at least this many optimiser steps per replay phase, reached by adding epochs (0: off, the
    #: reference's fixed ``replay_epochs``). Small experiences need it: one epoch of 13 paired batches left the
    #: averaged student unfitted.
    replay_min_steps: int = 0
    replay_batch_real: int = 16
    replay_batch_syn: int = 16
    #: *package*: this many images of the old classes' replay sets (the kept sets with ``replay_draw="once"``)
    #: appended to every minibatch of the classifier phase, as Avalanche's ``GenerativeReplayPlugin`` appends its
    #: generator's images, before dream replay runs as usual. 0 (DR-CPSD, the reference: "the classifier first
    #: trains on the current task's real data alone"): no synthetic image reaches the classifier phase.
    rehearsal_batch_syn: int = 0
    #: what the rehearsed images are trained towards: ``label`` (CE on their class, appended to the minibatch) or
    #: ``teacher`` (the old teacher's old-class logits, distilled at ``replay_kd_temperature`` in a forward pass of
    #: their own: generative replay with distillation, van de Ven et al. 2020's "DGR+distill"), ``teacher_seen``
    #: (the same over every seen class, the current experience's included: the old teacher's low logits for classes
    #: it never saw), or ``label_teacher`` (both: joined to the minibatch, and its outputs for them distilled
    #: towards the old teacher's old-class logits).
    rehearsal_target: str = "label"
    #: *package*: the weight of the old teacher's distillation on the rehearsed images (``rehearsal_target``
    #: ``teacher``, ``teacher_seen`` or ``label_teacher``); 1 weighs it like the minibatch's CE.
    rehearsal_kd_weight: float = 1.0
    #: *package*: after each replay phase, ``weight_norm`` scales the head's rows (weights and bias) of the
    #: experience's new classes by the mean weight norm of the old classes' rows over theirs (weight aligning,
    #: Zhao et al., CVPR 2020), against the bias of the last-trained classes; ``none`` (the reference): no step.
    replay_head_align: str = "none"
    #: None: the classifier's own learning rate (a fresh optimiser of the same class and settings).
    replay_lr: Optional[float] = None
    #: the replay optimiser's learning rate over the phase: ``constant`` (the reference: its annealing phase steps
    #: a per-epoch ``MultiStepLR`` whose milestone, ``c_epochs - 10``, ``run_cifar10.sh``'s ``c_epochs=1`` never
    #: reaches; ``backbone/train.py`` l. 264-265, 402) or *package* ``cosine``: annealed from its rate to 0 over
    #: the phase's optimiser steps (diffusers' ``get_scheduler("cosine")``), so that the student the phase ends
    #: with is not a snapshot taken at full rate. With ``replay_optimizer="continue"`` the strategy optimiser's
    #: rates are restored after the phase.
    replay_lr_schedule: str = "constant"
    #: *package*: clip the student's gradient norm during replay (None: off, as in the reference).
    replay_grad_clip: Optional[float] = None
    #: weight of the real-data CE in the isolation loss CE(syn) + kappa * CE(real).
    kappa: float = 0.05
    #: *package*: ``constant`` (the reference) uses ``kappa`` as is; ``balanced`` uses
    #: ``kappa * |new classes| / |old classes|`` at each experience (:func:`~avalanche_drcpsd.losses.balanced_kappa`).
    kappa_schedule: str = "constant"
    #: weight of the new teacher in w_old * MSE(h_s, h_old) + pi * MSE(h_s, h_new) (the paper: 1; the original code:
    #: 0.5, ``backbone/backbone.py`` l. 436, with ``mem_alpha = 0.5``).
    pi: float = 1.0
    #: weight w_old of the old teacher's term (the paper: 1; the original code: 0.5).
    distill_old_weight: float = 1.0
    #: ``split``: the old teacher sees the synthetic half, the new teacher the real half; ``both``: each
    #: teacher sees the whole paired batch.
    distill_targets: str = "split"
    #: *package*: weight of the old teacher's logit distillation (KD over the old classes' logits, on the whole
    #: paired batch, temperature ``replay_kd_temperature``) added to the replay loss; 0 (off) as in the reference.
    replay_kd_weight: float = 0.0
    replay_kd_temperature: float = 2.0
    #: the replay student's initial weights: ``average`` of the two teachers (the paper and the original code),
    #: *package* ``ema``: :math:`(1-\alpha)\theta_{old}+\alpha\theta_{new}` (``ema_alpha``), or *package*
    #: ``fresh``: newly initialised (the model's own ``reset_parameters``, seeded by ``seed`` and the experience),
    #: so that hidden units the classifier phase killed in the new teacher are not inherited; the teachers'
    #: distillation terms are unchanged.
    student_init: str = "average"
    ema_alpha: float = 0.1
    #: BatchNorm running statistics of the initial student: ``new``: the new teacher's, as the original code
    #: leaves them (it averages ``parameters()`` only, ``backbone/backbone.py`` l. 292-298), or *package*
    #: ``average`` of the two teachers' (like the weights). ``new`` is the default since 2026-12-02: no
    #: measurement favours ``average`` (``results/replay/README.md``: +0.9 and +1.4 points for ``new``, within the
    #: seeds' spread); the CPU profiles whose results were made before pin ``average``.
    student_bn: str = "new"
    #: per-step EMA of the student during replay, theta <- a * theta_after_step + (1 - a) * theta_before_step with
    #: this ``a`` (the original code's ``--c_ema``, alpha 0.1, off by default; ``backbone/train.py`` l. 374-388).
    #: None: off.
    replay_step_ema: Optional[float] = None
    #: ``seen``: the classifier's logits of classes not seen yet are masked out (set to -1e4,
    #: :data:`~avalanche_drcpsd.plugins.logit_mask.MASKED_LOGIT`) in training, replay and
    #: evaluation, as the original code slices ``fc(z)[:, :class_range]`` (``backbone/backbone.py`` l. 257);
    #: ``none``: every output counts.
    logit_mask: str = "none"
    #: mode of the two teachers during replay: ``eval`` (BatchNorm uses its running statistics) or ``student``:
    #: the student's mode, as in the original code, whose teachers are submodules of the student (train mode:
    #: batch statistics, and the teachers' running statistics move).
    teacher_mode: str = "eval"
    #: ``fresh``: replay gets a new optimiser of the strategy optimiser's class and settings (``replay_lr``);
    #: ``continue``: the strategy's optimiser itself continues into replay, as in the original code
    #: (``backbone/train.py`` l. 264-265).
    replay_optimizer: str = "fresh"

    # --- gap metric (MMDPlugin) ------------------------------------------------------------------------
    #: *package*: synthetic and real images per class for the real-vs-synthetic MMD metric (0: off).
    gap_samples_per_class: int = 64

    # --- the classifier's input images ----------------------------------------------------------------------
    #: *package*: how the benchmark's images relate to pixels in [0, 1] (the generator learns in its own [-1, 1]
    #: space, and its samples are handed to the classifier in the real images' space). ``input_range=(low, high)``:
    #: pixel 0 is ``low`` and pixel 1 ``high`` in every channel; ``input_mean``/``input_std`` (one value per channel,
    #: or one for all): the images went through ``Normalize(mean, std)`` after ``ToTensor()``, as Avalanche's
    #: classic benchmarks do by default. All None: learned from the first experience
    #: (:class:`~avalanche_drcpsd.input_space.InputSpace`): a torchvision ``Normalize`` in its transforms, else
    #: images in [0, 1] are taken as pixels, else each channel's minimum and maximum are pixel 0 and 1. Images
    #: outside the range are refused with an error naming the range seen.
    input_range: Optional[Tuple[float, float]] = None
    input_mean: Optional[Tuple[float, ...]] = None
    input_std: Optional[Tuple[float, ...]] = None

    # --- run --------------------------------------------------------------------------------------------
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.synthetic_cache_dir, os.PathLike):
            self.synthetic_cache_dir = os.fspath(self.synthetic_cache_dir)
        self.unet_block_out_channels = _as_int_tuple("unet_block_out_channels", self.unet_block_out_channels)
        for name in ("guidance_scale", "guidance_interval"):  # pairs of numbers, kept as tuples
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, tuple(float(_number(name, v)) for v in value))
        for name in ("input_range", "input_mean", "input_std"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (int, float)) and name != "input_range":
                    value = (value,)
                if not isinstance(value, (list, tuple)) or not value:
                    raise ConfigError(f"{name}={value!r} must be a list of numbers (or None: learned from the data)")
                setattr(self, name, tuple(_number(name, v) for v in value))
        self.validate()

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> "DRCPSDConfig":
        """Check every field; raise :class:`ConfigError` naming the first bad one."""
        replay = set(ReplayConfig.FLAT.values())  # the dream-replay group checks its own fields
        for name, choices in CHOICES.items():
            if name not in replay:
                _check_choice(name, getattr(self, name), choices)
        ReplayConfig.from_config(self)
        check_prompt_template(self.prompt_template)
        for name in ("cpsd_epochs", "cpsd_batch_size", "num_train_timesteps", "generator_batch_size",
                     "sampling_steps", "sample_batch_size", "unet_layers_per_block", "unet_attention_head_dim",
                     "patch_size", "generator_teacher_steps"):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("generator_steps", "gap_samples_per_class", "generator_warmup_steps", "cpsd_min_steps"):
            _int_at_least(name, getattr(self, name), 0)
        if self.cpsd_max_images_per_class is not None:
            _int_at_least("cpsd_max_images_per_class", self.cpsd_max_images_per_class, 1)
        if self.generator_first_steps is not None:
            _int_at_least("generator_first_steps", self.generator_first_steps, 0)
        for name in ("cpsd_lr", "generator_lr", "snr_gamma"):
            _positive(name, getattr(self, name))
        if self.generator_grad_clip is not None:
            _positive("generator_grad_clip", self.generator_grad_clip)
        d = _number("generator_ema_decay", self.generator_ema_decay)
        if not 0.0 <= d < 1.0:
            raise ConfigError(f"generator_ema_decay={d!r} must be in [0, 1) (0: no EMA)")
        for name in ("lambda_mmd", "generator_distill_weight", "cpsd_weight_decay", "generator_noise_offset"):
            _non_negative(name, getattr(self, name))
        for name in ("cond_dropout",):
            v = _number(name, getattr(self, name))
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{name}={v!r} must be in [0, 1)")
        v = _number("generator_replay_fraction", self.generator_replay_fraction)
        if not 0.0 < v < 1.0:
            raise ConfigError(f"generator_replay_fraction={v!r} must be in (0, 1)")
        if self.generator_scope == "per_experience":
            needs = {"replay_draw": "once", "cpsd_order": "after_generator", "generator": "unet",
                     "generator_distill_weight": 0, "generator_path": None}
            for name, want in needs.items():
                if getattr(self, name) != want:
                    raise ConfigError(f"generator_scope='per_experience' with {name}={getattr(self, name)!r}: a "
                                      f"generator per experience needs {name}={want!r} (each offline generator "
                                      "learns its own classes from scratch, with no teacher and no pretrained "
                                      "weights; their sets and embeddings come from it, and the next experience "
                                      "replaces it)")
        if self.generator_last_experience == "skip" and self.replay_classes == "seen":
            raise ConfigError("generator_last_experience='skip' with replay_classes='seen': the last experience's "
                              "replay draws its own classes from the generator its generator phase trains; use "
                              "replay_classes='old' or generator_last_experience='train'")
        if self.input_range is not None:
            if len(self.input_range) != 2 or not self.input_range[0] < self.input_range[1]:
                raise ConfigError(f"input_range={self.input_range!r} must be (low, high) with low < high: the values "
                                  "of pixel 0 and pixel 1 in the classifier's input")
            if self.input_mean is not None or self.input_std is not None:
                raise ConfigError("input_range with input_mean/input_std: give one description of the images, the "
                                  "range or the Normalize(mean, std) they went through")
        if (self.input_mean is None) != (self.input_std is None):
            raise ConfigError(f"input_mean={self.input_mean!r} with input_std={self.input_std!r}: give both (the "
                              "Normalize(mean, std) the images went through) or neither")
        if self.input_std is not None:
            if any(v <= 0 for v in self.input_std):
                raise ConfigError(f"input_std={self.input_std!r} must be > 0 in every channel")
            if len(self.input_mean) != len(self.input_std) and 1 not in (len(self.input_mean), len(self.input_std)):
                raise ConfigError(f"input_mean={self.input_mean!r} and input_std={self.input_std!r}: one value per "
                                  "channel each (or one for all channels)")
        g = self.guidance_scale
        if isinstance(g, tuple):
            if len(g) != 2 or not g[0] <= g[1] or g[0] < 0:
                raise ConfigError(f"guidance_scale={g!r} must be a number >= 0 or a pair (low, high) "
                                  "with 0 <= low <= high")
        else:
            _non_negative("guidance_scale", g)
        gi = self.guidance_interval
        if gi is not None and (not isinstance(gi, tuple) or len(gi) != 2 or not 0 <= gi[0] < gi[1] <= 1):
            raise ConfigError(f"guidance_interval={gi!r}: expected None or a pair (low, high) of fractions of the "
                              "training timesteps with 0 <= low < high <= 1")
        if not all(c >= 8 and c % 8 == 0 for c in self.unet_block_out_channels):
            raise ConfigError(
                f"unet_block_out_channels={self.unet_block_out_channels!r}: each entry must be a multiple of 8 "
                "(the UNet's GroupNorm uses 8 groups)"
            )
        if len(self.unet_block_out_channels) > 4:
            raise ConfigError(f"unet_block_out_channels={self.unet_block_out_channels!r}: at most 4 levels")
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ConfigError(
                f"beta_schedule={self.beta_schedule!r}; expected 'linear', 'scaled_linear' or 'squaredcos_cap_v2'"
            )
        if self.generator == "stable_diffusion" and not self.generator_path:
            raise ConfigError("generator='stable_diffusion' needs generator_path: a local diffusers pipeline directory")
        for name in ("generator_path", "captions_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (str, os.PathLike)) or "\x00" in os.fspath(value)):
                raise ConfigError(f"{name}={value!r} must be a path")
        if self.text_encoder is not None and not isinstance(self.text_encoder, dict):
            raise ConfigError(f"text_encoder={self.text_encoder!r} must be a dict spec or None")
        _check_generator_options(self.generator_options, self.generator)
        if self.synthetic_cache_dir is not None:
            if not isinstance(self.synthetic_cache_dir, str) or not self.synthetic_cache_dir \
                    or "\x00" in self.synthetic_cache_dir:
                raise ConfigError(f"synthetic_cache_dir={self.synthetic_cache_dir!r} must be a non-empty path or None")
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"device={self.device!r}; expected 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return self

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def reference(cls, **overrides: Any) -> "DRCPSDConfig":
        """The original code's settings (:data:`REFERENCE`), then ``overrides``; e.g.
        ``DRCPSDConfig.reference(generator="stable_diffusion", generator_path="/weights/miniSD")``."""
        return cls.from_dict({"preset": "reference", **overrides})

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "DRCPSDConfig":
        """Build from a plain dict (JSON); an unknown key raises :class:`ConfigError` listing the valid ones.
        ``"preset": "reference"`` starts from :data:`REFERENCE` (the original code's settings) instead of the
        defaults; the other keys override it."""
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a JSON object/dict, got {type(values).__name__}")
        if "preset" in values:
            values = dict(values)
            preset = values.pop("preset")
            if not isinstance(preset, str) or preset not in PRESETS:
                raise ConfigError(f"preset={preset!r} is not valid; expected one of {list(PRESETS)}")
            values = {**PRESETS[preset], **values}
        return build_from_fields(cls, values, "config")

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "DRCPSDConfig":
        """Read a JSON file (plain data only; nothing in a config is ever executed)."""
        return cls.from_dict(read_json(path, "config file"))

    def replace(self, **changes: Any) -> "DRCPSDConfig":
        """A validated copy with some fields changed."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["unet_block_out_channels"] = list(self.unet_block_out_channels)
        for name in ("guidance_scale", "guidance_interval"):
            if isinstance(d[name], tuple):
                d[name] = list(d[name])
        for name in ("input_range", "input_mean", "input_std"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d


def _flat_default(name: str) -> Any:
    """The default of :class:`DRCPSDConfig`'s field ``name`` (a group's fields take their flat field's)."""
    return DRCPSDConfig.__dataclass_fields__[name].default


@dataclass
class ReplayConfig:
    """The dream-replay group: the settings of :class:`~avalanche_drcpsd.plugins.DreamReplayPlugin`, under its own
    keyword names, validated here and nowhere else (:meth:`validate`, run on construction).

    In :class:`DRCPSDConfig` (and the JSON files) the same settings are flat fields: :data:`ReplayConfig.FLAT` maps
    each field here to its name there, :meth:`from_config` reads them, and an error names the field as the caller
    wrote it. What each setting does, and its default: the field of the same flat name in :class:`DRCPSDConfig`.
    """

    n_replay_per_class: int = _flat_default("n_replay_per_class")
    replay_classes: str = _flat_default("replay_classes")
    replay_filter: str = _flat_default("replay_filter")
    replay_epochs: int = _flat_default("replay_epochs")
    min_steps: int = _flat_default("replay_min_steps")
    batch_real: int = _flat_default("replay_batch_real")
    batch_syn: int = _flat_default("replay_batch_syn")
    rehearsal_batch: int = _flat_default("rehearsal_batch_syn")
    rehearsal_target: str = _flat_default("rehearsal_target")
    rehearsal_kd_weight: float = _flat_default("rehearsal_kd_weight")
    head_align: str = _flat_default("replay_head_align")
    kappa: float = _flat_default("kappa")
    kappa_schedule: str = _flat_default("kappa_schedule")
    pi: float = _flat_default("pi")
    distill_old_weight: float = _flat_default("distill_old_weight")
    student_init: str = _flat_default("student_init")
    ema_alpha: float = _flat_default("ema_alpha")
    student_bn: str = _flat_default("student_bn")
    step_ema: Optional[float] = _flat_default("replay_step_ema")
    epoch_length: str = _flat_default("replay_epoch_length")
    augment: str = _flat_default("replay_augment")
    bn: str = _flat_default("replay_bn")
    teacher_mode: str = _flat_default("teacher_mode")
    optimizer: str = _flat_default("replay_optimizer")
    replay_lr: Optional[float] = _flat_default("replay_lr")
    lr_schedule: str = _flat_default("replay_lr_schedule")
    grad_clip: Optional[float] = _flat_default("replay_grad_clip")
    kd_weight: float = _flat_default("replay_kd_weight")
    kd_temperature: float = _flat_default("replay_kd_temperature")
    seed: int = _flat_default("seed")

    #: field here -> field of :class:`DRCPSDConfig`
    FLAT = {"n_replay_per_class": "n_replay_per_class", "replay_classes": "replay_classes",
            "replay_filter": "replay_filter", "replay_epochs": "replay_epochs", "min_steps": "replay_min_steps",
            "batch_real": "replay_batch_real", "batch_syn": "replay_batch_syn",
            "rehearsal_batch": "rehearsal_batch_syn", "rehearsal_target": "rehearsal_target",
            "rehearsal_kd_weight": "rehearsal_kd_weight",
            "head_align": "replay_head_align", "kappa": "kappa",
            "kappa_schedule": "kappa_schedule", "pi": "pi", "distill_old_weight": "distill_old_weight",
            "student_init": "student_init", "ema_alpha": "ema_alpha", "student_bn": "student_bn",
            "step_ema": "replay_step_ema", "epoch_length": "replay_epoch_length", "augment": "replay_augment",
            "bn": "replay_bn",
            "teacher_mode": "teacher_mode", "optimizer": "replay_optimizer", "replay_lr": "replay_lr",
            "lr_schedule": "replay_lr_schedule",
            "grad_clip": "replay_grad_clip", "kd_weight": "replay_kd_weight",
            "kd_temperature": "replay_kd_temperature", "seed": "seed"}

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_config(cls, config: "DRCPSDConfig") -> "ReplayConfig":
        """The group's values in a (flat) :class:`DRCPSDConfig`; an error names the flat field."""
        group = cls.__new__(cls)
        for name, flat in cls.FLAT.items():
            setattr(group, name, getattr(config, flat))
        return group.validate(flat=True)

    def validate(self, *, flat: bool = False) -> "ReplayConfig":
        """Check every field; raise :class:`ConfigError` naming the first bad one (by its :data:`FLAT` name with
        ``flat=True``)."""
        def name(field: str) -> str:
            return self.FLAT[field] if flat else field

        for field, flat_name in self.FLAT.items():
            if flat_name in CHOICES:
                _check_choice(name(field), getattr(self, field), CHOICES[flat_name])
        for field in ("n_replay_per_class", "replay_epochs", "batch_real", "batch_syn"):
            _int_at_least(name(field), getattr(self, field), 1)
        for field in ("min_steps", "rehearsal_batch", "seed"):
            _int_at_least(name(field), getattr(self, field), 0)
        if self.seed >= 2 ** 32:
            raise ConfigError(f"{name('seed')}={self.seed!r} must be < 2**32 (what numpy and torch accept as a seed)")
        _positive(name("kd_temperature"), self.kd_temperature)
        for field in ("replay_lr", "grad_clip"):
            if getattr(self, field) is not None:
                _positive(name(field), getattr(self, field))
        for field in ("kappa", "pi", "kd_weight", "distill_old_weight", "rehearsal_kd_weight"):
            _non_negative(name(field), getattr(self, field))
        a = _number(name("ema_alpha"), self.ema_alpha)
        if not 0.0 < a <= 1.0:
            raise ConfigError(f"{name('ema_alpha')}={a!r} must be in (0, 1]")
        if self.step_ema is not None:
            a = _number(name("step_ema"), self.step_ema)
            if not 0.0 < a <= 1.0:
                raise ConfigError(f"{name('step_ema')}={a!r} must be in (0, 1] or None (off)")
        if self.optimizer == "continue" and self.replay_lr is not None:
            raise ConfigError(f"{name('replay_lr')}={self.replay_lr!r} with {name('optimizer')}='continue': the "
                              f"continued optimiser keeps its own learning rate; set {name('replay_lr')}=None or "
                              f"{name('optimizer')}='fresh'")
        return self

    @property
    def alpha(self) -> float:
        """The new teacher's weight in the initial student: 0.5 for ``student_init="average"``, else
        ``ema_alpha``."""
        return 0.5 if self.student_init == "average" else self.ema_alpha


# --------------------------------------------------------------------------------------------------------
def build_from_fields(cls: type, values: Dict[str, Any], what: str) -> Any:
    """``cls(**values)`` for a dataclass, with an unknown key or a wrongly typed value raised as
    :class:`ConfigError` (``what`` names the kind of config in the message)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted((k for k in values if k not in known), key=repr)
    if unknown:
        raise ConfigError(f"unknown {what} field(s) {unknown}; valid fields: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as exc:  # e.g. a list where a number was expected, caught by our checks first mostly
        raise ConfigError(str(exc)) from exc


def read_json(path: Union[str, os.PathLike], what: str) -> Any:
    """The plain data of a JSON file (nothing in it is executed); every failure is a :class:`ConfigError` naming
    ``what`` and the path."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{what} {os.fspath(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {os.fspath(path)!r} is not valid JSON: {exc}") from None
    except (OSError, RecursionError, ValueError) as exc:
        raise ConfigError(f"{what} {os.fspath(path)!r} cannot be read: {exc}") from None


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    try:
        as_float = float(value)
    except OverflowError:
        as_float = math.inf
    if not math.isfinite(as_float):
        raise ConfigError(f"{name}={_short(value)} must be a finite number")
    return as_float


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_device(device: str) -> None:
    """Raise :class:`ConfigError` when torch cannot use ``device`` on this machine (``'cuda:1'`` with one GPU,
    ``'cuda'`` without CUDA, ``'mps'`` without Metal), before anything is built on it. The string's form is
    :meth:`DRCPSDConfig.validate`'s; this checks the machine, so configs for another machine still load."""
    import torch

    kind, _, index = str(device).partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} but CUDA is not available on this machine (torch "
                              f"{torch.__version__}); use device='cpu'")
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device={device!r} but MPS is not available on this machine; use device='cpu'")


def check_prompt_template(template: Any, error: type = ConfigError) -> None:
    """A prompt template must format with one positional class name and nothing else (raises ``error``)."""
    expected = "a str with exactly one '{}' for the class name, e.g. 'a photo of a {}'"
    if not isinstance(template, str) or template.count("{}") != 1:
        raise error(f"prompt_template={template!r}; expected {expected}")
    try:  # parse, never format: a field such as '{:999999999}' would build a huge string
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise error(f"prompt_template={template!r} cannot be formatted ({exc!r}); expected {expected}") from None
    if fields != [("", "", None)]:  # e.g. '{{}}' (no placeholder), '{} {0.x}', '{!r}'
        raise error(f"prompt_template={template!r} must hold '{{}}' as its only replacement field; expected {expected}")


#: Keys of ``generator_options`` (the options of ``avalanche_drcpsd.sd.StableDiffusionGenerator.from_pretrained``).
SD_OPTION_KEYS = ("torch_dtype", "resolution", "compile_unet", "offload", "attention", "variant", "vae_batch_size",
                  "vae_latent")


def _check_generator_options(options: Any, generator: str) -> None:
    if options is None:
        return
    if not isinstance(options, dict):
        raise ConfigError(f"generator_options={options!r} must be a dict or None")
    if options and generator != "stable_diffusion":
        raise ConfigError(f"generator_options={options!r} only apply to generator='stable_diffusion' "
                          f"(generator={generator!r})")
    unknown = sorted(set(options) - set(SD_OPTION_KEYS))
    if unknown:
        raise ConfigError(f"generator_options has unknown key(s) {unknown}; expected some of {list(SD_OPTION_KEYS)}")
    dtype = options.get("torch_dtype")
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16"):
        raise ConfigError(f"generator_options['torch_dtype']={dtype!r}; expected 'float32', 'bfloat16' or 'float16'")
    for key in ("resolution", "vae_batch_size"):
        if options.get(key) is not None:
            _int_at_least(f"generator_options['{key}']", options[key], 1)
    for key in ("compile_unet", "offload"):
        if key in options and not isinstance(options[key], bool):
            raise ConfigError(f"generator_options['{key}']={options[key]!r} must be true or false")
    if options.get("attention", "sdpa") not in ("sdpa", "default"):
        raise ConfigError(f"generator_options['attention']={options['attention']!r}; expected 'sdpa' or 'default'")
    if options.get("vae_latent", "mode") not in ("mode", "sample"):
        raise ConfigError(f"generator_options['vae_latent']={options['vae_latent']!r}; expected 'mode' or 'sample'")
    if options.get("variant") is not None and not isinstance(options["variant"], str):
        raise ConfigError(f"generator_options['variant']={options['variant']!r} must be a string such as 'fp16'")


def _check_choice(name: str, value: Any, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={_short(value)} is not valid; expected one of {list(choices)}")


def _positive(name: str, value: Any) -> None:
    if _number(name, value) <= 0:
        raise ConfigError(f"{name}={value!r} must be > 0")


def _non_negative(name: str, value: Any) -> None:
    if _number(name, value) < 0:
        raise ConfigError(f"{name}={value!r} must be >= 0")


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} must be an integer >= {low}")
    if value < low:
        raise ConfigError(f"{name}={value!r} must be >= {low}")


def _as_int_tuple(name: str, value: Any) -> Tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{name}={value!r} must be a non-empty list of integers")
    for v in value:
        _int_at_least(name, v, 1)
    return tuple(value)
