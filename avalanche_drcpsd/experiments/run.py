"""Run one continual-learning experiment: ``python -m avalanche_drcpsd`` or ``drcpsd-run``.

With no ``--config`` and no ``--strategy`` it runs the *main job* (:func:`run_main_job`): on the embedded default
data set (a small real MNIST subset shipped in the package, so no data root and no download) and one recipe
(:func:`default_experiment`, the CPU profile's values built in), DR-CPSD, then Naive and ER200 (``--strategies``),
each into ``<out>/<strategy>/``, then a table of the three, ``<out>/summary.csv``, ``<out>/accuracy.png`` and
``<out>/accuracy_memory.png`` (default ``--out``: ``runs/<benchmark>-main-seed<seed>``). A finished sub-run (its
``logs/run_info.csv`` exists) is reused; ``--resume`` continues a killed DR-CPSD sub-run from its checkpoint.

``--config FILE`` reads an experiment JSON (see ``experiments/``) and, like ``--strategy``, runs that one
experiment. Outputs of one run in ``--out`` (default ``runs/<benchmark>-<strategy>-seed<seed>``):
``logs/`` (Avalanche ``CSVLogger`` files + ``metrics.csv`` with every metric, the MMD gap and phase times),
``state/`` (classifier, generator, embedding buffer after each experience), ``samples_exp<k>.png`` (a grid
of synthetic images per learned class), and ``summary.json``. While a DR-CPSD run is in progress, ``checkpoint/``
holds the checkpoint of its latest phase; ``--resume`` continues a killed run from it
(:mod:`avalanche_drcpsd.experiments.checkpoint`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import ConfigError, DRCPSDConfig, build_from_fields, check_device, read_json
from ..data import BENCHMARKS
from ..models import CLASSIFIERS
from ..utils import atomic_write, atomic_write_csv, atomic_write_text
from .baselines import (
    STRATEGIES,
    generator_parameters,
    is_joint,
    make_baseline,
    memory_bytes,
    memory_info,
    stored_real_images,
)

__all__ = ["ExperimentConfig", "run_experiment", "run_main_job", "format_main_job_table", "main", "RUN_INFO",
           "MAIN_JOB_STRATEGIES", "MAIN_JOB_COLUMNS"]

#: the run's facts that Avalanche's CSV files do not hold, written as ``logs/run_info.csv`` (``key,value``)
RUN_INFO = "run_info.csv"
#: a finished run's confusion on the whole test stream after the last experience (in ``logs/``)
CONFUSION = "confusion.csv"
#: the main job's strategies (``--strategies``), in the order they run: the method, its lower bound, rehearsal
MAIN_JOB_STRATEGIES = ("drcpsd", "naive", "er200")
#: the columns of the main job's ``summary.csv`` (one row per strategy)
MAIN_JOB_COLUMNS = ("strategy", "final_average_accuracy", "stored_real_images", "memory_bytes", "wall_time_s")


@dataclass
class ExperimentConfig:
    """What to run: benchmark, classifier and its optimiser, strategy, and the DR-CPSD hyper-parameters."""

    benchmark: str = "default"
    data_root: Optional[str] = None
    benchmark_args: Dict[str, Any] = field(default_factory=dict)
    strategy: str = "drcpsd"
    classifier: str = "small_cnn"
    train_epochs: int = 2
    #: epochs of every experience after the first (None: ``train_epochs``). Few-shot sessions (the FSCIL
    #: benchmarks: 5 images per class) need many more passes than the base session: 25 images are one minibatch.
    later_epochs: Optional[int] = None
    train_mb_size: int = 64
    eval_mb_size: int = 1000
    lr: float = 0.05
    momentum: float = 0.9
    seed: int = 0
    threads: Optional[int] = None
    #: a directory written by :func:`avalanche_drcpsd.experiments.fidelity.train_feature_extractor`: DR-CPSD runs then
    #: publish the FID and KID between real test images and synthetic samples of the learned classes after each
    #: experience
    fidelity_extractor: Optional[str] = None
    fidelity_samples_per_class: int = 100
    drcpsd: DRCPSDConfig = field(default_factory=DRCPSDConfig)

    def __post_init__(self):
        if isinstance(self.drcpsd, dict):
            self.drcpsd = DRCPSDConfig.from_dict(self.drcpsd)
        elif not isinstance(self.drcpsd, DRCPSDConfig):
            raise ConfigError(f"drcpsd={_short(self.drcpsd)} must be a JSON object of DRCPSDConfig fields")
        if not isinstance(self.strategy, str) or self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy={_short(self.strategy)}; expected one of {list(STRATEGIES)}")
        if not isinstance(self.benchmark, str) or self.benchmark not in BENCHMARK_NAMES:
            raise ConfigError(f"benchmark={_short(self.benchmark)}; expected one of {list(BENCHMARK_NAMES)}")
        if not isinstance(self.classifier, str) or self.classifier not in CLASSIFIERS:
            raise ConfigError(f"classifier={_short(self.classifier)}; expected one of {list(CLASSIFIERS)}")
        for name in ("data_root", "fidelity_extractor"):
            v = getattr(self, name)
            if isinstance(v, os.PathLike):
                v = os.fspath(v)
                setattr(self, name, v)
            if v is not None and (not isinstance(v, str) or not v or "\x00" in v):
                raise ConfigError(f"{name}={_short(v)} must be a non-empty path or null")
        if self.fidelity_extractor is not None and not os.path.isdir(self.fidelity_extractor):
            raise ConfigError(f"fidelity_extractor={self.fidelity_extractor!r} is not a directory; expected one "
                              "written by avalanche_drcpsd.experiments.fidelity.train_feature_extractor")
        for name in ("train_epochs", "train_mb_size", "eval_mb_size", "fidelity_samples_per_class"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={_short(v)} must be an integer >= 1")
        if self.later_epochs is not None and (isinstance(self.later_epochs, bool)
                                              or not isinstance(self.later_epochs, int) or self.later_epochs < 1):
            raise ConfigError(f"later_epochs={_short(self.later_epochs)} must be an integer >= 1 or null")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise ConfigError(f"seed={_short(self.seed)} must be an integer in [0, 2**32)")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ConfigError(f"threads={_short(self.threads)} must be an integer >= 1 or null")
        if not _finite(self.lr) or not self.lr > 0:
            raise ConfigError(f"lr={_short(self.lr)} must be a finite number > 0")
        if not _finite(self.momentum) or not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={_short(self.momentum)} must be a number in [0, 1)")
        _check_benchmark_args(self.benchmark, self.benchmark_args)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "ExperimentConfig":
        """Build from a plain dict (JSON); an unknown key or a bad value raises :class:`ConfigError`."""
        if not isinstance(values, dict):
            raise ConfigError(f"an experiment config must be a JSON object/dict, got {type(values).__name__}")
        return build_from_fields(cls, values, "experiment")

    @classmethod
    def from_json(cls, path: str) -> "ExperimentConfig":
        """Read a JSON file (plain data only; nothing in a config is ever executed)."""
        return cls.from_dict(read_json(path, "experiment config"))

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["drcpsd"] = self.drcpsd.to_dict()
        return d


#: names accepted by :func:`avalanche_drcpsd.data.make_benchmark` (and, imported above, ``CLASSIFIERS``: those of
#: :func:`avalanche_drcpsd.models.make_classifier`)
BENCHMARK_NAMES = BENCHMARKS


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _finite(value: Any) -> bool:
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _check_benchmark_args(benchmark: str, args: Any) -> None:
    """The keys the benchmark's builder takes (:func:`avalanche_drcpsd.data.benchmark_options`), typed."""
    from ..data import benchmark_options

    if not isinstance(args, dict):
        raise ConfigError(f"benchmark_args={_short(args)} must be a JSON object")
    allowed = benchmark_options(benchmark)
    unknown = sorted((k for k in args if k not in allowed), key=repr)
    if unknown:
        raise ConfigError(f"benchmark_args has unknown key(s) {unknown} for benchmark {benchmark!r}; expected some "
                          f"of {list(allowed)} (the seed is the experiment's 'seed')")
    for key in ("n_experiences", "train_per_class", "test_per_class", "base_classes", "n_way", "k_shot",
                "base_per_class"):
        v = args.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"benchmark_args['{key}']={_short(v)} must be an integer >= 1")
    v = args.get("sessions")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise ConfigError(f"benchmark_args['sessions']={_short(v)} must be an integer >= 0")
    order = args.get("class_order")
    if order is not None and (not isinstance(order, list)
                              or not all(isinstance(c, int) and not isinstance(c, bool) for c in order)
                              or sorted(order) != list(range(len(order)))):
        raise ConfigError(f"benchmark_args['class_order']={_short(order)} must be a permutation of 0..K-1")
    for key in ("verify", "use_cache"):
        if key in args and not isinstance(args[key], bool):
            raise ConfigError(f"benchmark_args['{key}']={_short(args[key])} must be true or false")
    cache = args.get("cache_dir")
    if cache is not None and (not isinstance(cache, str) or not cache or "\x00" in cache):
        raise ConfigError(f"benchmark_args['cache_dir']={_short(cache)} must be a non-empty path or null")


