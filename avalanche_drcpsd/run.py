"""Run one continual-learning experiment: ``python -m avalanche_drcpsd`` or ``drcpsd-run``.

With no argument it runs the *main job*: DR-CPSD on the embedded default data set (a small real MNIST subset
shipped in the package, so no data root and no download) with the CPU profile ``experiments/default.json``'s
values built in. ``--config FILE`` reads an experiment JSON (see ``experiments/``).

Outputs in ``--out`` (default ``runs/<benchmark>-<strategy>-seed<seed>``):
``logs/`` (Avalanche ``CSVLogger`` files + ``metrics.csv`` with every metric, the MMD gap and phase times),
``state/`` (classifier, generator, embedding buffer after each experience), ``samples_exp<k>.png`` (a grid
of synthetic images per learned class), and ``summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from .config import ConfigError, DRCPSDConfig
from .utils import atomic_write

__all__ = ["ExperimentConfig", "run_experiment", "main"]

STRATEGIES = ("drcpsd", "naive")


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
    drcpsd: DRCPSDConfig = field(default_factory=DRCPSDConfig)

    def __post_init__(self):
        if isinstance(self.drcpsd, dict):
            self.drcpsd = DRCPSDConfig.from_dict(self.drcpsd)
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy={self.strategy!r}; expected one of {list(STRATEGIES)}")
        for name in ("train_epochs", "train_mb_size", "eval_mb_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be an integer >= 1")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigError(f"lr={self.lr!r} must be a number > 0")
        if not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum!r} must be in [0, 1)")
        if not isinstance(self.benchmark_args, dict):
            raise ConfigError(f"benchmark_args={self.benchmark_args!r} must be a JSON object")

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "ExperimentConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown experiment field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str) -> "ExperimentConfig":
        try:
            with open(path, "r", encoding="utf-8") as fh:
                return cls.from_dict(json.load(fh))
        except FileNotFoundError:
            raise ConfigError(f"experiment config {path!r} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"experiment config {path!r} is not valid JSON: {exc}") from None

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["drcpsd"] = self.drcpsd.to_dict()
        return d


def default_experiment() -> ExperimentConfig:
    """The main job: DR-CPSD on the embedded MNIST subset with a CPU budget of a few minutes."""
    return ExperimentConfig(
        benchmark="default",
        train_epochs=4,
        drcpsd=DRCPSDConfig(
            prompt_template="a photo of the handwritten digit {}",
            generator_steps=150, generator_batch_size=64,
            cpsd_batch_size=32, cpsd_max_images_per_class=64,
            n_replay_per_class=200, sampling_steps=10, guidance_scale=3.0,
            replay_batch_real=32, replay_batch_syn=32, replay_epochs=2,
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


def run_experiment(exp: ExperimentConfig, out_dir: str, *, verbose: bool = True) -> Dict[str, Any]:
    """Train on every experience of the benchmark, evaluating on the whole test stream after each."""
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics, loss_metrics
    from avalanche.logging import CSVLogger, InteractiveLogger
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import Naive

    from .data import make_benchmark
    from .logging import MetricsCSVLogger
    from .models import make_classifier
    from .strategy import DRCPSD

    if exp.threads:
        torch.set_num_threads(exp.threads)
    torch.manual_seed(exp.seed)
    benchmark = make_benchmark(exp.benchmark, exp.data_root, seed=exp.seed, **exp.benchmark_args)
    spec = benchmark.spec
    os.makedirs(out_dir, exist_ok=True)
    _write_json(os.path.join(out_dir, "config.json"), {**exp.to_dict(), "command": " ".join(sys.argv)})

    model = make_classifier(exp.classifier, num_classes=spec.num_classes, image_shape=spec.image_shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=exp.lr, momentum=exp.momentum)
    log_dir = os.path.join(out_dir, "logs")
    loggers: List[Any] = [CSVLogger(log_dir), MetricsCSVLogger(log_dir)]
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
        strategy = Naive(**common)

    start = time.perf_counter()
    history = []
    for experience in benchmark.train_stream:
        strategy.train(experience)
        results = strategy.eval(benchmark.test_stream)
        acc = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
        history.append({"experience": experience.current_experience, "stream_accuracy": acc,
                        "elapsed_s": time.perf_counter() - start})
        if isinstance(strategy, DRCPSD):
            strategy.save(os.path.join(out_dir, "state"))
            learned = strategy.buffer.classes
            x, y = strategy.generator_plugin.sample(learned, 8, seed=12345, desc="sample grid")
            _image_grid(x, y, 8).save(os.path.join(out_dir, f"samples_exp{experience.current_experience}.png"))
    wall = time.perf_counter() - start
    summary = {
        "benchmark": exp.benchmark, "strategy": exp.strategy, "seed": exp.seed,
        "final_average_accuracy": history[-1]["stream_accuracy"], "wall_time_s": wall, "history": history,
        "stored_real_images": 0,
    }
    if isinstance(strategy, DRCPSD):
        phases = sorted({p for (_, p) in strategy.timer.seconds})
        summary["phase_time_s"] = {p: strategy.timer.total(p) for p in phases}
        summary["generator_parameters"] = sum(p.numel() for p in strategy.generator.parameters())
    _write_json(os.path.join(out_dir, "summary.json"), summary)
    for logger in loggers:
        if hasattr(logger, "close"):
            logger.close()
    return summary


def _write_json(path: str, payload: Dict[str, Any]) -> None:
    text = json.dumps(payload, indent=2, default=str)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="drcpsd-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="experiment JSON (default: the built-in main job on the embedded data)")
    parser.add_argument("--benchmark", help="override: default, split_mnist, split_fmnist, split_cifar10, split_gtsrb")
    parser.add_argument("--data-root", help="override: folder with the data sets (e.g. ../shared/data)")
    parser.add_argument("--strategy", choices=STRATEGIES, help="override the strategy")
    parser.add_argument("--seed", type=int, help="override the seed")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        exp = ExperimentConfig.from_json(args.config) if args.config else default_experiment()
        overrides = {k: v for k, v in (("benchmark", args.benchmark), ("data_root", args.data_root),
                                       ("strategy", args.strategy), ("seed", args.seed)) if v is not None}
        if overrides:
            exp = ExperimentConfig.from_dict({**exp.to_dict(), **overrides})
    except ConfigError as exc:
        parser.error(str(exc))
    out = args.out or os.path.join("runs", f"{exp.benchmark}-{exp.strategy}-seed{exp.seed}")
    from .data import DataError
    from .generator import GeneratorError
    from .text_encoders import TextEncoderError

    try:
        summary = run_experiment(exp, out, verbose=not args.quiet)
    except (DataError, GeneratorError, TextEncoderError) as exc:  # raised while setting up, before training
        parser.error(str(exc))
    print(json.dumps({k: summary[k] for k in ("benchmark", "strategy", "final_average_accuracy", "wall_time_s")}))
    print(f"outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
