"""The offline default generator: a class-conditioned pixel-space diffusion model built from diffusers parts.

* Denoiser: ``diffusers.UNet2DConditionModel`` whose cross-attention attends to the CPSD class embeddings
  (the ``(L, D)`` projected token states of the frozen text encoder).
* Space-to-depth (``patch_size``): images are padded to a size the UNet can halve, then each
  ``p x p`` patch becomes ``p*p`` channels (``pixel_unshuffle``), as in "simple diffusion" (Hoogeboom et al.,
  ICML 2023). It is lossless and has no weights, so unlike a learned autoencoder it cannot forget; on
  a 2-core CPU a ``p=2`` UNet trains 2.7x and samples 3.0x faster than the same UNet on raw 28x28
  pixels (``benchmarks/unet_cost.py``, ``results/unet_cost.csv``).
* Schedulers from diffusers, built from plain configs and swappable: ``DDPMScheduler`` for training noise,
  ``DPMSolverMultistepScheduler`` (default) or ``DDIMScheduler`` for few-step sampling.
* Classifier-free guidance: the null condition is the text encoder's embedding of the empty prompt.

``save_pretrained``/``from_pretrained`` write and read a directory: ``unet/`` (diffusers format, safetensors),
``scheduler/`` and ``generator_config.json``.

:class:`Generator` is the one interface of every generator the package drives (this offline model and the frozen
pretrained :class:`~avalanche_drcpsd.sd.StableDiffusionGenerator`): what the generator plugin, the CLI, the
checkpointer and the synthetic cache ask of a generator, with the noising, SNR and LDM loss they share.
"""

from __future__ import annotations

import abc
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from torch import Tensor, nn
from tqdm.auto import tqdm

from .losses import ldm_loss, snr_from_alphas_cumprod
from .utils import atomic_write

__all__ = ["GeneratorError", "GeneratorSpec", "Generator", "DiffusionGenerator", "make_sampling_scheduler",
           "draw_guidance_scales", "guided_denoise"]

GuidanceScale = Union[float, Tuple[float, float]]


class GeneratorError(ValueError):
    """A generator directory or argument that cannot be used (the message names it and what was expected)."""


@dataclass(frozen=True)
class GeneratorSpec:
    """What the UNet needs beyond its own diffusers config: the image it models and how it is patched."""

    image_shape: Tuple[int, int, int]  # (C, H, W) of the classifier's images, values in [0, 1]
    patch_size: int
    model_size: int  # H = W after padding, a multiple of patch_size * 2**(levels-1)

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        c, _, _ = self.image_shape
        s = self.model_size // self.patch_size
        return (c * self.patch_size ** 2, s, s)


