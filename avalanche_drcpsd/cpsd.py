r"""CPSD embeddings: a per-class projection of the frozen text encoder's token states, and their buffer.

A class prompt ("a photo of a {name}") is encoded by the frozen text encoder into token states
:math:`E_c \in \mathbb{R}^{L\times D}`. The CLIP projection (the paper: ``Linear(77, 77)`` over the token
positions, identity weight, zero bias) gives the class embedding :math:`e_c = W_c E_c + b_c` and is trained
for one epoch on the class's real images with :math:`\mathcal{L}_{CPSD}=\mathcal{L}_{LDM}+\lambda\mathcal{L}_{MMD}`
while the denoiser is frozen. The projected embeddings are the *embedding buffer*: with the generator, the only
thing kept of an old class.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import CHOICES
from .losses import cpsd_loss
from .utils import atomic_write

__all__ = ["CPSDProjection", "EmbeddingBuffer", "cpsd_steps", "train_cpsd_projection", "PROJECTIONS"]

#: the forms of the projection (:class:`CPSDProjection`)
PROJECTIONS = CHOICES["projection"]


class CPSDProjection(nn.Module):
    r"""Identity-initialised linear map of token states ``(B, L, D)``.

    ``mode="token"`` (the paper's description): :math:`e = W E + b\mathbf{1}^\top` with
    :math:`W\in\mathbb{R}^{L\times L}`, mixing token positions; ``mode="hidden"``: :math:`e = E W^\top + b` with
    :math:`W\in\mathbb{R}^{D\times D}`; ``mode="reference"``: what the original code computes
    (isaacNingLee/CPSD 769e79b, ``cpsd/train_cpsd.py`` l. 380 and ``cpsd/cpsd.py`` l. 78:
    ``embed_trans(h.reshape(-1, 77)).reshape(h.shape)``): the ``(L, D)`` states are flattened row-major and cut
    into runs of ``L`` consecutive values, each mapped by the same ``Linear(L, L)``. With CLIP's ``D = 768`` a run
    is 77 hidden values of one token, or the end of one token and the start of the next; it does not mix token
    positions. All three start as the identity.
    """

    def __init__(self, length: int, hidden_size: int, mode: str = "token"):
        super().__init__()
        if mode not in PROJECTIONS:
            raise ValueError(f"mode={mode!r}; expected one of {list(PROJECTIONS)}")
        self.mode = mode
        self.length = length
        n = hidden_size if mode == "hidden" else length
        # no random initialisation to overwrite: building a projection draws nothing from torch's global random
        # stream, so the classifier's data order does not depend on whether (or for how many classes) CPSD ran
        self.linear = nn.utils.skip_init(nn.Linear, n, n)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(n))
            self.linear.bias.zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        if self.mode == "hidden":
            return self.linear(tokens)
        if self.mode == "reference":
            return self.linear(tokens.reshape(-1, self.length)).reshape(tokens.shape)
        return self.linear(tokens.transpose(-1, -2)).transpose(-1, -2)


class EmbeddingBuffer:
    """Projected class embeddings ``(L, D)`` keyed by class id, the null (empty prompt) embedding for guidance,
    the prompts, and the identity of the text encoder that made them. Saved as one safetensors file whose
    metadata holds the prompts and the encoder identity (no pickle, nothing executed on load)."""

    def __init__(self, null: Optional[Tensor] = None, encoder_identity: Optional[dict] = None):
        self.embeddings: Dict[int, Tensor] = {}
        self.prompts: Dict[int, str] = {}
        #: per class with a caption list (:mod:`~avalanche_drcpsd.captions`): the projected embeddings ``(K, L, D)``
        #: of its K caption prompts, which :meth:`draw` samples from, and those prompts
        self.caption_embeddings: Dict[int, Tensor] = {}
        self.caption_prompts: Dict[int, List[str]] = {}
        self.null = null
        self.encoder_identity = dict(encoder_identity or {})

    @property
    def classes(self) -> List[int]:
        return sorted(self.embeddings)

    def __contains__(self, cls: int) -> bool:
        return int(cls) in self.embeddings

    def __len__(self) -> int:
        return len(self.embeddings)

    def add(self, cls: int, embedding: Tensor, prompt: str = "") -> None:
        if embedding.dim() != 2:
            raise ValueError(f"embedding for class {cls} has shape {tuple(embedding.shape)}; expected (L, D)")
        if self.null is not None and embedding.shape != self.null.shape:
            raise ValueError(f"embedding for class {cls} has shape {tuple(embedding.shape)}; "
                             f"the buffer holds {tuple(self.null.shape)}")
        self.embeddings[int(cls)] = embedding.detach().float().cpu().clone()
        self.prompts[int(cls)] = prompt

    def add_captions(self, cls: int, embeddings: Tensor, prompts: Sequence[str]) -> None:
        """The ``(K, L, D)`` projected embeddings of class ``cls``'s K caption prompts."""
        if int(cls) not in self.embeddings:
            raise KeyError(f"class {cls} has no class embedding; add() it before its captions")
        shape = self.embeddings[int(cls)].shape
        if embeddings.dim() != 3 or embeddings.shape[1:] != shape or embeddings.shape[0] != len(prompts):
            raise ValueError(f"caption embeddings of class {cls} have shape {tuple(embeddings.shape)}; expected "
                             f"({len(prompts)}, {shape[0]}, {shape[1]}), one per prompt")
        self.caption_embeddings[int(cls)] = embeddings.detach().float().cpu().clone()
        self.caption_prompts[int(cls)] = list(prompts)

    def draw(self, cls: int, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``(n, L, D)`` conditions for ``n`` images of class ``cls``: one of its caption embeddings drawn
        uniformly per image (with ``generator``) when it has captions, else its class embedding ``n`` times
        (drawing nothing, so a buffer without captions samples exactly as before they existed)."""
        cls = int(cls)
        if cls in self.caption_embeddings:
            captions = self.caption_embeddings[cls]
            return captions[torch.randint(len(captions), (n,), generator=generator)]
        return self.stack([cls]).expand(n, -1, -1)

    def stack(self, classes: Iterable[int]) -> Tensor:
        """``(N, L, D)`` embeddings of the given class ids (in order)."""
        classes = [int(c) for c in classes]
        missing = [c for c in classes if c not in self.embeddings]
        if missing:
            raise KeyError(f"classes {missing} are not in the embedding buffer (it holds {self.classes})")
        return torch.stack([self.embeddings[c] for c in classes])

    # ------------------------------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> None:
        tensors = {f"class_{c}": e.contiguous() for c, e in self.embeddings.items()}
        tensors.update({f"captions_{c}": e.contiguous() for c, e in self.caption_embeddings.items()})
        if self.null is not None:
            tensors["null"] = self.null.detach().float().cpu().contiguous()
        metadata = {
            "format": "avalanche_drcpsd.EmbeddingBuffer/1",
            "prompts": json.dumps({str(c): p for c, p in self.prompts.items()}),
            "encoder_identity": json.dumps(self.encoder_identity),
        }
        if self.caption_prompts:  # absent without captions: such files are as they were
            metadata["caption_prompts"] = json.dumps({str(c): p for c, p in self.caption_prompts.items()})
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "EmbeddingBuffer":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"embedding buffer {path!r} does not exist; expected a .safetensors file "
                                    "written by EmbeddingBuffer.save")
        from safetensors import safe_open

        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
        if metadata.get("format") != "avalanche_drcpsd.EmbeddingBuffer/1":
            raise ValueError(f"{path!r} is not an embedding buffer (format={metadata.get('format')!r})")
        tensors = load_file(path)
        buf = cls(null=tensors.pop("null", None), encoder_identity=json.loads(metadata["encoder_identity"]))
        prompts = json.loads(metadata["prompts"])
        captions = {k: v for k, v in tensors.items() if k.startswith("captions_")}
        for key, value in tensors.items():
            if key.startswith("class_"):
                c = int(key.split("_", 1)[1])
                buf.add(c, value, prompts.get(str(c), ""))
        caption_prompts = json.loads(metadata.get("caption_prompts", "{}"))
        for key, value in sorted(captions.items()):
            c = int(key.split("_", 1)[1])
            buf.add_captions(c, value, caption_prompts.get(str(c), [""] * len(value)))
        return buf


def cpsd_steps(n_images: int, epochs: int, batch_size: int, min_steps: int = 0) -> int:
    """The optimiser steps of :func:`train_cpsd_projection`: ``epochs`` passes of ``ceil(n / batch_size)`` batches,
    at least ``min_steps``."""
    return max(epochs * -(-n_images // batch_size), min_steps)


def train_cpsd_projection(
    denoiser,
    tokens: Tensor,
    images: Tensor,
    *,
    mode: str = "token",
    epochs: int = 1,
    batch_size: int = 4,
    min_steps: int = 0,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    augment: Optional[Callable[[Tensor, Optional[torch.Generator]], Tensor]] = None,
    snr_gamma: Optional[float] = 5.0,
    lam: float = 0.003,
    mmd_kind: str = "mean",
    generator: Optional[torch.Generator] = None,
    progress: Optional[callable] = None,
) -> CPSDProjection:
    """Fit one class's projection with the denoiser frozen.

    ``denoiser`` provides ``encode(images)``, ``noisy(z0, generator)``, ``predict_noise(z_t, t, cond)`` and
    ``snr(t)`` (e.g. :class:`~avalanche_drcpsd.generator.DiffusionGenerator`); ``tokens`` are the frozen text
    states ``(L, D)`` of the class prompt, or ``(K, L, D)`` of K caption prompts, one drawn (with ``generator``)
    for every image of every batch; ``images`` its real images in [0, 1]; ``augment(batch, generator)``
    (e.g. :func:`~avalanche_drcpsd.augment.reference_cpsd_augment`) transforms each batch before it is encoded. AdamW
    with ``lr`` and ``weight_decay`` (the original code: 4e-4 and 0.01). ``epochs`` passes over the reshuffled images,
    and more until ``min_steps`` optimiser steps are done (:func:`cpsd_steps`). Returns the trained projection.
    """
    if tokens.dim() not in (2, 3):
        raise ValueError(f"tokens of shape {tuple(tokens.shape)}; expected (L, D) or (K, L, D)")
    length, hidden = tokens.shape[-2:]
    device = next(denoiser.parameters()).device
    projection = CPSDProjection(length, hidden, mode).to(device)
    optimizer = torch.optim.AdamW(projection.parameters(), lr=lr, weight_decay=weight_decay)
    captions = tokens.dim() == 3
    tokens = tokens.to(device) if captions else tokens.to(device).unsqueeze(0)
    requires = [p.requires_grad for p in denoiser.parameters()]
    for p in denoiser.parameters():
        p.requires_grad_(False)
    try:
        n = images.shape[0]
        total = cpsd_steps(n, epochs, batch_size, min_steps)
        done = 0
        while done < total:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                if done == total:
                    break
                done += 1
                batch = images[order[start:start + batch_size]]
                if augment is not None:
                    batch = augment(batch, generator)
                z_t, noise, t = denoiser.noisy(denoiser.encode(batch), generator)
                if captions:  # a caption per image, drawn after the noise
                    cond = projection(tokens[torch.randint(len(tokens), (batch.shape[0],), generator=generator)])
                else:
                    cond = projection(tokens).expand(batch.shape[0], -1, -1)
                loss = cpsd_loss(denoiser.predict_noise(z_t, t, cond), noise, denoiser.snr(t), snr_gamma, lam, mmd_kind)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if progress is not None:
                    progress(1)
    finally:
        for p, r in zip(denoiser.parameters(), requires):
            p.requires_grad_(r)
    return projection.eval()
