r"""Checkpoints at every phase boundary of a DR-CPSD run, and resuming a killed run from the latest one.

**When.** Per experience the phases run in the order *generation* (:math:`t>0`), *classifier*, *generator* and
*CPSD* (or CPSD then generator with ``cpsd_order="before_generator"``), *replay* (:math:`t>0`), then the runner's
*eval*; a checkpoint is written at the end of each of them: the strategy announces its phases to its plugins
(``after_<phase>``, :class:`~avalanche_drcpsd.utils.PhaseTimer`) and :class:`CheckpointPlugin` listens. A run
killed inside a phase resumes from the start of that phase, i.e. from the previous phase's checkpoint, and the
strategy skips the phases done (:meth:`~avalanche_drcpsd.strategy.DRCPSD.train_from`).

**What.** One directory ``<out>/checkpoint/ckpt-<seq>/`` holds

* ``model.safetensors`` (classifier), ``optimizer.pt`` (its optimiser's ``state_dict``, momentum included),
  ``generator.safetensors`` (the trainable generator's weights; a frozen Stable Diffusion is reloaded from its
  path instead), ``embeddings.safetensors`` (the CPSD embedding buffer), ``old_teacher.safetensors`` /
  ``new_teacher.safetensors`` (the distillation teachers, when they exist), ``replay.safetensors`` (the
  experience's replay set once generated);
* ``rng.pt``: the torch (and CUDA), numpy and Python ``random`` states and every plugin's own ``torch.Generator``
  (e.g. ``CPSDGeneratorPlugin.rng``);
* ``state.pt``: plain data only: the strategy's clock, the phase timer, the evaluator's metric states and pending
  values, the CSV loggers' state, the phase timer's ``state_dict()`` and each package plugin's ``state_dict()``
  (:class:`~avalanche_drcpsd.plugins.base.StatefulPlugin`: seen classes, replay statistics, kept sets, ...); other
  plugins' plain-data attributes;
* ``manifest.json`` (written last): the position (experience, phase), the experiment's configuration, the size,
  row count and SHA-256 of every CSV log at that moment, the run's history so far, and the size and SHA-256 of
  every file above.

``<out>/checkpoint/LATEST`` names the current checkpoint. A new checkpoint is written completely (every file
atomically, the manifest last), then ``LATEST`` is switched to it in one atomic rename, then the older ones are
deleted: a kill at any moment leaves one complete checkpoint. Only the latest is kept; a file that did not change
(the replay set within an experience) is hard-linked from the previous checkpoint rather than written again.

**Loading** verifies every file against the manifest's SHA-256 (:class:`CorruptCheckpointError` names the file)
and reads tensors with ``safetensors`` or ``torch.load(weights_only=True)`` only: nothing in a checkpoint is
executed. The state is restored into a strategy built afresh from the same configuration (a different
configuration is refused), never unpickled.

**Resuming** (``drcpsd-run --resume``, ``run_experiment(..., resume=True)``): every CSV log is cut back to the
size the checkpoint recorded (rows written after it are written again by the resumed phase: none is lost or
repeated, see :mod:`avalanche_drcpsd.logging`), the state is restored and the run continues at the next phase. On
the CPU the result is bit-identical to an uninterrupted run with the same seed (same CSV rows and accuracies; only
the wall-clock ``PhaseTime`` values differ).

**Event hooks.** :data:`EVENT_HOOKS` holds callables ``hook(experience, phase, when)`` that every checkpointer
calls in phase ``phase`` (``generation``, ``classifier``, ``generator``, ``cpsd``, ``replay``, ``eval``) of
experience ``experience``: ``when="start"`` as the phase begins, ``"end"`` after its work and before its checkpoint,
``"checkpoint"`` in the middle of writing it (data files written, manifest and ``LATEST`` not). It is empty: the
resume tests put a hook there that kills the process (``tests/kill_switch.py``); a monitor could log progress.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import re
import shutil
import time
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..plugins.base import DRCPSDPlugin, StatefulPlugin
from ..utils import PHASES as STRATEGY_PHASES
from ..utils import WriteError, atomic_write, atomic_write_bytes, experience_classes, frozen_copy, sha256_file

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "NonFiniteError",
    "Checkpoint",
    "CheckpointStore",
    "Checkpointer",
    "CheckpointPlugin",
    "EVENT_HOOKS",
    "CHECKPOINT_DIR",
    "FORMAT",
    "load_checkpoint",
]

FORMAT = "avalanche_drcpsd.checkpoint/2"  # 2: plugin state by state_dict()
CHECKPOINT_DIR = "checkpoint"
LATEST = "LATEST"
MANIFEST = "manifest.json"
#: phases that end with a checkpoint, in the order they may run within an experience: the strategy's and its evaluation
PHASES = (*STRATEGY_PHASES, "eval")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used to resume (missing, from another configuration, ...)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that does not match its manifest (truncated, modified) or cannot be read safely."""


