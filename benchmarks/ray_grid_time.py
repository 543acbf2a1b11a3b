"""Wall time of one comparison grid, sequential against Ray (issue 17).

    python benchmarks/ray_grid_time.py --data-root ../shared/data --out /work/runs/ray_grid \\
        --csv results/ray_grid_time.csv

Runs the same grid (by default Split-MNIST's eight baselines x seeds 42, 69, 1714 with the CPU profile's recipe,
one torch thread a run) twice into two fresh folders: with the ``local`` executor (one run after another in this
process) and with the ``ray`` executor on a local Ray started by ``ray.init()`` (one task a run, ``num_cpus=1``,
so as many workers at once as the machine has cores: 2 on this project's machine). It then checks that both
executors wrote the same ``eval_results.csv`` rows for every run, and writes one CSV row per executor: the number
of runs, the wall time of the whole grid, the speed-up against ``local`` and whether every run's rows agree.

Run it with nothing else on the machine: it is a wall-time figure. ``--executors ray`` alone, or ``local`` alone,
times one of them (the agreement column then compares nothing and reads ``n/a``).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import time
from typing import Dict, List, Sequence

from avalanche_drcpsd.experiments.baselines import BASELINES, names
from avalanche_drcpsd.experiments.compare import EXECUTORS, GridResult, csv_list, profile_config, run_comparison
from avalanche_drcpsd.utils import atomic_write_csv

FIELDS = ["benchmark", "executor", "workers", "runs", "wall_s", "speedup_vs_local", "rows_agree", "failed"]


def _eval_files(results: Sequence[GridResult], out: str) -> Dict[str, str]:
    """``<benchmark>/runs/<strategy>/seed<k>`` -> its eval_results.csv, for every run of the grid that finished."""
    return {os.path.relpath(r.run.run_dir, out): os.path.join(r.run.run_dir, "logs", "eval_results.csv")
            for r in results if r.status != "failed"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default="split_mnist")
    parser.add_argument("--strategies", default=",".join(BASELINES), help="a comma-separated subset, or 'all'")
    parser.add_argument("--seeds", default="42,69,1714", type=lambda s: csv_list(s, int))
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--experiments", default="experiments",
                        help="the folder of <benchmark>_<profile>.json files")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--executors", default="local,ray", type=lambda s: csv_list(s, str, EXECUTORS),
                        help=f"a comma-separated subset of {','.join(EXECUTORS)}")
    parser.add_argument("--out", required=True, help="a scratch folder; <out>/<executor>/ is emptied first")
    parser.add_argument("--csv", default="results/ray_grid_time.csv")
    args = parser.parse_args(argv)

    try:
        strategies = names(args.strategies)
    except ValueError as exc:
        parser.error(f"--strategies: {exc}")
    config = profile_config(args.benchmark, args.profile, args.data_root, experiments=args.experiments, threads=1)

    rows: List[Dict[str, object]] = []
    files: Dict[str, Dict[str, str]] = {}
    for executor in args.executors:
        out = os.path.join(args.out, executor)
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        results = run_comparison({args.benchmark: config}, strategies, args.seeds, out, executor=executor, fid=False)
        wall = time.perf_counter() - start
        files[executor] = _eval_files(results, out)
        workers = 1 if executor == "local" else os.cpu_count()
        failed = sum(r.status == "failed" for r in results)
        rows.append({"benchmark": args.benchmark, "executor": executor, "workers": workers, "runs": len(results),
                     "wall_s": round(wall, 1), "failed": failed})
        print(f"{executor}: {len(results)} runs in {wall:.0f} s ({failed} failed)", flush=True)

    local = next((r for r in rows if r["executor"] == "local"), None)
    for row in rows:
        row["speedup_vs_local"] = round(local["wall_s"] / row["wall_s"], 2) if local else "n/a"
        if row["executor"] == "local" or "local" not in files:
            row["rows_agree"] = "n/a"
        else:
            mine, theirs = files[row["executor"]], files["local"]
            row["rows_agree"] = (set(mine) == set(theirs)
                                 and all(filecmp.cmp(mine[k], theirs[k], shallow=False) for k in mine))
    atomic_write_csv(args.csv, [{k: row[k] for k in FIELDS} for row in rows])
    with open(args.csv) as f:
        sys.stdout.write(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
