"""Comparison sweeps on Ray (issue 17): a tiny grid on a local Ray with two workers gives the sequential runner's CSV
rows; a worker killed mid-run is retried and its DR-CPSD run continues from its checkpoint; a failing run is
reported while the others finish, and the same call again completes it."""

import os
import re
import signal
import sys

import pytest
from conftest import tiny_config

from avalanche_drcpsd.experiments.compare import main as compare_main
from avalanche_drcpsd.experiments.compare import run_comparison
from avalanche_drcpsd.experiments.run import ExperimentConfig

#: end-to-end runs: deselect with -m "not slow" for a quick loop
pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")

STRATEGIES = ["naive", "drcpsd"]
SEEDS = [1, 2]


def _configs():
    exp = ExperimentConfig(benchmark="default", train_epochs=1, train_mb_size=32, threads=1, eval_mb_size=500,
                           benchmark_args={"n_experiences": 2, "train_per_class": 30, "test_per_class": 10},
                           drcpsd=tiny_config(gap_samples_per_class=0))
    return {"default": exp}


class Faults:
    """``worker_setup`` of the test grid: SIGKILL the worker running ``kill`` once (a marker file remembers it), at
    the end of experience 1's classifier phase (a checkpoint exists, the run is half done); raise in ``fail``."""

    def __init__(self, marker, kill=None, fail=None):
        self.marker, self.kill, self.fail = str(marker), kill, fail

    def __call__(self, run):
        if run.label == self.fail:
            raise ValueError(f"a bad configuration for {run.label}")
        if run.label != self.kill or os.path.exists(self.marker):
            return None
        marker = self.marker

        def hook(experience, phase, when):
            if (experience, phase, when) == (1, "classifier", "end"):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

        # through the module: this class travels to the worker by value, and a global list would travel as a copy
        from avalanche_drcpsd.experiments import checkpoint

        checkpoint.EVENT_HOOKS.append(hook)
        return lambda: checkpoint.EVENT_HOOKS.remove(hook)


@pytest.fixture(scope="module")
def local_ray():
    from ray import cloudpickle  # Ray's own copy pickles the task arguments

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential")
    results = run_comparison(_configs(), STRATEGIES, SEEDS, str(out), fid=False)
    assert [r.status for r in results] == ["done"] * 4
    return out


def _rows(out, run):
    path = os.path.join(out, "default", "runs", run.strategy, f"seed{run.seed}", "logs", "eval_results.csv")
    with open(path) as fh:
        return fh.read()


def test_ray_grid_survives_a_killed_worker_and_a_failing_run(local_ray, sequential, tmp_path, capsys):
    faults = Faults(tmp_path / "killed", kill="default drcpsd seed 1", fail="default naive seed 2")
    results = run_comparison(_configs(), STRATEGIES, SEEDS, str(tmp_path), executor="ray", fid=False,
                             worker_setup=faults)
    assert (tmp_path / "killed").exists(), "the DR-CPSD worker was killed once"
    status = {r.run.label: r.status for r in results}
    assert status == {"default naive seed 1": "done", "default naive seed 2": "failed",
                      "default drcpsd seed 1": "done", "default drcpsd seed 2": "done"}
    failed = next(r for r in results if r.status == "failed")
    assert "ValueError: a bad configuration for default naive seed 2" in failed.error
    for r in results:
        if r.status == "done":  # the retried DR-CPSD run too: nothing lost or repeated
            assert _rows(tmp_path, r.run) == _rows(sequential, r.run), r.run.label
    assert os.path.isfile(tmp_path / "default" / "report.md"), "the report is built from what finished"
    # the same call again: finished runs reused, the failed one run
    again = run_comparison(_configs(), STRATEGIES, SEEDS, str(tmp_path), executor="ray", fid=False)
    assert [r.status for r in again].count("reused") == 3
    redone = next(r for r in again if r.status == "done")
    assert redone.run.label == "default naive seed 2"
    assert _rows(tmp_path, redone.run) == _rows(sequential, redone.run)
    out = capsys.readouterr().out  # each finished run is announced with both accuracies
    assert re.search(r"default naive seed 2: final average accuracy \d\.\d{4} \(stream \d\.\d{4}\)", out), out


def test_executor_and_cli_arguments_are_checked(tmp_path, capsys):
    with pytest.raises(ValueError, match="executor='dask'"):
        run_comparison(_configs(), STRATEGIES, SEEDS, str(tmp_path), executor="dask", fid=False)
    with pytest.raises(ValueError, match="max_retries=-1"):
        run_comparison(_configs(), STRATEGIES, SEEDS, str(tmp_path), executor="ray", max_retries=-1, fid=False)
    with pytest.raises(SystemExit):
        compare_main(["--ray-address", "auto", "--out", str(tmp_path)])
    assert "--ray-address is for --executor ray" in capsys.readouterr().err


def test_missing_ray_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match=r'pip install "avalanche-drcpsd\[ray\]"'):
        run_comparison(_configs(), STRATEGIES, SEEDS, str(tmp_path), executor="ray", fid=False)
    assert not os.listdir(tmp_path), "nothing is written before the executor is known to work"
