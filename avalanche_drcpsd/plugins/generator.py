r"""The CPSD generator: a class-conditioned diffusion model, the CPSD class embeddings and their buffer.

Per training experience :math:`t` the plugin runs three phases around the strategy's own training:

* **generation** (``before_training_exp``, :math:`t>0`): samples the replay set of every old class from the
  generator as it stands (the generator after :math:`t-1`), conditioned on the buffer's embeddings, with
  classifier-free guidance and a few-step sampler. The set serves dream replay and generative distillation.
* **generator** (``after_training_exp``): trains the denoiser on the current classes' real images
  (:math:`\mathcal{L}_{LDM}` with min-SNR weights and condition dropout) while distilling the previous
  generator's noise predictions on the old-class replay set and embeddings (generative distillation, Masip et
  al. 2023), so the generator itself does not forget. Skipped for a frozen generator.
* **CPSD** (``after_training_exp``): for each new class, encodes its prompt with the frozen text encoder and fits
  an identity-initialised projection on the class's real images with
  :math:`\mathcal{L}_{CPSD}=\mathcal{L}_{LDM}+\lambda\mathcal{L}_{MMD}`; the projected embedding enters the buffer.

No real image is kept: the buffer and the generator are all that remains of an old class.

The generator works on pixels in [0, 1]; the benchmark's images may be normalised (Avalanche's classic
benchmarks apply ``Normalize``). The plugin's :attr:`~CPSDGeneratorPlugin.input_space` (configured, or learned at
the first experience: :mod:`avalanche_drcpsd.input_space`) maps real images to pixels before the generator and
CPSD see them, and replay images back to the classifier's space; every experience's images are checked against
it before training.

With ``generator="stable_diffusion"`` (the published method) the generator is a frozen pretrained Stable Diffusion
(:class:`~avalanche_drcpsd.sd.StableDiffusionGenerator`, loaded from ``generator_path`` with
``generator_options``), the text encoder defaults to the pipeline's own, and the generator phase never runs: only
the CPSD projections learn. With ``synthetic_cache_dir`` the replay set of each experience is written to (and on
resume read from) :class:`~avalanche_drcpsd.synthetic_cache.SyntheticCache`.

Reference: DR-CPSD (Dream Replay with CLIP Projection Stable Diffusion); generative distillation: S. Masip et al.,
"Continual Learning of Diffusion Models with Generative Distillation", arXiv:2311.14028.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..augment import jpeg_round_trip, reference_cpsd_augment
from ..captions import caption_prompts, check_captions, load_captions
from ..config import DRCPSDConfig, check_device
from ..cpsd import EmbeddingBuffer, cpsd_steps, train_cpsd_projection
from ..generator import DiffusionGenerator, draw_guidance_scales
from ..generator_training import DistillationSource, train_generator
from ..histogram import match_histogram, pixel_histogram, pixel_mean, shift_to_mean
from ..input_space import InputSpace
from ..synthetic_cache import SyntheticCache, generator_identity, tensor_sha256, to_uint8
from ..text_encoders import TextEncoder, TextEncoderError, load_text_encoder
from ..utils import PhaseTimer, dataset_tensors, experience_classes, frozen_copy, is_last_experience, spread_items
from .base import StatefulPlugin

__all__ = ["CPSDGeneratorPlugin"]


class CPSDGeneratorPlugin(StatefulPlugin):
    """Owns the generator, the frozen text encoder and the embedding buffer; a :class:`SyntheticSource`."""

    #: the run state (:meth:`state_dict`); the generator, the embedding buffer, the replay set and ``rng`` are saved by
    #: the phase checkpoint in their own files
    state_attributes = ("kept", "pixel_histograms", "pixel_means", "unlearned", "input_low", "input_high",
                        "input_source", "_exp", "_trainable")

    def __init__(
        self,
        config: Optional[DRCPSDConfig] = None,
        *,
        class_names: Optional[Sequence[str]] = None,
        generator: Optional[DiffusionGenerator] = None,
        text_encoder: Optional[TextEncoder] = None,
        timer: Optional[PhaseTimer] = None,
        verbose: bool = True,
        cache_dir: Optional[str] = None,
        captions: Optional[Dict[int, Sequence[str]]] = None,
    ):
        """
        :param config: DR-CPSD hyper-parameters (reference defaults when None).
        :param class_names: names used in the prompts, index = class id (``"class {id}"`` when None).
        :param generator: a ready generator (a :class:`DiffusionGenerator` or a frozen
            :class:`~avalanche_drcpsd.sd.StableDiffusionGenerator`); else one is built at the first experience (or
            loaded from ``config.generator_path``).
        :param text_encoder: a frozen text encoder; else ``config.text_encoder`` is loaded (when None: the offline
            default, or the Stable Diffusion pipeline's own encoder with ``generator="stable_diffusion"``).
        :param cache_dir: synthetic-set cache directory (default ``config.synthetic_cache_dir``; None: no cache).
        :param captions: caption lists per class id (:mod:`~avalanche_drcpsd.captions`); default: read from
            ``config.captions_file`` when set (a :class:`~avalanche_drcpsd.captions.CaptionError` names what is
            wrong with the file, before any training).
        """
        super().__init__()
        self.config = (config or DRCPSDConfig()).validate()
        self.class_names = list(class_names) if class_names is not None else None
        if captions is None and self.config.captions_file is not None:
            captions = load_captions(self.config.captions_file, self.class_names)
        #: class id -> its captions (classes missing here keep their one class prompt)
        self.captions: Dict[int, List[str]] = check_captions(captions or {})
        self.generator = generator
        self.text_encoder = text_encoder
        self.timer = timer if timer is not None else PhaseTimer()
        self.verbose = verbose
        self.buffer: Optional[EmbeddingBuffer] = None
        self.rng = torch.Generator().manual_seed(self.config.seed)
        cache_dir = cache_dir if cache_dir is not None else self.config.synthetic_cache_dir
        self.cache: Optional[SyntheticCache] = SyntheticCache(cache_dir) if cache_dir is not None else None
        #: the replay set drawn for the current experience as ``(classes, n_per_class, pixels, labels)``, None before
        #: it is drawn (:attr:`replay_set` gives its images and labels)
        self.replay_record: Optional[Tuple[Tuple[int, ...], int, Tensor, Tensor]] = None
        #: ``replay_draw="once"``: each old class's kept synthetic set (uint8 images, class id -> (N, C, H, W))
        self.kept: Dict[int, Tensor] = {}
        #: ``replay_pixel_match="class_histogram"``: each learned class's real pixel histogram (class id -> int64
        #: ``(C, 256)``, :func:`~avalanche_drcpsd.histogram.pixel_histogram`), which its drawn sets are matched to
        self.pixel_histograms: Dict[int, Tensor] = {}
        #: ``replay_pixel_match="class_mean_histogram"``: each learned class's real mean image (class id -> float32
        #: ``(C, H, W)``, :func:`~avalanche_drcpsd.histogram.pixel_mean`), which its drawn sets are shifted to first
        self.pixel_means: Dict[int, Tensor] = {}
        #: ``generator_last_experience="skip"``: the classes whose generator and CPSD phases were left out
        self.unlearned: List[int] = []
        #: the input space's per-channel pixel-0 / pixel-1 values and where they came from (plain data, so a
        #: checkpoint restores them; :attr:`input_space`)
        self.input_low: Optional[Tuple[float, ...]] = None
        self.input_high: Optional[Tuple[float, ...]] = None
        self.input_source: Optional[str] = None
        self._exp = 0
        self._trainable: Optional[bool] = None

    @property
    def input_space(self) -> InputSpace:
        """The classifier's input space against the generator's pixels (learned at the first experience; pixels
        in [0, 1] before it, or when the data are)."""
        if self.input_low is None:
            return InputSpace.unit(1)
        return InputSpace(tuple(self.input_low), tuple(self.input_high), self.input_source or "")

    def check_inputs(self, dataset: Any, where: str, samples: int = 512) -> InputSpace:
        """Learn the input space from ``dataset`` (the first time) and check ``samples`` of its images, spread
        over it, against it: a :class:`~avalanche_drcpsd.data.DataError` names the range seen and the setting to
        change. ``replay_augment="reference"`` (transforms of [0, 1] images) is refused for other spaces."""
        if len(dataset) == 0:
            return self.input_space
        images = torch.stack([torch.as_tensor(x) for _, x in spread_items(dataset, samples)]).float()
        if images.dim() != 4:
            from ..data import DataError

            raise DataError(f"{where}: images of shape {tuple(images.shape[1:])}; expected (C, H, W) tensors")
        if self.input_low is None:
            space = InputSpace.resolve(self.config, dataset, images)
            if not space.is_unit and self.config.replay_augment == "reference":
                from ..config import ConfigError

                raise ConfigError(f"replay_augment='reference' transforms images in [0, 1], but the inputs are in "
                                  f"[{min(space.low):.4g}, {max(space.high):.4g}] ({space.source}); use "
                                  "replay_augment='none' or a benchmark with unnormalised images")
            self.input_low, self.input_high, self.input_source = space.low, space.high, space.source
        self.input_space.check(images, where)
        return self.input_space

    def experience_pixels(self, experience: Any) -> Tuple[Tensor, Tensor]:
        """An experience's whole data set (its eval transforms) as generator pixels in [0, 1] and labels."""
        x, y = dataset_tensors(experience.dataset.eval())
        return self.input_space.to_unit(x), y

    @property
    def trainable(self) -> bool:
        """Whether the generator phase runs: the offline generator learns, a frozen pretrained one never does.
        Assign ``False`` to freeze the offline generator too (e.g. one trained beforehand); only the CPSD
        embeddings of new classes are then learned."""
        if self._trainable is not None:
            return self._trainable
        return self.config.generator == "unet" and not (self.generator is not None and self.generator.frozen)

    @trainable.setter
    def trainable(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"trainable={value!r}; expected True or False")
        if value and self.generator is not None and self.generator.frozen:
            raise ValueError("trainable=True for a frozen pretrained generator; only the CPSD projections learn")
        self._trainable = value

    # --- set-up ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the text encoder and (when configured) the generator now, so a bad path fails before training.
        A Stable Diffusion generator is loaded first, since its pipeline provides the default text encoder."""
        c = self.config
        check_device(c.device)
        if self.generator is None and c.generator == "stable_diffusion":
            from ..sd import StableDiffusionGenerator

            self.generator = StableDiffusionGenerator.from_pretrained(c.generator_path, device=c.device,
                                                                      **(c.generator_options or {}))
        if self.text_encoder is None and c.text_encoder is None and self.generator is not None:
            self.text_encoder = self.generator.load_text_encoder()  # a pipeline's own encoder, or None
        if self.text_encoder is None:
            self.text_encoder = load_text_encoder(c.text_encoder)
        if self.buffer is None:
            self.buffer = EmbeddingBuffer(null=self.text_encoder.null_embedding(),
                                          encoder_identity=self.text_encoder.identity)
        if self.generator is None and c.generator_path is not None:
            self.generator = DiffusionGenerator.from_pretrained(c.generator_path, device=c.device)
        if self.generator is not None:
            width = self.generator.unet.config.cross_attention_dim
            if width != self.text_encoder.hidden_size:
                raise TextEncoderError(f"the text encoder's hidden size {self.text_encoder.hidden_size} does not match "
                                       f"the generator's cross_attention_dim {width}")

    def build_generator(self, image_shape: Sequence[int], *, fresh: bool = False) -> DiffusionGenerator:
        """The generator for images of ``image_shape``: built (seeded by ``seed``) on the first call, given that
        output shape when it is a pretrained one of another shape; a resumed run calls it before loading weights.
        ``fresh``: a new one replaces it (``generator_scope="per_experience"``), seeded by ``seed`` plus the
        experience index."""
        if fresh:
            self.generator = None
        if self.generator is not None and self.generator.output_shape != tuple(image_shape):
            self.generator.set_output_shape(image_shape)  # a pretrained generator's images take the data's shape
        if self.generator is None:
            c = self.config
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(c.seed + (self._exp if fresh else 0))
                self.generator = DiffusionGenerator.build(
                    image_shape=image_shape, cross_attention_dim=self.text_encoder.hidden_size,
                    block_out_channels=c.unet_block_out_channels, layers_per_block=c.unet_layers_per_block,
                    attention_head_dim=c.unet_attention_head_dim, patch_size=c.patch_size,
                    num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                ).to(c.device)
        if self.config.generator_memory_format == "channels_last":
            self.generator.unet.to(memory_format=torch.channels_last)  # a no-op once it is
        return self.generator

    def prompt(self, cls: int) -> str:
        name = self.class_names[cls] if self.class_names is not None and cls < len(self.class_names) else f"class {cls}"
        return self.config.prompt_template.format(name)

    def class_tokens(self, classes: Sequence[int]) -> Dict[int, Tensor]:
        """The frozen text encoder's ``(L, D)`` states of each class's prompt (what the generator phase is
        conditioned on with ``cpsd_order="after_generator"``, and what CPSD projects into the class embedding)."""
        return {int(c): self.text_encoder.encode([self.prompt(int(c))])[0] for c in classes}

    @property
    def learned_classes(self) -> List[int]:
        return self.buffer.classes if self.buffer is not None else []

    # --- sampling (the SyntheticSource API) --------------------------------------------------------------
    @torch.no_grad()
    def sample(self, classes: Sequence[int], n_per_class: int, *, seed: Optional[int] = None,
               desc: str = "sampling") -> Tuple[Tensor, Tensor]:
        """``n_per_class`` images in [0, 1] for each class, from the buffer's embeddings. Each class draws its
        noise from its own generator seeded with ``(seed, class)``, so one class's set is reproducible."""
        if self.generator is None or self.buffer is None:
            raise RuntimeError("the generator has not been built yet: train on an experience first")
        c = self.config
        seed = self._default_seed() if seed is None else seed
        gen = self.generator
        was_training = gen.training
        gen.eval()
        xs, ys = [], []
        total = len(classes) * n_per_class
        bar = tqdm(total=total, desc=desc, disable=not self.verbose, leave=False)
        for cls in classes:
            g = torch.Generator().manual_seed(seed + int(cls))
            for start in range(0, n_per_class, c.sample_batch_size):
                b = min(c.sample_batch_size, n_per_class - start)
                scale = c.guidance_scale
                if c.guidance_draw == "batch" and isinstance(scale, tuple):  # one U(low, high) scale per batch
                    scale = float(draw_guidance_scales(scale, 1, g)[0])
                emb = self.buffer.draw(cls, b, g)  # a caption per image, if the class has captions
                xs.append(gen.sample(emb, self.buffer.null, guidance_scale=scale,
                                     num_inference_steps=c.sampling_steps, sampler=c.sampler, generator=g,
                                     guidance_interval=c.guidance_interval).cpu())
                ys.append(torch.full((b,), int(cls), dtype=torch.long))
                bar.update(b)
        bar.close()
        gen.train(was_training)
        return torch.cat(xs), torch.cat(ys)

    def replayed_samples(self, classes: Sequence[int], n_per_class: int, *, seed: Optional[int] = None,
                         desc: str = "sampling") -> Tuple[Tensor, Tensor]:
        """``n_per_class`` images in [0, 1] of each class as dream replay sees it: a class's kept set (its first
        ``n_per_class`` images, 8-bit as kept) when ``replay_draw="once"`` has kept one of at least that many, and
        :meth:`sample`'s draw from the generator as it now is for the others (``"redraw"``, and classes not kept
        yet, such as the experience just learned). With ``"once"`` an old class is replayed from its kept set,
        whatever the generator has become since (without generative distillation it forgets the class), so
        measuring the generator's fresh samples of it would measure images nothing replays."""
        classes = [int(k) for k in classes]
        kept = {k for k in classes if len(self.kept.get(k, ())) >= n_per_class}
        fresh = [k for k in classes if k not in kept]
        drawn = self.match_pixels(*self.sample(fresh, n_per_class, seed=seed, desc=desc)) if fresh else None
        xs, ys = [], []
        for k in classes:
            xs.append(self.kept[k][:n_per_class].float() / 255 if k in kept else drawn[0][drawn[1] == k])
            ys.append(torch.full((n_per_class,), k, dtype=torch.long))
        return torch.cat(xs), torch.cat(ys)

    def _default_seed(self) -> int:
        return self.config.seed * 1_000_003 + 7919 * self._exp

    def sample_replay(self, classes: Sequence[int], n_per_class: int) -> Tuple[Tensor, Tensor]:
        """The replay set of this experience in the classifier's input space (generated once, in
        ``before_training_exp``, and reused; read from and written to the synthetic cache as task
        ``<experience>`` when there is one)."""
        x, y = self._replay_pixels(classes, n_per_class)
        return self.input_space.from_unit(x), y

    def _replay_pixels(self, classes: Sequence[int], n_per_class: int) -> Tuple[Tensor, Tensor]:
        key = (tuple(int(c) for c in classes), int(n_per_class))
        if self.replay_record is None or self.replay_record[:2] != key:
            if self.config.replay_draw == "once":
                x, y = self._kept_sets(key[0], key[1])
            else:
                x, y = self._draw(key[0], key[1])
            self.replay_record = (key[0], key[1], x, y)
        return self.replay_record[2], self.replay_record[3]

    def _draw(self, classes: Sequence[int], n_per_class: int) -> Tuple[Tensor, Tensor]:
        """The generation phase: ``n_per_class`` images of each class, through the synthetic cache if any (with
        ``replay_augment="reference"``, each passed through a JPEG of quality 75)."""
        desc = f"exp {self._exp} generation"
        with self.timer("generation", self._exp):
            if self.cache is not None:
                x, y = self.sample_cached(classes, n_per_class, task=self._exp, desc=desc)
            else:
                x, y = self.sample(classes, n_per_class, desc=desc)
            x, y = self.match_pixels(x, y)
            if self.config.replay_augment == "reference":  # the original code's samples are .jpeg files
                x = jpeg_round_trip(x)
        return x, y

    def match_pixels(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """``replay_pixel_match="class_histogram"``: each class's images of ``x`` (pixels in [0, 1]) matched, as one
        set, to the pixel histogram of its real images (:func:`~avalanche_drcpsd.histogram.match_histogram`);
        ``"class_mean_histogram"``: shifted to its real mean image first
        (:func:`~avalanche_drcpsd.histogram.shift_to_mean`). ``"none"``, or a class with no recorded statistics (one
        learned before the option was set): unchanged."""
        if self.config.replay_pixel_match == "none":
            return x, y
        x = x.clone()
        for k in y.unique().tolist():
            rows = y == k
            if int(k) in self.pixel_means and self.config.replay_pixel_match == "class_mean_histogram":
                x[rows] = shift_to_mean(x[rows], self.pixel_means[int(k)]).to(x.dtype)
            if int(k) in self.pixel_histograms:
                x[rows] = match_histogram(x[rows], self.pixel_histograms[int(k)]).to(x.dtype)
        return x, y

    def record_pixel_statistics(self, images: Tensor, labels: Tensor, classes: Optional[Sequence[int]] = None) -> None:
        """Record the pixel histogram (and, with ``replay_pixel_match="class_mean_histogram"``, the mean image) of
        the real ``images`` (pixels in [0, 1]) of each class in ``classes`` (default: every class in ``labels``)
        that has images here, as the statistics :meth:`match_pixels` maps its sets to (what the generator phase
        does when ``replay_pixel_match`` is on)."""
        for k in labels.unique().tolist() if classes is None else classes:
            rows = labels == k
            if rows.any():
                class_images = images[rows]
                self.pixel_histograms[int(k)] = pixel_histogram(class_images)
                if self.config.replay_pixel_match == "class_mean_histogram":
                    self.pixel_means[int(k)] = pixel_mean(class_images)

    def _kept_sets(self, classes: Sequence[int], n_per_class: int) -> Tuple[Tensor, Tensor]:
        """``replay_draw="once"``: the classes without a kept set are drawn now (from the generator as it was when
        they were learned: nothing has trained it since) and kept, as 8-bit images, for every later experience."""
        missing = [k for k in classes if k not in self.kept or len(self.kept[k]) != n_per_class]
        if missing:
            x, y = self._draw(missing, n_per_class)
            for k in missing:
                self.kept[k] = to_uint8(x[y == k])
        x = torch.cat([self.kept[k].float() / 255 for k in classes])
        y = torch.cat([torch.full((len(self.kept[k]),), k, dtype=torch.long) for k in classes])
        return x, y

    def cache_settings(self, classes: Sequence[int], n_per_class: int, seed: int) -> Dict[str, Any]:
        """Everything that determines :meth:`sample`'s images, JSON-able: the synthetic cache's manifest settings
        (classes, prompts, per-class seeds and embedding hashes, guidance, sampler, steps, batch size, the
        generator's identity and the image shape)."""
        c = self.config
        gen = self.generator
        classes = [int(k) for k in classes]
        captioned = [k for k in classes if k in self.buffer.caption_embeddings]
        shape = gen.image_shape
        return {
            "classes": classes, "n_per_class": int(n_per_class),
            "prompts": {str(k): self.buffer.prompts.get(k, "") for k in classes},
            "seeds": {str(k): int(seed) + k for k in classes},
            "embeddings_sha256": {str(k): tensor_sha256(self.buffer.embeddings[k]) for k in classes},
            "null_sha256": tensor_sha256(self.buffer.null),
            "guidance_scale": c.guidance_scale, "sampler": c.sampler, "steps": c.sampling_steps,
            "sample_batch_size": c.sample_batch_size, "generator": generator_identity(gen),
            "image_shape": list(shape),
            # only when not the default, so the manifests of earlier caches still match
            **({"guidance_draw": c.guidance_draw} if c.guidance_draw != "image" else {}),
            **({"guidance_interval": list(c.guidance_interval)} if c.guidance_interval is not None else {}),
            **({"caption_prompts": {str(k): self.buffer.caption_prompts[k] for k in captioned},
                "caption_embeddings_sha256": {str(k): tensor_sha256(self.buffer.caption_embeddings[k])
                                              for k in captioned}} if captioned else {}),
        }

    def sample_cached(self, classes: Sequence[int], n_per_class: int, *, task: int, seed: Optional[int] = None,
                      desc: str = "sampling") -> Tuple[Tensor, Tensor]:
        """:meth:`sample` through the synthetic cache: task ``task`` is read back when its manifest matches
        :meth:`cache_settings` and its files verify, else generated and written (images quantised to 8 bits)."""
        if self.cache is None:
            raise RuntimeError("no synthetic cache: set cache_dir or config.synthetic_cache_dir")
        if self.generator is None or self.buffer is None:
            raise RuntimeError("the generator has not been built yet: train on an experience first")
        seed = self._default_seed() if seed is None else seed
        settings = self.cache_settings(classes, n_per_class, seed)
        x, y, _ = self.cache.get_or_generate(task, settings,
                                             lambda: self.sample(classes, n_per_class, seed=seed, desc=desc))
        return x, y

    # --- hooks -------------------------------------------------------------------------------------------
    def before_training(self, strategy, **kwargs):
        self.setup()

    def before_training_exp(self, strategy, **kwargs):
        self.setup()
        if self.unlearned:
            raise RuntimeError(
                f"experience {strategy.experience.current_experience} comes after the generator and CPSD phases of "
                f"classes {self.unlearned} were skipped (generator_last_experience='skip' at the last experience of "
                "the stream trained before): the generator cannot replay them. Train the whole stream in one call, "
                "or use generator_last_experience='train' to continue a stream")
        self._exp = strategy.experience.current_experience
        self.replay_record = None
        self.check_inputs(strategy.experience.dataset.eval(), f"experience {self._exp}")
        classes = experience_classes(strategy.experience)
        if self.learned_classes and set(classes) <= set(self.learned_classes):
            warnings.warn(f"experience {self._exp} holds only classes the generator has learned already ({classes}): "
                          "the generator and CPSD phases learn nothing new, and dream replay treats them as old "
                          "classes. A stream made with class_ids_from_zero_in_each_exp=True reuses the ids 0..n-1 "
                          "in every experience, which a class-incremental method cannot tell apart; use "
                          "class_ids_from_zero_from_first_exp=True or the original ids", stacklevel=2)
        if self.generator is not None and self.generator.output_shape is None:  # resumed before any class
            self.generator.set_output_shape(tuple(strategy.experience.dataset[0][0].shape))
        self.begin_experience(self._exp)

    def begin_experience(self, experience: int) -> None:
        """The generation phase of experience ``experience`` (what ``before_training_exp`` runs, usable without a
        strategy): the replay set of every learned class, unless the one held already covers them."""
        self._exp = int(experience)
        old = self.learned_classes
        if old and self.generator is not None:
            self._replay_pixels(old, self.config.n_replay_per_class)

    @property
    def replay_set(self) -> Optional[Tuple[Tensor, Tensor]]:
        """``(pixels in [0, 1], labels)`` of the replay set drawn for the current experience (None before any)."""
        return None if self.replay_record is None else (self.replay_record[2], self.replay_record[3])

    def after_training_exp(self, strategy, **kwargs):
        if self.config.generator_last_experience == "skip" and is_last_experience(strategy.experience):
            self.unlearned = [k for k in experience_classes(strategy.experience) if k not in self.learned_classes]
            return
        self.learn_classes(*self.experience_pixels(strategy.experience))

    # --- learning new classes ----------------------------------------------------------------------------
    def learning_phases(self) -> Tuple[str, str]:
        """The generator and CPSD phases in the order ``cpsd_order`` runs them."""
        return ("cpsd", "generator") if self.config.cpsd_order == "before_generator" else ("generator", "cpsd")

    def learn_classes(self, images: Tensor, labels: Tensor, *, new: Optional[Sequence[int]] = None,
                      done: Sequence[str] = ()) -> None:
        """Generator and CPSD phases (:meth:`learning_phases`) for the classes in ``labels`` that the buffer does
        not hold yet, or for ``new`` (``images``: pixels in [0, 1], ``(B, C, H, W)``; :meth:`experience_pixels`
        gives them for an experience). The phases in ``done`` are skipped: a run resumed from the checkpoint that
        ended one of them continues with the next."""
        self.setup()
        if new is None:
            new = set(int(c) for c in labels.unique().tolist()) - set(self.learned_classes)
        new = sorted(int(c) for c in new)
        if not new:
            return
        if self.config.replay_pixel_match != "none":
            self.record_pixel_statistics(images, labels, new)
        old = [k for k in self.learned_classes if k not in new]
        fresh = self.config.generator_scope == "per_experience" and bool(old) and self.trainable and not done
        if fresh:  # every old class's set comes from the generator that learned it, before it is replaced
            self._kept_sets(old, self.config.n_replay_per_class)
        self.build_generator(images.shape[1:], fresh=fresh)
        tokens = self.class_tokens(new)
        for phase in self.learning_phases():
            if phase in done:
                continue
            if phase == "cpsd":
                self._cpsd_phase(images, labels, tokens)
            elif self.trainable and self.generator_steps(new) > 0:
                cond_new = tokens if self.config.cpsd_order == "after_generator" else \
                    {c: self.buffer.embeddings[c] for c in new}
                with self.timer("generator", self._exp):
                    self.train_generator(images, labels, cond_new)

    def generator_steps(self, new_classes: Sequence[int]) -> int:
        """Optimiser steps of the generator phase that learns ``new_classes``: ``generator_first_steps`` (when
        set) for a generator from scratch (no other class learned, or ``generator_scope="per_experience"``), else
        ``generator_steps``."""
        c = self.config
        scratch = c.generator_scope == "per_experience" or set(self.learned_classes) <= {int(k) for k in new_classes}
        if c.generator_first_steps is not None and scratch:
            return c.generator_first_steps
        return c.generator_steps

    def _cpsd_phase(self, images: Tensor, labels: Tensor, tokens: Dict[int, Tensor]) -> None:
        c = self.config
        with self.timer("cpsd", self._exp):
            for cls, tok in tokens.items():
                imgs = images[labels == cls]
                if c.cpsd_max_images_per_class is not None:
                    imgs = imgs[torch.randperm(len(imgs), generator=self.rng)[:c.cpsd_max_images_per_class]]
                steps = cpsd_steps(len(imgs), c.cpsd_epochs, c.cpsd_batch_size, c.cpsd_min_steps)
                prompts = caption_prompts(self.prompt(cls), self.captions[cls]) if cls in self.captions else None
                caption_tok = self.text_encoder.encode(prompts) if prompts else None
                with tqdm(total=steps, desc=f"exp {self._exp} CPSD class {cls}", disable=not self.verbose,
                          leave=False) as bar:
                    proj = train_cpsd_projection(
                        self.generator, tok if caption_tok is None else caption_tok, imgs, mode=c.projection,
                        epochs=c.cpsd_epochs, min_steps=c.cpsd_min_steps,
                        batch_size=c.cpsd_batch_size, lr=c.cpsd_lr, weight_decay=c.cpsd_weight_decay,
                        augment=reference_cpsd_augment if c.cpsd_augment == "reference" else None,
                        snr_gamma=c.snr_gamma, lam=c.lambda_mmd,
                        mmd_kind=c.mmd_kind, generator=self.rng, progress=bar.update)
                with torch.no_grad():
                    self.buffer.add(cls, proj(tok.to(self.config.device).unsqueeze(0))[0], self.prompt(cls))
                    if caption_tok is not None:
                        self.buffer.add_captions(cls, proj(caption_tok), prompts)

    def train_generator(self, images: Tensor, labels: Tensor, cond_new: Dict[int, Tensor]) -> None:
        """The generator phase: :meth:`generator_steps` steps of
        :func:`~avalanche_drcpsd.generator_training.train_generator` on the new classes' real images (LDM loss)
        and, when there are old classes and ``generator_distill_weight > 0``, generative distillation against a
        frozen copy of the generator as it was: its noise predictions on old-class inputs (the replay set, or
        fresh teacher samples with ``generator_distill_source="fresh"``) under the old classes' embeddings, or
        with ``generator_replay_loss="ldm"`` the denoising loss on those inputs (no teacher for the set). The
        batch split and the terms' weights follow ``generator_replay_weighting`` (:meth:`replay_split`)."""
        c = self.config
        old_classes = self.learned_classes
        fresh = c.generator_distill_source == "fresh"
        # a zero distillation weight is no distillation: no teacher, and the whole batch is the new classes' real
        # images (a zero-weighted replay share would only halve the real batch at the same cost)
        distill = None
        if old_classes and c.generator_distill_weight > 0 and (fresh or self.replay_record is not None):
            needs_teacher = fresh or c.generator_replay_loss == "distill"
            distill = DistillationSource(
                teacher=frozen_copy(self.generator) if needs_teacher else None, classes=list(old_classes),
                embeddings=self.buffer.stack(old_classes), teacher_steps=c.generator_teacher_steps,
                images=None if fresh else self.replay_record[2], labels=None if fresh else self.replay_record[3],
                loss=c.generator_replay_loss)
        exp = self._exp
        train_generator(self.generator, images, labels, cond_new, self.buffer.null, c,
                        steps=self.generator_steps(list(cond_new)),
                        split=self.replay_split(len(cond_new), len(old_classes) if distill else 0),
                        rng=self.rng, distill=distill, desc=f"exp {exp} generator", verbose=self.verbose,
                        on_error=lambda step: f"at step {step} of experience {exp}")

    def replay_split(self, n_new: int, n_old: int) -> Tuple[int, int, float, float]:
        """``(b_new, b_old, w_new, w_old)``: real and replay images per generator step and the weights of the LDM
        and the distillation terms, for ``n_new`` new and ``n_old`` old classes (``generator_replay_weighting``).

        * ``fraction``: ``b_old = round(B * generator_replay_fraction)``, each term weighted by its batch share;
        * ``balanced``: the same with the fraction ``n_old / (n_new + n_old)``: every seen class an equal share;
        * ``task``: ``b_new = b_old = B``, weights :math:`1/(t+1)` and :math:`(1 - 1/(t+1))` at experience
          :math:`t` (the experience index).

        The distillation weight is multiplied by ``generator_distill_weight``; with weight 0 :meth:`train_generator`
        distils nothing and asks for the split with ``n_old=0`` (the whole batch real)."""
        c = self.config
        batch = c.generator_batch_size
        if n_old == 0:
            return batch, 0, 1.0, 0.0
        if c.generator_replay_weighting == "task":
            w = 1.0 / (self._exp + 1)
            return batch, batch, w, (1.0 - w) * c.generator_distill_weight
        fraction = (c.generator_replay_fraction if c.generator_replay_weighting == "fraction"
                    else n_old / (n_new + n_old))
        b_old = min(max(round(batch * fraction), 1), batch - 1)
        b_new = batch - b_old
        return b_new, b_old, b_new / batch, c.generator_distill_weight * b_old / batch