class NonFiniteError(FloatingPointError):
    """A non-finite loss or weight: the run stops, naming the phase and the experience; the last checkpoint (from
    before the phase) is kept."""

    def __init__(self, phase: str, experience: int, what: str, checkpoint: Optional[str] = None):
        self.phase, self.experience = phase, experience
        kept = (f"; the last good checkpoint ({checkpoint}) is kept" if checkpoint else
                "; no checkpoint had been written yet")
        super().__init__(f"non-finite value in phase {phase!r} of experience {experience}: {what}{kept}")


# ----------------------------------------------------------------------------------------------------------------
# Event hooks
# ----------------------------------------------------------------------------------------------------------------
#: callables ``hook(experience, phase, when)`` called at every phase boundary and half-way through writing each
#: checkpoint (the module's docstring); empty unless a test or a monitor adds one
EVENT_HOOKS: List[Callable[[int, str, str], None]] = []
#: the moments of a phase that :data:`EVENT_HOOKS` are told about
EVENT_WHEN = ("start", "end", "checkpoint")


def _event(experience: int, phase: str, when: str) -> None:
    for hook in list(EVENT_HOOKS):
        hook(experience, phase, when)


# ----------------------------------------------------------------------------------------------------------------
# Serialisation helpers (no pickle of objects: safetensors, or torch.save of plain data loaded with weights_only)
# ----------------------------------------------------------------------------------------------------------------
def _state_dict_bytes(module_or_state, metadata: Optional[Dict[str, str]] = None) -> bytes:
    from safetensors.torch import save

    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    return save(tensors, metadata=metadata)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


_PRIMITIVES = (bool, int, float, str, type(None))


class _NotData(Exception):
    pass


def _is_state_object(value: Any) -> bool:
    """Objects whose attributes are walked (metric states): Avalanche's evaluation classes."""
    return type(value).__module__.startswith("avalanche.evaluation") and hasattr(value, "__dict__")


def _encode(value: Any, depth: int = 0) -> tuple:
    """A tagged tree of plain data and tensors (``torch.load(weights_only=True)`` reads it back), or _NotData."""
    if depth > 50:
        raise _NotData
    if value is None or isinstance(value, (bool, np.bool_)):
        return ("p", None if value is None else bool(value))
    if isinstance(value, (int, np.integer)):
        return ("p", int(value))
    if isinstance(value, (float, np.floating)):
        return ("p", float(value))
    if isinstance(value, str):
        return ("p", str(value))
    if isinstance(value, torch.Tensor):
        return ("t", value.detach().to("cpu", copy=True))
    if type(value) is list:
        return ("l", [_encode(v, depth + 1) for v in value])
    if type(value) is tuple:
        return ("u", [_encode(v, depth + 1) for v in value])
    if isinstance(value, (set, frozenset)):
        return ("s", [_encode(v, depth + 1) for v in sorted(value, key=repr)])
    if isinstance(value, dict):
        return ("d", [(_encode(k, depth + 1), _encode(v, depth + 1)) for k, v in value.items()])
    if _is_state_object(value):
        return ("o", type(value).__qualname__, _encode_attrs(value, depth=depth + 1))
    raise _NotData


def _encode_attrs(obj: Any, exclude: Sequence[str] = (), depth: int = 0) -> Dict[str, tuple]:
    out = {}
    for name, value in vars(obj).items():
        if name in exclude:
            continue
        try:
            out[name] = _encode(value, depth)
        except _NotData:
            continue
    return out


_MISSING = object()


