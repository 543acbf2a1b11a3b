"""Small shared helpers: frozen copies, weight interpolation, atomic writes, phase timing, tensors of a dataset,
and the checks run on an experience's data before training."""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import os
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "PHASES",
    "freeze",
    "frozen_copy",
    "running_stats_kept",
    "parse_dtype",
    "interpolate_state_dicts",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_csv",
    "WriteError",
    "write_error",
    "sha256_file",
    "PhaseTimer",
    "dataset_tensors",
    "dataset_labels",
    "spread_items",
    "experience_classes",
    "is_last_experience",
    "check_experience_data",
    "lr_schedule",
]

PathLike = Union[str, "os.PathLike[str]"]


def freeze(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with ``requires_grad=False`` for every parameter (in place); returns it."""
    module.requires_grad_(False)
    return module.eval()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with ``requires_grad=False`` everywhere (a teacher)."""
    return freeze(copy.deepcopy(model))


_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


@contextlib.contextmanager
def running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Inside the block, forward passes of ``module`` in train mode normalise by their batch statistics as usual,
    but they update copies of every BatchNorm's running statistics (``running_mean``, ``running_var``,
    ``num_batches_tracked``); the block's end puts the originals back, unchanged. The copies are swapped in
    rather than the originals restored in place, so a backward pass through the block's graph (which holds the
    buffers it saw) stays valid."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    names = ("running_mean", "running_var", "num_batches_tracked")
    saved = [{k: getattr(m, k) for k in names if getattr(m, k, None) is not None} for m in norms]
    for m, buffers in zip(norms, saved):
        for k, b in buffers.items():
            setattr(m, k, b.clone())
    try:
        yield
    finally:
        for m, buffers in zip(norms, saved):
            for k, b in buffers.items():
                setattr(m, k, b)


