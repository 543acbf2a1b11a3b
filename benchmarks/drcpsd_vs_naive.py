"""DR-CPSD vs Naive on one benchmark, same classifier, epochs and optimiser; wall time per DR-CPSD phase.

    python benchmarks/drcpsd_vs_naive.py --config experiments/split_mnist_cpu.json --out results/split_mnist_cpu

Writes, in ``--out``: ``runs/<strategy>/`` (each run's CSV logs, sample grids, summary.json), ``summary.csv``
(one row per strategy: final average accuracy, wall time, phase times), ``accuracy.png`` (average accuracy on
the whole test stream after each experience), ``phase_times.png`` and ``command.txt``. Runs already finished in
``--out`` are reused (delete their folder to rerun), so a killed benchmark resumes at the next strategy.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from avalanche_drcpsd.experiments.run import ExperimentConfig, run_experiment  # noqa: E402
from avalanche_drcpsd.utils import (  # noqa: E402
    PHASES,  # noqa: E402
    atomic_write,
    atomic_write_csv,
    atomic_write_text,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategies", default="drcpsd,naive")
    args = parser.parse_args(argv)
    base = ExperimentConfig.from_json(args.config)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "command.txt"),
                      "python " + " ".join(shlex.quote(a) for a in sys.argv) + "\n")
    summaries: Dict[str, dict] = {}
    for name in args.strategies.split(","):
        run_dir = os.path.join(args.out, "runs", name)
        done = os.path.join(run_dir, "summary.json")
        if os.path.exists(done):
            summaries[name] = json.load(open(done))
            print(f"{name}: reusing {done}")
            continue
        exp = ExperimentConfig.from_dict({**base.to_dict(), "strategy": name})
        summaries[name] = run_experiment(exp, run_dir, verbose=True)
        print(f"{name}: final average accuracy {summaries[name]['final_average_accuracy']:.4f}, "
              f"wall time {summaries[name]['wall_time_s']:.0f} s", flush=True)
    write_summary(summaries, args.out)
    return 0


def write_summary(summaries: Dict[str, dict], out: str) -> None:
    rows: List[dict] = []
    for name, s in summaries.items():
        row = {"strategy": name, "final_average_accuracy": round(s["final_average_accuracy"], 4),
               "wall_time_s": round(s["wall_time_s"], 1), "stored_real_images": s.get("stored_real_images", 0),
               "generator_parameters": s.get("generator_parameters", 0)}
        for phase in PHASES:
            row[f"{phase}_s"] = round(s.get("phase_time_s", {}).get(phase, 0.0), 1)
        row["accuracy_per_experience"] = " ".join(f"{h['stream_accuracy']:.4f}" for h in s["history"])
        rows.append(row)

    atomic_write_csv(os.path.join(out, "summary.csv"), rows)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, s in summaries.items():
        xs = [h["experience"] + 1 for h in s["history"]]
        ax.plot(xs, [h["stream_accuracy"] for h in s["history"]], marker="o", label=name)
    ax.set_xlabel("experiences learned")
    ax.set_ylabel("accuracy on the whole test stream")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(os.path.join(out, "accuracy.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)

    timed = {n: s["phase_time_s"] for n, s in summaries.items() if "phase_time_s" in s}
    if timed:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, phases in timed.items():
            ax.bar([p for p in PHASES], [phases.get(p, 0.0) / 60 for p in PHASES], label=name)
        ax.set_ylabel("wall time (min)")
        ax.set_title("DR-CPSD time per phase, all experiences")
        fig.tight_layout()
        atomic_write(os.path.join(out, "phase_times.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
