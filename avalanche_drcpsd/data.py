"""Class-incremental image benchmarks read from local files, never downloaded.

Every benchmark is an Avalanche ``NCScenario`` (``task_labels=False``: class-incremental) built over tensor
data sets that carry task label 0, so metric names end with ``/Task000`` and strategies that read task labels
(LwF, GenerativeReplay) work. Images are ``torch.float32`` in [0, 1] with shape ``(N, C, H, W)``; labels are
``torch.int64``. The returned benchmark has two extra attributes: ``class_names`` (list of str, index = label)
and ``spec`` (:class:`BenchmarkSpec`).

Data layout under ``data_root`` (the data folder README's format)::

    MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    cifar10/cifar10_jpeg_q75.npz     {split}_bytes, {split}_offsets, {split}_labels, classes
    gtsrb/gtsrb32_webp.npz           the same packed format

The ``"default"`` benchmark needs no data root: a small real MNIST subset ships inside the package
(``_embedded/mnist_mini.npz``, built by ``tools/make_embedded_dataset.py``).

Packed (``.npz``) data sets are decoded once with PIL and the uint8 array is cached as ``.npy`` in a cache
folder (argument ``cache_dir``, else ``$AVALANCHE_DRCPSD_CACHE``, else ``~/.cache/avalanche_drcpsd``); the
cache is written atomically. With ``train_per_class``/``test_per_class`` and no cache yet, only the selected
images are decoded (and nothing is cached).

Invalid arguments raise :class:`DataError` (a ``ValueError``); missing files raise :class:`MissingDataError`
(also a ``FileNotFoundError``) naming the exact path. Both are raised before any file is read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .config import check_prompt_template
from .utils import atomic_write

__all__ = [
    "BENCHMARKS",
    "FSCIL_BENCHMARKS",
    "FSCIL_PRESETS",
    "benchmark_options",
    "fscil_benchmark",
    "fscil_cifar10",
    "fscil_cifar100",
    "fscil_gtsrb",
    "SPLIT_BENCHMARKS",
    "BenchmarkSpec",
    "ChecksumError",
    "DataError",
    "MissingDataError",
    "balanced_classes_per_exp",
    "default_cache_dir",
    "make_benchmark",
    "make_tensor_benchmark",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "read_packed_classes",
    "read_packed_labels",
    "read_packed_npz",
    "select_per_class",
    "split_cifar10",
    "split_default",
    "split_fmnist",
    "split_gtsrb",
    "split_mnist",
    "to_image_tensor",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The benchmarks read from a data root, in the order runners, reports and tables list them.
SPLIT_BENCHMARKS = ("split_mnist", "split_fmnist", "split_cifar10", "split_gtsrb")
#: Valid names for :func:`make_benchmark`: the embedded default, the split and the few-shot (FSCIL) benchmarks.
BENCHMARKS = ("default",) + SPLIT_BENCHMARKS + ("fscil_gtsrb", "fscil_cifar10", "fscil_cifar100")

DATA_README = "the data folder's README.md (layout in avalanche_drcpsd.data's docstring)"
CACHE_ENV = "AVALANCHE_DRCPSD_CACHE"

MNIST_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

#: md5 of every file of the data folder (``verify=True`` checks them; they equal torchvision's for IDX).
MD5 = {
    "MNIST/raw/train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "MNIST/raw/train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "MNIST/raw/t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "MNIST/raw/t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "FashionMNIST/raw/train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "FashionMNIST/raw/train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "FashionMNIST/raw/t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "FashionMNIST/raw/t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    "cifar10/cifar10_jpeg_q75.npz": "d2f9e040e5cf93c16337d749001e4cbc",
    "gtsrb/gtsrb32_webp.npz": "de21d68341b944fbf61c9c31ee385cc2",
}

_SPLITS = ("train", "test")


class DataError(ValueError):
    """An invalid argument or malformed data (the message names the bad value and what was expected)."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file that should exist does not (the message names the exact path and the expected layout)."""


class ChecksumError(DataError):
    """A data file whose md5 differs from the one in the data folder's README (``verify=True``)."""


