"""The experiment harness: what runs, compares and reports DR-CPSD, apart from the method itself.

The library (``avalanche_drcpsd``: the strategy, the plugins, the losses, CPSD, the generators, the text encoders,
the synthetic cache, data and models) is what a researcher drops into an Avalanche benchmark. This subpackage is
the lab around it, built on the library's public interface:

* :mod:`~avalanche_drcpsd.experiments.run`: one experiment from an :class:`~.run.ExperimentConfig` (a JSON file of
  ``experiments/`` or ``default.json``, the main job's recipe), its CSV logs, sample grids and state;
  ``python -m avalanche_drcpsd`` and ``drcpsd-run``;
* :mod:`~avalanche_drcpsd.experiments.baselines`: the strategies DR-CPSD is compared with, and the memory each keeps;
* :mod:`~avalanche_drcpsd.experiments.compare`: a (benchmark, strategy, seed) grid, sequential or on Ray
  (``drcpsd-compare``);
* :mod:`~avalanche_drcpsd.experiments.report`: summaries, plots and reports rebuilt from the CSV folders alone
  (``drcpsd-report``);
* :mod:`~avalanche_drcpsd.experiments.fidelity`: FID/KID and CAS in a benchmark's own feature extractor;
* :mod:`~avalanche_drcpsd.experiments.checkpoint`: phase checkpoints and bit-identical resume of a killed run;
* :mod:`~avalanche_drcpsd.experiments.cli`: ``drcpsd-sample`` and ``drcpsd-train-cpsd``.

Submodules are imported on use (``from avalanche_drcpsd.experiments.run import run_experiment``): importing the
library never imports the harness.
"""

__all__ = ["baselines", "checkpoint", "cli", "compare", "fidelity", "report", "run"]
