"""Frozen text encoders that turn class prompts into CLIP-style token hidden states.

DR-CPSD encodes a class prompt (``"a photo of a dog"``) once with a *frozen* text encoder into the
per-token hidden states of its last layer, shape ``(L, D)`` (``L`` = context length, 77 for CLIP),
and then learns a per-class ``Linear(L, L)`` projection over the token axis.  This module provides
the encoders; nothing in it is ever trained and nothing in it downloads anything:

* :func:`default_text_encoder` -- the offline default: a small, randomly initialised (NOT pretrained)
  transformers ``CLIPTextModel`` with the real CLIP BPE tokenizer;
* :class:`HFCLIPTextEncoder` -- a transformers ``CLIPTextModel`` directory written by
  ``save_pretrained`` (also the ``text_encoder/`` folder of a Stable Diffusion checkpoint);
* :class:`OpenCLIPTextEncoder` -- the text tower of an open_clip model, from a local checkpoint file;
* :func:`load_text_encoder` -- builds any of them from a JSON-able spec (what a run config stores).

Every encoder returns ``float32`` tensors of shape ``(B, L, D)``: the last layer's hidden states
after the final layer norm, for every token position including padding (not a pooled vector).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import pickle
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .utils import freeze, parse_dtype

__all__ = [
    "TextEncoderError",
    "MissingWeightsError",
    "TextEncoder",
    "HFCLIPTextEncoder",
    "OpenCLIPTextEncoder",
    "build_clip_tokenizer",
    "default_text_encoder",
    "load_text_encoder",
    "CLIP_VOCAB_SIZE",
    "CLIP_CONTEXT_LENGTH",
]

PathLike = Union[str, "os.PathLike[str]"]
DeviceLike = Union[str, torch.device]

CLIP_VOCAB_SIZE = 49408
"""Size of the CLIP BPE vocabulary: 256 bytes x 2 + 48 894 merges + 2 special tokens."""
CLIP_CONTEXT_LENGTH = 77
"""Context length of every released CLIP text encoder."""

_BUNDLED_TOKENIZER = "open_clip:bpe_simple_vocab_16e6.txt.gz"
_SOT, _EOT = "<|startoftext|>", "<|endoftext|>"
_HF_CONFIG = "config.json"
_HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HF_MODEL_TYPES = ("clip_text_model", "clip")


class TextEncoderError(ValueError):
    """A text encoder could not be built or used: bad spec, path, model name or prompts."""


class MissingWeightsError(TextEncoderError, FileNotFoundError):
    """The weights file (or directory) a text encoder should load does not exist."""


# --------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------


def _check_prompts(prompts: Sequence[str]) -> List[str]:
    """Return ``prompts`` as a list, or raise :class:`TextEncoderError` unless it is a non-empty sequence of str."""
    if isinstance(prompts, str):
        raise TextEncoderError(f"prompts must be a sequence of str, got a single str {prompts!r}; wrap it in a list")
    if not isinstance(prompts, Sequence):
        raise TextEncoderError(f"prompts must be a non-empty sequence of str, got {type(prompts).__name__} {prompts!r}")
    if len(prompts) == 0:
        raise TextEncoderError("prompts must be a non-empty sequence of str, got an empty sequence")
    bad = [(i, p) for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        i, p = bad[0]
        raise TextEncoderError(f"prompts must all be str, but prompts[{i}] is {type(p).__name__} {p!r}")
    return list(prompts)


class TextEncoder(nn.Module, ABC):
    """A frozen text encoder: prompts -> last-layer token hidden states ``(B, L, D)``.

    The wrapped network is frozen at construction (eval mode, ``requires_grad=False``) and stays in
    eval mode even if a parent module calls ``.train()``; :meth:`encode` runs under
    ``torch.no_grad()`` (not ``inference_mode``, so its outputs can feed a trainable projection).

    Attributes:
        context_length: ``L``, the number of token positions every prompt is padded/truncated to.
        hidden_size: ``D``, the width of each token's hidden state.
        identity: JSON-able description ``{"kind", "model", "checkpoint", "config"}`` that a run
            records next to the embeddings it made.
    """

    def __init__(self, model: nn.Module, *, context_length: int, hidden_size: int, identity: Dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.context_length = int(context_length)
        self.hidden_size = int(hidden_size)
        self.identity = identity
        freeze(self)

    def train(self, mode: bool = True) -> "TextEncoder":
        """Ignore ``mode``: a frozen encoder always stays in eval mode."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """The device of the encoder's weights (outputs of :meth:`encode` live there)."""
        return next(self.model.parameters()).device

    @abstractmethod
    def tokenize(self, prompts: List[str]) -> Tensor:
        """Token ids ``(B, L)`` (int64, CPU) of already validated ``prompts``, padded/truncated to ``L``."""

    @abstractmethod
    def _hidden_states(self, input_ids: Tensor) -> Tensor:
        """Last-layer hidden states after the final layer norm, ``(B, L, D)``, for ``input_ids`` on :attr:`device`."""

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Encode ``prompts`` into float32 hidden states of shape ``(len(prompts), L, D)`` on :attr:`device`.

        Raises:
            TextEncoderError: ``prompts`` is not a non-empty sequence of str.
        """
        input_ids = self.tokenize(_check_prompts(prompts)).to(self.device)
        return self._hidden_states(input_ids).float()

    def null_embedding(self) -> Tensor:
        """The ``(L, D)`` encoding of the empty prompt ``""`` (the unconditional input for classifier-free guidance)."""
        return self.encode([""])[0]

    def weights_fingerprint(self) -> str:
        """SHA-256 over the names, dtypes, shapes and bytes of all weights: a cheap-to-store exact identity.

        Costs one pass over the weights (about a second for a CLIP ViT-L text tower), so it is
        computed on demand rather than stored in :attr:`identity`.
        """
        digest = hashlib.sha256()
        for name, tensor in self.model.state_dict().items():
            data = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def extra_repr(self) -> str:
        kind = self.identity.get("kind")
        return f"kind={kind!r}, context_length={self.context_length}, hidden_size={self.hidden_size}"


# --------------------------------------------------------------------------------------------------
# CLIP BPE tokenizer from open_clip's bundled vocabulary
# --------------------------------------------------------------------------------------------------


def _write_clip_tokenizer_files(out_dir: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` built exactly like open_clip's ``SimpleTokenizer`` vocabulary."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe  # default_bpe(): the bundled .txt.gz

    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [_SOT, _EOT]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(tokens)}, f, ensure_ascii=False)
    with open(out_dir / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


@functools.lru_cache(maxsize=None)
def _cached_tokenizer_dir() -> Path:
    """A per-process temporary directory holding the tokenizer files (built once)."""
    out_dir = Path(tempfile.mkdtemp(prefix="drcpsd-clip-tokenizer-"))
    _write_clip_tokenizer_files(out_dir)
    return out_dir


def _load_clip_tokenizer(directory: Path, context_length: int = CLIP_CONTEXT_LENGTH):
    """``CLIPTokenizer`` from local files in ``directory``, with ``model_max_length`` set to ``context_length``."""
    from transformers import CLIPTokenizer

    # transformers 5.x: CLIPTokenizer(vocab_file=..., merges_file=...) silently ignores those keywords and
    # returns a 3-token tokenizer; from_pretrained on the local directory is the robust way to load files.
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.model_max_length = context_length
    return tokenizer


def build_clip_tokenizer(out_dir: Optional[PathLike] = None, *, context_length: int = CLIP_CONTEXT_LENGTH):
    """A real CLIP BPE ``transformers.CLIPTokenizer`` built offline from open_clip's bundled vocabulary.

    Writes ``vocab.json`` + ``merges.txt`` (same construction as open_clip's ``SimpleTokenizer``:
    byte characters, byte characters + ``</w>``, the first 48 894 merges, ``<|startoftext|>``,
    ``<|endoftext|>``; 49 408 tokens) to ``out_dir`` -- or, when ``out_dir`` is None, to a temporary
    directory built once per process -- and loads a ``CLIPTokenizer`` from them.  Its ids equal
    open_clip's for ordinary prompts; it pads with ``<|endoftext|>`` (49407) where open_clip pads with 0.
    """
    directory = _cached_tokenizer_dir() if out_dir is None else Path(out_dir)
    if out_dir is not None:
        _write_clip_tokenizer_files(directory)
    return _load_clip_tokenizer(directory, context_length)


# --------------------------------------------------------------------------------------------------
# transformers CLIPTextModel
# --------------------------------------------------------------------------------------------------


def _has_tokenizer_files(directory: Path) -> bool:
    has_bpe_files = (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    return has_bpe_files or (directory / "tokenizer.json").is_file()


def _tokenizer_dirs(model_dir: Path) -> List[Path]:
    """Where to look for tokenizer files: the model directory, then its Stable Diffusion sibling.

    ``.../text_encoder`` -> ``.../tokenizer`` and ``.../text_encoder_2`` -> ``.../tokenizer_2``.
    """
    candidates = [model_dir]
    if model_dir.name.startswith("text_encoder"):
        candidates.append(model_dir.parent / model_dir.name.replace("text_encoder", "tokenizer", 1))
    return candidates


def _check_hf_directory(model_dir: Path) -> None:
    """Validate a ``save_pretrained`` directory (exists, CLIP ``config.json``, a weights file) without loading it."""
    expected = (
        "a transformers CLIPTextModel (or CLIPModel) directory saved with save_pretrained "
        "(config.json + model.safetensors)"
    )
    if not model_dir.is_dir():
        raise MissingWeightsError(f"text encoder directory {str(model_dir)!r} does not exist; expected {expected}")
    config_path = model_dir / _HF_CONFIG
    if not config_path.is_file():
        raise TextEncoderError(f"no {_HF_CONFIG} in text encoder directory {str(model_dir)!r}; expected {expected}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TextEncoderError(f"cannot read {str(config_path)!r} as JSON ({exc}); expected {expected}") from exc
    model_type = config.get("model_type")
    if model_type not in _HF_MODEL_TYPES:
        raise TextEncoderError(
            f"{str(config_path)!r} has model_type {model_type!r}, expected one of {list(_HF_MODEL_TYPES)}"
        )
    if not any((model_dir / name).is_file() for name in _HF_WEIGHT_FILES):
        raise MissingWeightsError(
            f"no weights in text encoder directory {str(model_dir)!r}: expected one of {list(_HF_WEIGHT_FILES)}"
        )


class HFCLIPTextEncoder(TextEncoder):
    """A frozen transformers ``CLIPTextModel`` with its ``CLIPTokenizer``.

    The hidden states are ``last_hidden_state`` (after ``final_layer_norm``) for ids padded to
    ``max_position_embeddings`` with the tokenizer's pad token, computed without an attention mask
    (the causal mask keeps real tokens independent of the padding), as Stable Diffusion does.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, identity: Dict[str, Any]) -> None:
        config = model.config
        if len(tokenizer) > config.vocab_size:
            raise TextEncoderError(
                f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}"
            )
        super().__init__(
            model,
            context_length=config.max_position_embeddings,
            hidden_size=config.hidden_size,
            identity=identity,
        )
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        directory: PathLike,
        *,
        device: DeviceLike = "cpu",
        dtype: torch.dtype = torch.float32,
        subfolder: Optional[str] = None,
    ) -> "HFCLIPTextEncoder":
        """Load a ``CLIPTextModel`` saved with ``save_pretrained`` from ``directory`` (``/subfolder``), offline.

        Weights are read with ``use_safetensors=True`` when a ``.safetensors`` file is present and
        otherwise by transformers' ``torch.load(weights_only=True)``; no remote code is run.  The
        tokenizer comes from the model directory, else from the Stable Diffusion sibling
        (``text_encoder`` -> ``tokenizer``), when ``vocab.json`` + ``merges.txt`` (or
        ``tokenizer.json``) are there; otherwise it is :func:`build_clip_tokenizer`'s.

        Raises:
            MissingWeightsError: the directory or its weights file does not exist.
            TextEncoderError: no ``config.json``, not a CLIP text model, checkpoint keys missing, or a
                ``.bin`` checkpoint holding pickled objects (refused by ``weights_only=True``, never run).
        """
        model_dir = Path(directory) / subfolder if subfolder else Path(directory)
        _check_hf_directory(model_dir)
        from transformers import CLIPTextModel

        use_safetensors = any(model_dir.glob("*.safetensors")) or (model_dir / "model.safetensors.index.json").is_file()
        try:
            model, info = CLIPTextModel.from_pretrained(
                str(model_dir),
                local_files_only=True,
                use_safetensors=use_safetensors,
                trust_remote_code=False,
                dtype=dtype,
                output_loading_info=True,
            )
        except pickle.UnpicklingError as exc:
            raise TextEncoderError(
                f"refusing to unpickle non-tensor objects from the weights in {str(model_dir)!r}: {exc}"
            ) from exc
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise TextEncoderError(
                f"checkpoint in {str(model_dir)!r} lacks {len(missing)} weights of its own config, e.g. {missing[:3]}"
            )
        model.to(device)

        context_length = model.config.max_position_embeddings
        tokenizer_dir = next((d for d in _tokenizer_dirs(model_dir) if _has_tokenizer_files(d)), None)
        if tokenizer_dir is None:
            tokenizer, tokenizer_source = build_clip_tokenizer(context_length=context_length), _BUNDLED_TOKENIZER
        else:
            tokenizer = _load_clip_tokenizer(tokenizer_dir, context_length)
            tokenizer_source = str(tokenizer_dir.resolve())

        identity = {
            "kind": "hf_clip",
            "model": type(model).__name__,
            "checkpoint": str(model_dir.resolve()),
            "config": {
                **_clip_text_config_summary(model.config),
                "dtype": str(dtype).replace("torch.", ""),
                "tokenizer": tokenizer_source,
            },
        }
        return cls(model, tokenizer, identity=identity)

    def tokenize(self, prompts: List[str]) -> Tensor:
        """``(B, L)`` ids: ``<|startoftext|>`` + BPE + ``<|endoftext|>``, truncated and padded to ``L``."""
        batch = self.tokenizer(
            prompts, padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        )
        return batch["input_ids"]

    def _hidden_states(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


def _clip_text_config_summary(config: Any) -> Dict[str, Any]:
    """The JSON-able architecture fields of a ``CLIPTextConfig``."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "context_length": config.max_position_embeddings,
        "hidden_act": config.hidden_act,
    }


def _check_positive_ints(**values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise TextEncoderError(f"{name} must be a positive int, got {value!r}")


def default_text_encoder(
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    context_length: int = CLIP_CONTEXT_LENGTH,
    seed: int = 0,
    device: DeviceLike = "cpu",
) -> HFCLIPTextEncoder:
    """The offline default encoder: a small, randomly initialised, frozen CLIP text transformer.

    This encoder is NOT pretrained: it gives each prompt a fixed, distinct embedding and the
    generator learns what they mean.  It is a transformers ``CLIPTextModel`` built from
    ``CLIPTextConfig(vocab_size=49408, hidden_size, intermediate_size=4*hidden_size,
    num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=context_length)``,
    initialised on the CPU under ``seed`` inside a forked RNG (the caller's global RNG state is left
    untouched), with the real CLIP BPE tokenizer from :func:`build_clip_tokenizer`.  Same arguments
    (and transformers version) -> bit-identical weights and embeddings.

    Raises:
        TextEncoderError: a size is not a positive int, or ``hidden_size`` is not divisible by ``num_heads``.
    """
    _check_positive_ints(
        hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, context_length=context_length
    )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TextEncoderError(f"seed must be an int, got {seed!r}")
    if hidden_size % num_heads:
        raise TextEncoderError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    import transformers
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer(context_length=context_length)
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=context_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Only the CPU generator is seeded and consumed (the model is built on the CPU), so forking the
    # CPU RNG alone restores the caller's state; CUDA generators are never touched.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        model = CLIPTextModel(config)
    model.to(device)
    identity = {
        "kind": "default",
        "model": type(model).__name__,
        "checkpoint": None,
        "config": {
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "context_length": context_length,
            "seed": seed,
            "pretrained": False,
            "tokenizer": _BUNDLED_TOKENIZER,
            "transformers_version": transformers.__version__,
        },
    }
    return HFCLIPTextEncoder(model, tokenizer, identity=identity)


# --------------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------------


class _OpenCLIPTextTower(nn.Module):
    """The token-level part of an open_clip text tower (no pooling, no projection).

    Holds references to the embedding, transformer and final norm of either a ``CLIP`` model (whose
    text tower lives on the model itself) or a ``TextTransformer`` (``CustomTextCLIP.text``), so the
    vision tower can be dropped.
    """

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.token_embedding = source.token_embedding
        self.positional_embedding = source.positional_embedding
        self.transformer = source.transformer
        self.ln_final = source.ln_final
        self.register_buffer("attn_mask", source.attn_mask, persistent=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(input_ids).to(cast_dtype)
        x = x + self.positional_embedding[: input_ids.shape[1]].to(cast_dtype)
        # open_clip >= 2.24 (3.3 included): Transformer takes and returns batch-first (B, L, D) and
        # transposes internally when built with batch_first=False; attn_mask is the additive causal mask.
        x = self.transformer(x, attn_mask=self.attn_mask)
        return self.ln_final(x)


def _open_clip_text_cfg(model_name: str) -> Dict[str, Any]:
    """Validate ``model_name`` against open_clip's registry and return its ``text_cfg`` (nothing is built).

    Like open_clip, ``/`` in the name is read as ``-`` (``"ViT-B/32"`` is ``"ViT-B-32"``).
    """
    import open_clip

    known = open_clip.list_models()
    if not isinstance(model_name, str) or model_name.replace("/", "-") not in known:
        examples = [n for n in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "RN50") if n in known] or known[:5]
        raise TextEncoderError(
            f"unknown open_clip model name {model_name!r}; expected one of open_clip.list_models() "
            f"({len(known)} names, e.g. {examples}); register custom architectures with open_clip.add_model_config()"
        )
    model_cfg = open_clip.get_model_config(model_name.replace("/", "-"))
    text_cfg = model_cfg.get("text_cfg", {})
    unsupported = {
        "hf_model_name": "a Hugging Face text tower",
        "hf_tokenizer_name": "a Hugging Face tokenizer (downloaded at run time)",
        "embed_cls": "a CoCa-style appended class token",
    }
    reasons = [why for key, why in unsupported.items() if text_cfg.get(key)]
    if "multimodal_cfg" in model_cfg:
        reasons.append("a CoCa multimodal decoder")
    if "siglip" in model_name.lower():
        reasons.append("a SigLIP tokenizer (downloaded at run time)")
    if reasons:
        raise TextEncoderError(
            f"open_clip model {model_name!r} uses {', '.join(reasons)}; OpenCLIPTextEncoder supports models with "
            "open_clip's native text transformer and the bundled CLIP BPE tokenizer"
        )
    return text_cfg


class OpenCLIPTextEncoder(TextEncoder):
    """The frozen text tower of an open_clip model: token hidden states after ``ln_final``.

    ``token_embedding + positional_embedding -> transformer (causal attn_mask) -> ln_final``, i.e.
    the per-token states ``(B, context_length, width)`` that ``encode_text`` would pool and project.
    Ids come from ``open_clip.get_tokenizer(model_name)`` (padded with 0 as in CLIP training).
    """

    def __init__(
        self, tower: _OpenCLIPTextTower, tokenizer: Callable[..., Tensor], *, identity: Dict[str, Any]
    ) -> None:
        context_length, hidden_size = tower.positional_embedding.shape
        super().__init__(tower, context_length=context_length, hidden_size=hidden_size, identity=identity)
        self.tokenizer = tokenizer

    @classmethod
    def from_checkpoint(
        cls, model_name: str, checkpoint: PathLike, *, device: DeviceLike = "cpu"
    ) -> "OpenCLIPTextEncoder":
        """Build open_clip's ``model_name`` and load the local ``checkpoint`` file into it (strictly).

        ``checkpoint`` is a state dict saved with ``torch.save`` (read by open_clip with
        ``torch.load(weights_only=True)``, so no pickled code runs) or a ``.safetensors`` file; it
        must hold the full CLIP model (vision tower included), as open_clip's own checkpoints do.
        Only the text tower is kept.

        Raises:
            TextEncoderError: ``model_name`` is not in ``open_clip.list_models()`` or has an unsupported text
                tower; or the checkpoint does not fit the model or holds pickled objects (refused, never run).
            MissingWeightsError: ``checkpoint`` is not an existing file.
        """
        text_cfg = _open_clip_text_cfg(model_name)
        checkpoint_path = Path(checkpoint)
        if not checkpoint_path.is_file():
            raise MissingWeightsError(
                f"open_clip checkpoint file {str(checkpoint_path)!r} for model {model_name!r} does not exist"
            )
        import open_clip

        # An absolute path can never be mistaken for a pretrained *tag* (which would trigger a download).
        try:
            model = open_clip.create_model(
                model_name,
                pretrained=str(checkpoint_path.resolve()),
                device=device,
                weights_only=True,
                require_pretrained=True,
            )
        except (RuntimeError, pickle.UnpicklingError) as exc:  # key/shape mismatch, or pickled objects refused
            raise TextEncoderError(
                f"cannot load checkpoint {str(checkpoint_path)!r} into open_clip model {model_name!r} "
                f"(expected a full-model state dict of plain tensors): {exc}"
            ) from exc
        source = model.text if isinstance(getattr(model, "text", None), nn.Module) else model
        tower = _OpenCLIPTextTower(source)
        del model, source  # drop the vision tower
        tokenizer = open_clip.get_tokenizer(model_name, context_length=tower.positional_embedding.shape[0])
        identity = {
            "kind": "open_clip",
            "model": model_name,
            "checkpoint": str(checkpoint_path.resolve()),
            "config": {**text_cfg, "tokenizer": type(tokenizer).__name__, "open_clip_version": open_clip.__version__},
        }
        return cls(tower, tokenizer, identity=identity)

    def tokenize(self, prompts: List[str]) -> Tensor:
        """``(B, L)`` ids from open_clip's tokenizer (start, BPE, end, zero padding; truncated to ``L``)."""
        return self.tokenizer(prompts, context_length=self.context_length)

    def _hidden_states(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)


# --------------------------------------------------------------------------------------------------
# Spec -> encoder
# --------------------------------------------------------------------------------------------------


def _load_hf_clip(
    path: PathLike, subfolder: Optional[str] = None, device: DeviceLike = "cpu", dtype: Any = "float32"
) -> TextEncoder:
    return HFCLIPTextEncoder.from_pretrained(path, subfolder=subfolder, device=device,
                                             dtype=parse_dtype(dtype, name="dtype", error=TextEncoderError))


def _load_open_clip(model: str, checkpoint: PathLike, device: DeviceLike = "cpu") -> TextEncoder:
    return OpenCLIPTextEncoder.from_checkpoint(model, checkpoint, device=device)


_LOADERS: Dict[str, Callable[..., TextEncoder]] = {
    "default": default_text_encoder,
    "hf_clip": _load_hf_clip,
    "open_clip": _load_open_clip,
}
_SPEC_KEYS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {  # kind -> (allowed keys, required keys)
    "default": (("hidden_size", "num_layers", "num_heads", "context_length", "seed", "device"), ()),
    "hf_clip": (("path", "subfolder", "device", "dtype"), ("path",)),
    "open_clip": (("model", "checkpoint", "device"), ("model", "checkpoint")),
}


def load_text_encoder(spec: Optional[Mapping[str, Any]] = None) -> TextEncoder:
    """Build a frozen text encoder from a JSON-able spec (as stored in a run config).

    * ``None`` or ``{"kind": "default", **kwargs}`` -> :func:`default_text_encoder` (``hidden_size``,
      ``num_layers``, ``num_heads``, ``context_length``, ``seed``, ``device``);
    * ``{"kind": "hf_clip", "path": dir, ["subfolder", "device", "dtype"]}`` ->
      :meth:`HFCLIPTextEncoder.from_pretrained`;
    * ``{"kind": "open_clip", "model": name, "checkpoint": file, ["device"]}`` ->
      :meth:`OpenCLIPTextEncoder.from_checkpoint`.

    The spec is validated before anything is loaded.

    Raises:
        TextEncoderError: not a mapping, unknown ``kind``, missing or unexpected keys (and the loaders' errors).
    """
    if spec is None:
        return default_text_encoder()
    if not isinstance(spec, Mapping):
        raise TextEncoderError(f"text encoder spec must be a dict or None, got {type(spec).__name__} {spec!r}")
    kwargs = dict(spec)
    kind = kwargs.pop("kind", "default")
    if kind not in _LOADERS:
        raise TextEncoderError(f"unknown text encoder kind {kind!r}; expected one of {sorted(_LOADERS)}")
    allowed, required = _SPEC_KEYS[kind]
    missing = [key for key in required if key not in kwargs]
    if missing:
        raise TextEncoderError(f"text encoder spec of kind {kind!r} lacks {missing}; got keys {sorted(kwargs)}")
    unexpected = sorted(set(kwargs) - set(allowed))
    if unexpected:
        raise TextEncoderError(
            f"text encoder spec of kind {kind!r} has unexpected keys {unexpected}; allowed: {list(allowed)}"
        )
    return _LOADERS[kind](**kwargs)
