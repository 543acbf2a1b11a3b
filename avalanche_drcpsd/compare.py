"""DR-CPSD against Naive, Joint, ER, GDumb, LwF, generative replay and rehearsal+KD, on one recipe per benchmark.

    python benchmarks/compare.py --benchmarks split_mnist --strategies all --seeds 42,69,1714 --profile cpu
    drcpsd-compare ...   (the same, installed as a console command)

For every (benchmark, strategy, seed) it runs ``run_experiment`` with the profile's shared recipe (classifier,
epochs, optimiser; ``experiments/<benchmark>_<profile>.json``, whose ``drcpsd`` block configures DR-CPSD) into
``<out>/<benchmark>/runs/<strategy>/seed<k>/`` (an Avalanche ``CSVLogger`` folder plus ``run_info.csv``), then
rebuilds ``<out>/<benchmark>/{summary.csv,report.md,*.png}`` with :mod:`avalanche_drcpsd.report`. A finished
run (its ``logs/run_info.csv`` exists) is never rerun, so a killed comparison resumes where it stopped; an
unfinished DR-CPSD run continues from its last phase checkpoint, an unfinished baseline run (minutes) is cleared
and starts again.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from typing import List, Optional, Sequence

import torch

from .baselines import names as strategy_names
from .config import ConfigError
from .data import SPLIT_BENCHMARKS
from .report import build_report
from .run import RUN_INFO, ExperimentConfig, run_experiment
from .utils import atomic_write_text

__all__ = ["BENCHMARKS", "SEEDS", "profile_config", "main"]

BENCHMARKS = SPLIT_BENCHMARKS
SEEDS = (42, 69, 1714)


def profile_config(benchmark: str, profile: str, data_root: Optional[str],
                   experiments: str = "experiments", threads: Optional[int] = None) -> ExperimentConfig:
    """``<experiments>/<benchmark>_<profile>.json`` with the data root and thread count overridden when given."""
    path = os.path.join(experiments, f"{benchmark}_{profile}.json")
    exp = ExperimentConfig.from_json(path)
    overrides = {k: v for k, v in (("data_root", data_root), ("threads", threads)) if v is not None}
    if overrides:
        exp = ExperimentConfig.from_dict({**exp.to_dict(), **overrides})
    return exp


def _record_command(folder: str, command: str) -> None:
    """Append ``command`` to ``<folder>/command.txt`` unless it is there (several commands may fill one folder)."""
    path = os.path.join(folder, "command.txt")
    lines = open(path).read().splitlines() if os.path.isfile(path) else []
    if command not in lines:
        atomic_write_text(path, "\n".join(lines + [command]) + "\n")


def ensure_feature_extractor(exp: ExperimentConfig, directory: str) -> str:
    """The benchmark's FID/KID feature extractor, trained once on its whole training set and reused."""
    from .data import make_benchmark
    from .fidelity import train_feature_extractor
    from .utils import dataset_tensors

    if os.path.isfile(os.path.join(directory, "extractor.json")):
        return directory
    benchmark = make_benchmark(exp.benchmark, exp.data_root, seed=0, **exp.benchmark_args)
    xs, ys = zip(*(dataset_tensors(e.dataset.eval()) for e in benchmark.train_stream))
    print(f"training the FID/KID feature extractor on {sum(len(y) for y in ys)} images", flush=True)
    return train_feature_extractor(torch.cat(xs), torch.cat(ys), directory, num_classes=benchmark.spec.num_classes)


def _csv_list(text: str, kind, allowed: Optional[Sequence] = None) -> List:
    try:
        items = [kind(s.strip()) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {kind.__name__}") from None
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad}: expected a subset of {list(allowed)}")
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: empty list")
    return items


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="drcpsd-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks", default="split_mnist",
                        type=lambda s: _csv_list(s, str, BENCHMARKS), help=f"subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--strategies", default="all", help="'all' or a comma-separated subset")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), type=lambda s: _csv_list(s, int))
    parser.add_argument("--profile", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--data-root", default=None, help="override the profile's data root")
    parser.add_argument("--experiments", default="experiments", help="folder of <benchmark>_<profile>.json")
    parser.add_argument("--out", default="results")
    parser.add_argument("--threads", type=int, default=None,
                        help="override the profile's torch thread count (1 lets two comparisons share 2 cores)")
    parser.add_argument("--no-fid", action="store_true", help="skip the FID/KID of DR-CPSD's synthetic images")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        strategies = strategy_names(args.strategies)
        configs = {b: profile_config(b, args.profile, args.data_root, args.experiments, args.threads)
                   for b in args.benchmarks}
    except (ValueError, ConfigError) as exc:
        parser.error(str(exc))

    command = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                     else sys.argv[1:]))
    for benchmark, base in configs.items():
        folder = os.path.join(args.out, benchmark)
        os.makedirs(folder, exist_ok=True)
        _record_command(folder, command)
        fid_dir = None
        if "drcpsd" in strategies and not args.no_fid:
            fid_dir = ensure_feature_extractor(base, os.path.join(folder, "feature_extractor"))
        for strategy in strategies:
            for seed in args.seeds:
                run_dir = os.path.join(folder, "runs", strategy, f"seed{seed}")
                if os.path.isfile(os.path.join(run_dir, "logs", RUN_INFO)):
                    print(f"{benchmark} {strategy} seed {seed}: done, reused", flush=True)
                    continue
                exp = ExperimentConfig.from_dict({**base.to_dict(), "strategy": strategy, "seed": seed,
                                                  "fidelity_extractor": fid_dir})
                resumable = strategy == "drcpsd"  # checkpointed per phase: a killed run continues where it was
                if os.path.isdir(run_dir) and not resumable:  # an unfinished run: its CSV rows would be repeated
                    shutil.rmtree(run_dir)
                summary = run_experiment(exp, run_dir, verbose=not args.quiet, checkpoint=resumable,
                                         resume=resumable and os.path.isdir(run_dir))
                print(f"{benchmark} {strategy} seed {seed}: stream accuracy {summary['final_average_accuracy']:.4f}"
                      f" in {summary['wall_time_s']:.0f} s", flush=True)
        build_report(folder, title=f"{benchmark}, {args.profile} profile")
        print(f"report: {os.path.join(folder, 'report.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