def _decode(node: tuple, current: Any = _MISSING) -> Any:
    """Plain data from a tagged tree; dicts keep the type (e.g. defaultdict) of ``current``; objects are restored
    into the existing ones of ``current`` (never constructed from the file)."""
    tag = node[0]
    if tag == "p":
        return node[1]
    if tag == "t":
        return node[1]
    if tag == "l":
        return [_decode(v) for v in node[1]]
    if tag == "u":
        return tuple(_decode(v) for v in node[1])
    if tag == "s":
        return set(_decode(v) for v in node[1])
    if tag == "d":
        if isinstance(current, defaultdict):
            out: Any = defaultdict(current.default_factory)
        elif isinstance(current, OrderedDict):
            out = OrderedDict()
        else:
            out = {}
        for key_node, value_node in node[1]:
            key = _decode(key_node)
            old = current.get(key, _MISSING) if isinstance(current, dict) else _MISSING
            if value_node[0] == "o":
                if old is _MISSING and isinstance(out, defaultdict) and out.default_factory is not None:
                    old = out.default_factory()
                if old is _MISSING or type(old).__qualname__ != value_node[1]:
                    continue
                _restore_attrs(old, value_node[2])
                out[key] = old
            else:
                out[key] = _decode(value_node, old)
        return out
    raise CorruptCheckpointError(f"unknown node {tag!r} in a checkpoint's state")


def _restore_attrs(obj: Any, attrs: Dict[str, tuple], exclude: Sequence[str] = ()) -> None:
    for name, node in attrs.items():
        if name in exclude:
            continue
        current = getattr(obj, name, _MISSING)
        if node[0] == "o":
            if current is not _MISSING and type(current).__qualname__ == node[1]:
                _restore_attrs(current, node[2])
            continue
        setattr(obj, name, _decode(node, current))


#: attributes never restored in the plugins and loggers saved by reflection (not :class:`StatefulPlugin`s): how
#: this process prints or where it writes, not the run's state
_SKIP_ATTRS = ("verbose", "path", "log_folder", "timer", "config")


def _rng_state(plugins: Sequence[Any]) -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
        "generators": {},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for i, plugin in enumerate(plugins):
        for name, value in vars(plugin).items():
            if isinstance(value, torch.Generator):
                state["generators"][f"{i}.{type(plugin).__name__}.{name}"] = value.get_state()
    return state