#: Avalanche's per-experience test accuracy (``accuracy_metrics(experience=True)``), one key per test experience
EXPERIENCE_ACCURACY = re.compile(r"Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)")


def experience_accuracies(results: Dict[str, Any]) -> List[float]:
    """The accuracy of each test experience in one evaluation's metric dictionary, in experience order."""
    found = sorted((int(m.group(1)), float(v)) for k, v in results.items() if (m := EXPERIENCE_ACCURACY.fullmatch(k)))
    if not found:
        raise KeyError(f"no {EXPERIENCE_ACCURACY.pattern!r} metric among the evaluation's results")
    return [v for _, v in found]


#: the main job's recipe (:func:`default_experiment`)
DEFAULT_EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.json")


def default_experiment() -> ExperimentConfig:
    """The main job's recipe, read from ``avalanche_drcpsd/experiments/default.json``: DR-CPSD on the embedded
    MNIST subset on a 2-core CPU (the main job's other strategies take the same benchmark, classifier, epochs and
    optimiser, :func:`run_main_job`). Why each setting is what it is, with the measurements behind it:
    ``results/main_job/README.md``."""
    return ExperimentConfig.from_json(DEFAULT_EXPERIMENT)


#: images per class in ``samples_exp<k>.png``
GRID_PER_CLASS = 8
#: the seed of the synthetic images every measurement of an experience shares (:func:`_measurement_samples`)
MEASUREMENT_SEED = 54321


