"""DR-CPSD against Naive, Joint, ER, GDumb, LwF, generative replay and rehearsal+KD, on one recipe per benchmark.

    python benchmarks/compare.py --benchmarks split_mnist --strategies all --seeds 42,69,1714 --profile cpu
    drcpsd-compare ...   (the same, installed as a console command)

For every (benchmark, strategy, seed) it runs ``run_experiment`` with the profile's shared recipe (classifier,
epochs, optimiser; ``experiments/<benchmark>_<profile>.json``, whose ``drcpsd`` block configures DR-CPSD) into
``<out>/<benchmark>/runs/<strategy>/seed<k>/`` (an Avalanche ``CSVLogger`` folder plus ``run_info.csv``), then
rebuilds ``<out>/<benchmark>/{summary.csv,report.md,*.png}`` with :mod:`avalanche_drcpsd.experiments.report`. A finished
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
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..config import ConfigError
from ..data import FSCIL_BENCHMARKS, SPLIT_BENCHMARKS
from ..utils import atomic_write_text
from .baselines import names as strategy_names
from .report import build_report
from .run import RUN_INFO, ExperimentConfig, run_experiment

__all__ = ["BENCHMARKS", "SEEDS", "EXECUTORS", "GridRun", "GridResult", "profile_config", "plan_grid",
           "execute_run", "run_comparison", "main"]

BENCHMARKS = SPLIT_BENCHMARKS + FSCIL_BENCHMARKS
SEEDS = (42, 69, 1714)
#: how the grid's runs are executed (:func:`run_comparison`)
EXECUTORS = ("local", "ray")


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
    from ..data import make_benchmark
    from ..utils import dataset_tensors
    from .fidelity import train_feature_extractor

    if os.path.isfile(os.path.join(directory, "extractor.json")):
        return directory
    benchmark = make_benchmark(exp.benchmark, exp.data_root, seed=0, **exp.benchmark_args)
    xs, ys = zip(*(dataset_tensors(e.dataset.eval()) for e in benchmark.train_stream))
    print(f"training the FID/KID feature extractor on {sum(len(y) for y in ys)} images", flush=True)
    return train_feature_extractor(torch.cat(xs), torch.cat(ys), directory, num_classes=benchmark.spec.num_classes)


def csv_list(text: str, kind, allowed: Optional[Sequence] = None) -> List:
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


@dataclass(frozen=True)
class GridRun:
    """One (benchmark, strategy, seed) cell of a comparison and the folder its run writes."""

    benchmark: str
    strategy: str
    seed: int
    run_dir: str
    experiment: Dict[str, Any]  # the run's ExperimentConfig as a dict (plain data: it travels to Ray workers)

    @property
    def resumable(self) -> bool:
        return self.strategy == "drcpsd"  # checkpointed per phase: a killed run continues where it was

    @property
    def label(self) -> str:
        return f"{self.benchmark} {self.strategy} seed {self.seed}"


def execute_run(run: GridRun, *, verbose: bool = False,
                worker_setup: Optional[Callable[[GridRun], Optional[Callable[[], None]]]] = None) -> Dict[str, Any]:
    """Run one grid cell to the end (the body of every executor's task): an unfinished DR-CPSD run continues from
    its last phase checkpoint, an unfinished baseline run is cleared and starts again, so a task retried after its
    worker died repeats nothing. ``worker_setup(run)`` (tests: fault injection) runs first in the worker and may
    return a clean-up callable. Returns the run's summary."""
    cleanup = worker_setup(run) if worker_setup is not None else None
    try:
        if os.path.isdir(run.run_dir) and not run.resumable:  # its CSV rows would be repeated
            shutil.rmtree(run.run_dir)
        exp = ExperimentConfig.from_dict(run.experiment)
        return run_experiment(exp, run.run_dir, verbose=verbose, checkpoint=run.resumable,
                              resume=run.resumable and os.path.isdir(run.run_dir))
    finally:
        if cleanup is not None:
            cleanup()


def plan_grid(configs: Dict[str, ExperimentConfig], strategies: Sequence[str], seeds: Sequence[int], out: str,
              fid_dirs: Optional[Dict[str, Optional[str]]] = None) -> List[GridRun]:
    """Every (benchmark, strategy, seed) of the grid, in the sequential runner's order."""
    grid = []
    for benchmark, base in configs.items():
        for strategy in strategies:
            for seed in seeds:
                exp = ExperimentConfig.from_dict({**base.to_dict(), "strategy": strategy, "seed": seed,
                                                  "fidelity_extractor": (fid_dirs or {}).get(benchmark)})
                grid.append(GridRun(benchmark, strategy, int(seed),
                                    os.path.join(out, benchmark, "runs", strategy, f"seed{seed}"), exp.to_dict()))
    return grid


def is_finished(run: GridRun) -> bool:
    return os.path.isfile(os.path.join(run.run_dir, "logs", RUN_INFO))


@dataclass
class GridResult:
    """What became of one grid cell: ``status`` is ``reused``, ``done`` or ``failed`` (with ``error``)."""

    run: GridRun
    status: str
    summary: Optional[Dict[str, Any]] = None
    error: Optional[str] = None


def run_comparison(configs: Dict[str, ExperimentConfig], strategies: Sequence[str], seeds: Sequence[int], out: str,
                   *, executor: str = "local", ray_address: Optional[str] = None, max_retries: int = 3,
                   fid: bool = True, verbose: bool = False, command: Optional[str] = None,
                   title: str = "{benchmark}", worker_setup=None) -> List[GridResult]:
    """Run every (benchmark, strategy, seed) of the grid not finished already into
    ``<out>/<benchmark>/runs/<strategy>/seed<k>/``, then build each benchmark's report once from what finished.

    ``executor="local"`` runs them one after another in this process. ``"ray"`` makes every run a Ray task asking
    for ``num_cpus`` = its thread count (1 when it has none) and one GPU when its device is CUDA: ``ray.init()``
    starts a local cluster on this machine when ``ray_address`` is None, else joins that cluster (``"auto"`` or
    ``"HOST:PORT"``). A task
    whose worker dies is retried up to ``max_retries`` times, and a DR-CPSD run continues from its last phase
    checkpoint. A run that fails with an error (bad configuration, non-finite loss) is reported with it and the
    others go on. Ctrl-C cancels the tasks still running; the same call again reuses what finished and resumes the
    rest. Only this process writes ``command.txt`` and the reports.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r}; expected one of {list(EXECUTORS)}")
    if not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries={max_retries!r} must be an integer >= 0")
    if executor == "ray":
        ray = _import_ray()  # before anything is written
    fid_dirs: Dict[str, Optional[str]] = {}
    for benchmark, base in configs.items():
        folder = os.path.join(out, benchmark)
        os.makedirs(folder, exist_ok=True)
        if command is not None:
            _record_command(folder, command)
        fid_dirs[benchmark] = (ensure_feature_extractor(base, os.path.join(folder, "feature_extractor"))
                               if fid and "drcpsd" in strategies else None)
    grid = plan_grid(configs, strategies, seeds, out, fid_dirs)
    finished_before = [is_finished(r) for r in grid]
    results: List[GridResult] = [GridResult(r, "reused") for r, f in zip(grid, finished_before) if f]
    for r in results:
        print(f"{r.run.label}: done, reused", flush=True)
    todo = [r for r, f in zip(grid, finished_before) if not f]
    bar = tqdm(total=len(grid), initial=len(results), desc="comparison", unit="run", disable=not todo, leave=False)

    def finished(result: GridResult) -> None:
        results.append(result)
        if result.status == "done":
            s = result.summary
            tqdm.write(f"{result.run.label}: final average accuracy {s['final_average_accuracy']:.4f} (stream "
                       f"{s['final_stream_accuracy']:.4f}) in {s['wall_time_s']:.0f} s")
        else:
            tqdm.write(f"{result.run.label}: FAILED: {result.error}")
        bar.update(1)

    try:
        if executor == "local":
            for run in todo:
                try:
                    finished(GridResult(run, "done", execute_run(run, verbose=verbose, worker_setup=worker_setup)))
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # noqa: BLE001 (reported, and the other runs go on)
                    finished(GridResult(run, "failed", error=f"{type(exc).__name__}: {exc}"))
        elif todo:
            _run_on_ray(ray, todo, ray_address, max_retries, verbose, worker_setup, finished)
    finally:
        bar.close()
        for benchmark in configs:
            folder = os.path.join(out, benchmark)
            if any(is_finished(r) for r in grid if r.benchmark == benchmark):
                build_report(folder, title=title.format(benchmark=benchmark))
                print(f"report: {os.path.join(folder, 'report.md')}", flush=True)
    order = {r.run_dir: i for i, r in enumerate(grid)}
    return sorted(results, key=lambda r: order[r.run.run_dir])


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError('executor="ray" needs Ray: pip install "avalanche-drcpsd[ray]"') from None
    return ray


def _run_on_ray(ray, todo: Sequence[GridRun], address: Optional[str], max_retries: int, verbose: bool,
                worker_setup, finished: Callable[[GridResult], None]) -> None:
    from ray.exceptions import RayTaskError

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=verbose)
    task = ray.remote(execute_run)
    pending = {}
    try:
        for run in todo:  # run.experiment is ExperimentConfig.to_dict() of a config plan_grid validated
            gpus = 1 if str(run.experiment["drcpsd"]["device"]).startswith("cuda") else 0
            cpus = run.experiment["threads"] or 1  # no thread count: torch's default inside a 1-CPU task
            ref = task.options(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries,
                               retry_exceptions=False, name=run.label).remote(run, verbose=verbose,
                                                                              worker_setup=worker_setup)
            pending[ref] = run
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(ready[0])
            try:
                finished(GridResult(run, "done", ray.get(ready[0])))
            except RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                finished(GridResult(run, "failed", error=f"{type(cause).__name__}: {cause}"))
            except ray.exceptions.RayError as exc:  # the worker died more often than max_retries
                finished(GridResult(run, "failed", error=f"{type(exc).__name__}: {exc}"))
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        print(f"interrupted: {len(pending)} run(s) cancelled; the same command resumes them", flush=True)
        raise
    finally:
        if started_here:
            ray.shutdown()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="drcpsd-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks", default="split_mnist",
                        type=lambda s: csv_list(s, str, BENCHMARKS), help=f"subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--strategies", default="all", help="'all' or a comma-separated subset")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), type=lambda s: csv_list(s, int))
    parser.add_argument("--profile", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--data-root", default=None, help="override the profile's data root")
    parser.add_argument("--experiments", default="experiments", help="folder of <benchmark>_<profile>.json")
    parser.add_argument("--out", default="results")
    parser.add_argument("--threads", type=int, default=None,
                        help="override the profile's torch thread count (1 lets two comparisons share 2 cores)")
    parser.add_argument("--no-fid", action="store_true", help="skip the FID/KID of DR-CPSD's synthetic images")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--executor", default="local", choices=EXECUTORS,
                        help="local: one run after another in this process; ray: every run a Ray task")
    parser.add_argument("--ray-address", default=None,
                        help="join this Ray cluster ('auto' or HOST:PORT); default: start a local one")
    parser.add_argument("--max-retries", type=int, default=3, help="Ray: retries of a run whose worker dies")
    args = parser.parse_args(argv)
    if args.ray_address is not None and args.executor != "ray":
        parser.error("--ray-address is for --executor ray")
    try:
        strategies = strategy_names(args.strategies)
        configs = {b: profile_config(b, args.profile, args.data_root, args.experiments, args.threads)
                   for b in args.benchmarks}
    except (ValueError, ConfigError) as exc:
        parser.error(str(exc))

    command = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                     else sys.argv[1:]))
    try:
        results = run_comparison(configs, strategies, args.seeds, args.out, executor=args.executor,
                                 ray_address=args.ray_address, max_retries=args.max_retries, fid=not args.no_fid,
                                 verbose=not args.quiet, command=command,
                                 title="{benchmark}, %s profile" % args.profile)
    except ImportError as exc:
        parser.error(str(exc))
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"failed: {r.run.label}: {r.error}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
