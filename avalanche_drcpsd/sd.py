r"""A frozen pretrained Stable Diffusion as the DR-CPSD generator: the published method's setting.

DR-CPSD freezes a pretrained Stable Diffusion (VAE, UNet and CLIP text encoder) and learns only one CPSD
projection per class (``Linear(77, 77)`` over the token positions of the text encoder's states, identity
initialised, as the paper describes it; ``projection="reference"`` is the original code's reshape form).
:class:`StableDiffusionGenerator` loads the three networks from a local diffusers pipeline directory
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``), freezes them, and exposes the protocol that
:func:`~avalanche_drcpsd.cpsd.train_cpsd_projection` and
:class:`~avalanche_drcpsd.plugins.generator.CPSDGeneratorPlugin` use on the offline
:class:`~avalanche_drcpsd.generator.DiffusionGenerator` (both implement
:class:`~avalanche_drcpsd.generator.Generator`):

* ``encode(images)``: classifier images in [0, 1] -> VAE latents :math:`z_0 = s\,\mathbb{E}[q(z|x)]` (``s`` the
  VAE's ``scaling_factor``; images are converted to RGB at the pipeline's resolution first);
* ``decode(z)``: latents -> images in [0, 1], resized (and converted to grayscale when ``C = 1``) to the
  classifier's input shape ``output_shape``;
* ``predict_noise(z_t, t, cond)``: the UNet's :math:`\hat\epsilon` (a v-prediction UNet's output is converted to
  :math:`\hat\epsilon = \sqrt{\bar\alpha_t}\,\hat v + \sqrt{1-\bar\alpha_t}\,z_t`, so the CPSD losses of
  :mod:`avalanche_drcpsd.losses` apply unchanged);
* ``noisy``, ``snr`` and ``training_loss``: :class:`~avalanche_drcpsd.generator.Generator`'s (shared);
* ``sample(cond, null, guidance_scale, num_inference_steps, sampler, generator)``: DPM-Solver++ (20 steps in the
  reference) with classifier-free guidance against the empty prompt, the scale drawn from U(5, 9) per image.

Nothing is downloaded (``local_files_only``) and nothing in the pipeline is ever trained. GPU options:
``torch_dtype`` (``bfloat16``/``float16``), batched sampling, SDPA attention (diffusers' ``AttnProcessor2_0``),
``compile_unet`` (``torch.compile`` of the UNet), ``offload`` (only the network in use on the device) and
``device``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn

from .config import SD_OPTION_KEYS
from .generator import (
    DiffusionGenerator,
    Generator,
    GeneratorError,
    GuidanceScale,
    draw_guidance_scales,
    guided_denoise,
    make_sampling_scheduler,
)
from .utils import atomic_write, freeze
from .utils import parse_dtype as _parse_dtype  # re-raised as StableDiffusionError below

__all__ = [
    "StableDiffusionError",
    "StableDiffusionGenerator",
    "SD_OPTIONS",
    "check_pipeline_directory",
    "pipeline_fingerprint",
    "parse_dtype",
    "draw_guidance_scales",
    "to_classifier_images",
    "to_pipeline_images",
    "load_generator",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Keyword options of :meth:`StableDiffusionGenerator.from_pretrained` that a config may set
#: (``DRCPSDConfig.generator_options``).
SD_OPTIONS = SD_OPTION_KEYS

_EXPECTED = ("a diffusers Stable Diffusion pipeline directory (StableDiffusionPipeline.save_pretrained or a "
             "downloaded snapshot) with model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/")
_WEIGHT_STEMS = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                 "text_encoder": ("model", "pytorch_model")}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")
_POINTER_CLASS = "StableDiffusionGenerator"


class StableDiffusionError(GeneratorError):
    """A Stable Diffusion directory or option that cannot be used (names what is missing and what was expected)."""


# --------------------------------------------------------------------------------------------------------
# The directory
# --------------------------------------------------------------------------------------------------------
def _weight_files(component_dir: Path, stems: Sequence[str]) -> List[Path]:
    """Weight files of a component (``<stem>[.<variant>]<suffix>``), sorted."""
    if not component_dir.is_dir():
        return []
    return sorted(p for p in component_dir.iterdir() if p.is_file() and any(
        p.name.startswith(stem + ".") and p.name.endswith(_WEIGHT_SUFFIXES) for stem in stems))


def _has_tokenizer(tokenizer_dir: Path) -> bool:
    return ((tokenizer_dir / "vocab.json").is_file() and (tokenizer_dir / "merges.txt").is_file()) or (
        tokenizer_dir / "tokenizer.json").is_file()


def _pointer(directory: Path) -> Optional[Dict[str, Any]]:
    """The ``generator_config.json`` written by :meth:`StableDiffusionGenerator.save_pretrained`, if any."""
    path = directory / DiffusionGenerator.config_name
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StableDiffusionError(f"cannot read {str(path)!r} as JSON ({exc})") from exc
    return raw if isinstance(raw, dict) and raw.get("_class_name") == _POINTER_CLASS else None


def check_pipeline_directory(directory: PathLike) -> Path:
    """Check that ``directory`` holds every file a Stable Diffusion pipeline needs, without loading anything.

    Raises:
        StableDiffusionError: the directory does not exist, or lacks files; the message lists every missing
            entry (e.g. ``vae/diffusion_pytorch_model.safetensors (or .bin)``) and what was expected.
    """
    root = Path(os.fspath(directory))
    if not root.is_dir():
        raise StableDiffusionError(f"Stable Diffusion directory {str(root)!r} does not exist; expected {_EXPECTED}")
    missing = []
    if not (root / "model_index.json").is_file():
        missing.append("model_index.json")
    for component, stems in _WEIGHT_STEMS.items():
        if not (root / component / "config.json").is_file():
            missing.append(f"{component}/config.json")
        if not _weight_files(root / component, stems):
            missing.append(f"{component}/{stems[0]}.safetensors (or .bin)")
    if not _has_tokenizer(root / "tokenizer"):
        missing.append("tokenizer/vocab.json + tokenizer/merges.txt (or tokenizer/tokenizer.json)")
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        missing.append("scheduler/scheduler_config.json")
    if missing:
        raise StableDiffusionError(f"Stable Diffusion directory {str(root)!r} lacks {missing}; expected {_EXPECTED}")
    return root


def pipeline_fingerprint(directory: PathLike, *, full: bool = False) -> str:
    """SHA-256 identity of a pipeline directory: every config/tokenizer file in full, and for each weight file its
    size plus its first and last MiB (``full=True``: every byte, slow for a 4 GB checkpoint). Moving or copying
    the directory keeps the fingerprint; changing a config, the tokenizer or a weight file changes it."""
    root = check_pipeline_directory(directory)
    digest = hashlib.sha256()
    chunk = 1 << 20
    files = [root / "model_index.json"] + sorted(
        p for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") for p in (root / sub).rglob("*")
        if p.is_file())
    for path in files:
        rel = path.relative_to(root).as_posix()
        size = path.stat().st_size
        digest.update(f"{rel}|{size}|".encode())
        with open(path, "rb") as fh:
            if full or not path.name.endswith(_WEIGHT_SUFFIXES) or size <= 2 * chunk:
                for block in iter(lambda: fh.read(chunk), b""):
                    digest.update(block)
            else:
                digest.update(fh.read(chunk))
                fh.seek(size - chunk)
                digest.update(fh.read(chunk))
    return digest.hexdigest()


def parse_dtype(value: Union[str, torch.dtype]) -> torch.dtype:
    """``torch.bfloat16`` from ``"bfloat16"``, ``"bf16"``, ``"torch.bfloat16"`` or the dtype itself
    (:func:`avalanche_drcpsd.utils.parse_dtype` raising :class:`StableDiffusionError`)."""
    return _parse_dtype(value, name="torch_dtype", error=StableDiffusionError)


def _detect_variant(component_dir: Path, stems: Sequence[str]) -> Optional[str]:
    """``fp16`` when a component has only ``<stem>.fp16.safetensors``-style files (no plain weights)."""
    names = [p.name for p in _weight_files(component_dir, stems)]
    if set(names) & {stem + suffix for stem in stems for suffix in _WEIGHT_SUFFIXES}:
        return None
    variants = sorted({n.split(".")[1] for n in names if n.count(".") >= 2})
    return variants[0] if len(variants) == 1 else None


# --------------------------------------------------------------------------------------------------------
# Pure image conversions
# --------------------------------------------------------------------------------------------------------
def _check_shape(shape: Sequence[int]) -> Tuple[int, int, int]:
    if len(shape) != 3 or int(shape[0]) not in (1, 3) or int(shape[1]) < 1 or int(shape[2]) < 1:
        raise StableDiffusionError(f"output_shape={tuple(shape)!r}; expected (C, H, W) with C = 1 or 3")
    return int(shape[0]), int(shape[1]), int(shape[2])


def to_classifier_images(images: Tensor, shape: Sequence[int]) -> Tensor:
    """RGB images in [0, 1] ``(B, 3, h, w)`` -> the classifier's ``(B, C, H, W)`` in [0, 1]: resized (bilinear with
    antialiasing) and, for ``C = 1``, converted to luma (ITU-R BT.601 weights, as PIL's ``convert("L")``)."""
    c, h, w = _check_shape(shape)
    x = images.float()
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    if c == 1 and x.shape[1] == 3:
        x = (x * x.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif c == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.clamp(0.0, 1.0)


def to_pipeline_images(images: Tensor, resolution: int) -> Tensor:
    """Classifier images in [0, 1] ``(B, C, H, W)``, ``C`` 1 or 3 -> the VAE's input: RGB (gray repeated),
    ``resolution`` x ``resolution`` (bilinear, antialiased; a non-square image is stretched), in [-1, 1]."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise StableDiffusionError(f"images of shape {tuple(images.shape)}; expected (B, C, H, W) with C = 1 or 3")
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0.0, 1.0) * 2.0 - 1.0


# --------------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------------
class StableDiffusionGenerator(Generator):
    """A frozen pretrained Stable Diffusion (UNet + VAE) speaking the package's generator protocol.

    Build it with :meth:`from_pretrained`; the pipeline's text encoder comes from :meth:`load_text_encoder`.
    ``frozen = True`` tells :class:`~avalanche_drcpsd.plugins.generator.CPSDGeneratorPlugin` never to train it:
    only the CPSD projections learn.
    """

    frozen = True

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        noise_scheduler: DDPMScheduler,
        *,
        resolution: Optional[int] = None,
        output_shape: Optional[Sequence[int]] = None,
        device: Union[str, torch.device] = "cpu",
        offload: bool = False,
        compile_unet: bool = False,
        attention: str = "sdpa",
        vae_batch_size: int = 8,
        vae_latent: str = "mode",
        source: Optional[str] = None,
        fingerprint: Optional[str] = None,
    ):
        super().__init__()
        self.unet = freeze(unet)
        self.vae = freeze(vae)
        self.noise_scheduler = noise_scheduler
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = int(resolution or unet.config.sample_size * self.vae_scale_factor)
        if self.resolution < 1 or self.resolution % self.vae_scale_factor:
            raise StableDiffusionError(f"resolution={self.resolution} must be a positive multiple of the VAE's "
                                       f"downsampling factor {self.vae_scale_factor}")
        if unet.config.in_channels != vae.config.latent_channels:
            raise StableDiffusionError(f"the UNet takes {unet.config.in_channels} channels but the VAE's latents have "
                                       f"{vae.config.latent_channels}")
        if getattr(unet.config, "addition_embed_type", None) is not None:
            raise StableDiffusionError(f"the UNet needs extra conditions (addition_embed_type="
                                       f"{unet.config.addition_embed_type!r}, e.g. SDXL); only SD 1.x/2.x-style "
                                       "text-conditioned UNets are supported")
        if attention not in ("sdpa", "default"):
            raise StableDiffusionError(f"attention={attention!r}; expected 'sdpa' or 'default'")
        if isinstance(vae_batch_size, bool) or not isinstance(vae_batch_size, int) or vae_batch_size < 1:
            raise StableDiffusionError(f"vae_batch_size={vae_batch_size!r} must be an integer >= 1")
        if vae_latent not in ("mode", "sample"):
            raise StableDiffusionError(f"vae_latent={vae_latent!r}; expected 'mode' or 'sample'")
        self.vae_latent = vae_latent
        self._output_shape: Optional[Tuple[int, int, int]] = None
        if output_shape is not None:
            self.set_output_shape(output_shape)
        self.prediction_type = noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise StableDiffusionError(f"prediction_type={self.prediction_type!r}; "
                                       "expected 'epsilon' or 'v_prediction'")
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.vae_batch_size = vae_batch_size
        self.source = source
        self.fingerprint = fingerprint
        self.execution_device = torch.device(device)
        self.offload = bool(offload)
        self.register_buffer("alphas_cumprod", noise_scheduler.alphas_cumprod.clone().float(), persistent=False)
        if attention == "sdpa":
            from diffusers.models.attention_processor import AttnProcessor2_0

            self.unet.set_attn_processor(AttnProcessor2_0())
            self.vae.set_attn_processor(AttnProcessor2_0())
        self.to("cpu" if self.offload else self.execution_device)
        # The compiled UNet is kept out of the module tree (no "_orig_mod." keys in state_dict).
        self.__dict__["_unet_fn"] = torch.compile(self.unet) if compile_unet else self.unet

    # --- loading ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        directory: PathLike,
        *,
        device: Union[str, torch.device] = "cpu",
        torch_dtype: Union[str, torch.dtype] = torch.float32,
        resolution: Optional[int] = None,
        output_shape: Optional[Sequence[int]] = None,
        compile_unet: bool = False,
        offload: bool = False,
        attention: str = "sdpa",
        variant: Optional[str] = None,
        vae_batch_size: int = 8,
        vae_latent: str = "mode",
    ) -> "StableDiffusionGenerator":
        """Load the UNet, VAE and noise schedule of a local diffusers Stable Diffusion directory, frozen.

        ``directory`` is a pipeline directory, or one written by :meth:`save_pretrained` (which points to the
        pipeline it was loaded from). ``resolution``: the side of the generated images (default: the UNet's
        ``sample_size`` times the VAE factor, 512 for SD 1.5); ``output_shape``: the classifier's ``(C, H, W)``
        that :meth:`decode` returns (default ``(3, resolution, resolution)``; the plugin sets it from the data).
        ``torch_dtype``: the weights' dtype (``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``; encode, predict_noise
        and sample still return float32); ``compile_unet``: ``torch.compile`` the UNet; ``offload``: keep the
        networks on the CPU and move only the one in use to ``device`` (for sampling when GPU memory is short: a
        CPSD step uses both networks, so it moves them at every step); ``attention="sdpa"``: diffusers'
        ``AttnProcessor2_0`` (scaled-dot-product attention); ``variant``: e.g. ``"fp16"`` weight files (detected
        when they are the only ones); ``vae_batch_size``: images per VAE call; ``vae_latent``: what
        :meth:`encode` returns of the VAE's posterior, its mean (``"mode"``) or a draw from it (``"sample"``, from
        torch's global generator: what the original CPSD code does, ``cpsd/train_cpsd.py`` l. 364).

        Raises:
            StableDiffusionError: a missing directory or component (every missing file is named), a bad option,
                or a text encoder whose width does not match the UNet's cross-attention.
        """
        root = Path(os.fspath(directory))
        pointer = _pointer(root) if root.is_dir() else None
        if pointer is not None:
            return cls._from_pointer(root, pointer, device=device, torch_dtype=torch_dtype, resolution=resolution,
                                     output_shape=output_shape, compile_unet=compile_unet, offload=offload,
                                     attention=attention, variant=variant, vae_batch_size=vae_batch_size,
                                     vae_latent=vae_latent)
        root = check_pipeline_directory(root)
        dtype = parse_dtype(torch_dtype)
        kwargs = dict(local_files_only=True, torch_dtype=dtype)
        networks = {}
        for name, model_cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
            files = _weight_files(root / name, _WEIGHT_STEMS[name])
            use_safetensors = any(f.name.endswith((".safetensors", ".safetensors.index.json")) for f in files)
            networks[name] = model_cls.from_pretrained(
                str(root), subfolder=name, use_safetensors=use_safetensors,
                variant=variant or _detect_variant(root / name, _WEIGHT_STEMS[name]), **kwargs)
        scheduler_config = DDPMScheduler.load_config(str(root), subfolder="scheduler", local_files_only=True)
        noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        text_config = json.loads((root / "text_encoder" / "config.json").read_text(encoding="utf-8"))
        width = text_config.get("hidden_size", text_config.get("text_config", {}).get("hidden_size"))
        if width != networks["unet"].config.cross_attention_dim:
            raise StableDiffusionError(
                f"{str(root / 'text_encoder')!r} has hidden_size {width} but the UNet's cross_attention_dim is "
                f"{networks['unet'].config.cross_attention_dim}")
        return cls(networks["unet"], networks["vae"], noise_scheduler, resolution=resolution,
                   output_shape=output_shape, device=device, offload=offload, compile_unet=compile_unet,
                   attention=attention, vae_batch_size=vae_batch_size, vae_latent=vae_latent,
                   source=str(root.resolve()),
                   fingerprint=pipeline_fingerprint(root))

    @classmethod
    def _from_pointer(cls, root: Path, pointer: Dict[str, Any], **kwargs: Any) -> "StableDiffusionGenerator":
        source = pointer.get("source")
        if not source or not Path(source).is_dir():
            raise StableDiffusionError(f"{str(root)!r} points to the Stable Diffusion directory {source!r}, which does "
                                       "not exist; expected the pipeline directory the generator was loaded from")
        if kwargs.get("resolution") is None:
            kwargs["resolution"] = pointer.get("resolution")
        if kwargs.get("output_shape") is None and pointer.get("output_shape") is not None:
            kwargs["output_shape"] = tuple(pointer["output_shape"])
        gen = cls.from_pretrained(source, **kwargs)
        if pointer.get("fingerprint") and gen.fingerprint != pointer["fingerprint"]:
            raise StableDiffusionError(f"the Stable Diffusion directory {source!r} changed since {str(root)!r} was "
                                       f"saved (fingerprint {gen.fingerprint[:12]} != {pointer['fingerprint'][:12]})")
        return gen

    def load_text_encoder(self, *, device: Optional[Union[str, torch.device]] = None,
                          dtype: Optional[torch.dtype] = None):
        """The pipeline's own frozen CLIP text encoder and tokenizer (``text_encoder/`` + ``tokenizer/``) as an
        :class:`~avalanche_drcpsd.text_encoders.HFCLIPTextEncoder`: last-layer token states ``(B, 77, D)``, the
        conditions Stable Diffusion was trained on."""
        from .text_encoders import HFCLIPTextEncoder

        if self.source is None:
            raise StableDiffusionError("this generator was not loaded from a directory: pass a text encoder")
        if device is None:
            device = "cpu" if self.offload else self.execution_device
        return HFCLIPTextEncoder.from_pretrained(self.source, subfolder="text_encoder", device=device,
                                                 dtype=dtype if dtype is not None else self.unet.dtype)

    def save_pretrained(self, directory: PathLike) -> None:
        """Write ``generator_config.json``, a pointer to the source pipeline with its fingerprint, the resolution and
        the output shape. The frozen weights are not copied (they never change); :meth:`from_pretrained` on this
        directory reloads the source and refuses it if its fingerprint changed."""
        if self.source is None:
            raise StableDiffusionError("this generator was not loaded from a directory; nothing to point to")
        payload = json.dumps({"_class_name": _POINTER_CLASS, "source": self.source, "fingerprint": self.fingerprint,
                              "resolution": self.resolution,
                              "output_shape": list(self.output_shape) if self.output_shape else None}, indent=2)

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(payload)

        atomic_write(os.path.join(os.fspath(directory), self.config_name), write)

    # --- geometry and identity ----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "StableDiffusionGenerator":
        """Ignore ``mode``: the pretrained networks always stay in eval mode."""
        return super().train(False)

    def set_output_shape(self, shape: Sequence[int]) -> None:
        """The classifier's ``(C, H, W)`` (``C`` 1 or 3) that :meth:`decode` and :meth:`sample` return."""
        self._output_shape = _check_shape(shape)

    @property
    def output_shape(self) -> Optional[Tuple[int, int, int]]:
        return self._output_shape

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """What :meth:`decode` returns: ``output_shape``, else ``(3, resolution, resolution)``."""
        return self._output_shape or (3, self.resolution, self.resolution)

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (self.unet.config.in_channels, side, side)

    @property
    def identity(self) -> Dict[str, Any]:
        """JSON-able identity of what this generator produces (for the synthetic cache's manifest)."""
        return {"class": _POINTER_CLASS, "fingerprint": self.fingerprint, "dtype": str(self.unet.dtype),
                "resolution": self.resolution, "prediction_type": self.prediction_type}

    # --- device placement -------------------------------------------------------------------------------
    def _use(self, module: nn.Module) -> nn.Module:
        """With ``offload``, move ``module`` to the execution device and the other network back to the CPU (as
        diffusers' model CPU offload, without accelerate); otherwise a no-op."""
        if self.offload:
            for other in (self.unet, self.vae):
                if other is not module and other.device.type != "cpu":
                    other.to("cpu")
            if module.device != self.execution_device:
                module.to(self.execution_device)
        return module

    # --- the protocol -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        r"""Images in [0, 1] ``(B, C, H, W)`` -> float32 latents :math:`s\,(\mu - \text{shift})` on the execution
        device, where :math:`\mu` is the VAE posterior's mean (deterministic; the SD VAE's posterior std is tiny),
        or a draw from the posterior with ``vae_latent="sample"``, and ``s`` its ``scaling_factor``. Encoded in chunks
        of ``vae_batch_size``."""
        x = to_pipeline_images(images, self.resolution)
        vae = self._use(self.vae)
        out = []
        for chunk in x.split(self.vae_batch_size):
            posterior = vae.encode(chunk.to(self.execution_device, vae.dtype)).latent_dist
            z = posterior.sample() if self.vae_latent == "sample" else posterior.mode()
            out.append((z.float() - self.shift_factor) * self.scaling_factor)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Latents -> images in [0, 1] of :attr:`image_shape`, float32 on the execution device; decoded in chunks of
        ``vae_batch_size``."""
        vae = self._use(self.vae)
        out = []
        for chunk in z.split(self.vae_batch_size):
            latents = chunk.to(self.execution_device, vae.dtype) / self.scaling_factor + self.shift_factor
            x = (vae.decode(latents).sample.float() + 1.0) / 2.0
            out.append(to_classifier_images(x.clamp(0.0, 1.0), self.image_shape))
        return torch.cat(out)

    def predict_noise(self, z_t: Tensor, timesteps: Tensor, cond: Tensor) -> Tensor:
        r""":math:`\hat\epsilon(z_t, t, c)` in float32 (gradients flow to ``cond``; the UNet itself is frozen)."""
        unet = self._use(self.unet)
        device, dtype = self.execution_device, unet.dtype
        t = timesteps.to(device)
        z_in = z_t.to(device, dtype)
        out = self._unet_fn(z_in, t, encoder_hidden_states=cond.to(device, dtype)).sample.float()
        if self.prediction_type == "epsilon":
            return out
        abar = self.alphas_cumprod.to(device)[t.long()].view(-1, 1, 1, 1)
        return abar.sqrt() * out + (1.0 - abar).sqrt() * z_t.to(device).float()

    @torch.no_grad()
    def sample(
        self,
        cond: Tensor,
        null: Tensor,
        *,
        guidance_scale: GuidanceScale = (5.0, 9.0),
        num_inference_steps: int = 20,
        sampler: str = "dpm",
        generator: Optional[torch.Generator] = None,
        guidance_interval: Optional[Tuple[float, float]] = None,
        progress: bool = False,
    ) -> Tensor:
        """Images in [0, 1] of :attr:`image_shape` for conditions ``cond`` ``(B, L, D)``: DPM-Solver++ (2M, or its
        stochastic form ``dpm_sde``) or DDIM with ``num_inference_steps`` steps on the pipeline's noise schedule,
        classifier-free guidance against ``null`` ``(L, D)`` (the empty prompt) with one batched UNet call per
        step, a guidance scale per image
        (a number, or ``(low, high)`` for U(low, high)), at the steps of ``guidance_interval`` only
        (:func:`~avalanche_drcpsd.generator.guided_denoise`; None: all). Noise and scales are drawn on the CPU from
        ``generator``."""
        device = self.execution_device
        b = cond.shape[0]
        config = {**self.noise_scheduler.config, "prediction_type": "epsilon"}  # predict_noise returns epsilon
        scheduler = make_sampling_scheduler(sampler, config, clip_x0=False)  # latents are not bounded to [-1, 1]
        scheduler.set_timesteps(num_inference_steps, device=device)
        w = draw_guidance_scales(guidance_scale, b, generator)
        z = torch.randn((b,) + self.latent_shape, generator=generator).to(device) * scheduler.init_noise_sigma
        return self.decode(guided_denoise(self.predict_noise, scheduler, z, cond.to(device), null.to(device), w,
                                          interval=guidance_interval, generator=generator, progress=progress))