def _measurement_samples(strategy, exp: ExperimentConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """One draw per experience, before its evaluation, for every measurement of the synthetic images: of each
    learned class as many as the largest measurement takes (FID/KID's ``fidelity_samples_per_class`` when an
    extractor is set, the MMD gap's ``gap_samples_per_class``, the sample grid's :data:`GRID_PER_CLASS`), seed
    :data:`MEASUREMENT_SEED`; each takes the first ones of every class (drawing them apart cost the CPU profiles 140
    images per class and experience instead of 100: 11% of a Split-MNIST run's wall time). The images are those dream
    replay holds (:meth:`~avalanche_drcpsd.plugins.generator.CPSDGeneratorPlugin.replayed_samples`: an old class's
    kept set with ``replay_draw="once"``, fresh samples of the generator otherwise)."""
    n = GRID_PER_CLASS
    if exp.fidelity_extractor:
        n = max(n, exp.fidelity_samples_per_class)
    mmd = strategy.mmd_plugin
    if mmd is not None:
        n = max(n, mmd.samples_per_class)
    x, y = strategy.generator_plugin.replayed_samples(strategy.buffer.classes, n, seed=MEASUREMENT_SEED,
                                                      desc="measurement samples")
    if mmd is not None:
        mmd.use_samples(x, y, strategy.clock.train_exp_counter)
    return x, y


def _image_grid(images: torch.Tensor, labels: torch.Tensor, per_class: int):
    """A (classes x per_class) grid as a PIL image."""
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid

    rows = []
    for c in labels.unique().tolist():
        rows.append(images[labels == c][:per_class])
    grid = make_grid(torch.cat(rows), nrow=per_class, padding=1, pad_value=1.0)
    return to_pil_image(grid)


def run_experiment(exp: ExperimentConfig, out_dir: str, *, verbose: bool = True, resume: bool = False,
                   checkpoint: bool = True) -> Dict[str, Any]:
    """Train on every experience of the benchmark, evaluating on the whole test stream after each.

    A DR-CPSD run writes a checkpoint to ``<out_dir>/checkpoint/`` at the end of every phase of every experience
    (:mod:`avalanche_drcpsd.experiments.checkpoint`; ``checkpoint=False``: none) and deletes it once the run is
    complete. ``resume=True`` continues the run left in ``out_dir`` by a killed process from its latest checkpoint, with
    the same configuration (else :class:`~avalanche_drcpsd.experiments.checkpoint.CheckpointError`): the CSV logs are
    cut back to what the checkpoint recorded and the rows, accuracies and final state are those of an uninterrupted run
    (on the CPU, bit for bit). Without a checkpoint it starts from the beginning; on a finished run it returns the saved
    summary. A run started without ``resume`` discards any checkpoint left in ``out_dir``.
    """
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics, loss_metrics
    from avalanche.logging import InteractiveLogger
    from avalanche.training.plugins import EvaluationPlugin

    from ..data import make_benchmark
    from ..features import find_head
    from ..logging import MetricsCSVLogger, ResumableCSVLogger, restore_log
    from ..models import make_classifier
    from ..strategy import DRCPSD
    from ..utils import check_experience_data
    from .checkpoint import CHECKPOINT_DIR, Checkpointer, CheckpointError, NonFiniteError, load_checkpoint

    out_dir = os.fspath(out_dir)
    log_dir = os.path.join(out_dir, "logs")
    summary_path = os.path.join(out_dir, "summary.json")
    use_checkpoints = (checkpoint or resume) and exp.strategy == "drcpsd"
    ckpt = None
    if resume:
        if exp.strategy != "drcpsd":
            raise CheckpointError(f"resuming is supported for strategy='drcpsd' only (not {exp.strategy!r}): "
                                  "run it again without --resume")
        ckpt = load_checkpoint(out_dir)  # verified against its manifest; CorruptCheckpointError if it is not
        if ckpt is not None:
            _check_same_experiment(ckpt.manifest.get("experiment", {}), exp, out_dir)
        elif os.path.isfile(summary_path) and os.path.isfile(os.path.join(out_dir, "config.json")):
            with open(os.path.join(out_dir, "config.json"), "r", encoding="utf-8") as fh:
                _check_same_experiment(json.load(fh), exp, out_dir)
            if verbose:
                print(f"the run in {out_dir} is complete: nothing to resume")
            with open(summary_path, "r", encoding="utf-8") as fh:
                return json.load(fh)
        elif verbose:
            print(f"no checkpoint in {out_dir}: starting from the beginning")
    if ckpt is None:  # a fresh start: what a previous run left is no longer valid
        if os.path.isdir(os.path.join(out_dir, CHECKPOINT_DIR)):
            print(f"warning: discarding the checkpoint in {os.path.join(out_dir, CHECKPOINT_DIR)} "
                  "(pass --resume to continue that run instead)", file=sys.stderr)
            shutil.rmtree(os.path.join(out_dir, CHECKPOINT_DIR), ignore_errors=True)
        for stale in (summary_path, os.path.join(log_dir, RUN_INFO)):
            if os.path.exists(stale):
                os.remove(stale)

    if exp.threads:
        torch.set_num_threads(exp.threads)
    torch.manual_seed(exp.seed)
    random.seed(exp.seed)
    np.random.seed(exp.seed)
    check_device(exp.drcpsd.device)  # before the data and the models are built
    benchmark = make_benchmark(exp.benchmark, exp.data_root, seed=exp.seed, **exp.benchmark_args)
    spec = benchmark.spec
    os.makedirs(out_dir, exist_ok=True)
    if ckpt is None:
        _write_json(os.path.join(out_dir, "config.json"), {**exp.to_dict(), "command": " ".join(sys.argv)})

    model = make_classifier(exp.classifier, num_classes=spec.num_classes, image_shape=spec.image_shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=exp.lr, momentum=exp.momentum)
    log_files = [os.path.join(log_dir, name) for name in ResumableCSVLogger.FILES + ("metrics.csv",)]
    if ckpt is not None:  # cut every log back to the checkpoint: rows written after it are written again
        positions = ckpt.manifest.get("logs", {})
        for path in log_files:
            rel = os.path.relpath(path, out_dir)
            if rel not in positions:
                raise CheckpointError(f"checkpoint {ckpt.directory!r} has no position for {rel!r}")
            restore_log(path, positions[rel])
    loggers: List[Any] = [ResumableCSVLogger(log_dir, resume=ckpt is not None),
                          MetricsCSVLogger(log_dir, truncate_to=None if ckpt is not None else 0)]
    if verbose:
        loggers.append(InteractiveLogger())
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), loss_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True), loggers=loggers)
    common = dict(model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(),
                  train_mb_size=exp.train_mb_size, train_epochs=exp.train_epochs, eval_mb_size=exp.eval_mb_size,
                  evaluator=evaluator, device=exp.drcpsd.device)
    if exp.strategy == "drcpsd":
        cfg = exp.drcpsd
        if cfg.seed != exp.seed:
            cfg = cfg.replace(seed=exp.seed)
        strategy = DRCPSD(config=cfg, class_names=benchmark.class_names, verbose=verbose, **common)
    else:
        strategy = make_baseline(exp.strategy, common, spec)
    checkpointer = None
    if use_checkpoints:
        checkpointer = Checkpointer(out_dir, strategy, experiment=exp.to_dict(), log_files=log_files)
    num_outputs = find_head(model).out_features

    history: List[Dict[str, Any]] = list(ckpt.manifest["run"]["history"]) if ckpt is not None else []
    start = time.perf_counter() - (float(ckpt.manifest["run"]["elapsed_s"]) if ckpt is not None else 0.0)
    if checkpointer is not None:
        checkpointer.run_state = {"history": history}
        checkpointer.elapsed = lambda: time.perf_counter() - start
        if ckpt is not None and ckpt.phase == "eval":
            checkpointer.restore(ckpt)  # between two experiences: the next one starts as it would have
    # joint training (the upper bound) learns the whole stream in one call and is evaluated once, at the end
    schedule = [benchmark.train_stream] if is_joint(exp.strategy) else list(benchmark.train_stream)
    for index, step in enumerate(schedule):
        if ckpt is not None and (index < ckpt.index or (index == ckpt.index and ckpt.phase == "eval")):
            continue  # done before the checkpoint
        experience = step if not is_joint(exp.strategy) else benchmark.train_stream[len(benchmark.train_stream) - 1]
        exp_id = experience.current_experience
        for e in ([step] if not is_joint(exp.strategy) else list(step)):
            check_experience_data(e.dataset, image_shape=spec.image_shape,
                                  num_classes=min(spec.num_classes, num_outputs), experience=e.current_experience)
        if not is_joint(exp.strategy) and exp.later_epochs is not None:
            strategy.train_epochs = exp.train_epochs if index == 0 else exp.later_epochs
        try:
            if checkpointer is not None:
                checkpointer.index = index
            if ckpt is not None and index == ckpt.index:
                checkpointer.continue_experience(step, ckpt)  # the phases after the checkpoint's
            else:
                strategy.train(step)
            if checkpointer is not None:
                checkpointer.eval_started(exp_id)
            measured = _measurement_samples(strategy, exp) if isinstance(strategy, DRCPSD) else None
            results = strategy.eval(benchmark.test_stream)
        except FloatingPointError as exc:
            if isinstance(exc, NonFiniteError):
                raise
            where = getattr(exc, "drcpsd_phase", None) or (exp_id, "unknown")
            raise NonFiniteError(where[1], where[0], str(exc),
                                 checkpointer.last_name if checkpointer is not None else None) from exc
        acc = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
        history.append({"experience": exp_id, "stream_accuracy": acc,
                        "experience_accuracy": experience_accuracies(results),
                        "elapsed_s": time.perf_counter() - start})
        if isinstance(strategy, DRCPSD) and exp.fidelity_extractor:
            _publish_fidelity(strategy, benchmark, exp_id, exp, measured)
        if isinstance(strategy, DRCPSD):
            strategy.save(os.path.join(out_dir, "state"))
            grid = _image_grid(*measured, GRID_PER_CLASS)
            atomic_write(os.path.join(out_dir, f"samples_exp{exp_id}.png"), lambda tmp: grid.save(tmp, format="PNG"))
        if checkpointer is not None:
            checkpointer.eval_ended(exp_id)
    wall = time.perf_counter() - start
    n_train = sum(len(e.dataset) for e in benchmark.train_stream)
    summary = {
        "benchmark": exp.benchmark, "strategy": exp.strategy, "seed": exp.seed,
        # the mean over the test experiences (the report's figure) and the accuracy over all test images pooled
        "final_average_accuracy": float(np.mean(history[-1]["experience_accuracy"])),
        "final_stream_accuracy": history[-1]["stream_accuracy"], "wall_time_s": wall, "history": history,
        "stored_real_images": stored_real_images(exp.strategy, n_train),
    }
    if isinstance(strategy, DRCPSD):
        phases = sorted({p for (_, p) in strategy.timer.seconds})
        summary["phase_time_s"] = {p: strategy.timer.total(p) for p in phases}
    summary["generator_parameters"] = generator_parameters(strategy)
    # what the strategy keeps for the next experience, measured after the last one (baselines.memory_bytes)
    summary.update(memory_info(memory_bytes(strategy, exp.strategy, spec.image_shape, n_train)))
    info = {k: summary[k] for k in ("benchmark", "strategy", "seed", "final_average_accuracy",
                                    "final_stream_accuracy", "wall_time_s", "stored_real_images",
                                    "generator_parameters")}
    info.update({k: v for k, v in summary.items() if k.startswith("memory_")})
    # what the report needs to pool test experiences (FSCIL: accuracy on all seen, base and novel classes)
    info["test_sizes"] = " ".join(str(len(e.dataset)) for e in benchmark.test_stream)
    info["k_shot"] = "" if spec.k_shot is None else spec.k_shot
    # which class each test image of the last evaluation is taken for (rows: true class), before run_info.csv,
    # which is written last and marks the run finished
    _write_confusion(os.path.join(log_dir, CONFUSION), strategy.model, benchmark, exp, num_outputs)
    _write_key_values(os.path.join(log_dir, RUN_INFO), info)
    _write_json(summary_path, summary)
    for logger in loggers:
        if hasattr(logger, "close"):
            logger.close()
    if checkpointer is not None:
        checkpointer.store.clear()  # the run is complete: state/ and the logs hold everything
    return summary


