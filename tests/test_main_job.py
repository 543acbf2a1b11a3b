"""The main job tells its story in one run: ``python -m avalanche_drcpsd`` trains DR-CPSD, Naive and ER200 on the
same data and recipe (here a tiny one, ``run.default_experiment`` patched), each into its own folder, then
prints one table and writes ``summary.csv`` and the plots."""

import contextlib
import csv
import errno
import io
import json

import numpy as np
import pytest
from conftest import tiny_config

from avalanche_drcpsd.experiments import run
from avalanche_drcpsd.experiments.run import MAIN_JOB_COLUMNS, ExperimentConfig, main

#: end-to-end runs: deselect with -m "not slow" for a quick loop
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STRATEGIES = ("drcpsd", "naive", "er200")
PIXELS = 28 * 28
TRAIN_PER_CLASS = 15  # 2 experiences of 5 classes: 150 training images, all in ER200's buffer (75 of 100 per exp)


def tiny_experiment() -> ExperimentConfig:
    return ExperimentConfig(
        benchmark="default", train_epochs=1, train_mb_size=32, eval_mb_size=256, threads=1,
        benchmark_args={"n_experiences": 2, "train_per_class": TRAIN_PER_CLASS, "test_per_class": 10},
        drcpsd=tiny_config(gap_samples_per_class=0))