# --------------------------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchmarkSpec:
    """What a benchmark is: its classes, image shape and how the classes are split into experiences.

    ``class_order[i]`` is the label of the i-th class seen; experience ``e`` holds the next
    ``classes_per_exp[e]`` classes of that order (see :meth:`classes_in_experience`).
    """

    name: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (C, H, W)
    n_experiences: int
    classes_per_exp: tuple[int, ...]
    prompt_template: str = "a photo of a {}"
    class_order: tuple[int, ...] = ()  # () means the natural order 0..K-1
    #: few-shot class-incremental benchmarks (:func:`fscil_benchmark`): training images per class of every
    #: session after the first (the base session); None for the split benchmarks
    k_shot: int | None = None

    def __post_init__(self) -> None:
        k = len(self.class_names)
        if not self.class_order:
            object.__setattr__(self, "class_order", tuple(range(k)))
        if sorted(self.class_order) != list(range(k)):
            raise DataError(f"class_order={self.class_order!r} must be a permutation of 0..{k - 1}")
        if len(self.classes_per_exp) != self.n_experiences or sum(self.classes_per_exp) != k:
            raise DataError(
                f"classes_per_exp={self.classes_per_exp!r} must have n_experiences={self.n_experiences} "
                f"positive entries summing to the {k} classes"
            )
        if min(self.classes_per_exp) < 1:
            raise DataError(f"classes_per_exp={self.classes_per_exp!r}: every experience needs a class")
        if len(self.image_shape) != 3:
            raise DataError(f"image_shape={self.image_shape!r} must be (C, H, W)")
        check_prompt_template(self.prompt_template, DataError)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def base_classes(self) -> int | None:
        """The base session's number of classes (FSCIL), None for a split benchmark."""
        return self.classes_per_exp[0] if self.k_shot is not None else None

    def classes_in_experience(self, exp: int) -> tuple[int, ...]:
        """The labels introduced by experience ``exp``."""
        if not 0 <= exp < self.n_experiences:
            raise DataError(f"experience {exp} is out of range 0..{self.n_experiences - 1}")
        start = sum(self.classes_per_exp[:exp])
        return self.class_order[start : start + self.classes_per_exp[exp]]

    def prompt(self, label: int) -> str:
        """The text prompt of a class, e.g. ``"a photo of the handwritten digit three"``."""
        return self.prompt_template.format(self.class_names[label])


def balanced_classes_per_exp(num_classes: int, n_experiences: int) -> tuple[int, ...]:
    """Split ``num_classes`` into ``n_experiences`` near-equal parts, larger first (43, 5 -> 9, 9, 9, 8, 8)."""
    _check_int("n_experiences", n_experiences, low=1, high=num_classes)
    base, extra = divmod(num_classes, n_experiences)
    return tuple(base + 1 if i < extra else base for i in range(n_experiences))


# --------------------------------------------------------------------------------------------------------------
# Readers (pure functions)
# --------------------------------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzip-compressed or not, into an array of its shape."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx_images(path: PathLike) -> np.ndarray:
    """uint8 images ``(N, H, W)`` from an IDX file."""
    images = read_idx(path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    return images


def read_idx_labels(path: PathLike) -> np.ndarray:
    """int64 labels ``(N,)`` from an IDX file."""
    labels = read_idx(path)
    if labels.ndim != 1:
        raise DataError(f"{path}: expected labels (N,), got shape {labels.shape}")
    return labels.astype(np.int64)


def read_packed_classes(path: PathLike) -> tuple[str, ...]:
    """The class names stored in a packed ``.npz`` (index = label)."""
    with np.load(path) as z:
        return tuple(str(c) for c in z["classes"])


def read_packed_labels(path: PathLike, split: str) -> np.ndarray:
    """The int64 labels of one split of a packed ``.npz`` (cheap: no image is decoded)."""
    _check_choice("split", split, _SPLITS)
    with np.load(path) as z:
        return z[f"{split}_labels"].astype(np.int64)


def default_cache_dir() -> Path:
    """``$AVALANCHE_DRCPSD_CACHE`` if set, else ``~/.cache/avalanche_drcpsd``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "avalanche_drcpsd"


def read_packed_npz(
    path: PathLike,
    split: str,
    *,
    indices: np.ndarray | None = None,
    cache_dir: PathLike | None = None,
    use_cache: bool = True,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode one split of a packed ``.npz`` into uint8 images ``(N, H, W, 3)`` and int64 labels ``(N,)``.

    With ``indices``, only those rows are returned (in that order). The full decoded split is cached as
    ``<cache_dir>/<stem>-<split>-<key>.npy`` (key: a hash of the split's offsets and labels) and reused on
    the next call; when it is not cached yet and ``indices`` is given, only the selected images are decoded
    and nothing is written. ``workers`` threads decode (default ``min(4, cpu_count)``).
    """
    _check_choice("split", split, _SPLITS)
    path = Path(path)
    with np.load(path) as z:  # an NpzFile reads each array only when asked: the blob only if we decode
        offsets, labels = z[f"{split}_offsets"], z[f"{split}_labels"].astype(np.int64)
        if len(offsets) != len(labels) + 1:
            raise DataError(f"{path}: {split}_offsets has {len(offsets)} entries, expected {len(labels) + 1}")
        rows = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)

        cache_file = None
        if use_cache:
            key = hashlib.sha1(offsets.tobytes() + labels.tobytes()).hexdigest()[:16]
            cache_file = Path(cache_dir if cache_dir is not None else default_cache_dir())
            cache_file = cache_file / f"{path.stem}-{split}-{key}.npy"
            cached = _load_cached(cache_file, len(labels))
            if cached is not None:
                return (np.array(cached) if indices is None else cached[rows]), labels[rows]

        images = _decode_images(z[f"{split}_bytes"], offsets, rows, workers=workers)
    if cache_file is not None and indices is None:
        _save_cache(cache_file, images)
    return images, labels[rows]