def _check_same_experiment(saved: Dict[str, Any], exp: ExperimentConfig, out_dir: str) -> None:
    """Refuse to resume a run with another configuration (``threads`` and the recorded command may differ).

    A field the saved configuration lacks (one added to the package after the run started) counts as its
    current default, so that adding an option that is off by default keeps older runs resumable."""
    from .checkpoint import CheckpointError

    diffs = _experiment_differences(saved, exp)
    if diffs:
        raise CheckpointError(f"the run in {out_dir!r} was started with another configuration ({'; '.join(diffs[:8])}"
                              "): resume it with the same --config and options, or start again without --resume")


def _experiment_differences(saved: Dict[str, Any], exp: ExperimentConfig) -> List[str]:
    """``"field: saved -> now"`` for every field in which the saved configuration (a run's ``config.json``)
    differs from ``exp``; ``threads`` and the recorded command are not compared, and a field the saved
    configuration lacks counts as its default."""
    def plain(config: ExperimentConfig) -> Dict[str, Any]:  # as JSON reads it back, without ``threads``
        d = json.loads(json.dumps(config.to_dict(), default=str))
        d.pop("threads", None)
        return d

    now = plain(exp)
    saved = {k: v for k, v in saved.items() if k not in ("threads", "command")}
    try:  # fill in the defaults of fields added since; a config that no longer builds is compared as it is
        saved = plain(ExperimentConfig.from_dict(saved))
    except ConfigError:
        pass
    diffs: List[str] = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                      if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def run_main_job(base: ExperimentConfig, out_dir: str, strategies: Sequence[str] = MAIN_JOB_STRATEGIES, *,
                 verbose: bool = True, resume: bool = False, checkpoint: bool = True) -> List[Dict[str, Any]]:
    """The main job: ``base`` (its data, classifier, epochs and optimiser) with each of ``strategies`` in turn,
    each run into ``<out_dir>/<strategy>/`` by :func:`run_experiment`, then ``<out_dir>/summary.csv``
    (:data:`MAIN_JOB_COLUMNS`, one row per strategy, in the order run), ``accuracy.png`` (accuracy on the seen
    experiences after each experience) and ``accuracy_memory.png`` (:mod:`avalanche_drcpsd.experiments.report`'s plots).
    DR-CPSD's sample grids stay in ``<out_dir>/drcpsd/``.

    As in ``drcpsd-compare``, a finished sub-run (``logs/run_info.csv`` present) is reused, provided it was made
    with the same configuration (else :class:`ConfigError`: another ``out_dir`` or delete it); an unfinished
    baseline sub-run starts again; ``resume=True`` continues an unfinished DR-CPSD sub-run from its checkpoint.
    Returns the summary rows."""
    from .baselines import names

    strategies = list(dict.fromkeys(names(list(strategies))))  # ValueError naming an unknown strategy
    out_dir = os.fspath(out_dir)
    for strategy in strategies:
        exp = ExperimentConfig.from_dict({**base.to_dict(), "strategy": strategy})
        _main_job_run(exp, os.path.join(out_dir, strategy), verbose=verbose, resume=resume, checkpoint=checkpoint)
    return _main_job_summary(out_dir, strategies)