def _main(argv):
    """``main(argv)`` with its standard output captured: (exit code, output)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _info(run_dir):
    return {r["key"]: r["value"] for r in _read(run_dir / "logs" / "run_info.csv")}


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("main") / "job"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "default_experiment", tiny_experiment)
        code, printed = _main(["--out", str(out), "--quiet"])
    assert code == 0
    return out, printed


def test_three_sub_runs_on_one_recipe(main_job):
    out, _ = main_job
    configs = {}
    for strategy in STRATEGIES:
        assert (out / strategy / "logs" / "run_info.csv").is_file(), strategy
        assert _info(out / strategy)["strategy"] == strategy
        configs[strategy] = json.loads((out / strategy / "config.json").read_text())
    for strategy, cfg in configs.items():  # the same data, classifier, epochs and optimiser; only the strategy
        assert {k: v for k, v in cfg.items() if k not in ("strategy", "command")} == \
            {k: v for k, v in configs["drcpsd"].items() if k not in ("strategy", "command")}, strategy
    assert sorted(p.name for p in (out / "drcpsd").glob("samples_exp*.png")) == ["samples_exp0.png",
                                                                               "samples_exp1.png"]


def test_summary_table_and_plots(main_job):
    out, printed = main_job
    rows = _read(out / "summary.csv")
    assert [r["strategy"] for r in rows] == list(STRATEGIES)
    assert tuple(rows[0]) == MAIN_JOB_COLUMNS
    by = {r["strategy"]: r for r in rows}
    for strategy, row in by.items():
        info = _info(out / strategy)
        ev = _read(out / strategy / "logs" / "eval_results.csv")
        last = [float(r["eval_accuracy"]) for r in ev if int(r["training_exp"]) == 1]
        assert float(row["final_average_accuracy"]) == pytest.approx(np.mean(last), abs=1e-4)
        assert row["stored_real_images"] == info["stored_real_images"]
        assert row["memory_bytes"] == info["memory_bytes"]
        assert float(row["wall_time_s"]) == pytest.approx(float(info["wall_time_s"]), abs=0.05)
    assert by["naive"]["memory_bytes"] == "0" and by["naive"]["stored_real_images"] == "0"
    assert int(by["er200"]["memory_bytes"]) == 10 * TRAIN_PER_CLASS * PIXELS
    assert by["drcpsd"]["stored_real_images"] == "0" and int(by["drcpsd"]["memory_bytes"]) > 0
    for png in ("accuracy.png", "accuracy_memory.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000, png

    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("strategy"))
    assert "final avg accuracy" in lines[header] and "memory (bytes)" in lines[header]
    assert [line.split()[0] for line in lines[header + 1: header + 4]] == list(STRATEGIES)
    assert f"{int(by['er200']['memory_bytes']):,}" in lines[header + 3]
    assert f"outputs in {out}" in printed


def test_rerun_reuses_finished_sub_runs(main_job, monkeypatch):
    out, _ = main_job
    stamps = {s: (out / s / "logs" / "run_info.csv").stat().st_mtime_ns for s in STRATEGIES}
    before = (out / "summary.csv").read_text()
    monkeypatch.setattr(run, "default_experiment", tiny_experiment)
    monkeypatch.setattr(run, "run_experiment", lambda *a, **k: pytest.fail("a finished sub-run was run again"))
    code, printed = _main(["--out", str(out), "--quiet", "--resume"])
    assert code == 0
    assert all(f"{s}: finished run in" in printed for s in STRATEGIES)
    assert {s: (out / s / "logs" / "run_info.csv").stat().st_mtime_ns for s in STRATEGIES} == stamps
    assert (out / "summary.csv").read_text() == before


def test_finished_run_of_another_configuration_is_named(main_job, monkeypatch, capsys):
    out, _ = main_job
    monkeypatch.setattr(run, "default_experiment", tiny_experiment)
    with pytest.raises(SystemExit) as info:
        main(["--out", str(out), "--quiet", "--seed", "7"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "holds a finished drcpsd run of another configuration" in err and "seed: 0 -> 7" in err


def test_strategies_option_is_validated(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "default_experiment", tiny_experiment)
    for argv, message in ((["--strategies", "naive,ewc"], "--strategies: strategies ['ewc']"),
                          (["--strategies", "naive", "--strategy", "naive"], "cannot be combined"),
                          (["--strategies", "naive", "--config", "x.json"], "cannot be combined")):
        with pytest.raises(SystemExit) as info:
            main(argv + ["--out", str(tmp_path / "out")])
        assert info.value.code == 2
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "out").exists()


def test_strategy_option_keeps_the_single_run(tmp_path, monkeypatch):
    """--strategy (or --config) runs one experiment into --out itself, as before the main job had three."""
    monkeypatch.setattr(run, "default_experiment", tiny_experiment)
    code, printed = _main(["--strategy", "naive", "--out", str(tmp_path / "one"), "--quiet"])
    assert code == 0
    assert (tmp_path / "one" / "logs" / "run_info.csv").is_file() and not (tmp_path / "one" / "naive").exists()
    assert json.loads(printed.splitlines()[0])["strategy"] == "naive"


def test_resume_continues_a_killed_drcpsd_sub_run(tmp_path, monkeypatch, capsys):
    """A full disk while the sample grid of experience 0 is written stops the job (exit 1, the checkpoint kept);
    the same command with --resume continues DR-CPSD from its checkpoint and finishes the job."""
    from avalanche_drcpsd.experiments import checkpoint
    from avalanche_drcpsd.utils import WriteError

    out = tmp_path / "job"
    monkeypatch.setattr(run, "default_experiment", tiny_experiment)
    argv = ["--out", str(out), "--quiet", "--strategies", "drcpsd,naive"]

    def full_disk(*args, **kwargs):
        raise WriteError(errno.ENOSPC, "cannot write 'samples_exp0.png': No space left on device (test)")

    with monkeypatch.context() as mp:
        mp.setattr(run, "_image_grid", full_disk)
        code, _ = _main(argv)
    assert code == 1
    assert "--resume" in capsys.readouterr().err
    assert (out / "drcpsd" / "checkpoint").is_dir() and not (out / "drcpsd" / "logs" / "run_info.csv").exists()
    assert not (out / "naive").exists(), "the job stopped at DR-CPSD"

    loaded = []
    real_load = checkpoint.load_checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda d: loaded.append(real_load(d)) or loaded[-1])
    code, printed = _main(argv + ["--resume"])
    assert code == 0
    assert loaded and loaded[0] is not None, "DR-CPSD continued from its checkpoint"
    assert not (out / "drcpsd" / "checkpoint").exists(), "a finished run deletes its checkpoint"
    cells = [(r["training_exp"], r["eval_exp"]) for r in _read(out / "drcpsd" / "logs" / "eval_results.csv")]
    assert sorted(cells) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")], "every evaluation once"
    assert [r["strategy"] for r in _read(out / "summary.csv")] == ["drcpsd", "naive"]