# --------------------------------------------------------------------------------------------------------
# Any generator directory
# --------------------------------------------------------------------------------------------------------
def load_generator(directory: PathLike, *, device: Union[str, torch.device] = "cpu",
                   torch_dtype: Union[str, torch.dtype] = torch.float32, **sd_options: Any):
    """Load whichever generator ``directory`` holds: a Stable Diffusion pipeline (``model_index.json``) or a
    :meth:`StableDiffusionGenerator.save_pretrained` pointer -> :class:`StableDiffusionGenerator` (``sd_options``
    go to its :meth:`~StableDiffusionGenerator.from_pretrained`); a :meth:`DiffusionGenerator.save_pretrained`
    folder -> :class:`DiffusionGenerator` (which takes no ``sd_options``)."""
    root = Path(os.fspath(directory))
    if not root.is_dir():
        raise GeneratorError(f"generator directory {str(root)!r} does not exist; expected {_EXPECTED}, or a folder "
                             "written by DiffusionGenerator.save_pretrained")
    if (root / "model_index.json").is_file() or _pointer(root) is not None:
        return StableDiffusionGenerator.from_pretrained(root, device=device, torch_dtype=torch_dtype, **sd_options)
    if (root / DiffusionGenerator.config_name).is_file():
        unknown = {k: v for k, v in sd_options.items() if v not in (None, False)}
        if parse_dtype(torch_dtype) != torch.float32:
            unknown["torch_dtype"] = torch_dtype  # the offline generator encodes and samples in float32
        if unknown:
            raise GeneratorError(f"options {sorted(unknown)} only apply to a Stable Diffusion generator; "
                                 f"{str(root)!r} holds a DiffusionGenerator")
        return DiffusionGenerator.from_pretrained(root, device=device)
    raise GeneratorError(f"{str(root)!r} holds neither model_index.json (a Stable Diffusion pipeline) nor "
                         f"{DiffusionGenerator.config_name} (a DiffusionGenerator); expected {_EXPECTED}, or a folder "
                         "written by DiffusionGenerator.save_pretrained")
