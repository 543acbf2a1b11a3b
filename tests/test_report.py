"""The comparison runner and the report builder: tiny real runs, then summary, plots and report from CSVs alone."""

import csv
import json

import numpy as np
import pytest
from conftest import tiny_config

from avalanche_drcpsd.experiments import baselines
from avalanche_drcpsd.experiments.compare import main as compare_main
from avalanche_drcpsd.experiments.report import ReportError, RunLogs, build_report, load_run
from avalanche_drcpsd.experiments.report import main as report_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_average_accuracy_and_forgetting_by_hand():
    """a = [[.9, 0], [.5, .8], [.3, .6, .7]] (3 experiences):
    final average accuracy (.3 + .6 + .7) / 3 = 0.5333; forgetting ((.9 - .3) + (.8 - .6)) / 2 = 0.4."""
    m = np.array([[0.9, 0.0, 0.0], [0.5, 0.8, 0.1], [0.3, 0.6, 0.7]])
    run = RunLogs("x", 0, m, stream_accuracy=[])
    assert run.final_average_accuracy == pytest.approx(1.6 / 3)
    assert run.average_forgetting == pytest.approx(0.4)
    # accuracy on the seen experiences after each: .9, (.5 + .8) / 2, (.3 + .6 + .7) / 3
    np.testing.assert_allclose(run.seen_accuracy, [0.9, 0.65, 1.6 / 3])


def test_joint_run_with_one_row_has_no_forgetting():
    m = np.full((3, 3), np.nan)
    m[2] = [0.9, 0.8, 0.7]
    run = RunLogs("joint", 0, m, stream_accuracy=[0.8])
    assert run.final_average_accuracy == pytest.approx(0.8)
    assert np.isnan(run.seen_accuracy[:2]).all() and run.seen_accuracy[2] == pytest.approx(0.8)
    assert run.average_forgetting == pytest.approx(0.0)


