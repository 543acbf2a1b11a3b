"""A synthetic replay set on disk, reused on resume: DDDR's layout with a verifying manifest.

Layout (as DDDR's ``outputs/syn_image_*/task_<k>/<class>/...``)::

    <cache>/task_<k>/<class_id>/<idx>.png      8-bit PNG, grayscale (C = 1) or RGB (C = 3)
    <cache>/task_<k>/manifest.json             written last

The manifest holds the *settings* the set was generated with (classes, images per class, prompts, per-class
seeds, guidance, sampler and steps, the generator's identity e.g. the fingerprint of its weights, the embedding
hashes, the image shape) and the relative path and SHA-256 of every PNG.

Rules:

* every file is written atomically (:func:`~avalanche_drcpsd.utils.atomic_write`: temp file + rename) and the
  manifest last, after removing the previous one first: a task without a manifest is incomplete and is never used;
* a task is reused only when its manifest's settings equal the requested ones and every PNG exists, has the
  recorded SHA-256 and decodes to the recorded shape; a settings mismatch regenerates (and overwrites) the task;
* a missing or corrupted PNG under a matching manifest is reported: :class:`CorruptCacheError` with
  ``on_corrupt="error"``, or a warning and regeneration of the whole task with ``on_corrupt="regenerate"``
  (the default);
* an ``OSError`` while writing (e.g. ``ENOSPC``, disk full) raises :class:`CacheWriteError` naming the path; the
  partial task has no manifest, so it is not used.

Images come back quantised to 8 bits (``round(255 x) / 255``) both when generated and when read, so a resumed run
trains on exactly the images of the first one.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .utils import atomic_write

__all__ = [
    "SyntheticCacheError",
    "CorruptCacheError",
    "CacheWriteError",
    "SyntheticCache",
    "tensor_sha256",
    "generator_identity",
    "quantize",
]

PathLike = Union[str, "os.PathLike[str]"]
FORMAT = "avalanche_drcpsd.SyntheticCache/1"
MANIFEST = "manifest.json"


class SyntheticCacheError(RuntimeError):
    """The synthetic cache cannot be used (the message names the path and what is wrong)."""


class CorruptCacheError(SyntheticCacheError):
    """A task's manifest matches, but a PNG it lists is missing, altered or unreadable."""


class CacheWriteError(SyntheticCacheError):
    """Writing the cache failed (``errno`` as the underlying ``OSError``); the partial task is not used."""

    def __init__(self, message: str, errno_: Optional[int] = None):
        super().__init__(message)
        self.errno = errno_


