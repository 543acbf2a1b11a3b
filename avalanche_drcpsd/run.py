"""Run one continual-learning experiment: ``python -m avalanche_drcpsd`` or ``drcpsd-run``.

With no argument it runs the *main job*: DR-CPSD on the embedded default data set (a small real MNIST subset
shipped in the package, so no data root and no download) with the CPU profile ``experiments/default.json``'s
values built in. ``--config FILE`` reads an experiment JSON (see ``experiments/``).

Outputs in ``--out`` (default ``runs/<benchmark>-<strategy>-seed<seed>``):
``logs/`` (Avalanche ``CSVLogger`` files + ``metrics.csv`` with every metric, the MMD gap and phase times),
``state/`` (classifier, generator, embedding buffer after each experience), ``samples_exp<k>.png`` (a grid
of synthetic images per learned class), and ``summary.json``. While a DR-CPSD run is in progress, ``checkpoint/``
holds the checkpoint of its latest phase; ``--resume`` continues a killed run from it
(:mod:`avalanche_drcpsd.checkpoint`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .baselines import STRATEGIES, generator_parameters, is_joint, make_baseline, stored_real_images
from .config import ConfigError, DRCPSDConfig
from .data import BENCHMARKS
from .utils import atomic_write, atomic_write_csv, atomic_write_text

__all__ = ["ExperimentConfig", "run_experiment", "main", "RUN_INFO"]

#: the run's facts that Avalanche's CSV files do not hold, written as ``logs/run_info.csv`` (``key,value``)
RUN_INFO = "run_info.csv"


@dataclass
class ExperimentConfig:
    """What to run: benchmark, classifier and its optimiser, strategy, and the DR-CPSD hyper-parameters."""

    benchmark: str = "default"
    data_root: Optional[str] = None
    benchmark_args: Dict[str, Any] = field(default_factory=dict)
    strategy: str = "drcpsd"
    classifier: str = "small_cnn"
    train_epochs: int = 2
    train_mb_size: int = 64
    eval_mb_size: int = 1000
    lr: float = 0.05
    momentum: float = 0.9
    seed: int = 0
    threads: Optional[int] = None
    #: a directory written by :func:`avalanche_drcpsd.fidelity.train_feature_extractor`: DR-CPSD runs then publish
    #: the FID and KID between real test images and synthetic samples of the learned classes after each experience
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
                              "written by avalanche_drcpsd.fidelity.train_feature_extractor")
        for name in ("train_epochs", "train_mb_size", "eval_mb_size", "fidelity_samples_per_class"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={_short(v)} must be an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise ConfigError(f"seed={_short(self.seed)} must be an integer in [0, 2**32)")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ConfigError(f"threads={_short(self.threads)} must be an integer >= 1 or null")
        if not _finite(self.lr) or not self.lr > 0:
            raise ConfigError(f"lr={_short(self.lr)} must be a finite number > 0")
        if not _finite(self.momentum) or not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={_short(self.momentum)} must be a number in [0, 1)")
        _check_benchmark_args(self.benchmark_args)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "ExperimentConfig":
        """Build from a plain dict (JSON); an unknown key or a bad value raises :class:`ConfigError`."""
        if not isinstance(values, dict):
            raise ConfigError(f"an experiment config must be a JSON object/dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((k for k in values if k not in known), key=repr)
        if unknown:
            raise ConfigError(f"unknown experiment field(s) {unknown}; valid fields: {sorted(known)}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(str(exc)) from exc

    @classmethod
    def from_json(cls, path: str) -> "ExperimentConfig":
        """Read a JSON file (plain data only; nothing in a config is ever executed)."""
        try:
            with open(path, "r", encoding="utf-8") as fh:
                values = json.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"experiment config {path!r} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"experiment config {path!r} is not valid JSON: {exc}") from None
        except (OSError, RecursionError, ValueError) as exc:
            raise ConfigError(f"experiment config {path!r} cannot be read: {exc}") from None
        return cls.from_dict(values)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["drcpsd"] = self.drcpsd.to_dict()
        return d


#: names accepted by :func:`avalanche_drcpsd.data.make_benchmark` and :func:`avalanche_drcpsd.models.make_classifier`
BENCHMARK_NAMES = BENCHMARKS
CLASSIFIERS = ("small_cnn", "resnet18")
#: ``benchmark_args`` keys (the builders' options; ``seed`` is the experiment's own)
BENCHMARK_ARGS = ("n_experiences", "train_per_class", "test_per_class", "class_order", "verify", "cache_dir",
                  "use_cache")


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


def _check_benchmark_args(args: Any) -> None:
    if not isinstance(args, dict):
        raise ConfigError(f"benchmark_args={_short(args)} must be a JSON object")
    unknown = sorted((k for k in args if k not in BENCHMARK_ARGS), key=repr)
    if unknown:
        raise ConfigError(f"benchmark_args has unknown key(s) {unknown}; expected some of {list(BENCHMARK_ARGS)} "
                          "(the seed is the experiment's 'seed')")
    for key in ("n_experiences", "train_per_class", "test_per_class"):
        v = args.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"benchmark_args['{key}']={_short(v)} must be an integer >= 1")
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


def default_experiment() -> ExperimentConfig:
    """The main job: DR-CPSD on the embedded MNIST subset with a CPU budget of about half an hour.

    The generator gets 400 steps per experience: at 150 its samples were still noise and the run ended at 0.294
    (results/README.md, "Main job"). Fewer synthetic images per old class (100) pay for part of those steps.
    Replay runs 10 epochs: an experience here has only 400 real images, so one or two epochs are 13-26 optimiser
    steps, too few for the averaged student to fit anything (it erased the newest classes)."""
    return ExperimentConfig(
        benchmark="default",
        train_epochs=4,
        drcpsd=DRCPSDConfig(
            prompt_template="a photo of the handwritten digit {}",
            generator_steps=400, generator_batch_size=64,
            cpsd_batch_size=32, cpsd_max_images_per_class=64,
            n_replay_per_class=100, sampling_steps=10, guidance_scale=3.0,
            replay_batch_real=32, replay_batch_syn=32, replay_epochs=10,
            # the CPU profile's replay (results/README.md): class-balanced isolation weight, old-teacher logit
            # distillation, a smaller replay learning rate
            kappa=1.0, kappa_schedule="balanced", replay_kd_weight=3.0, replay_lr=0.01,
            gap_samples_per_class=32,
        ),
    )


def _image_grid(images: torch.Tensor, labels: torch.Tensor, per_class: int):
    """A (classes x per_class) grid as a PIL image."""
    from torchvision.utils import make_grid
    from torchvision.transforms.functional import to_pil_image

    rows = []
    for c in labels.unique().tolist():
        rows.append(images[labels == c][:per_class])
    grid = make_grid(torch.cat(rows), nrow=per_class, padding=1, pad_value=1.0)
    return to_pil_image(grid)


def run_experiment(exp: ExperimentConfig, out_dir: str, *, verbose: bool = True, resume: bool = False,
                   checkpoint: bool = True) -> Dict[str, Any]:
    """Train on every experience of the benchmark, evaluating on the whole test stream after each.

    A DR-CPSD run writes a checkpoint to ``<out_dir>/checkpoint/`` at the end of every phase of every experience
    (:mod:`avalanche_drcpsd.checkpoint`; ``checkpoint=False``: none) and deletes it once the run is complete.
    ``resume=True`` continues the run left in ``out_dir`` by a killed process from its latest checkpoint, with the
    same configuration (else :class:`~avalanche_drcpsd.checkpoint.CheckpointError`): the CSV logs are cut back to
    what the checkpoint recorded and the rows, accuracies and final state are those of an uninterrupted run (on the
    CPU, bit for bit). Without a checkpoint it starts from the beginning; on a finished run it returns the saved
    summary. A run started without ``resume`` discards any checkpoint left in ``out_dir``.
    """
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics, loss_metrics
    from avalanche.logging import InteractiveLogger
    from avalanche.training.plugins import EvaluationPlugin

    from .checkpoint import CHECKPOINT_DIR, CheckpointError, Checkpointer, NonFiniteError, load_checkpoint
    from .data import make_benchmark
    from .features import find_head
    from .logging import MetricsCSVLogger, ResumableCSVLogger, restore_log
    from .models import make_classifier
    from .strategy import DRCPSD
    from .utils import check_experience_data

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
        try:
            if checkpointer is not None:
                checkpointer.index = index
            if ckpt is not None and index == ckpt.index:
                checkpointer.continue_experience(step, ckpt)  # the phases after the checkpoint's
            else:
                strategy.train(step)
            if checkpointer is not None:
                checkpointer.eval_started(exp_id)
            results = strategy.eval(benchmark.test_stream)
        except FloatingPointError as exc:
            if isinstance(exc, NonFiniteError):
                raise
            where = getattr(exc, "drcpsd_phase", None) or (exp_id, "unknown")
            raise NonFiniteError(where[1], where[0], str(exc),
                                 checkpointer.last_name if checkpointer is not None else None) from exc
        acc = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
        history.append({"experience": exp_id, "stream_accuracy": acc, "elapsed_s": time.perf_counter() - start})
        if isinstance(strategy, DRCPSD) and exp.fidelity_extractor:
            _publish_fidelity(strategy, benchmark, exp_id, exp)
        if isinstance(strategy, DRCPSD):
            strategy.save(os.path.join(out_dir, "state"))
            learned = strategy.buffer.classes
            x, y = strategy.generator_plugin.sample(learned, 8, seed=12345, desc="sample grid")
            grid = _image_grid(x, y, 8)
            atomic_write(os.path.join(out_dir, f"samples_exp{exp_id}.png"), lambda tmp: grid.save(tmp, format="PNG"))
        if checkpointer is not None:
            checkpointer.eval_ended(exp_id)
    wall = time.perf_counter() - start
    summary = {
        "benchmark": exp.benchmark, "strategy": exp.strategy, "seed": exp.seed,
        "final_average_accuracy": history[-1]["stream_accuracy"], "wall_time_s": wall, "history": history,
        "stored_real_images": stored_real_images(
            exp.strategy, sum(len(e.dataset) for e in benchmark.train_stream)),
    }
    if isinstance(strategy, DRCPSD):
        phases = sorted({p for (_, p) in strategy.timer.seconds})
        summary["phase_time_s"] = {p: strategy.timer.total(p) for p in phases}
    summary["generator_parameters"] = generator_parameters(strategy)
    info = {k: summary[k] for k in ("benchmark", "strategy", "seed", "final_average_accuracy", "wall_time_s",
                                    "stored_real_images", "generator_parameters")}
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
    if saved != now:
        diffs = []
        for key in sorted(set(saved) | set(now)):
            a, b = saved.get(key), now.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                diffs += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                          if a.get(k) != b.get(k)]
            elif a != b:
                diffs.append(f"{key}: {a!r} -> {b!r}")
        raise CheckpointError(f"the run in {out_dir!r} was started with another configuration ({'; '.join(diffs[:8])}"
                              "): resume it with the same --config and options, or start again without --resume")


def _publish_fidelity(strategy, benchmark, exp_id: int, exp: ExperimentConfig) -> None:
    """FID/KID (the project's feature extractor) between the learned classes' real test images and as many
    synthetic samples per class, published as ``RealSynFID/Exp<eee>`` and ``RealSynKID/Exp<eee>``."""
    from avalanche.evaluation.metric_results import MetricValue

    from .fidelity import fid_kid
    from .logging import flush_metric_values
    from .utils import dataset_tensors

    learned = strategy.buffer.classes
    n = exp.fidelity_samples_per_class
    real = []
    for e in benchmark.test_stream[: exp_id + 1]:
        x, y = dataset_tensors(e.dataset.eval())
        for c in learned:
            real.append(x[y == c][:n])
    syn, _ = strategy.generator_plugin.sample(learned, n, seed=54321, desc="fidelity samples")
    m = fid_kid(torch.cat(real), syn, exp.fidelity_extractor)
    for key, name in (("fid", "RealSynFID"), ("kid_mean", "RealSynKID")):
        strategy.evaluator.publish_metric_value(
            MetricValue(strategy, f"{name}/Exp{exp_id:03d}", m[key], strategy.clock.train_iterations))
    flush_metric_values(strategy.evaluator)  # published after the evaluation: no later callback may come


def _write_key_values(path: str, values: Dict[str, Any]) -> None:
    atomic_write_csv(path, [{"key": k, "value": v} for k, v in values.items()])


def _write_json(path: str, payload: Dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="drcpsd-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="experiment JSON (default: the built-in main job on the embedded data)")
    parser.add_argument("--benchmark", help="override: default, split_mnist, split_fmnist, split_cifar10, split_gtsrb")
    parser.add_argument("--data-root", help="override: folder with the data sets (e.g. ../shared/data)")
    parser.add_argument("--strategy", choices=STRATEGIES, help="override the strategy")
    parser.add_argument("--seed", type=int, help="override the seed")
    parser.add_argument("--threads", type=int, help="override the torch thread count (default: torch's own)")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run killed in --out from its latest checkpoint (same config and options); "
                             "without a checkpoint, start from the beginning")
    parser.add_argument("--no-checkpoint", action="store_true",
                        help="write no checkpoint (a killed run then starts again from the beginning)")
    args = parser.parse_args(argv)
    try:
        exp = ExperimentConfig.from_json(args.config) if args.config else default_experiment()
        overrides = {k: v for k, v in (("benchmark", args.benchmark), ("data_root", args.data_root),
                                       ("strategy", args.strategy), ("seed", args.seed),
                                       ("threads", args.threads)) if v is not None}
        if overrides:
            exp = ExperimentConfig.from_dict({**exp.to_dict(), **overrides})
    except ConfigError as exc:
        parser.error(str(exc))
    out = args.out or os.path.join("runs", f"{exp.benchmark}-{exp.strategy}-seed{exp.seed}")
    from .checkpoint import CheckpointError
    from .data import DataError
    from .generator import GeneratorError
    from .logging import LogPositionError
    from .text_encoders import TextEncoderError
    from .utils import WriteError

    try:
        summary = run_experiment(exp, out, verbose=not args.quiet, resume=args.resume,
                                 checkpoint=not args.no_checkpoint)
    except (DataError, GeneratorError, TextEncoderError, CheckpointError, LogPositionError) as exc:
        parser.error(str(exc))  # bad data, paths or checkpoint: found before training or before resuming
    except (FloatingPointError, WriteError) as exc:  # a non-finite loss, a full disk: the run stops, checkpoint kept
        print(f"drcpsd-run: error: {exc}", file=sys.stderr)
        if not args.no_checkpoint and exp.strategy == "drcpsd":
            print("drcpsd-run: fix the cause, then continue with the same command and --resume", file=sys.stderr)
        return 1
    print(json.dumps({k: summary[k] for k in ("benchmark", "strategy", "final_average_accuracy", "wall_time_s")}))
    print(f"outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