def test_strategy_names_are_validated():
    assert baselines.names("all") == list(baselines.STRATEGIES)
    assert baselines.names("lwf, er200") == ["lwf", "er200"]
    with pytest.raises(ValueError, match="'ewc'"):
        baselines.names("lwf,ewc")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """naive, lwf, er200, rehearsal_kd, joint, genreplay and a tiny DR-CPSD, 2 seeds, on 2 experiences of the
    embedded MNIST subset (no data root), through the same command a user runs."""
    root = tmp_path_factory.mktemp("compare")
    exps = root / "experiments"
    exps.mkdir()
    cfg = {"benchmark": "default", "benchmark_args": {"n_experiences": 2}, "train_epochs": 1, "train_mb_size": 32,
           "drcpsd": tiny_config(gap_samples_per_class=4).to_dict()}
    # the compare command takes profile files named <benchmark>_<profile>.json; "default" is not one of the
    # four public benchmarks, so the test writes the file under split_mnist's name and points the runner at it
    (exps / "split_mnist_cpu.json").write_text(json.dumps(cfg))
    out = root / "results"
    argv = ["--benchmarks", "split_mnist", "--strategies", "naive,lwf,er200,gdumb,rehearsal_kd,joint,genreplay,drcpsd",
            "--seeds", "1,2", "--experiments", str(exps), "--out", str(out), "--quiet"]
    assert compare_main(argv) == 0
    return out / "split_mnist", argv


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_compare_writes_one_csv_folder_per_run_and_a_report(compared):
    folder, _ = compared
    for strategy in ("naive", "lwf", "er200", "gdumb", "rehearsal_kd", "joint", "genreplay", "drcpsd"):
        for seed in (1, 2):
            logs = folder / "runs" / strategy / f"seed{seed}" / "logs"
            assert (logs / "eval_results.csv").is_file() and (logs / "run_info.csv").is_file()
    for png in ("accuracy.png", "accuracy_memory.png", "accuracy_matrix.png", "confusion.png", "mmd_gap.png",
                "fid.png", "kid.png"):
        data = (folder / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000, png
    for seed in (1, 2):  # FID/KID after every experience, the last included (published after its evaluation)
        names = {r["name"] for r in _read(folder / "runs" / "drcpsd" / f"seed{seed}" / "logs" / "metrics.csv")}
        assert {f"RealSyn{m}/Exp{e:03d}" for m in ("FID", "KID") for e in (0, 1)} <= names
    for strategy in ("naive", "joint", "drcpsd"):  # every run's last confusion: its diagonal the pooled accuracy
        run = load_run(str(folder / "runs" / strategy / "seed1" / "logs"))
        assert run.confusion.shape == (10, 10) and run.class_names[0] == "zero"
        assert run.confusion.sum() == sum(int(n) for n in run.info["test_sizes"].split())
        assert np.trace(run.confusion) / run.confusion.sum() == pytest.approx(run.stream_accuracy[-1], abs=1e-6)
    report = (folder / "report.md").read_text()
    assert "compare.py" in report and "![accuracy](accuracy.png)" in report and "(confusion.png)" in report
    assert "runs/drcpsd/seed1/samples_exp1.png" in report


def test_summary_equals_numbers_recomputed_from_the_csvs(compared):
    folder, _ = compared
    rows = {r["strategy"]: r for r in _read(folder / "summary.csv")}
    assert set(rows) == {"naive", "lwf", "er200", "gdumb", "rehearsal_kd", "joint", "genreplay", "drcpsd"}
    for strategy, row in rows.items():
        finals, streams, walls = [], [], []
        for seed in (1, 2):
            logs = folder / "runs" / strategy / f"seed{seed}" / "logs"
            ev = _read(logs / "eval_results.csv")
            last = max(int(r["training_exp"]) for r in ev)
            accs = [float(r["eval_accuracy"]) for r in ev if int(r["training_exp"]) == last]
            finals.append(sum(accs) / len(accs))
            stream = [float(r["value"]) for r in _read(logs / "metrics.csv")
                      if r["name"] == "Top1_Acc_Stream/eval_phase/test_stream/Task000"]
            streams.append(stream[-1])
            info = {r["key"]: r["value"] for r in _read(logs / "run_info.csv")}
            walls.append(float(info["wall_time_s"]))
            assert float(info["final_average_accuracy"]) == pytest.approx(stream[-1], abs=1e-6)
        assert float(row["final_average_accuracy_mean"]) == pytest.approx(np.mean(finals), abs=1e-4)
        assert float(row["final_average_accuracy_std"]) == pytest.approx(np.std(finals, ddof=1), abs=1e-4)
        assert float(row["final_stream_accuracy_mean"]) == pytest.approx(np.mean(streams), abs=1e-4)
        assert float(row["wall_time_s_mean"]) == pytest.approx(np.mean(walls), abs=1e-3)
    assert int(rows["er200"]["stored_real_images"]) == 200
    assert int(rows["drcpsd"]["stored_real_images"]) == 0 and int(rows["drcpsd"]["generator_parameters"]) > 0
    assert int(rows["genreplay"]["generator_parameters"]) > 0, "the VAE is counted"
    assert int(rows["naive"]["generator_parameters"]) == 0
    assert int(rows["joint"]["stored_real_images"]) > 200
    # memory in one unit (bytes kept between experiences, from run_info.csv): none for Naive, 200 uint8 images
    # for ER200, the generator and more for DR-CPSD
    for strategy, row in rows.items():
        info = {r["key"]: r["value"] for r in _read(folder / "runs" / strategy / "seed1" / "logs" / "run_info.csv")}
        parts = sum(int(v) for k, v in info.items() if k.startswith("memory_") and k != "memory_bytes")
        assert int(info["memory_bytes"]) == parts == int(row["memory_bytes"]), strategy
    assert int(rows["naive"]["memory_bytes"]) == 0
    assert int(rows["er200"]["memory_bytes"]) == 200 * 28 * 28
    assert int(rows["drcpsd"]["memory_bytes"]) > 4 * int(rows["drcpsd"]["generator_parameters"])


def test_targets_equal_those_recomputed_from_the_summary(compared):
    """split_mnist's targets: >= 0.92, and above every baseline storing as many real images or more (all of
    them: DR-CPSD stores none), Joint excepted; margins in accuracy points."""
    from avalanche_drcpsd.experiments.report import target_checks

    folder, _ = compared
    summary = {r["strategy"]: r for r in _read(folder / "summary.csv")}
    acc = float(summary["drcpsd"]["final_average_accuracy_mean"])
    expected = {"final average accuracy >= 0.92": (0.92, acc - 0.92, acc >= 0.92)}
    for name, r in summary.items():
        if name not in ("drcpsd", "joint"):
            other = float(r["final_average_accuracy_mean"])
            expected[f"above {name} ({r['stored_real_images']} real images)"] = (other, acc - other, acc > other)
    rows = _read(folder / "targets.csv")
    assert {r["target"] for r in rows} == set(expected)
    for r in rows:
        reference, margin, met = expected[r["target"]]
        assert float(r["value"]) == pytest.approx(acc)
        assert float(r["reference"]) == pytest.approx(reference)
        assert float(r["margin_points"]) == pytest.approx(100 * margin, abs=0.01)
        assert r["met"] == str(met)
        line = next(md_line for md_line in (folder / "report.md").read_text().splitlines()
                    if md_line.startswith(f"| {r['target']} |"))
        assert line.endswith("| met |" if met else "| **missed** |") and f"{100 * margin:+.1f}" in line

    # Joint's target, from summary rows made by hand: 0.70 against Joint 0.90 misses 10 points by 10
    rows = [{"strategy": "joint", "final_average_accuracy_mean": 0.90, "stored_real_images": 60000},
            {"strategy": "drcpsd", "final_average_accuracy_mean": 0.70, "stored_real_images": 0},
            {"strategy": "er200", "final_average_accuracy_mean": 0.68, "stored_real_images": 200}]
    checks = {c["target"]: c for c in target_checks(rows, "split_fmnist")}
    assert checks["within 10 points of joint"]["margin_points"] == pytest.approx(-10.0)
    assert not checks["within 10 points of joint"]["met"]
    assert checks["above er200 (200 real images)"]["met"] and "above joint" not in " ".join(checks)
    assert target_checks(rows[:1], "split_fmnist") == [], "no targets without the method"
    # a baseline storing fewer real images than the method is no target
    rows.append({"strategy": "er0", "final_average_accuracy_mean": 0.9, "stored_real_images": 0})
    assert "above er0 (0 real images)" not in {c["target"] for c in target_checks(rows[1:], "x", method="er200")}


def _copy_run_csvs(folder, copy):
    """The CSV files of ``folder``'s runs alone, copied to ``copy`` (no summary, plot, report or grid)."""
    for path in folder.rglob("*.csv"):
        if "runs" in path.parts:
            dest = copy / path.relative_to(folder)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(path.read_bytes())
    return copy


def test_report_includes_hand_written_notes(compared, tmp_path):
    folder, _ = compared
    copy = _copy_run_csvs(folder, tmp_path / "split_mnist")
    (copy / "notes.md").write_text("The generator forgets the oldest classes.\n")
    assert report_main([str(copy)]) == 0
    report = (copy / "report.md").read_text()
    assert "## Notes (written by hand" in report and "The generator forgets the oldest classes." in report
    assert report.index("## Targets") < report.index("## Notes")


def test_report_rebuilds_from_csv_folders_alone(compared, tmp_path):
    """Delete every output and every non-CSV run file: the report command rebuilds the same summary."""
    folder, _ = compared
    before = (folder / "summary.csv").read_text()
    copy = _copy_run_csvs(folder, tmp_path / "copy")
    assert report_main([str(copy)]) == 0
    assert (copy / "summary.csv").read_text() == before
    assert (copy / "accuracy.png").read_bytes()[:8] == PNG_MAGIC


def test_compare_resumes_without_rerunning_finished_runs(compared):
    folder, argv = compared
    stamp = (folder / "runs" / "naive" / "seed1" / "logs" / "run_info.csv").stat().st_mtime_ns
    assert compare_main(argv) == 0
    assert (folder / "runs" / "naive" / "seed1" / "logs" / "run_info.csv").stat().st_mtime_ns == stamp


def test_report_errors_name_the_folder(tmp_path):
    with pytest.raises(ReportError, match="no runs/ folder"):
        build_report(str(tmp_path))
    (tmp_path / "runs" / "naive" / "seed0" / "logs").mkdir(parents=True)
    with pytest.raises(ReportError, match="no finished run"):
        build_report(str(tmp_path))
    with pytest.raises(ReportError, match="eval_results.csv"):
        load_run(str(tmp_path / "runs" / "naive" / "seed0" / "logs"))


def test_compare_rejects_unknown_strategy_and_benchmark(capsys):
    with pytest.raises(SystemExit):
        compare_main(["--strategies", "ewc"])
    assert "'ewc'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_main(["--benchmarks", "imagenet"])
    assert "imagenet" in capsys.readouterr().err


def _fake_run(folder, strategy, seed, accuracies, info):
    """A finished run's CSV folder written by hand: ``accuracies[i][j]`` is the accuracy on experience j after
    training on i (j <= i), ``info`` the rows of run_info.csv beyond strategy and seed."""
    logs = folder / "runs" / strategy / f"seed{seed}" / "logs"
    logs.mkdir(parents=True)
    with open(logs / "eval_results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["eval_exp", "training_exp", "eval_accuracy"])
        w.writerows([j, i, a] for i, row in enumerate(accuracies) for j, a in enumerate(row))
    with open(logs / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "x", "value"])
        w.writerows(["Top1_Acc_Stream/eval_phase/test_stream/Task000", i, np.mean(row)]
                    for i, row in enumerate(accuracies))
    with open(logs / "run_info.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "value"])
        w.writerows([("strategy", strategy), ("seed", seed), ("wall_time_s", 1.0)] + list(info.items()))


def test_report_plots_accuracy_against_memory_and_tolerates_old_run_info(tmp_path):
    """memory_bytes in summary.csv and report.md, accuracy_memory.png; a run_info.csv written before memory was
    measured leaves the cell empty (and the strategy off the plot); with none at all the plot is not written."""
    folder = tmp_path / "bench"
    _fake_run(folder, "naive", 0, [[0.9], [0.0, 0.95]], {"stored_real_images": 0, "memory_bytes": 0})
    _fake_run(folder, "er200", 0, [[0.9], [0.6, 0.9]], {"stored_real_images": 200, "memory_bytes": 156800,
                                                        "memory_real_images_bytes": 156800})
    _fake_run(folder, "er200", 1, [[0.9], [0.7, 0.9]], {"stored_real_images": 200, "memory_bytes": 156800})
    _fake_run(folder, "lwf", 0, [[0.9], [0.2, 0.9]], {"stored_real_images": 0})  # an old run_info.csv
    assert report_main([str(folder)]) == 0
    rows = {r["strategy"]: r for r in _read(folder / "summary.csv")}
    assert rows["naive"]["memory_bytes"] == "0" and rows["er200"]["memory_bytes"] == "156800"
    assert rows["lwf"]["memory_bytes"] == "", "no memory_bytes in run_info.csv: an empty cell"
    assert float(rows["er200"]["final_average_accuracy_mean"]) == pytest.approx(0.775)
    data = (folder / "accuracy_memory.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000
    report = (folder / "report.md").read_text()
    assert "![accuracy_memory](accuracy_memory.png)" in report and "| memory (bytes) |" in report
    assert next(line for line in report.splitlines() if line.startswith("| lwf |")).endswith("| n/a |")
    assert next(line for line in report.splitlines() if line.startswith("| er200 |")).endswith("| 156800 |")

    old = tmp_path / "old"  # every run from before: the report still builds, without the plot
    _fake_run(old, "lwf", 0, [[0.9], [0.2, 0.9]], {"stored_real_images": 0})
    assert report_main([str(old)]) == 0
    assert _read(old / "summary.csv")[0]["memory_bytes"] == ""
    assert not (old / "accuracy_memory.png").exists()
    assert not (old / "confusion.png").exists(), "no run wrote a confusion.csv"
    assert "accuracy_memory" not in (old / "report.md").read_text()

    _fake_run(old, "naive", 0, [[0.9], [0.0, 0.9]], {"memory_bytes": "lots"})
    with pytest.raises(ReportError, match="memory_bytes='lots'"):
        build_report(str(old))


def _summary(folder, rows):
    from avalanche_drcpsd.utils import atomic_write_csv

    atomic_write_csv(folder / "summary.csv", [
        {"strategy": s, "seeds": seeds, "final_average_accuracy_mean": m, "final_average_accuracy_std": sd,
         "stored_real_images": real} for s, seeds, m, sd, real in rows])


def test_index_gathers_every_benchmark_summary_into_one_table(tmp_path):
    from avalanche_drcpsd.experiments.report import comparison_rows, update_index

    _summary(tmp_path / "split_mnist", [("joint", "42 69", 0.98, 0.001, 60000), ("drcpsd", "42", 0.65, 0.0, 0),
                                        ("naive", "42 69", 0.195, 0.002, 0)])
    _summary(tmp_path / "split_fmnist", [("naive", "42", 0.19, 0.0, 0), ("er200", "42", 0.55, 0.0, 200)])
    (tmp_path / "split_mnist_cpu").mkdir()  # another script's summary (no *_mean columns) is skipped
    (tmp_path / "split_mnist_cpu" / "summary.csv").write_text("strategy,final_average_accuracy\nnaive,0.19\n")
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n\nintro\n")
    update_index(str(tmp_path))
    text = readme.read_text()
    assert text.startswith("# Results\n\nintro\n")
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| strategy | split_mnist | split_fmnist |", "the public benchmarks in their usual order"
    rows = {line.split(" | ")[0][2:]: line for line in table[2:]}
    assert list(rows) == ["joint", "drcpsd", "er200", "naive"], "ordered by best accuracy on any benchmark"
    assert "**0.650 ± 0.000 (1 seed; 0 real)**" in rows["drcpsd"], "best non-joint strategy of split_mnist in bold"
    assert "| not run | **0.550 ± 0.000 (1 seed; 200 real)** |" in rows["er200"]
    assert "0.195 ± 0.002 (2 seeds; 0 real)" in rows["naive"]
    assert len(comparison_rows(str(tmp_path))) == 5
    assert (tmp_path / "comparison.csv").read_text().splitlines()[0].startswith("benchmark,strategy,")

    _summary(tmp_path / "split_fmnist", [("naive", "42", 0.2, 0.0, 0)])  # rebuilt: the block is replaced
    update_index(str(tmp_path))
    again = readme.read_text()
    assert again.count("comparison table: begin") == 1 and "0.200 ± 0.000" in again and "0.550" not in again

    _summary(tmp_path / "split_mnist_fresh", [("drcpsd", "42", 0.7, 0.0, 0)])  # a study of one recipe change
    assert {r["benchmark"] for r in comparison_rows(str(tmp_path))} == {"split_mnist", "split_fmnist"}
    update_index(str(tmp_path), studies=True)
    header = [line for line in readme.read_text().splitlines() if line.startswith("| strategy")]
    assert header == ["| strategy | split_mnist | split_fmnist | split_mnist_fresh |"], "studies follow the benchmarks"
    with pytest.raises(SystemExit):
        report_main([str(tmp_path / "split_mnist"), "--studies"])


def test_annotated_grid_writes_finite_cells_and_picks_a_readable_colour():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from avalanche_drcpsd.experiments.report import annotated_grid

    fig, ax = plt.subplots()
    annotated_grid(ax, np.array([[0.9, np.nan], [0.001, 0.2]]), fmt=lambda v: f"{100 * v:.0f}", hide_below=0.005)
    texts = {(t.get_position(), t.get_text(), t.get_color()) for t in ax.texts}
    assert texts == {((0, 0), "90", "black"), ((1, 1), "20", "white")}, "NaN and tiny cells stay blank"
    fig2, ax2 = plt.subplots()
    annotated_grid(ax2, np.array([[-0.2, 0.05]]), vmin=-0.3, vmax=0.3, cmap="RdBu_r")
    assert [(t.get_text(), t.get_color()) for t in ax2.texts] == [("-0.20", "black"), ("0.05", "black")]
    plt.close(fig)
    plt.close(fig2)