# --------------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------------
def tensor_sha256(tensor: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (on the CPU, contiguous)."""
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{data.dtype}|{tuple(data.shape)}".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def generator_identity(generator: nn.Module) -> Dict[str, Any]:
    """What makes a generator's samples what they are, JSON-able: its
    :attr:`~avalanche_drcpsd.generator.Generator.identity` (a Stable Diffusion pipeline's fingerprint, dtype and
    resolution; the offline generator's class, spec and the SHA-256 of its weights: it is trained, so its weights
    are its identity)."""
    return dict(generator.identity)


def quantize(images: Tensor) -> Tensor:
    """Images in [0, 1] -> the 8-bit levels a PNG stores, as float32 in [0, 1]."""
    return to_uint8(images).float() / 255.0


def to_uint8(images: Tensor) -> Tensor:
    """Images in [0, 1] -> uint8 levels on the CPU (values clamped, rounded to the nearest level)."""
    return (images.detach().float().cpu().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def _png_bytes(image: Tensor) -> bytes:
    """One ``(C, H, W)`` uint8 image, C = 1 or 3, as PNG bytes."""
    from PIL import Image

    array = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)  # uint8: "L" or "RGB"
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def _read_png(data: bytes, shape: Tuple[int, int, int]) -> Tensor:
    """PNG bytes -> float ``(C, H, W)`` in [0, 1]; ``ValueError`` if it does not decode to ``shape``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as pil:
        pil.load()
        mode = "L" if shape[0] == 1 else "RGB"
        if pil.mode != mode or pil.size != (shape[2], shape[1]):
            raise ValueError(f"decodes to mode {pil.mode} size {pil.size}, expected {mode} {(shape[2], shape[1])}")
        array = np.asarray(pil, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def _normalise(settings: Mapping[str, Any]) -> Dict[str, Any]:
    """Settings as they read back from JSON (tuples -> lists, int keys -> str), for comparison."""
    return json.loads(json.dumps(settings, sort_keys=True))


def _write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)


# --------------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------------
class SyntheticCache:
    """Synthetic sets on disk, one per task, under ``root`` (see the module docstring for the rules).

    ``settings`` is any JSON-able mapping that determines the images; it must hold ``classes`` (ids),
    ``n_per_class`` and ``image_shape`` ``(C, H, W)`` with ``C`` 1 or 3.
    """

    def __init__(self, root: PathLike, *, on_corrupt: str = "regenerate"):
        if on_corrupt not in ("regenerate", "error"):
            raise ValueError(f"on_corrupt={on_corrupt!r}; expected 'regenerate' or 'error'")
        self.root = Path(os.fspath(root))
        if self.root.exists() and not self.root.is_dir():
            raise SyntheticCacheError(f"synthetic cache {str(self.root)!r} exists and is not a directory")
        self.on_corrupt = on_corrupt

    def task_dir(self, task: int) -> Path:
        return self.root / f"task_{int(task)}"

    def manifest_path(self, task: int) -> Path:
        return self.task_dir(task) / MANIFEST

    def read_manifest(self, task: int) -> Optional[Dict[str, Any]]:
        """The task's manifest, or None when there is none (never written, or an interrupted write)."""
        path = self.manifest_path(task)
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            warnings.warn(f"ignoring unreadable synthetic-cache manifest {str(path)!r}: {exc}", stacklevel=2)
            return None
        return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None

    # --- reading -----------------------------------------------------------------------------------------
    def load(self, task: int, settings: Mapping[str, Any]) -> Optional[Tuple[Tensor, Tensor]]:
        """``(images, labels)`` of a complete task generated with ``settings``; None when the task is absent,
        incomplete or was generated with other settings.

        Raises:
            CorruptCacheError: the settings match but a listed PNG is missing, altered or does not decode.
        """
        manifest = self.read_manifest(task)
        if manifest is None or manifest.get("settings") != _normalise(settings):
            return None
        shape = tuple(int(v) for v in manifest["settings"]["image_shape"])
        task_dir = self.task_dir(task)
        images, labels = [], []
        for entry in manifest["files"]:
            path = task_dir / entry["path"]
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise CorruptCacheError(f"synthetic cache file {str(path)!r} listed in "
                                        f"{str(self.manifest_path(task))!r} "
                                        f"cannot be read ({exc.strerror or exc})") from exc
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise CorruptCacheError(f"synthetic cache file {str(path)!r} does not match the SHA-256 in "
                                        f"{str(self.manifest_path(task))!r}: it was altered or truncated")
            try:
                images.append(_read_png(data, shape))
            except Exception as exc:  # PIL raises several types for a broken image
                raise CorruptCacheError(f"synthetic cache file {str(path)!r} is not a valid PNG of shape {shape}: "
                                        f"{exc}") from exc
            labels.append(int(entry["class"]))
        if not images:
            return torch.empty((0,) + shape), torch.empty(0, dtype=torch.long)
        return torch.stack(images), torch.tensor(labels, dtype=torch.long)

    # --- writing -----------------------------------------------------------------------------------------
    def save(self, task: int, settings: Mapping[str, Any], images: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """Write a task (the previous manifest is removed first, the new one written last) and return the images
        as stored (quantised to 8 bits) with their labels.

        Raises:
            CacheWriteError: an ``OSError`` while writing (the message names the file and the task directory).
            SyntheticCacheError: ``images`` do not have the shape in ``settings``.
        """
        settings = _normalise(settings)
        shape = tuple(int(v) for v in settings["image_shape"])
        if shape[0] not in (1, 3) or tuple(images.shape[1:]) != shape or images.shape[0] != labels.shape[0]:
            raise SyntheticCacheError(f"cannot cache images of shape {tuple(images.shape)} with "
                                      f"{tuple(labels.shape)} labels as image_shape {shape} (C must be 1 or 3)")
        task_dir = self.task_dir(task)
        pixels = to_uint8(images)
        files: List[Dict[str, Any]] = []
        written = set()
        current = task_dir
        try:
            task_dir.mkdir(parents=True, exist_ok=True)
            current = self.manifest_path(task)
            current.unlink(missing_ok=True)  # from now on the task is incomplete until the new manifest exists
            counters: Dict[int, int] = {}
            for image, label in zip(pixels, labels.tolist()):
                idx = counters.get(int(label), 0)
                counters[int(label)] = idx + 1
                rel = f"{int(label)}/{idx}.png"
                data = _png_bytes(image)
                current = task_dir / rel
                _write_bytes(current, data)
                written.add(rel)
                files.append({"path": rel, "class": int(label), "index": idx,
                              "sha256": hashlib.sha256(data).hexdigest()})
            current = task_dir
            self._remove_stale(task_dir, written)
            manifest = {"format": FORMAT, "task": int(task), "settings": settings, "files": files}
            current = self.manifest_path(task)
            _write_bytes(current, json.dumps(manifest, indent=1).encode("utf-8"))
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            hint = " (disk full)" if exc.errno == errno.ENOSPC else ""
            raise CacheWriteError(f"cannot write the synthetic cache at {str(current)!r}: {reason}{hint}; task "
                                  f"{task} in {str(task_dir)!r} is incomplete (no manifest) and will not be used",
                                  exc.errno) from exc
        return pixels.float() / 255.0, labels.detach().cpu().long()

    @staticmethod
    def _remove_stale(task_dir: Path, keep: set) -> None:
        """Delete ``<class>/<idx>.png`` files of an earlier generation that the new set does not overwrite."""
        for path in task_dir.glob("*/*.png"):
            rel = path.relative_to(task_dir).as_posix()
            if re.fullmatch(r"\d+/\d+\.png", rel) and rel not in keep:
                path.unlink()

    # --- both ----------------------------------------------------------------------------------------------
    def get_or_generate(self, task: int, settings: Mapping[str, Any],
                        generate: Callable[[], Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor, bool]:
        """``(images, labels, from_cache)``: the cached task when it matches and verifies, else ``generate()``'s
        images, written to the cache first. A corrupted task raises :class:`CorruptCacheError`
        (``on_corrupt="error"``) or is regenerated with a warning (``"regenerate"``)."""
        try:
            cached = self.load(task, settings)
        except CorruptCacheError as exc:
            if self.on_corrupt == "error":
                raise
            warnings.warn(f"{exc}; regenerating task {task}", stacklevel=2)
            cached = None
        if cached is not None:
            return cached[0], cached[1], True
        manifest = self.read_manifest(task)
        new = _normalise(settings)
        if manifest is not None and manifest.get("settings") != new:
            old = manifest.get("settings") or {}
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            warnings.warn(f"synthetic cache {str(self.task_dir(task))!r} was generated with other settings "
                          f"(changed: {changed}); regenerating it", stacklevel=2)
        images, labels = generate()
        x, y = self.save(task, settings, images, labels)
        return x, y, False
