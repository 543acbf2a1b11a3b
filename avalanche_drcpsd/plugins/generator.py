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

Reference: DR-CPSD (Dream Replay with CLIP Projection Stable Diffusion); generative distillation: S. Masip et al.,
"Continual Learning of Diffusion Models with Generative Distillation", arXiv:2311.14028.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch import Tensor
from tqdm.auto import tqdm

from ..config import DRCPSDConfig
from ..cpsd import EmbeddingBuffer, train_cpsd_projection
from ..generator import DiffusionGenerator
from ..losses import generative_distillation_loss, ldm_loss
from ..text_encoders import TextEncoder, load_text_encoder
from ..utils import PhaseTimer, dataset_tensors, frozen_copy

__all__ = ["CPSDGeneratorPlugin"]


class CPSDGeneratorPlugin(SupervisedPlugin):
    """Owns the generator, the frozen text encoder and the embedding buffer; a :class:`SyntheticSource`."""

    def __init__(
        self,
        config: Optional[DRCPSDConfig] = None,
        *,
        class_names: Optional[Sequence[str]] = None,
        generator: Optional[DiffusionGenerator] = None,
        text_encoder: Optional[TextEncoder] = None,
        timer: Optional[PhaseTimer] = None,
        verbose: bool = True,
    ):
        """
        :param config: DR-CPSD hyper-parameters (reference defaults when None).
        :param class_names: names used in the prompts, index = class id (``"class {id}"`` when None).
        :param generator: a ready generator; else one is built at the first experience (or loaded from
            ``config.generator_path``).
        :param text_encoder: a frozen text encoder; else ``config.text_encoder`` is loaded (offline default when None).
        """
        super().__init__()
        self.config = (config or DRCPSDConfig()).validate()
        self.class_names = list(class_names) if class_names is not None else None
        self.generator = generator
        self.text_encoder = text_encoder
        self.timer = timer if timer is not None else PhaseTimer()
        self.verbose = verbose
        self.buffer: Optional[EmbeddingBuffer] = None
        self.rng = torch.Generator().manual_seed(self.config.seed)
        self.trainable = self.config.generator == "unet"
        self._replay: Optional[Tuple[Tuple[int, ...], int, Tensor, Tensor]] = None
        self._exp = 0

    # --- set-up ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the text encoder and (when configured) the generator now, so a bad path fails before training."""
        if self.text_encoder is None:
            self.text_encoder = load_text_encoder(self.config.text_encoder)
        if self.buffer is None:
            self.buffer = EmbeddingBuffer(null=self.text_encoder.null_embedding(),
                                          encoder_identity=self.text_encoder.identity)
        if self.generator is None and self.config.generator_path is not None:
            self.generator = DiffusionGenerator.from_pretrained(self.config.generator_path, device=self.config.device)

    def _ensure_generator(self, image_shape: Sequence[int]) -> DiffusionGenerator:
        if self.generator is None:
            c = self.config
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(c.seed)
                self.generator = DiffusionGenerator.build(
                    image_shape=image_shape, cross_attention_dim=self.text_encoder.hidden_size,
                    block_out_channels=c.unet_block_out_channels, layers_per_block=c.unet_layers_per_block,
                    attention_head_dim=c.unet_attention_head_dim, patch_size=c.patch_size,
                    num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                ).to(c.device)
        return self.generator

    def prompt(self, cls: int) -> str:
        name = self.class_names[cls] if self.class_names is not None and cls < len(self.class_names) else f"class {cls}"
        return self.config.prompt_template.format(name)

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
        seed = c.seed * 1_000_003 + 7919 * self._exp if seed is None else seed
        gen = self.generator
        was_training = gen.training
        gen.eval()
        xs, ys = [], []
        total = len(classes) * n_per_class
        bar = tqdm(total=total, desc=desc, disable=not self.verbose, leave=False)
        for cls in classes:
            g = torch.Generator().manual_seed(seed + int(cls))
            emb = self.buffer.stack([cls])
            for start in range(0, n_per_class, c.sample_batch_size):
                b = min(c.sample_batch_size, n_per_class - start)
                xs.append(gen.sample(emb.expand(b, -1, -1), self.buffer.null, guidance_scale=c.guidance_scale,
                                     num_inference_steps=c.sampling_steps, sampler=c.sampler, generator=g).cpu())
                ys.append(torch.full((b,), int(cls), dtype=torch.long))
                bar.update(b)
        bar.close()
        gen.train(was_training)
        return torch.cat(xs), torch.cat(ys)

    def sample_replay(self, classes: Sequence[int], n_per_class: int) -> Tuple[Tensor, Tensor]:
        """The replay set of this experience (generated once, in ``before_training_exp``, and reused)."""
        key = (tuple(int(c) for c in classes), int(n_per_class))
        if self._replay is None or self._replay[:2] != key:
            with self.timer("generation", self._exp):
                x, y = self.sample(key[0], key[1], desc=f"exp {self._exp} generation")
            self._replay = (key[0], key[1], x, y)
        return self._replay[2], self._replay[3]

    # --- hooks -------------------------------------------------------------------------------------------
    def before_training(self, strategy, **kwargs):
        self.setup()

    def before_training_exp(self, strategy, **kwargs):
        self.setup()
        self._exp = strategy.experience.current_experience
        self._replay = None
        old = self.learned_classes
        if old and self.generator is not None:
            self.sample_replay(old, self.config.n_replay_per_class)

    def after_training_exp(self, strategy, **kwargs):
        x, y = dataset_tensors(strategy.experience.dataset.eval())
        self.learn_classes(x, y)

    # --- learning new classes ----------------------------------------------------------------------------
    def learn_classes(self, images: Tensor, labels: Tensor) -> None:
        """Generator and CPSD phases for the classes in ``labels`` that the buffer does not hold yet."""
        self.setup()
        new = sorted(set(int(c) for c in labels.unique().tolist()) - set(self.learned_classes))
        if not new:
            return
        self._ensure_generator(images.shape[1:])
        tokens = {c: self.text_encoder.encode([self.prompt(c)])[0] for c in new}
        if self.config.cpsd_order == "before_generator":
            self._cpsd_phase(images, labels, tokens)
            cond_new = {c: self.buffer.embeddings[c] for c in new}
        else:
            cond_new = tokens
        if self.trainable and self.config.generator_steps > 0:
            with self.timer("generator", self._exp):
                self.train_generator(images, labels, cond_new)
        if self.config.cpsd_order == "after_generator":
            self._cpsd_phase(images, labels, tokens)

    def _cpsd_phase(self, images: Tensor, labels: Tensor, tokens: Dict[int, Tensor]) -> None:
        c = self.config
        with self.timer("cpsd", self._exp):
            for cls, tok in tokens.items():
                imgs = images[labels == cls]
                if c.cpsd_max_images_per_class is not None:
                    imgs = imgs[torch.randperm(len(imgs), generator=self.rng)[:c.cpsd_max_images_per_class]]
                steps = c.cpsd_epochs * -(-len(imgs) // c.cpsd_batch_size)
                with tqdm(total=steps, desc=f"exp {self._exp} CPSD class {cls}", disable=not self.verbose,
                          leave=False) as bar:
                    proj = train_cpsd_projection(
                        self.generator, tok, imgs, mode=c.projection, epochs=c.cpsd_epochs,
                        batch_size=c.cpsd_batch_size, lr=c.cpsd_lr, snr_gamma=c.snr_gamma, lam=c.lambda_mmd,
                        mmd_kind=c.mmd_kind, generator=self.rng, progress=bar.update)
                with torch.no_grad():
                    self.buffer.add(cls, proj(tok.to(self.config.device).unsqueeze(0))[0], self.prompt(cls))

    def train_generator(self, images: Tensor, labels: Tensor, cond_new: Dict[int, Tensor]) -> None:
        """``generator_steps`` AdamW steps on batches that mix the new classes' real images (LDM loss) and, with
        share ``generator_replay_fraction``, the old classes' replay set (generative distillation against a frozen
        copy of the generator as it was); each term is weighted by its share of the batch."""
        c = self.config
        gen = self.generator
        device = c.device
        old_classes = self.learned_classes
        teacher = frozen_copy(gen) if (old_classes and self._replay is not None) else None
        new_ids = sorted(cond_new)
        emb_new = torch.stack([cond_new[k] for k in new_ids]).to(device)
        lookup_new = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
        lookup_new[torch.tensor(new_ids)] = torch.arange(len(new_ids))
        null = self.buffer.null.to(device)
        if teacher is not None:
            x_old, y_old = self._replay[2], self._replay[3]
            emb_old = self.buffer.stack(old_classes).to(device)
            lookup_old = torch.full((max(old_classes) + 1,), -1, dtype=torch.long)
            lookup_old[torch.tensor(old_classes)] = torch.arange(len(old_classes))
            b_old = round(c.generator_batch_size * c.generator_replay_fraction)
            b_old = min(max(b_old, 1), c.generator_batch_size - 1)
        else:
            b_old = 0
        b_new = c.generator_batch_size - b_old
        real_idx = torch.nonzero(lookup_new[labels] >= 0).flatten()
        optimizer = torch.optim.AdamW(gen.unet.parameters(), lr=c.generator_lr, weight_decay=0.0)
        gen.train()
        bar = tqdm(range(c.generator_steps), desc=f"exp {self._exp} generator", disable=not self.verbose, leave=False)
        for step in bar:
            pick = real_idx[torch.randint(len(real_idx), (b_new,), generator=self.rng)]
            x = images[pick].to(device)
            cond = self._drop(emb_new[lookup_new[labels[pick]].to(device)], null)
            z_t, noise, t = gen.noisy(gen.encode(x), self.rng)
            loss_new = ldm_loss(gen.predict_noise(z_t, t, cond), noise, gen.snr(t), c.snr_gamma)
            loss = loss_new * (b_new / c.generator_batch_size)
            if teacher is not None:
                pick = torch.randint(len(y_old), (b_old,), generator=self.rng)
                cond_o = self._drop(emb_old[lookup_old[y_old[pick]].to(device)], null)
                z_t, _, t = gen.noisy(gen.encode(x_old[pick].to(device)), self.rng)
                with torch.no_grad():
                    target = teacher.predict_noise(z_t, t, cond_o)
                loss_gd = generative_distillation_loss(gen.predict_noise(z_t, t, cond_o), target)
                loss = loss + c.generator_distill_weight * loss_gd * (b_old / c.generator_batch_size)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite generator loss ({loss.item()}) at step {step} of experience "
                                         f"{self._exp}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        gen.eval()

    def _drop(self, cond: Tensor, null: Tensor) -> Tensor:
        """Classifier-free guidance training: replace each condition by the null one with p = cond_dropout."""
        p = self.config.cond_dropout
        if p <= 0:
            return cond
        mask = (torch.rand(cond.shape[0], generator=self.rng) < p).to(cond.device).view(-1, 1, 1)
        return torch.where(mask, null.expand_as(cond), cond)