def draw_guidance_scales(guidance_scale: GuidanceScale, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """``(n,)`` guidance scales: a constant, or U(low, high) per image for ``(low, high)`` (reference: U(5, 9)),
    drawn on the CPU from ``generator`` so a seed gives the same scales on every device."""
    if isinstance(guidance_scale, (tuple, list)):
        low, high = (float(v) for v in guidance_scale)
        return low + (high - low) * torch.rand(n, generator=generator)
    return torch.full((n,), float(guidance_scale))


def guided_denoise(predict_noise: Callable[[Tensor, Tensor, Tensor], Tensor], scheduler, z: Tensor, cond: Tensor,
                   null: Tensor, guidance: Tensor, *, interval: Optional[Tuple[float, float]] = None,
                   generator: Optional[torch.Generator] = None, progress: bool = False) -> Tensor:
    """Run ``scheduler``'s reverse process from the noise ``z`` ``(B, ...)`` with classifier-free guidance
    (Ho & Salimans, 2022): :math:`\\hat\\epsilon = \\epsilon(z_t, \\varnothing) + w\\,(\\epsilon(z_t, c) -
    \\epsilon(z_t, \\varnothing))`, one batched ``predict_noise(z, t, cond)`` call per step for both halves (one
    conditional call when every scale is 1). ``cond`` ``(B, L, D)``, ``null`` ``(L, D)``, ``guidance`` ``(B,)``;
    returns the final ``z``.

    ``interval`` ``(low, high)``: guidance only at the steps whose timestep ``t`` has ``low <= t / T <= high``
    (``T`` the scheduler's ``num_train_timesteps``), the conditional prediction alone at the others (Kynkaanniemi
    et al., 2024, "Applying guidance in a limited interval": guidance at the noisiest steps narrows the samples
    without making them more faithful). None: every step. ``generator``: where a stochastic sampler (``dpm_sde``)
    draws the noise it adds at each step."""
    b = z.shape[0]
    w = guidance.to(z.device).view(b, *([1] * (z.dim() - 1)))
    both = torch.cat([null.expand(b, -1, -1), cond], 0)
    guided = bool((w != 1).any())
    total = scheduler.config.num_train_timesteps
    for t in tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False):
        model_in = scheduler.scale_model_input(z, t)
        if guided and (interval is None or interval[0] <= float(t) / total <= interval[1]):
            eps_u, eps_c = predict_noise(torch.cat([model_in, model_in]), t.expand(2 * b), both).chunk(2)
            eps = eps_u + w * (eps_c - eps_u)
        else:
            eps = predict_noise(model_in, t.expand(b), cond)
        z = scheduler.step(eps, t, z, generator=generator).prev_sample  # only a stochastic step draws from it
    return z


def make_sampling_scheduler(kind: str, config, *,
                            clip_x0: bool = True) -> Union[DPMSolverMultistepScheduler, DDIMScheduler]:
    """A few-step sampler sharing the training scheduler's noise schedule (``kind``): ``dpm`` (DPM-Solver++ 2M, an
    ODE solver), ``dpm_sde`` (its stochastic form, SDE-DPM-Solver++ 2M: fresh noise at every step, Lu et al., 2022)
    or ``ddim`` (eta 0).

    ``clip_x0``: clip the predicted clean sample to the data range [-1, 1] at every step (pixel space). Near
    t = T the epsilon-to-x0 conversion divides by sqrt(abar_T) (1/157 for the linear schedule), so without it an
    imperfect denoiser's first steps overshoot and few-step samples saturate.
    """
    # "trailing" spacing starts few-step sampling at the last training timestep (Lin et al., 2024). It is passed
    # explicitly: a value left at its default is not carried through save/load, so a reloaded scheduler would
    # otherwise fall back to the training scheduler's spacing and sample differently.
    if kind in ("dpm", "dpm_sde"):
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++" if kind == "dpm" else "sde-dpmsolver++", solver_order=2,
            timestep_spacing="trailing",
            thresholding=clip_x0, dynamic_thresholding_ratio=1.0, sample_max_value=1.0)
    if kind == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=clip_x0,
                                         clip_sample_range=1.0)
    raise GeneratorError(f"sampler={kind!r}; expected 'dpm', 'dpm_sde' or 'ddim'")