def _main_job_run(exp: ExperimentConfig, run_dir: str, *, verbose: bool, resume: bool, checkpoint: bool) -> None:
    """One sub-run of the main job, unless a finished one of the same configuration is there."""
    if os.path.isfile(os.path.join(run_dir, "logs", RUN_INFO)):
        config_path = os.path.join(run_dir, "config.json")
        if os.path.isfile(config_path):
            with open(config_path, "r", encoding="utf-8") as fh:
                diffs = _experiment_differences(json.load(fh), exp)
            if diffs:
                raise ConfigError(f"{run_dir!r} holds a finished {exp.strategy} run of another configuration "
                                  f"({'; '.join(diffs[:8])}): choose another --out, or delete {run_dir!r} to run it "
                                  "again")
        print(f"{exp.strategy}: finished run in {run_dir} reused", flush=True)
        return
    resumable = exp.strategy == "drcpsd"  # checkpointed per phase; a baseline (minutes) starts again
    if os.path.isdir(run_dir) and not resumable:  # an unfinished run: its CSV rows would be repeated
        shutil.rmtree(run_dir)
    if verbose:
        print(f"{exp.strategy}: training into {run_dir}", flush=True)
    run_experiment(exp, run_dir, verbose=verbose, resume=resume and resumable, checkpoint=checkpoint)