def parse_dtype(value: Union[str, torch.dtype], *, name: str = "torch_dtype",
                error: type = ValueError) -> torch.dtype:
    """``torch.bfloat16`` from ``"bfloat16"``, ``"bf16"``, ``"torch.bfloat16"`` or the dtype itself; anything but
    a floating dtype raises ``error`` naming ``name`` and the value."""
    if isinstance(value, torch.dtype):
        dtype = value
    else:
        text = str(value).replace("torch.", "")
        dtype = getattr(torch, _DTYPE_ALIASES.get(text, text), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise error(f"{name}={value!r}; expected a floating dtype such as 'float32', 'bfloat16' (bf16) or "
                    "'float16' (fp16)")
    return dtype


def interpolate_state_dicts(old: Mapping[str, Tensor], new: Mapping[str, Tensor], alpha: float) -> Dict[str, Tensor]:
    r"""Weights :math:`\theta = (1-\alpha)\,\theta_{old} + \alpha\,\theta_{new}` for every floating tensor
    (``alpha=0.5``: the average of the two teachers); integer buffers (BatchNorm's counters) come from ``new``."""
    if old.keys() != new.keys():
        missing = sorted(set(old) ^ set(new))
        raise ValueError(f"the two models have different parameters: {missing[:5]}")
    out = {}
    for k, v_new in new.items():
        v_old = old[k]
        if torch.is_floating_point(v_new):
            out[k] = torch.lerp(v_old.to(v_new.dtype), v_new, alpha)
        else:
            out[k] = v_new.clone()
    return out


class WriteError(OSError):
    """Writing an output file failed (``errno`` as the underlying ``OSError``, e.g. ``ENOSPC`` for a full disk); the
    message names the file and says what is left of it."""


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def write_error(path: PathLike, exc: OSError, *, kept: str = "the previous version, if any, is intact") -> WriteError:
    """A :class:`WriteError` for ``exc`` raised while writing ``path``: ``"cannot write 'x': No space left on device
    (disk full); <kept>"``."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = " (disk full: free some space and run again)" if exc.errno in _DISK_FULL else ""
    err = WriteError(exc.errno, f"cannot write {os.fspath(path)!r}: {reason}{hint}; {kept}")
    err.filename = os.fspath(path)
    return err


def atomic_write(path: PathLike, write: Callable[[str], None], *, fsync: bool = False) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one ``os.replace``: a reader never sees a
    half-written file, and a killed process leaves the previous version intact. An ``OSError`` (a full disk, a
    read-only folder) is raised as :class:`WriteError` naming ``path``. ``fsync``: flush the file to the disk
    before the rename (durable across a power cut, not only a killed process)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise write_error(path, exc) from exc
        raise


def atomic_write_bytes(path: PathLike, data: bytes, *, fsync: bool = False) -> None:
    """:func:`atomic_write` of a bytes payload."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write, fsync=fsync)


def atomic_write_text(path: PathLike, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(path: PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """:func:`atomic_write` of ``rows`` as a CSV with a header: the union of their keys in first-seen order
    (a row lacking a column leaves it empty)."""
    import csv

    fields = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def sha256_file(path: PathLike, limit: Optional[int] = None) -> str:
    """Hex SHA-256 of a file (of its first ``limit`` bytes when given)."""
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as fh:
        while left is None or left > 0:
            chunk = fh.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: DR-CPSD's named phases of one experience, in the order they run: the replay set is drawn before the classifier
#: trains (``before_training_exp``), then the generator and CPSD learn the new classes and dream replay trains the
#: student (``after_training_exp``). :class:`PhaseTimer` keys, ``PhaseTime/<phase>`` metrics, the
#: ``before_<phase>`` / ``after_<phase>`` plugin callbacks and checkpoints use these names.
PHASES = ("generation", "classifier", "generator", "cpsd", "replay")


class PhaseTimer:
    """Runs, times and announces the named phases: ``with timer("generator", exp=2): ...``.

    Wall time is kept per (experience, phase). With ``strategy`` set (:class:`~avalanche_drcpsd.strategy.DRCPSD`
    sets itself), every phase is announced to the strategy's plugins as Avalanche's templates announce their steps
    (``trigger_plugins``): ``before_<phase>(strategy, experience=exp)`` as it begins and
    ``after_<phase>(strategy, experience=exp)`` when it ends without an error (after its time is recorded); the
    run's checkpoint plugin listens to these. An exception escaping a phase gets a ``drcpsd_phase = (exp, phase)``
    attribute (the innermost phase), so the error can be reported with the phase and experience it happened in.

    :param strategy: the strategy whose plugins hear the phases; None (plugins used on their own) announces
        nothing.
    """

    def __init__(self, strategy: Any = None) -> None:
        self.seconds: Dict[Tuple[int, str], float] = defaultdict(float)
        self.strategy = strategy
        self.active: List[Tuple[int, str]] = []

    def _announce(self, event: str, exp: int) -> None:
        if self.strategy is not None:
            from avalanche.training.utils import trigger_plugins

            trigger_plugins(self.strategy, event, experience=exp)

    @contextlib.contextmanager
    def __call__(self, phase: str, exp: int) -> Iterator[None]:
        self._announce(f"before_{phase}", exp)
        start = time.perf_counter()
        self.active.append((exp, phase))
        try:
            yield
        except BaseException as exc:
            if not hasattr(exc, "drcpsd_phase"):
                with contextlib.suppress(AttributeError, TypeError):
                    exc.drcpsd_phase = (exp, phase)
            raise
        finally:
            self.active.pop()
            self.seconds[(exp, phase)] += time.perf_counter() - start
        self._announce(f"after_{phase}", exp)

    def total(self, phase: str) -> float:
        return sum(v for (_, p), v in self.seconds.items() if p == phase)

    def state_dict(self) -> Dict[str, Any]:
        """The seconds spent so far, ``{"seconds": [[experience, phase, seconds], ...]}`` (the strategy is
        wiring, not state)."""
        return {"seconds": [[int(e), str(p), float(v)] for (e, p), v in self.seconds.items()]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.seconds.clear()
        for e, p, v in state["seconds"]:
            self.seconds[(int(e), str(p))] = float(v)


@torch.no_grad()
def dataset_tensors(dataset: Dataset, batch_size: int = 1024) -> Tuple[Tensor, Tensor]:
    """All ``(x, y)`` of a (small enough) dataset as two tensors, in dataset order. Draws nothing from torch's
    global random stream (a DataLoader's iterator otherwise takes its base seed from it), so reading a data set
    does not move the classifier's data order."""
    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator()):
        xs.append(batch[0])
        ys.append(torch.as_tensor(batch[1]))
    if not xs:
        raise ValueError("the dataset is empty")
    return torch.cat(xs), torch.cat(ys).long()


def dataset_labels(dataset: Any) -> Tensor:
    """Every label of a data set, in order: from its ``targets`` when they convert to a tensor, else read item by
    item."""
    targets = getattr(dataset, "targets", None)
    try:
        labels = torch.as_tensor(list(targets)) if targets is not None else None
    except (TypeError, ValueError, RuntimeError):
        labels = None
    if labels is None:
        labels = torch.as_tensor([int(torch.as_tensor(dataset[i][1])) for i in range(len(dataset))])
    return labels


def spread_items(dataset: Any, samples: int) -> Iterator[Tuple[int, Any]]:
    """``(index, input)`` of up to ``samples`` items spread evenly over ``dataset``, each read under a forked
    random state, so a check that reads them draws nothing from torch's global random stream."""
    n = len(dataset)
    for i in sorted(set(torch.linspace(0, n - 1, min(samples, n)).round().long().tolist())) if n else []:
        with torch.random.fork_rng(devices=[]):
            yield i, dataset[i][0]


def experience_classes(experience: Any) -> List[int]:
    """The sorted class ids of an Avalanche experience: its classes timeline (``classes_in_this_experience``) when
    the stream has one, else the distinct values of its data set's ``targets`` (streams made with
    ``benchmark_from_datasets`` and other generic builders), else of the labels read from the data set."""
    classes = getattr(experience, "classes_in_this_experience", None)
    if classes is not None:
        return sorted(int(c) for c in classes)
    return sorted(int(c) for c in dataset_labels(experience.dataset).unique().tolist())


def is_last_experience(experience: Any) -> bool:
    """Whether ``experience`` is the last of the stream it came from (``origin_stream``); False when the stream
    does not say (no origin stream, or one of unknown length)."""
    stream = getattr(experience, "origin_stream", None)
    if stream is None:
        return False
    try:  # Avalanche's streams do not all take negative indices
        return int(stream[len(stream) - 1].current_experience) == int(experience.current_experience)
    except (TypeError, IndexError, AttributeError, NotImplementedError):
        return False


def check_experience_data(dataset: Any, *, image_shape: Sequence[int], num_classes: int, experience: int,
                          samples: int = 16) -> None:
    """Refuse an experience's data set whose labels a ``num_classes``-way classifier cannot learn or whose images are
    not ``image_shape`` (C, H, W) finite values in [0, 1], before any training: raises
    :class:`~avalanche_drcpsd.data.DataError` naming the experience, the bad value and what was expected.

    Labels are checked in full (from the data set's ``targets`` when it has them); images on ``samples`` items
    spread over the data set (shape, dtype, finiteness and range)."""
    from .data import DataError

    where = f"experience {experience}"
    n = len(dataset)
    if n == 0:
        raise DataError(f"{where}: the training data set is empty")
    labels = dataset_labels(dataset)
    if labels.dim() != 1 or len(labels) != n:
        raise DataError(f"{where}: expected one label per image ({n}), got labels of shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        if labels.dtype == torch.bool or not bool(torch.all(labels == labels.round())):
            raise DataError(f"{where}: labels must be integer class ids, got {labels.dtype} values")
        labels = labels.long()
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        wrong = sorted(set(labels[bad].tolist()))
        raise DataError(f"{where}: label(s) {wrong[:10]} out of range; the classifier has {num_classes} classes, "
                        f"so labels must be in 0..{num_classes - 1}")
    expected = tuple(int(v) for v in image_shape)
    if hasattr(dataset, "eval"):
        dataset = dataset.eval()  # no random augmentation: the check must not draw from any random generator
    for i, x in spread_items(dataset, samples):
        if not isinstance(x, torch.Tensor):
            raise DataError(f"{where}: item {i} is a {type(x).__name__}, expected a float tensor of shape {expected} "
                            "(apply a ToTensor transform)")
        if tuple(x.shape) != expected:
            raise DataError(f"{where}: item {i} has shape {tuple(x.shape)}, expected {expected} (C, H, W) as the "
                            "classifier and the generator were built for")
        if not x.is_floating_point():
            raise DataError(f"{where}: item {i} has dtype {x.dtype}, expected floating point values in [0, 1]")
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"{where}: item {i} holds non-finite values (NaN or inf)")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise DataError(f"{where}: item {i} has values in [{lo:.3g}, {hi:.3g}], expected images in [0, 1]")


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, warmup: int, steps: int):
    """diffusers' ``get_scheduler`` for a training phase of ``steps`` optimiser steps: ``cosine`` (annealed to 0
    after ``warmup`` warm-up steps) or ``constant`` (after the warm-up); None for a constant rate with no
    warm-up."""
    from diffusers.optimization import get_scheduler

    if kind == "constant" and warmup == 0:
        return None
    name = "cosine" if kind == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(steps, 1))