def _model_size(h: int, w: int, patch_size: int, levels: int) -> int:
    multiple = patch_size * 2 ** (levels - 1)
    side = max(h, w)
    return -(-side // multiple) * multiple


class Generator(nn.Module, abc.ABC):
    """A class-conditioned diffusion generator as the package drives it.

    Subclasses hold a DDPM-family ``noise_scheduler`` and its ``alphas_cumprod`` (a buffer), and implement
    :meth:`encode` (images in [0, 1] -> model space), :meth:`decode`, :meth:`predict_noise` and :meth:`sample`;
    the noising, SNR and LDM loss below are shared. ``frozen`` generators (pretrained) are never trained: only the
    CPSD projections learn."""

    #: True for a pretrained generator that no phase trains
    frozen: bool = False
    config_name = "generator_config.json"

    @property
    @abc.abstractmethod
    def image_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of the images :meth:`decode` and :meth:`sample` return."""

    @property
    def output_shape(self) -> Optional[Tuple[int, int, int]]:
        """The classifier's ``(C, H, W)`` this generator draws; None while a generator that takes the data's shape
        (Stable Diffusion) has not been told it. The offline generator's is fixed: :attr:`image_shape`."""
        return tuple(self.image_shape)

    def set_output_shape(self, shape: Sequence[int]) -> None:
        """Draw images of ``shape`` from now on; a generator with a fixed shape refuses any other one."""
        if tuple(shape) != tuple(self.image_shape):
            raise GeneratorError(f"{type(self).__name__} draws images of shape {tuple(self.image_shape)}, not "
                                 f"{tuple(shape)}: its shape is fixed when it is built")

    def load_text_encoder(self) -> Optional[Any]:
        """The text encoder that comes with the generator (a pipeline's own), or None: the configured one."""
        return None

    @property
    @abc.abstractmethod
    def identity(self) -> Dict[str, Any]:
        """JSON-able identity of what this generator draws (the synthetic cache's manifest)."""

    @abc.abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Images in [0, 1] ``(B, C, H, W)`` -> model space."""

    @abc.abstractmethod
    def decode(self, z: Tensor) -> Tensor:
        """Model space -> images in [0, 1] of :attr:`image_shape`."""

    @abc.abstractmethod
    def predict_noise(self, z_t: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        """The denoiser's noise prediction for ``z_t`` at ``timesteps`` under conditions ``cond`` ``(B, L, D)``."""

    @abc.abstractmethod
    def sample(self, cond: Tensor, null: Tensor, *, guidance_scale: "GuidanceScale" = 2.0,
               num_inference_steps: int = 20, sampler: str = "dpm",
               generator: Optional[torch.Generator] = None,
               guidance_interval: Optional[Tuple[float, float]] = None) -> Tensor:
        """Images in [0, 1] for conditions ``cond`` with classifier-free guidance against ``null`` (at the steps
        of ``guidance_interval`` only, :func:`guided_denoise`)."""

    def noisy(self, z0: Tensor, generator: Optional[torch.Generator] = None, *,
              offset: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
        """``(z_t, noise, t)`` for uniformly drawn timesteps; ``offset`` > 0 adds ``offset`` times
        :meth:`constant_noise` to the noise (offset noise; nothing more is drawn at 0)."""
        b = z0.shape[0]
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
        t = t.to(z0.device)
        noise = torch.randn(z0.shape, generator=generator)
        if offset:
            noise = noise + offset * self.constant_noise(z0.shape, generator)
        noise = noise.to(z0.device, z0.dtype)
        return self.noise_scheduler.add_noise(z0, noise, t), noise, t

    def constant_noise(self, shape: Sequence[int], generator: Optional[torch.Generator] = None) -> Tensor:
        """Normal noise of ``shape`` ``(B, C, H, W)`` (model space) that is constant over each image's pixels: one
        draw per image and model channel (diffusers' ``--noise_offset``, for latents). A model space whose channels
        are not colours overrides it."""
        return torch.randn(tuple(shape[:2]) + (1,) * (len(shape) - 2), generator=generator).expand(*shape)

    def snr(self, timesteps: Tensor) -> Tensor:
        return snr_from_alphas_cumprod(self.alphas_cumprod, timesteps)

    def training_loss(self, images: Tensor, cond: Tensor, snr_gamma: Optional[float] = 5.0,
                      generator: Optional[torch.Generator] = None) -> Tensor:
        """:math:`\\mathcal{L}_{LDM}` of a batch of images in [0, 1] under conditions ``cond`` ``(B, L, D)``."""
        z_t, noise, t = self.noisy(self.encode(images), generator)
        return ldm_loss(self.predict_noise(z_t, t, cond), noise, self.snr(t), snr_gamma)


class DiffusionGenerator(Generator):
    """Class-conditioned diffusion on (patched) pixels; the CPSD embeddings are its conditions."""

    def __init__(self, unet: UNet2DConditionModel, noise_scheduler: DDPMScheduler, spec: GeneratorSpec):
        super().__init__()
        self.unet = unet
        self.noise_scheduler = noise_scheduler
        self.spec = spec
        expected = spec.latent_shape[0]
        if unet.config.in_channels != expected or unet.config.out_channels != expected:
            raise GeneratorError(
                f"the UNet has in/out channels {unet.config.in_channels}/{unet.config.out_channels}; "
                f"image_shape={spec.image_shape} with patch_size={spec.patch_size} needs {expected}"
            )
        self.register_buffer("alphas_cumprod", noise_scheduler.alphas_cumprod.clone().float(), persistent=False)

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        *,
        image_shape: Sequence[int],
        cross_attention_dim: int,
        block_out_channels: Sequence[int] = (32, 64, 64),
        layers_per_block: int = 1,
        attention_head_dim: int = 8,
        patch_size: int = 2,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
    ) -> "DiffusionGenerator":
        """A fresh, randomly initialised generator. Cross-attention sits on every level but the first
        (the highest resolution) when there are more than two levels, else on all of them."""
        if len(image_shape) != 3:
            raise GeneratorError(f"image_shape={tuple(image_shape)!r}; expected (C, H, W)")
        c, h, w = (int(v) for v in image_shape)
        levels = len(block_out_channels)
        spec = GeneratorSpec((c, h, w), int(patch_size), _model_size(h, w, patch_size, levels))
        down = ["CrossAttnDownBlock2D" if (levels <= 2 or i > 0) else "DownBlock2D" for i in range(levels)]
        up = [d.replace("Down", "Up") for d in reversed(down)]
        channels = spec.latent_shape[0]
        unet = UNet2DConditionModel(
            sample_size=spec.latent_shape[1],
            in_channels=channels,
            out_channels=channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim,
            norm_num_groups=8,
        )
        scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type="epsilon",
            clip_sample=False,
        )
        return cls(unet, scheduler, spec)

    # ------------------------------------------------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        """Images in [0, 1], ``(B, C, H, W)`` -> model space: scaled to [-1, 1], padded, patched."""
        c, h, w = self.spec.image_shape
        if images.dim() != 4 or tuple(images.shape[1:]) != (c, h, w):
            raise GeneratorError(f"images of shape {tuple(images.shape)}; this generator models (B, {c}, {h}, {w})")
        x = images.to(self.alphas_cumprod.device, torch.float32) * 2.0 - 1.0
        s = self.spec.model_size
        top, left = (s - h) // 2, (s - w) // 2
        x = F.pad(x, (left, s - w - left, top, s - h - top), value=-1.0)
        return F.pixel_unshuffle(x, self.spec.patch_size) if self.spec.patch_size > 1 else x

    def constant_noise(self, shape: Sequence[int], generator: Optional[torch.Generator] = None) -> Tensor:
        """One normal draw per image and colour channel, constant over the (padded) image, in model space: a patch's
        channels are its pixels, so the draw is made in pixel space and patched like an image."""
        c = self.spec.image_shape[0]
        s = self.spec.model_size
        x = torch.randn((shape[0], c, 1, 1), generator=generator).expand(-1, -1, s, s)
        return F.pixel_unshuffle(x, self.spec.patch_size) if self.spec.patch_size > 1 else x

    def decode(self, z: Tensor) -> Tensor:
        """Model space -> images in [0, 1] of ``image_shape`` (inverse of :meth:`encode`, then clamped)."""
        x = F.pixel_shuffle(z, self.spec.patch_size) if self.spec.patch_size > 1 else z
        c, h, w = self.spec.image_shape
        s = self.spec.model_size
        top, left = (s - h) // 2, (s - w) // 2
        x = x[:, :, top:top + h, left:left + w]
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def predict_noise(self, z_t: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        return self.unet(z_t, timesteps, encoder_hidden_states=cond).sample

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.spec.image_shape)

    @property
    def identity(self) -> Dict[str, Any]:
        """Its class, spec and the SHA-256 of its weights: it is trained, so its weights are its identity."""
        import hashlib

        from .synthetic_cache import tensor_sha256

        digest = hashlib.sha256()
        for name, value in self.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor_sha256(value).encode())
        return {"class": type(self).__name__, "weights_sha256": digest.hexdigest(), "spec": asdict(self.spec)}

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        cond: Tensor,
        null: Tensor,
        *,
        guidance_scale: GuidanceScale = 2.0,
        num_inference_steps: int = 20,
        sampler: str = "dpm",
        generator: Optional[torch.Generator] = None,
        guidance_interval: Optional[Tuple[float, float]] = None,
    ) -> Tensor:
        """Images in [0, 1] for conditions ``cond`` ``(B, L, D)``, with classifier-free guidance against the
        null condition ``null`` ``(L, D)``. ``guidance_scale``: a number, or ``(low, high)`` for a scale drawn from
        U(low, high) per image; ``guidance_interval``: the steps guided (:func:`guided_denoise`; None: all).
        Conditional and unconditional predictions share one batched UNet call."""
        return self.decode(self.sample_latents(cond, null, guidance_scale=guidance_scale,
                                               num_inference_steps=num_inference_steps, sampler=sampler,
                                               generator=generator, guidance_interval=guidance_interval))

    @torch.no_grad()
    def sample_latents(self, cond: Tensor, null: Tensor, *, guidance_scale: GuidanceScale = 2.0,
                       num_inference_steps: int = 20, sampler: str = "dpm",
                       generator: Optional[torch.Generator] = None,
                       guidance_interval: Optional[Tuple[float, float]] = None) -> Tensor:
        """:meth:`sample` without the final :meth:`decode`: clean samples in model space (what
        :meth:`encode` makes of images), e.g. for generative distillation on fresh teacher samples."""
        device = self.alphas_cumprod.device
        b = cond.shape[0]
        scheduler = make_sampling_scheduler(sampler, self.noise_scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        w = draw_guidance_scales(guidance_scale, b, generator)
        z = torch.randn((b,) + self.spec.latent_shape, generator=generator).to(device)
        z = z * scheduler.init_noise_sigma
        return guided_denoise(self.predict_noise, scheduler, z, cond.to(device), null.to(device), w,
                              interval=guidance_interval, generator=generator)

    # ------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write ``unet/``, ``scheduler/`` and ``generator_config.json`` (each file atomically)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.unet.save_pretrained(os.path.join(directory, "unet"), safe_serialization=True)
        self.noise_scheduler.save_pretrained(os.path.join(directory, "scheduler"))
        payload = json.dumps({"_class_name": type(self).__name__, **asdict(self.spec)}, indent=2)

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(payload)

        atomic_write(os.path.join(directory, self.config_name), write)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], *, device: Union[str, torch.device] = "cpu",
                        torch_dtype: torch.dtype = torch.float32) -> "DiffusionGenerator":
        """Load a directory written by :meth:`save_pretrained` (local files only, safetensors weights)."""
        directory = os.fspath(directory)
        needed = [cls.config_name, os.path.join("unet", "config.json"),
                  os.path.join("scheduler", "scheduler_config.json")]
        if not os.path.isdir(directory):
            raise GeneratorError(f"generator directory {directory!r} does not exist; expected a folder written by "
                                 "DiffusionGenerator.save_pretrained")
        missing = [n for n in needed if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            raise GeneratorError(f"generator directory {directory!r} lacks {missing}; expected a folder written by "
                                 "DiffusionGenerator.save_pretrained (unet/, scheduler/, generator_config.json)")
        with open(os.path.join(directory, cls.config_name), "r", encoding="utf-8") as fh:
            raw = json.load(fh)
        spec = GeneratorSpec(tuple(raw["image_shape"]), int(raw["patch_size"]), int(raw["model_size"]))
        unet = UNet2DConditionModel.from_pretrained(os.path.join(directory, "unet"), local_files_only=True,
                                                    use_safetensors=True, torch_dtype=torch_dtype)
        scheduler = DDPMScheduler.from_pretrained(os.path.join(directory, "scheduler"), local_files_only=True)
        return cls(unet, scheduler, spec).to(device)