def _main_job_summary(out_dir: str, strategies: Sequence[str]) -> List[Dict[str, Any]]:
    """``summary.csv`` and the two plots of the main job, from its sub-runs' CSV folders."""
    from .report import load_run, plot_accuracy, plot_accuracy_memory, summarise

    runs = {s: [load_run(os.path.join(out_dir, s, "logs"))] for s in strategies}
    rows = []
    for strategy, (run,) in runs.items():
        memory = run.info.get("memory_bytes", "")
        rows.append({
            "strategy": strategy,
            "final_average_accuracy": round(run.final_average_accuracy, 4),
            "stored_real_images": int(float(run.info.get("stored_real_images", 0))),
            "memory_bytes": int(float(memory)) if memory != "" else "",
            "wall_time_s": round(float(run.info.get("wall_time_s", "nan")), 1),
        })
    atomic_write_csv(os.path.join(out_dir, "summary.csv"), rows)
    plot_accuracy(runs, os.path.join(out_dir, "accuracy.png"))
    plot_accuracy_memory(summarise(runs), os.path.join(out_dir, "accuracy_memory.png"))
    return rows


def format_main_job_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The main job's summary rows as a fixed-width text table (what the command prints)."""
    header = ("strategy", "final avg accuracy", "stored real images", "memory (bytes)", "wall time (s)")
    cells = [(str(r["strategy"]), f"{float(r['final_average_accuracy']):.4f}", str(r["stored_real_images"]),
              f"{r['memory_bytes']:,}" if r["memory_bytes"] != "" else "n/a", f"{float(r['wall_time_s']):.0f}")
             for r in rows]
    widths = [max(len(c[i]) for c in [header] + cells) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in cells]
    return "\n".join(lines)