def _set_rng_state(state: Dict[str, Any], plugins: Sequence[Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for i, plugin in enumerate(plugins):
        for name, value in vars(plugin).items():
            key = f"{i}.{type(plugin).__name__}.{name}"
            if isinstance(value, torch.Generator) and key in state["generators"]:
                value.set_state(state["generators"][key])


def _module_modes(module: Optional[nn.Module]) -> Optional[List[bool]]:
    return [m.training for m in module.modules()] if isinstance(module, nn.Module) else None


def _set_module_modes(module: Optional[nn.Module], modes: Optional[List[bool]]) -> None:
    if not isinstance(module, nn.Module) or modes is None:
        return
    mods = list(module.modules())
    if len(mods) == len(modes):
        for m, training in zip(mods, modes):
            m.training = bool(training)


# ----------------------------------------------------------------------------------------------------------------
# The on-disk store
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    name: str
    data: Optional[bytes] = None
    writer: Optional[Callable[[str], None]] = None
    reuse: Optional[str] = None  # same key as the previous checkpoint's file: hard-link it instead of writing


_NAME = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


@dataclass
class Checkpoint:
    """One verified checkpoint directory and its manifest."""

    directory: str
    manifest: Dict[str, Any]

    @property
    def name(self) -> str:
        return os.path.basename(self.directory)

    @property
    def phase(self) -> str:
        return self.manifest["position"]["phase"]

    @property
    def experience(self) -> int:
        return int(self.manifest["position"]["experience"])

    @property
    def index(self) -> int:
        return int(self.manifest["position"]["index"])

    def has(self, name: str) -> bool:
        return name in self.manifest.get("files", {})

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def load_tensors(self, name: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
        """A safetensors file's tensors (on the CPU) and metadata."""
        from safetensors import safe_open

        path = self.path(name)
        try:
            with safe_open(path, framework="pt") as fh:
                metadata = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CorruptCheckpointError(f"checkpoint file {path!r} is not a readable safetensors file: {exc}") from exc
        return tensors, metadata

    def load_data(self, name: str) -> Any:
        """A ``torch.save`` file of tensors and plain data, read with ``weights_only=True`` (no code runs)."""
        path = self.path(name)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as exc:
            raise CorruptCheckpointError(
                f"refusing to load checkpoint file {path!r}: it is not plain tensors and data that "
                f"torch.load(weights_only=True) accepts ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
            ) from exc


class CheckpointStore:
    """``<root>/ckpt-<seq>/`` directories and the ``<root>/LATEST`` pointer; only the latest is kept."""

    def __init__(self, root: str):
        self.root = os.fspath(root)

    # --- reading ----------------------------------------------------------------------------------------------
    def latest_name(self) -> Optional[str]:
        pointer = os.path.join(self.root, LATEST)
        if not os.path.isfile(pointer):
            return None
        try:
            with open(pointer, "r", encoding="utf-8") as fh:
                name = fh.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CorruptCheckpointError(f"cannot read the checkpoint pointer {pointer!r}: {exc}") from exc
        if not re.fullmatch(r"ckpt-\d{6,}", name):
            raise CorruptCheckpointError(f"the checkpoint pointer {pointer!r} holds {name[:80]!r}, not a checkpoint "
                                         "name such as 'ckpt-000003'")
        return name

    def load(self, *, verify: bool = True) -> Optional[Checkpoint]:
        """The latest checkpoint (None when none was ever completed), its files checked against the manifest."""
        name = self.latest_name()
        if name is None:
            return None
        directory = os.path.join(self.root, name)
        manifest_path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise CorruptCheckpointError(f"checkpoint {directory!r} (named by {os.path.join(self.root, LATEST)!r}) "
                                         f"has no {MANIFEST}")
        try:
            with open(manifest_path, "r", encoding="utf-8") as fh:
                manifest = json.load(fh)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(f"checkpoint manifest {manifest_path!r} is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise CorruptCheckpointError(f"{manifest_path!r} is not a checkpoint manifest of format {FORMAT!r} "
                                         f"(found {found!r})")
        try:
            position = manifest["position"]
            if position["phase"] not in PHASES:
                raise ValueError(f"phase {position['phase']!r}")
            int(position["experience"]), int(position["index"])
            files = manifest["files"]
            if not isinstance(files, dict):
                raise ValueError("files is not an object")
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"checkpoint manifest {manifest_path!r} is malformed ({exc!r})") from exc
        ckpt = Checkpoint(directory, manifest)
        if verify:
            for fname, info in files.items():
                self._verify(ckpt, fname, info)
        return ckpt

    @staticmethod
    def _verify(ckpt: Checkpoint, fname: str, info: Any) -> None:
        if not isinstance(fname, str) or not _NAME.fullmatch(fname) or ".." in fname.split("/"):
            raise CorruptCheckpointError(f"checkpoint {ckpt.directory!r} lists a bad file name {fname!r}")
        path = ckpt.path(fname)
        if not os.path.isfile(path):
            raise CorruptCheckpointError(f"checkpoint file {path!r} is missing")
        try:
            expected_size, expected_sha = int(info["bytes"]), str(info["sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"checkpoint manifest entry for {fname!r} is malformed ({exc!r})") from exc
        size = os.path.getsize(path)
        if size != expected_size:
            raise CorruptCheckpointError(f"checkpoint file {path!r} is corrupt: {size} bytes, the manifest recorded "
                                         f"{expected_size} (truncated or overwritten)")
        digest = sha256_file(path)
        if digest != expected_sha:
            raise CorruptCheckpointError(f"checkpoint file {path!r} is corrupt: its SHA-256 is {digest}, the manifest "
                                         f"recorded {expected_sha}")

    # --- writing ----------------------------------------------------------------------------------------------
    def _next_sequence(self) -> int:
        seqs = [int(n[5:]) for n in (os.listdir(self.root) if os.path.isdir(self.root) else [])
                if re.fullmatch(r"ckpt-\d{6,}", n)]
        return max(seqs, default=0) + 1

    def write(self, entries: Sequence[_Entry], manifest: Dict[str, Any], *,
              files_written: Optional[Callable[[], None]] = None) -> Checkpoint:
        """Write a new checkpoint, switch ``LATEST`` to it, delete the older ones. On an ``OSError`` (a full disk)
        raise :class:`~avalanche_drcpsd.utils.WriteError` and keep the previous checkpoint."""
        previous_name = None
        previous_files: Dict[str, Any] = {}
        with contextlib.suppress(CheckpointError, OSError):
            previous_name = self.latest_name()
            if previous_name:
                with open(os.path.join(self.root, previous_name, MANIFEST), "r", encoding="utf-8") as fh:
                    previous_files = json.load(fh).get("files", {})
        name = f"ckpt-{self._next_sequence():06d}"
        directory = os.path.join(self.root, name)
        try:
            os.makedirs(directory, exist_ok=False)
            files: Dict[str, Any] = {}
            for entry in entries:
                if not _NAME.fullmatch(entry.name):
                    raise ValueError(f"bad checkpoint file name {entry.name!r}")
                path = os.path.join(directory, entry.name)
                old = previous_files.get(entry.name)
                if entry.reuse and previous_name and isinstance(old, dict) and old.get("reuse") == entry.reuse:
                    source = os.path.join(self.root, previous_name, entry.name)
                    if os.path.isfile(source) and os.path.getsize(source) == old.get("bytes"):
                        try:
                            os.link(source, path)
                        except OSError:
                            shutil.copyfile(source, path)
                        files[entry.name] = dict(old)
                        continue
                if entry.data is not None:
                    atomic_write_bytes(path, entry.data, fsync=True)
                else:
                    atomic_write(path, entry.writer, fsync=True)
                files[entry.name] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path),
                                     "reuse": entry.reuse}
            manifest = {"format": FORMAT, **manifest, "files": files}
            if files_written is not None:
                files_written()
            atomic_write_bytes(os.path.join(directory, MANIFEST),
                               json.dumps(manifest, indent=1, default=str).encode("utf-8"), fsync=True)
            _fsync_dir(directory)
            atomic_write_bytes(os.path.join(self.root, LATEST), name.encode("ascii"), fsync=True)
            _fsync_dir(self.root)
        except OSError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            kept = f"the previous checkpoint ({previous_name}) is kept" if previous_name else "no checkpoint is kept"
            if isinstance(exc, WriteError):
                raise WriteError(exc.errno, f"{exc.strerror}; checkpoint not written, {kept}") from exc
            raise WriteError(exc.errno, f"cannot write checkpoint {directory!r}: {exc}; {kept}") from exc
        for other in os.listdir(self.root):
            if other != name and re.fullmatch(r"ckpt-\d{6,}", other):
                shutil.rmtree(os.path.join(self.root, other), ignore_errors=True)
        return Checkpoint(directory, manifest)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(out_dir: str, *, verify: bool = True) -> Optional[Checkpoint]:
    """The latest checkpoint of the run in ``out_dir`` (None when it has none)."""
    return CheckpointStore(os.path.join(os.fspath(out_dir), CHECKPOINT_DIR)).load(verify=verify)


# ----------------------------------------------------------------------------------------------------------------
# The run's checkpointer
# ----------------------------------------------------------------------------------------------------------------
def _on_start(phase: str):
    """A ``before_<phase>`` callback that reports the phase's start to :data:`EVENT_HOOKS`."""
    def callback(self, strategy, experience: int, **kwargs):
        _event(experience, phase, "start")
    return callback


def _on_end(phase: str):
    """An ``after_<phase>`` callback that checkpoints the end of the phase."""
    def callback(self, strategy, experience: int, **kwargs):
        self._save(strategy, phase, experience)
    return callback


class CheckpointPlugin(DRCPSDPlugin):
    """The checkpointer's ears in the strategy: placed right after the generator plugin, it hears the phases the
    strategy announces (``before_<phase>`` / ``after_<phase>``, :class:`~avalanche_drcpsd.utils.PhaseTimer`) and
    checkpoints the end of each, the *generation* phase at the end of the generator plugin's
    ``before_training_exp`` (once the replay set is ready); it also stops the classifier phase on a non-finite
    loss. A position already checkpointed (a resumed experience passes it again) is not written again."""

    def __init__(self, checkpointer: "Checkpointer"):
        super().__init__()
        self.checkpointer = checkpointer

    def _save(self, strategy, phase: str, exp: int) -> None:
        if strategy.is_training and self.checkpointer.position != (self.checkpointer.index, exp, phase):
            _event(exp, phase, "end")
            self.checkpointer.save(phase, exp)

    def before_training_exp(self, strategy, **kwargs):
        if strategy.generator_plugin.replay_record is not None:
            self._save(strategy, "generation", strategy.experience.current_experience)

    def before_backward(self, strategy, **kwargs):
        loss = strategy.loss
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteError("classifier", strategy.experience.current_experience,
                                 f"training loss {loss.detach().float().mean().item()} at iteration "
                                 f"{strategy.clock.train_exp_iterations}", self.checkpointer.last_name)

    def before_classifier(self, strategy, experience: int, **kwargs):
        _event(experience, "classifier", "start")
        self.checkpointer.learned_before = list(strategy.generator_plugin.learned_classes)

    before_generation = _on_start("generation")
    before_generator = _on_start("generator")
    before_cpsd = _on_start("cpsd")
    before_replay = _on_start("replay")
    after_classifier = _on_end("classifier")
    after_generator = _on_end("generator")
    after_cpsd = _on_end("cpsd")
    after_replay = _on_end("replay")


class Checkpointer:
    """Writes a checkpoint at the end of every phase of a :class:`~avalanche_drcpsd.strategy.DRCPSD` run and
    restores one into a strategy built afresh from the same configuration.

    ``log_files``: the append-only CSV logs whose positions a checkpoint records. ``run_state``: the runner's own
    state (``history``), saved in the manifest with ``elapsed()`` (the run's wall time so far); a resumed runner
    reads them back from :attr:`Checkpoint.manifest` ``["run"]``.

    Building it inserts its :class:`CheckpointPlugin` right after the strategy's generator plugin: the plugin hears
    the end of every phase and calls :meth:`save`."""

    def __init__(self, out_dir: str, strategy, *, experiment: Dict[str, Any], log_files: Sequence[str]):
        self.out_dir = os.fspath(out_dir)
        self.store = CheckpointStore(os.path.join(self.out_dir, CHECKPOINT_DIR))
        self.strategy = strategy
        self.experiment = json.loads(json.dumps(experiment, default=str))
        self.log_files = [os.fspath(p) for p in log_files]
        self.run_state: Dict[str, Any] = {"history": [], "elapsed_s": 0.0}
        self.elapsed: Callable[[], float] = lambda: 0.0
        self.index = 0
        self.last_name: Optional[str] = None
        #: (index, experience, phase) of the last checkpoint written or restored
        self.position: Optional[Tuple[int, int, str]] = None
        #: the classes the generator plugin had learned when the current experience's classifier phase began
        self.learned_before: List[int] = []
        self._nonce = uuid.uuid4().hex
        self.plugin = CheckpointPlugin(self)
        plugins = strategy.plugins
        plugins.insert(plugins.index(strategy.generator_plugin) + 1, self.plugin)
        #: the strategy's full plugin list (a resumed experience runs some callbacks on a part of it)
        self.plugins = plugins

    # --- the evaluation phase (the runner's) ----------------------------------------------------------------
    def eval_started(self, exp: int) -> None:
        _event(exp, "eval", "start")

    def eval_ended(self, exp: int) -> None:
        _event(exp, "eval", "end")
        self.save("eval", exp)

    # --- writing ------------------------------------------------------------------------------------------------
    def _check_finite(self, phase: str, exp: int) -> None:
        s = self.strategy
        gp = s.generator_plugin
        parts = [("the classifier", s.model)]
        if gp.generator is not None and not gp.generator.frozen:
            parts.append(("the generator", gp.generator))
        for what, module in parts:
            for name, t in module.state_dict().items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(phase, exp, f"{what}'s {name} holds NaN/inf (a non-finite loss in this "
                                                     "phase)", self.last_name)
        if gp.buffer is not None:
            for c, e in [*gp.buffer.embeddings.items(), *gp.buffer.caption_embeddings.items()]:
                if not bool(torch.isfinite(e).all()):
                    raise NonFiniteError(phase, exp, f"the CPSD embedding of class {c} holds NaN/inf (a non-finite "
                                                     "CPSD loss)", self.last_name)

    def save(self, phase: str, exp: int) -> Checkpoint:
        """Checkpoint the run as it stands at the end of ``phase`` of experience ``exp``."""
        s = self.strategy
        gp = s.generator_plugin
        self._check_finite(phase, exp)
        entries = [_Entry("model.safetensors", _state_dict_bytes(s.model)),
                   _Entry("optimizer.pt", _torch_bytes(s.optimizer.state_dict()))]
        gen = gp.generator
        gen_info = None
        if gen is not None:
            shape = gen.output_shape
            weights = not gen.frozen
            gen_info = {"class": type(gen).__name__, "image_shape": list(shape) if shape else None,
                        "weights": weights}
            if weights:
                entries.append(_Entry("generator.safetensors", _state_dict_bytes(gen)))
        if gp.buffer is not None:
            entries.append(_Entry("embeddings.safetensors", writer=gp.buffer.save))
        d = s.distill_plugin
        for label, teacher in (("old_teacher", d.old_teacher), ("new_teacher", d.new_teacher)):
            if teacher is not None:
                entries.append(_Entry(f"{label}.safetensors", _state_dict_bytes(teacher)))
        replay_info = None
        if gp.replay_record is not None:
            classes, n, x, y = gp.replay_record
            replay_info = {"classes": [int(c) for c in classes], "n_per_class": int(n)}
            key = f"{self._nonce}:{id(x)}:{x.data_ptr()}:{tuple(x.shape)}:{id(y)}"

            def write_replay(tmp: str, x=x, y=y) -> None:
                with open(tmp, "wb") as fh:
                    fh.write(_state_dict_bytes({"x": x, "y": y}))

            entries.append(_Entry("replay.safetensors", writer=write_replay, reuse=key))
        entries.append(_Entry("rng.pt", _torch_bytes(_rng_state(self.plugins))))
        entries.append(_Entry("state.pt", _torch_bytes(self._plain_state())))
        experience = getattr(s, "experience", None)
        classes_now = experience_classes(experience) if experience is not None else []
        manifest = {
            "position": {"index": self.index, "experience": exp, "phase": phase},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "experiment": self.experiment,
            "logs": {os.path.relpath(p, self.out_dir): _log_position(p) for p in self.log_files},
            "run": {"history": self.run_state.get("history", []), "elapsed_s": float(self.elapsed())},
            "learned_before": self.learned_before,
            "new_classes": sorted(set(classes_now) - set(self.learned_before)),
            "generator": gen_info,
            "replay": replay_info,
            "plugins": [type(p).__name__ for p in self.plugins],
            "versions": {"torch": torch.__version__},
        }
        ckpt = self.store.write(entries, manifest, files_written=lambda: _event(exp, phase, "checkpoint"))
        self.last_name = ckpt.name
        self.position = (self.index, exp, phase)
        return ckpt

    def _plain_state(self) -> Dict[str, Any]:
        """The run's state that is not a tensor file. Three of its entries are Avalanche's private attributes, read
        because Avalanche gives them no accessor and a resumed run must continue them: the evaluator's metric values
        not yet sent to its loggers (``_metric_values``) and whether it is collecting (``_active``), and the
        template's ``_stop_training`` flag (set by early stopping within an experience)."""
        s = self.strategy
        ev = s.evaluator
        plugins = []
        for p in self.plugins:  # the package's plugins by their state_dict; others' plain-data attributes
            if isinstance(p, StatefulPlugin):
                plugins.append((type(p).__name__, {"state_dict": _encode(p.state_dict(copy_values=False))}))
            else:
                plugins.append((type(p).__name__, {} if p is ev else _encode_attrs(p, exclude=_SKIP_ATTRS)))

        def items(d: Dict[Any, Any]) -> list:
            out = []
            for k, v in d.items():
                try:
                    out.append((_encode(k), _encode(v)))
                except _NotData:
                    continue
            return out

        pending = []
        for mv in ev._metric_values:
            try:
                pending.append((str(mv.name), _encode(mv.value), _encode(mv.x_plot)))
            except _NotData:
                continue
        return {
            "plugins": plugins,
            "evaluator": {"last": ("d", items(ev.last_metric_results)),
                          "all": ("d", items(ev.all_metric_results)) if ev.collect_all else ("d", []),
                          "pending": pending, "active": bool(ev._active),
                          "metrics": [(type(m).__name__, _encode_attrs(m)) for m in ev.metrics]},
            "loggers": [(type(lg).__name__, _encode_attrs(lg, exclude=_SKIP_ATTRS)) for lg in ev.loggers],
            "timer": s.timer.state_dict(),
            "modes": {"model": _module_modes(s.model), "generator": _module_modes(s.generator_plugin.generator)},
            "stop_training": bool(getattr(s, "_stop_training", False)),
        }

    # --- restoring ------------------------------------------------------------------------------------------------
    def restore(self, ckpt: Checkpoint) -> None:
        """Put the run's state of ``ckpt`` into the (freshly built) strategy; random states last."""
        from avalanche.evaluation.metric_results import MetricValue

        from ..cpsd import EmbeddingBuffer

        s = self.strategy
        gp = s.generator_plugin
        m = ckpt.manifest
        saved_plugins = m.get("plugins", [])
        now = [type(p).__name__ for p in self.plugins]
        if saved_plugins != now:
            raise CheckpointError(f"checkpoint {ckpt.directory!r} was written by a strategy with plugins "
                                  f"{saved_plugins}, this one has {now}: resume with the same configuration and code")
        gp.setup()
        if ckpt.has("embeddings.safetensors"):
            try:
                gp.buffer = EmbeddingBuffer.load(ckpt.path("embeddings.safetensors"))
            except (ValueError, OSError) as exc:
                raise CorruptCheckpointError(f"cannot read {ckpt.path('embeddings.safetensors')!r}: {exc}") from exc
        gen_info = m.get("generator")
        if gen_info:
            if gen_info.get("image_shape"):
                gp.build_generator(tuple(int(v) for v in gen_info["image_shape"]))
            if gen_info.get("weights"):
                tensors, _ = ckpt.load_tensors("generator.safetensors")
                _load_module(gp.generator, tensors, ckpt.path("generator.safetensors"))
        tensors, _ = ckpt.load_tensors("model.safetensors")
        _load_module(s.model, tensors, ckpt.path("model.safetensors"))
        s.optimized_param_id = {n: p for n, p in s.model.named_parameters()}
        optimizer_state = ckpt.load_data("optimizer.pt")
        try:
            s.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"the optimiser state in {ckpt.path('optimizer.pt')!r} does not fit this "
                                  f"optimiser: {exc}") from exc
        d = s.distill_plugin
        for label in ("old_teacher", "new_teacher"):
            teacher = None
            if ckpt.has(f"{label}.safetensors"):
                teacher = frozen_copy(s.model)
                tensors, _ = ckpt.load_tensors(f"{label}.safetensors")
                _load_module(teacher, tensors, ckpt.path(f"{label}.safetensors"))
            setattr(d, label, teacher)
        gp.replay_record = None
        if m.get("replay"):
            tensors, _ = ckpt.load_tensors("replay.safetensors")
            info = m["replay"]
            gp.replay_record = (tuple(int(c) for c in info["classes"]), int(info["n_per_class"]), tensors["x"],
                                tensors["y"])
        state = ckpt.load_data("state.pt")
        try:
            for plugin, (cls_name, attrs) in zip(self.plugins, state["plugins"]):
                if isinstance(plugin, StatefulPlugin):
                    plugin.load_state_dict(_decode(attrs["state_dict"], plugin.state_dict(copy_values=False)))
                elif plugin is not s.evaluator:
                    _restore_attrs(plugin, attrs, exclude=_SKIP_ATTRS)
            ev = s.evaluator
            ev.last_metric_results = _decode(state["evaluator"]["last"], ev.last_metric_results)
            if ev.collect_all:
                ev.all_metric_results = _decode(state["evaluator"]["all"], ev.all_metric_results)
            ev._active = bool(state["evaluator"]["active"])
            ev._metric_values = [MetricValue(s, name, _decode(v), _decode(x))
                                 for name, v, x in state["evaluator"]["pending"]]
            for metric, (cls_name, attrs) in zip(ev.metrics, state["evaluator"]["metrics"]):
                if type(metric).__name__ == cls_name:
                    _restore_attrs(metric, attrs)
            unused = list(ev.loggers)
            for cls_name, attrs in state["loggers"]:
                match = next((lg for lg in unused if type(lg).__name__ == cls_name), None)
                if match is not None:
                    unused.remove(match)
                    _restore_attrs(match, attrs, exclude=_SKIP_ATTRS)
            s.timer.load_state_dict(state["timer"])
            _set_module_modes(s.model, state["modes"]["model"])
            _set_module_modes(gp.generator, state["modes"]["generator"])
            s._stop_training = bool(state.get("stop_training", False))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CorruptCheckpointError(f"the state in {ckpt.path('state.pt')!r} is malformed ({exc!r})") from exc
        self.learned_before = [int(c) for c in m.get("learned_before", [])]
        self.index = ckpt.index
        self.last_name = ckpt.name
        self.position = (ckpt.index, ckpt.experience, ckpt.phase)
        _set_rng_state(ckpt.load_data("rng.pt"), self.plugins)

    def continue_experience(self, experience, ckpt: Checkpoint) -> None:
        """Finish ``experience`` from a checkpoint written inside its training (any phase but eval): the strategy's
        :meth:`~avalanche_drcpsd.strategy.DRCPSD.train_from` the checkpoint's phase, with its state restored."""
        if experience.current_experience != ckpt.experience:
            raise CheckpointError(f"checkpoint {ckpt.directory!r} is in experience {ckpt.experience}, not "
                                  f"{experience.current_experience}")
        if ckpt.phase not in STRATEGY_PHASES:
            raise CheckpointError(f"cannot continue an experience from phase {ckpt.phase!r}")
        self.strategy.train_from(experience, ckpt.phase, restore=lambda: self.restore(ckpt),
                                 new_classes=ckpt.manifest.get("new_classes", []))


def _log_position(path: str) -> Dict[str, Any]:
    from ..logging import log_position

    return log_position(path)


def _load_module(module: nn.Module, tensors: Dict[str, torch.Tensor], path: str) -> None:
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {path!r} do not fit the model built from this configuration: "
                              f"{str(exc).splitlines()[0]}") from exc