def _load_cached(cache_file: Path, n: int) -> np.ndarray | None:
    """The cached array (memory-mapped) if it exists and looks right (uint8, N rows, NHWC), else None."""
    if not cache_file.is_file():
        return None
    try:
        arr = np.load(cache_file, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[0] != n:
        return None
    return arr


def _save_cache(cache_file: Path, images: np.ndarray) -> None:
    """Write the cache atomically; an unwritable cache folder only warns."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, images)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600

    try:
        atomic_write(cache_file, write)
    except OSError as e:
        warnings.warn(f"could not write the decode cache {cache_file}: {e}", RuntimeWarning, stacklevel=3)


def _decode_images(blob: np.ndarray, offsets: np.ndarray, rows: np.ndarray, *, workers: int | None) -> np.ndarray:
    """Decode ``blob[offsets[i]:offsets[i+1]]`` for each i in ``rows`` with PIL, in a thread pool."""
    from PIL import Image

    buf = memoryview(np.ascontiguousarray(blob))

    def open_image(i: int, formats: Sequence[str] | None) -> np.ndarray:
        with Image.open(io.BytesIO(buf[offsets[i] : offsets[i + 1]]), formats=formats) as im:
            return np.asarray(im.convert("RGB"))

    if len(rows) == 0:
        raise DataError("no image selected to decode")
    with Image.open(io.BytesIO(buf[offsets[rows[0]] : offsets[rows[0] + 1]])) as im:
        formats = [im.format] if im.format else None  # skipping format detection is ~1.6x faster for WebP
    first = open_image(int(rows[0]), formats)
    out = np.empty((len(rows), *first.shape), dtype=np.uint8)

    def decode_range(lo: int, hi: int) -> None:
        for j in range(lo, hi):
            img = open_image(int(rows[j]), formats)
            if img.shape != first.shape:
                raise DataError(f"image {int(rows[j])} has shape {img.shape}, expected {first.shape}")
            out[j] = img

    workers = workers or min(4, os.cpu_count() or 1)
    bounds = np.linspace(0, len(rows), workers * 8 + 1).astype(int)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(decode_range, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]:
            future.result()
    return out


# --------------------------------------------------------------------------------------------------------------
# Generic building blocks
# --------------------------------------------------------------------------------------------------------------
def select_per_class(labels: np.ndarray, k: int | None, seed: int = 0) -> np.ndarray:
    """Indices of the first ``k`` samples of each class after a seeded permutation, sorted ascending.

    ``k=None`` selects everything. A class with fewer than ``k`` samples gives all of them. Deterministic
    given ``(labels, k, seed)``.
    """
    labels = np.asarray(labels)
    if k is None:
        return np.arange(len(labels))
    _check_int("k", k, low=1)
    perm = np.random.default_rng(seed).permutation(len(labels))
    shuffled = labels[perm]
    chosen = [perm[shuffled == c][:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


def to_image_tensor(images: np.ndarray) -> Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` -> contiguous float32 ``(N, C, H, W)`` in [0, 1]."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(f"expected uint8 images (N, H, W[, C]), got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous().to(torch.float32).div_(255.0)


def make_tensor_benchmark(
    spec: BenchmarkSpec, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]
) -> Any:
    """An Avalanche class-incremental benchmark over ``(x, y)`` tensors, split as ``spec`` says.

    The data sets carry task label 0 (metric names end with ``/Task000``). The returned ``NCScenario`` has
    ``class_names`` and ``spec`` attributes.

    Built with Avalanche's ``nc_benchmark`` (its ``deprecated`` module), not its successor
    ``class_incremental_benchmark``: checked on the embedded Split-MNIST (Avalanche 0.6), the successor's experiences
    hold the same items in another order (an experience's classes in the order of a set: class 1's images before
    class 0's in the first experience) and carry no task label. Either changes the classifier's batches, so every
    committed result would stop reproducing to the digit; a move is a results-changing step of its own.
    """
    from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset,
    )

    def dataset(x: Tensor, y: Tensor, split: str) -> Any:
        if tuple(x.shape[1:]) != spec.image_shape:
            raise DataError(f"{split} images have shape {tuple(x.shape[1:])}, spec says {spec.image_shape}")
        missing = sorted(set(range(spec.num_classes)) - set(y.unique().tolist()))
        if missing or y.min() < 0 or y.max() >= spec.num_classes:
            raise DataError(f"{split} labels must cover exactly 0..{spec.num_classes - 1}; missing {missing}")
        return _make_taskaware_tensor_classification_dataset(x, y, targets=y.tolist(), task_labels=0)

    benchmark = nc_benchmark(
        dataset(*train, "train"),
        dataset(*test, "test"),
        n_experiences=spec.n_experiences,
        task_labels=False,
        shuffle=False,
        fixed_class_order=list(spec.class_order),
        per_exp_classes=dict(enumerate(spec.classes_per_exp)),
    )
    benchmark.class_names = list(spec.class_names)
    benchmark.spec = spec
    return benchmark


# --------------------------------------------------------------------------------------------------------------
# Validation (runs before any file is read)
# --------------------------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, *, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{name}={value!r} must be an int")
    if value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise DataError(f"{name}={value!r} must be {bound}")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise DataError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, choices))}")


def _make_spec(
    name: str,
    class_names: Sequence[str],
    image_shape: tuple[int, int, int],
    prompt_template: str,
    *,
    n_experiences: int,
    class_order: Sequence[int] | None,
) -> BenchmarkSpec:
    """Validate the builder arguments that depend on the classes and return the spec."""
    k = len(class_names)
    _check_int("n_experiences", n_experiences, low=1, high=k)
    if class_order is not None and sorted(class_order) != list(range(k)):
        raise DataError(f"class_order={list(class_order)!r} must be a permutation of 0..{k - 1}")
    return BenchmarkSpec(
        name=name,
        class_names=tuple(class_names),
        image_shape=image_shape,
        n_experiences=n_experiences,
        classes_per_exp=balanced_classes_per_exp(k, n_experiences),
        prompt_template=prompt_template,
        class_order=tuple(int(c) for c in class_order) if class_order is not None else (),
    )


def _check_options(n_experiences: int, train_per_class: int | None, test_per_class: int | None, seed: int) -> None:
    """Validate the builder arguments that need no data (called first, before any file is looked at)."""
    _check_int("n_experiences", n_experiences, low=1)
    for arg, value in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if value is not None:
            _check_int(arg, value, low=1)
    _check_int("seed", seed, low=0)


def _data_root(data_root: PathLike | None, benchmark: str) -> Path:
    if data_root is None:
        raise DataError(
            f"benchmark {benchmark!r} needs a data_root (the folder described by {DATA_README}); "
            f"only 'default' works without one"
        )
    root = Path(data_root)
    if not root.is_dir():
        raise MissingDataError(f"data_root {str(root)!r} is not a folder (expected the layout of {DATA_README})")
    return root


def _require_files(root: Path, relpaths: Sequence[str], layout: str, verify: bool) -> list[Path]:
    """The files' paths; raise :class:`MissingDataError` for the first missing one, or
    :class:`ChecksumError` (``verify=True``) for a bad md5."""
    paths = [root / rel for rel in relpaths]
    for path in paths:
        if not path.is_file():
            raise MissingDataError(
                f"missing data file {str(path)!r}; expected under data_root={str(root)!r}: {layout} "
                f"(the layout of {DATA_README})"
            )
    if verify:
        for rel, path in zip(relpaths, paths):
            digest = _md5(path)
            if digest != MD5[rel]:
                raise ChecksumError(f"{path}: md5 {digest} != expected {MD5[rel]} ({DATA_README})")
    return paths


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Data sources
# --------------------------------------------------------------------------------------------------------------
SplitArrays = tuple[np.ndarray, np.ndarray]  # uint8 images (N, H, W[, C]), int64 labels (N,)


@dataclass(frozen=True)
class _Source:
    """One on-disk data set: where its files are and how to read a split."""

    benchmark: str
    files: tuple[str, ...]  # relative to data_root; IDX: train images, train labels, test images, test labels
    image_shape: tuple[int, int, int]
    prompt_template: str
    class_names: tuple[str, ...] | None  # None: read from the npz's ``classes``

    @property
    def packed(self) -> bool:
        return self.files[0].endswith(".npz")

    @property
    def layout(self) -> str:
        return ", ".join(self.files)


def _idx_source(benchmark: str, folder: str, names: tuple[str, ...], prompt: str) -> _Source:
    stems = ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")
    files = tuple(f"{folder}/raw/{s}-ubyte.gz" for s in stems)
    return _Source(benchmark, files, (1, 28, 28), prompt, names)


_SOURCES = {
    "split_mnist": _idx_source("split_mnist", "MNIST", MNIST_CLASSES, "a photo of the handwritten digit {}"),
    "split_fmnist": _idx_source("split_fmnist", "FashionMNIST", FMNIST_CLASSES, "a photo of a {}"),
    "split_cifar10": _Source("split_cifar10", ("cifar10/cifar10_jpeg_q75.npz",), (3, 32, 32), "a photo of a {}", None),
    "split_gtsrb": _Source(
        "split_gtsrb", ("gtsrb/gtsrb32_webp.npz",), (3, 32, 32), "a photo of the traffic sign {}", None
    ),
}


def _load_split(
    source: _Source, paths: list[Path], split: str, k: int | None, seed: int, cache: dict[str, Any]
) -> SplitArrays:
    """The selected images and labels of one split (``k`` per class after a seeded permutation)."""
    if source.packed:
        labels = read_packed_labels(paths[0], split)
        rows = None if k is None else select_per_class(labels, k, seed)
        return read_packed_npz(paths[0], split, indices=rows, **cache)
    images_path, labels_path = paths[:2] if split == "train" else paths[2:]
    labels = read_idx_labels(labels_path)
    rows = select_per_class(labels, k, seed)
    return read_idx_images(images_path)[rows], labels[rows]


def _benchmark_from_arrays(spec: BenchmarkSpec, train: SplitArrays, test: SplitArrays) -> Any:
    return make_tensor_benchmark(
        spec,
        (to_image_tensor(train[0]), torch.from_numpy(train[1]).long()),
        (to_image_tensor(test[0]), torch.from_numpy(test[1]).long()),
    )


def _build_from_root(
    benchmark: str,
    data_root: PathLike | None,
    *,
    n_experiences: int,
    train_per_class: int | None,
    test_per_class: int | None,
    seed: int,
    class_order: Sequence[int] | None,
    verify: bool,
    cache_dir: PathLike | None,
    use_cache: bool,
) -> Any:
    _check_options(n_experiences, train_per_class, test_per_class, seed)
    source = _SOURCES[benchmark]
    root = _data_root(data_root, benchmark)
    paths = _require_files(root, source.files, source.layout, verify)
    names = source.class_names or read_packed_classes(paths[0])
    spec = _make_spec(
        benchmark, names, source.image_shape, source.prompt_template,
        n_experiences=n_experiences, class_order=class_order,
    )  # fmt: skip
    cache = {"cache_dir": cache_dir, "use_cache": use_cache}
    train = _load_split(source, paths, "train", train_per_class, seed, cache)
    test = _load_split(source, paths, "test", test_per_class, seed, cache)
    return _benchmark_from_arrays(spec, train, test)


# --------------------------------------------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------------------------------------------
_BUILDER_DOC = """

    :param data_root: the folder with the layout above.
    :param n_experiences: 1..num_classes; classes are split near-equally, larger experiences first.
    :param train_per_class: keep only the first k training images of each class after a seeded permutation
        (None: all).
    :param test_per_class: the same for the test images.
    :param seed: the seed of that permutation (the benchmark is deterministic given its arguments).
    :param class_order: the order in which classes arrive (default: natural order 0..K-1).
    :param verify: check the files' md5 against the data folder README's md5s first.
    :param cache_dir: where decoded packed images are cached (``.npz`` data sets only).
    :param use_cache: whether to read and write that cache.
    :return: an Avalanche ``NCScenario`` with extra attributes ``class_names`` and ``spec``.
"""


def _public_builder(benchmark: str, summary: str) -> Callable[..., Any]:
    def builder(
        data_root: PathLike | None,
        *,
        n_experiences: int = 5,
        train_per_class: int | None = None,
        test_per_class: int | None = None,
        seed: int = 0,
        class_order: Sequence[int] | None = None,
        verify: bool = False,
        cache_dir: PathLike | None = None,
        use_cache: bool = True,
    ) -> Any:
        return _build_from_root(
            benchmark, data_root,
            n_experiences=n_experiences, train_per_class=train_per_class, test_per_class=test_per_class,
            seed=seed, class_order=class_order, verify=verify, cache_dir=cache_dir, use_cache=use_cache,
        )  # fmt: skip

    builder.__name__ = builder.__qualname__ = benchmark
    builder.__doc__ = summary + _BUILDER_DOC
    return builder


split_mnist = _public_builder("split_mnist", "Split MNIST: 10 digits, classes named 'zero'..'nine', (1, 28, 28).")
split_fmnist = _public_builder("split_fmnist", "Split Fashion-MNIST: 10 classes, (1, 28, 28).")
split_cifar10 = _public_builder("split_cifar10", "Split CIFAR-10: 10 classes (names from the npz), (3, 32, 32).")
split_gtsrb = _public_builder(
    "split_gtsrb", "Split GTSRB: 43 classes (names from the npz), (3, 32, 32); 5 experiences are 9, 9, 9, 8, 8."
)

EMBEDDED_TRAIN_PER_CLASS = 200
EMBEDDED_TEST_PER_CLASS = 50


def _embedded_arrays() -> tuple[SplitArrays, SplitArrays]:
    """The MNIST subset shipped in the package (``_embedded/mnist_mini.npz``)."""
    resource = resources.files("avalanche_drcpsd") / "_embedded" / "mnist_mini.npz"
    if not resource.is_file():
        raise MissingDataError(
            f"the embedded data set {resource} is missing; rebuild it with tools/make_embedded_dataset.py"
        )
    with resource.open("rb") as f, np.load(f) as z:
        return (z["x_train"], z["y_train"].astype(np.int64)), (z["x_test"], z["y_test"].astype(np.int64))


def split_default(
    *,
    n_experiences: int = 5,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    seed: int = 0,
    class_order: Sequence[int] | None = None,
) -> Any:
    """Split MNIST on the small subset shipped in the package (200 train / 50 test images per class); no
    data root needed. ``train_per_class``/``test_per_class`` select fewer (at most 200/50 exist). Other
    arguments as for :func:`split_mnist`."""
    _check_options(n_experiences, train_per_class, test_per_class, seed)
    spec = _make_spec(
        "default", MNIST_CLASSES, (1, 28, 28), _SOURCES["split_mnist"].prompt_template,
        n_experiences=n_experiences, class_order=class_order,
    )  # fmt: skip
    train, test = _embedded_arrays()
    train_rows = select_per_class(train[1], train_per_class, seed)
    test_rows = select_per_class(test[1], test_per_class, seed)
    return _benchmark_from_arrays(
        spec, (train[0][train_rows], train[1][train_rows]), (test[0][test_rows], test[1][test_rows])
    )


# --------------------------------------------------------------------------------------------------------------
# Few-shot class-incremental (FSCIL) benchmarks
# --------------------------------------------------------------------------------------------------------------
#: The FSCIL presets (:func:`fscil_benchmark` on the data folder's sets, or on CIFAR-100 in torchvision's layout).
FSCIL_BENCHMARKS = ("fscil_gtsrb", "fscil_cifar10", "fscil_cifar100")
#: Each preset's data set and split sizes: ``fscil_cifar100`` is the standard protocol (60 base classes, 8 sessions
#: of 5-way 5-shot); the two others fit the data folder's sets (every class used).
FSCIL_PRESETS = {
    "fscil_gtsrb": {"source": "split_gtsrb", "base_classes": 23, "n_way": 5, "k_shot": 5, "sessions": 4},
    "fscil_cifar10": {"source": "split_cifar10", "base_classes": 5, "n_way": 1, "k_shot": 5, "sessions": 5},
    "fscil_cifar100": {"source": "cifar100", "base_classes": 60, "n_way": 5, "k_shot": 5, "sessions": 8},
}
#: ``torchvision.datasets.CIFAR100``'s folder under the data root (its python pickles, read without torchvision:
#: its integrity check would need the original files' md5s, and nothing is ever downloaded).
CIFAR100_LAYOUT = ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta")


def _read_cifar100(root: Path) -> tuple[SplitArrays, SplitArrays, tuple[str, ...]]:
    """CIFAR-100 from torchvision's layout (``<root>/cifar-100-python/{train,test,meta}``): uint8 (N, 32, 32, 3)
    images, fine labels and the fine class names. The files are Python pickles, as torchvision reads them: only
    point this at a copy of CIFAR-100 you trust."""
    import pickle

    paths = _require_files(root, CIFAR100_LAYOUT, "torchvision's CIFAR-100 folder " + ", ".join(CIFAR100_LAYOUT),
                           verify=False)

    def load(path: Path) -> dict:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="latin1")

    splits = []
    for path in paths[:2]:
        d = load(path)
        if "data" not in d or "fine_labels" not in d:
            raise DataError(f"{path}: expected a CIFAR-100 pickle with 'data' and 'fine_labels'")
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        splits.append((np.ascontiguousarray(x), np.asarray(d["fine_labels"], dtype=np.int64)))
    names = tuple(load(paths[2]).get("fine_label_names", ()))
    if len(names) != 100:
        raise DataError(f"{paths[2]}: expected 100 'fine_label_names', got {len(names)}")
    return splits[0], splits[1], names


def _as_arrays(data: Any, split: str) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` tensors from an ``(x, y)`` pair or a map-style data set of ``(x, y, ...)`` items."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(v) for v in data):
        x, y = data
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise DataError(f"the {split} data set is empty")
        items = [data[i] for i in range(len(data))]
        if not all(isinstance(it, (tuple, list)) and len(it) >= 2 and torch.is_tensor(it[0]) for it in items):
            raise DataError(f"the {split} data set's items must be (image tensor, label, ...); got "
                            f"{type(items[0]).__name__}")
        x = torch.stack([it[0] for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
    else:
        raise DataError(f"{split}={type(data).__name__}: expected an (images, labels) pair of tensors or a "
                        "map-style data set of (image tensor, label) items")
    if x.dim() != 4 or x.shape[0] != y.shape[0] or y.dim() != 1:
        raise DataError(f"{split} images {tuple(x.shape)} and labels {tuple(y.shape)}: expected (N, C, H, W) "
                        "and (N,)")
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    return x.float(), y.long()


def fscil_benchmark(
    data: Any,
    *,
    base_classes: int,
    n_way: int,
    k_shot: int,
    sessions: int,
    seed: int = 0,
    test: Any = None,
    class_names: Sequence[str] | None = None,
    data_root: PathLike | None = None,
    class_order: Sequence[int] | None = None,
    base_per_class: int | None = None,
    test_per_class: int | None = None,
    prompt_template: str | None = None,
    name: str = "fscil",
    cache_dir: PathLike | None = None,
    use_cache: bool = True,
) -> Any:
    """A few-shot class-incremental benchmark: a base session, then ``sessions`` sessions of ``n_way`` new classes
    with ``k_shot`` training images apiece.

    ``data`` is a data set name (``"split_mnist"``, ``"split_fmnist"``, ``"split_cifar10"``, ``"split_gtsrb"``:
    read from ``data_root``; ``"cifar100"``: torchvision's ``cifar-100-python/`` folder under ``data_root``), or
    the training data as an ``(images, labels)`` pair of tensors or a map-style data set of ``(image, label)``
    items, with ``test`` the same for the test split (images uint8 or float in [0, 1], ``(N, C, H, W)``).

    Classes arrive in ``class_order`` (default 0..K-1): the first ``base_classes`` form the base session, which keeps
    every training image of its classes (``base_per_class``: at most that many, seeded); each later session keeps
    ``k_shot`` training images of each of its ``n_way`` classes, chosen with ``seed``; every class appears in one
    session only. Test experience ``e`` holds every test image of session ``e``'s classes (``test_per_class``: at
    most that many), so after session ``i`` the test experiences ``0..i`` are exactly the classes seen so far.
    Classes the sessions do not use are dropped and the used ones relabelled ``0..K'-1`` in their original order
    (the class names follow). Experiences carry task label 0, as in the split benchmarks.

    Returns an Avalanche ``NCScenario`` with ``class_names`` and ``spec`` (``spec.k_shot`` set, ``spec.base_classes``
    the base session's size).
    """
    for arg, value, low in (("base_classes", base_classes, 1), ("n_way", n_way, 1), ("k_shot", k_shot, 1),
                            ("sessions", sessions, 0), ("seed", seed, 0)):
        _check_int(arg, value, low=low)
    for arg, value in (("base_per_class", base_per_class), ("test_per_class", test_per_class)):
        if value is not None:
            _check_int(arg, value, low=1)
    if isinstance(data, str):
        known = tuple(_SOURCES) + ("cifar100",)
        _check_choice("data set", data, known)
        if test is not None or class_names is not None:
            raise DataError(f"data={data!r} is read from data_root: pass neither test= nor class_names=")
        root = _data_root(data_root, name)
        if data == "cifar100":
            train_arrays, test_arrays, names = _read_cifar100(root)
            shape, template = (3, 32, 32), "a photo of a {}"
        else:
            source = _SOURCES[data]
            paths = _require_files(root, source.files, source.layout, False)
            names = source.class_names or read_packed_classes(paths[0])
            cache = {"cache_dir": cache_dir, "use_cache": use_cache}
            train_arrays = _load_split(source, paths, "train", None, seed, cache)
            test_arrays = _load_split(source, paths, "test", None, seed, cache)
            shape, template = source.image_shape, source.prompt_template
        x_train, y_train = to_image_tensor(train_arrays[0]), torch.from_numpy(train_arrays[1]).long()
        x_test, y_test = to_image_tensor(test_arrays[0]), torch.from_numpy(test_arrays[1]).long()
    else:
        if test is None:
            raise DataError("fscil_benchmark on in-memory data needs test= (the test split, as data)")
        x_train, y_train = _as_arrays(data, "train")
        x_test, y_test = _as_arrays(test, "test")
        k = int(max(y_train.max(), y_test.max())) + 1
        names = tuple(class_names) if class_names is not None else tuple(str(c) for c in range(k))
        if len(names) < k:
            raise DataError(f"class_names has {len(names)} names; the labels need at least {k}")
        shape, template = tuple(x_train.shape[1:]), "a photo of a {}"
    k = len(names)
    used = base_classes + n_way * sessions
    if used > k:
        raise DataError(f"base_classes={base_classes} + n_way={n_way} x sessions={sessions} = {used} classes; "
                        f"the data set has {k}")
    order = list(range(k)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(k)):
        raise DataError(f"class_order={list(class_order)!r} must be a permutation of 0..{k - 1}")
    arrival = order[:used]
    present = set(y_train.unique().tolist())
    absent = [c for c in arrival if c not in present]
    if absent:
        raise DataError(f"classes {absent} have no training image")
    rng_seed = seed
    keep = []
    labels = y_train.numpy()
    for position, c in enumerate(arrival):
        rows = np.flatnonzero(labels == c)
        cap = base_per_class if position < base_classes else k_shot
        if position >= base_classes and len(rows) < k_shot:
            raise DataError(f"class {c} ({names[c]!r}) has {len(rows)} training images; k_shot={k_shot} needs more")
        if cap is not None and len(rows) > cap:
            rows = np.sort(np.random.default_rng([rng_seed, c]).choice(rows, cap, replace=False))
        keep.append(rows)
    train_rows = np.sort(np.concatenate(keep))
    test_labels = y_test.numpy()
    test_rows = np.flatnonzero(np.isin(test_labels, arrival))
    if test_per_class is not None:
        chosen = select_per_class(test_labels[test_rows], test_per_class, seed)
        test_rows = test_rows[chosen]
    relabel = {c: i for i, c in enumerate(sorted(arrival))}  # the used classes, in their original order
    to_new = np.vectorize(relabel.__getitem__, otypes=[np.int64])
    y_tr = torch.from_numpy(to_new(labels[train_rows]))
    y_te = torch.from_numpy(to_new(test_labels[test_rows]))
    spec = BenchmarkSpec(
        name=name, class_names=tuple(names[c] for c in sorted(arrival)), image_shape=tuple(int(v) for v in shape),
        n_experiences=1 + sessions, classes_per_exp=(base_classes,) + (n_way,) * sessions,
        prompt_template=prompt_template or template, class_order=tuple(relabel[c] for c in arrival),
        k_shot=k_shot,
    )
    return make_tensor_benchmark(spec, (x_train[train_rows], y_tr), (x_test[test_rows], y_te))


def _fscil_preset(benchmark: str) -> Callable[..., Any]:
    preset = FSCIL_PRESETS[benchmark]

    def builder(
        data_root: PathLike | None,
        *,
        base_classes: int = preset["base_classes"],
        n_way: int = preset["n_way"],
        k_shot: int = preset["k_shot"],
        sessions: int = preset["sessions"],
        seed: int = 0,
        class_order: Sequence[int] | None = None,
        base_per_class: int | None = None,
        test_per_class: int | None = None,
        verify: bool = False,
        cache_dir: PathLike | None = None,
        use_cache: bool = True,
    ) -> Any:
        source = preset["source"]
        if verify and source in _SOURCES:
            _require_files(_data_root(data_root, benchmark), _SOURCES[source].files, _SOURCES[source].layout, True)
        return fscil_benchmark(
            source, data_root=data_root, base_classes=base_classes, n_way=n_way, k_shot=k_shot, sessions=sessions,
            seed=seed, class_order=class_order, base_per_class=base_per_class, test_per_class=test_per_class,
            name=benchmark, cache_dir=cache_dir, use_cache=use_cache,
        )  # fmt: skip

    builder.__name__ = builder.__qualname__ = benchmark
    builder.__doc__ = (
        f"FSCIL on {source_name(preset['source'])}: {preset['base_classes']} base classes, then {preset['sessions']} "
        f"sessions of {preset['n_way']}-way {preset['k_shot']}-shot (:func:`fscil_benchmark`; every argument "
        "overrides the preset's)."
    )
    return builder


def source_name(source: str) -> str:
    return {"split_gtsrb": "GTSRB", "split_cifar10": "CIFAR-10", "cifar100": "CIFAR-100 (torchvision's layout)",
            "split_mnist": "MNIST", "split_fmnist": "Fashion-MNIST"}[source]


fscil_gtsrb = _fscil_preset("fscil_gtsrb")
fscil_cifar10 = _fscil_preset("fscil_cifar10")
fscil_cifar100 = _fscil_preset("fscil_cifar100")

_BUILDERS: dict[str, Callable[..., Any]] = {
    "fscil_gtsrb": fscil_gtsrb,
    "fscil_cifar10": fscil_cifar10,
    "fscil_cifar100": fscil_cifar100,
    "split_mnist": split_mnist,
    "split_fmnist": split_fmnist,
    "split_cifar10": split_cifar10,
    "split_gtsrb": split_gtsrb,
}


_SOURCE_OPTIONS = ("verify", "cache_dir", "use_cache")  # options about reading files: meaningless for "default"
_SPLIT_OPTIONS = ("n_experiences", "train_per_class", "test_per_class", "class_order") + _SOURCE_OPTIONS
_FSCIL_OPTIONS = ("base_classes", "n_way", "k_shot", "sessions", "base_per_class", "test_per_class",
                  "class_order") + _SOURCE_OPTIONS


def benchmark_options(name: str) -> tuple[str, ...]:
    """The keyword arguments :func:`make_benchmark` accepts for ``name`` (besides ``seed``)."""
    _check_choice("benchmark", name, BENCHMARKS)
    return _FSCIL_OPTIONS if name in FSCIL_BENCHMARKS else _SPLIT_OPTIONS


def make_benchmark(name: str, data_root: PathLike | None = None, **kwargs: Any) -> Any:
    """Build a benchmark by name (one of :data:`BENCHMARKS`).

    ``kwargs`` go to the builder: for the split benchmarks ``n_experiences``, ``train_per_class``,
    ``test_per_class``, ``seed``, ``class_order``, ``verify``, ``cache_dir``, ``use_cache``; for the FSCIL ones
    ``base_classes``, ``n_way``, ``k_shot``, ``sessions``, ``base_per_class``, ``test_per_class``, ``seed``,
    ``class_order`` and the same file options (:func:`benchmark_options`). ``"default"`` ignores ``data_root`` and
    the file options ``verify``/``cache_dir``/``use_cache``, so one set of kwargs works for every split name.
    """
    allowed = benchmark_options(name)
    unknown = sorted(k for k in kwargs if k != "seed" and k not in allowed)
    if unknown:
        raise DataError(f"benchmark {name!r} takes no option {unknown}; valid: {', '.join(allowed)} and seed")
    if name == "default":
        return split_default(**{k: v for k, v in kwargs.items() if k not in _SOURCE_OPTIONS})
    return _BUILDERS[name](data_root, **kwargs)