def _publish_fidelity(strategy, benchmark, exp_id: int, exp: ExperimentConfig,
                      measured: Tuple[torch.Tensor, torch.Tensor]) -> None:
    """FID/KID (the project's feature extractor) between the learned classes' real test images and as many
    synthetic samples per class (the first ``fidelity_samples_per_class`` of each class in ``measured``,
    :func:`_measurement_samples`), published as ``RealSynFID/Exp<eee>`` and ``RealSynKID/Exp<eee>``."""
    from avalanche.evaluation.metric_results import MetricValue

    from ..logging import flush_metric_values
    from ..utils import dataset_tensors
    from .fidelity import fid_kid

    learned = strategy.buffer.classes
    n = exp.fidelity_samples_per_class
    real = []
    for e in benchmark.test_stream[: exp_id + 1]:
        x, y = dataset_tensors(e.dataset.eval())
        x = strategy.generator_plugin.input_space.to_unit(x)  # both sides in pixels
        for c in learned:
            real.append(x[y == c][:n])
    syn = torch.cat([measured[0][measured[1] == c][:n] for c in learned])
    m = fid_kid(torch.cat(real), syn, exp.fidelity_extractor)
    for key, name in (("fid", "RealSynFID"), ("kid_mean", "RealSynKID")):
        strategy.evaluator.publish_metric_value(
            MetricValue(strategy, f"{name}/Exp{exp_id:03d}", m[key], strategy.clock.train_iterations))
    flush_metric_values(strategy.evaluator)  # published after the evaluation: no later callback may come


def _write_confusion(path: str, model: torch.nn.Module, benchmark, exp: ExperimentConfig, num_outputs: int) -> None:
    """``logs/confusion.csv``: the model's confusion on the whole test stream, one row per class (``class``,
    ``name``, then the count of its test images predicted as each class, columns ``0`` ... ``K-1``; K the
    benchmark's classes, or the head's outputs where it has more)."""
    from .fidelity import model_confusion

    names = list(benchmark.class_names)
    k = max(benchmark.spec.num_classes, num_outputs)
    counts = model_confusion(model, [e.dataset.eval() for e in benchmark.test_stream], k,
                             device=exp.drcpsd.device, batch_size=exp.eval_mb_size)
    atomic_write_csv(path, [{"class": i, "name": names[i] if i < len(names) else "",
                             **{str(j): int(v) for j, v in enumerate(row)}} for i, row in enumerate(counts.tolist())])


def _write_key_values(path: str, values: Dict[str, Any]) -> None:
    atomic_write_csv(path, [{"key": k, "value": v} for k, v in values.items()])


def _write_json(path: str, payload: Dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="drcpsd-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="experiment JSON: run that one experiment (default: the built-in main job "
                                         "on the embedded data)")
    parser.add_argument("--benchmark", help=f"override: one of {', '.join(BENCHMARK_NAMES)}")
    parser.add_argument("--data-root", help="override: folder with the data sets (e.g. data/ with MNIST/raw/*.gz)")
    parser.add_argument("--strategy", choices=STRATEGIES, help="override the strategy (one run, not the main job)")
    parser.add_argument("--strategies", help="the main job's strategies, comma-separated, in the order they run "
                                             f"(default {','.join(MAIN_JOB_STRATEGIES)}; 'all': every strategy); "
                                             "not with --config or --strategy")
    parser.add_argument("--seed", type=int, help="override the seed")
    parser.add_argument("--threads", type=int, help="override the torch thread count (default: torch's own)")
    parser.add_argument("--out", help="output folder (the main job: one sub-folder per strategy)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run killed in --out from its latest checkpoint (same config and options); "
                             "without a checkpoint, start from the beginning")
    parser.add_argument("--no-checkpoint", action="store_true",
                        help="write no checkpoint (a killed run then starts again from the beginning)")
    args = parser.parse_args(argv)
    main_job = args.config is None and args.strategy is None
    if args.strategies is not None and not main_job:
        parser.error("--strategies selects the main job's runs; it cannot be combined with --config or --strategy "
                     "(which run one experiment)")
    try:
        exp = ExperimentConfig.from_json(args.config) if args.config else default_experiment()
        overrides = {k: v for k, v in (("benchmark", args.benchmark), ("data_root", args.data_root),
                                       ("strategy", args.strategy), ("seed", args.seed),
                                       ("threads", args.threads)) if v is not None}
        if overrides:
            exp = ExperimentConfig.from_dict({**exp.to_dict(), **overrides})
        if main_job:
            strategies = _main_job_strategies(args.strategies)
    except ConfigError as exc:
        parser.error(str(exc))
    if main_job:
        from .report import ReportError

        out = args.out or os.path.join("runs", f"{exp.benchmark}-main-seed{exp.seed}")
        rows = _guarded(parser, args, "drcpsd" in strategies, lambda: run_main_job(
            exp, out, strategies, verbose=not args.quiet, resume=args.resume, checkpoint=not args.no_checkpoint),
            also=(ConfigError, ReportError))  # a finished sub-run of another configuration, an unreadable CSV
        if rows is None:
            return 1
        print(format_main_job_table(rows))
        print(f"outputs in {out} (summary.csv, accuracy.png, accuracy_memory.png, one folder per strategy"
              + (f"; DR-CPSD's sample grids in {os.path.join(out, 'drcpsd')}" if "drcpsd" in strategies else "")
              + ")")
        return 0
    out = args.out or os.path.join("runs", f"{exp.benchmark}-{exp.strategy}-seed{exp.seed}")
    summary = _guarded(parser, args, exp.strategy == "drcpsd", lambda: run_experiment(
        exp, out, verbose=not args.quiet, resume=args.resume, checkpoint=not args.no_checkpoint))
    if summary is None:
        return 1
    print(json.dumps({k: summary[k] for k in ("benchmark", "strategy", "final_average_accuracy", "wall_time_s")}))
    print(f"outputs in {out}")
    return 0


def _main_job_strategies(selection: Optional[str]) -> List[str]:
    """``--strategies`` (None: :data:`MAIN_JOB_STRATEGIES`) as a list; an unknown name raises :class:`ConfigError`."""
    from .baselines import names

    try:
        return names(selection if selection is not None else ",".join(MAIN_JOB_STRATEGIES))
    except ValueError as exc:
        raise ConfigError(f"--strategies: {exc}") from None


def _guarded(parser: argparse.ArgumentParser, args: argparse.Namespace, resumable: bool, work, also: tuple = ()):
    """``work()``, with the command's errors: bad data, paths or checkpoint (found before training or before
    resuming) and the exception types ``also`` exit through ``parser.error``; a non-finite loss or a full disk
    prints the error and returns None (exit code 1), the checkpoint kept."""
    from ..data import DataError
    from ..generator import GeneratorError
    from ..logging import LogPositionError
    from ..text_encoders import TextEncoderError
    from ..utils import WriteError
    from .checkpoint import CheckpointError

    try:
        return work()
    except (DataError, GeneratorError, TextEncoderError, CheckpointError, LogPositionError) + tuple(also) as exc:
        parser.error(str(exc))  # bad data, paths or checkpoint: found before training or before resuming
    except (FloatingPointError, WriteError) as exc:  # a non-finite loss, a full disk: the run stops, checkpoint kept
        print(f"drcpsd-run: error: {exc}", file=sys.stderr)
        if not args.no_checkpoint and resumable:
            print("drcpsd-run: fix the cause, then continue with the same command and --resume", file=sys.stderr)
        return None


if __name__ == "__main__":
    sys.exit(main())
