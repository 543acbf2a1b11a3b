"""Few-shot class-incremental benchmarks (issue 18): the builder, the presets, the options the few-shot case needs,
and the report's per-session accuracy on base and novel classes."""

import csv
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import tiny_config

from avalanche_drcpsd.data import DataError, MissingDataError, benchmark_options, fscil_benchmark, make_benchmark
from avalanche_drcpsd.experiments.report import RunLogs, build_report, session_rows


def _toy(n_classes=6, per_class=12, test_per_class=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = torch.rand(len(y), 1, 8, 8, generator=g)
    yt = torch.arange(n_classes).repeat_interleave(test_per_class)
    xt = torch.rand(len(yt), 1, 8, 8, generator=g)
    return (x, y), (xt, yt)


def _train_rows(benchmark):
    """(experience, label, image bytes) of every training image, to compare selections."""
    out = []
    for e in benchmark.train_stream:
        for x, y, *_ in e.dataset:
            out.append((e.current_experience, int(y), x.numpy().tobytes()))
    return out


def test_sessions_hold_k_shot_images_per_new_class_and_classes_never_repeat():
    train, test = _toy()
    b = fscil_benchmark(train, test=test, base_classes=2, n_way=2, k_shot=3, sessions=2, seed=5)
    assert b.spec.k_shot == 3 and b.spec.base_classes == 2 and b.spec.n_experiences == 3
    seen = []
    for e in b.train_stream:
        labels = torch.as_tensor(e.dataset.targets)
        classes = sorted(set(labels.tolist()))
        assert not set(classes) & set(seen)  # a class arrives in one session only
        seen += classes
        counts = torch.bincount(labels, minlength=6)[classes].tolist()
        assert counts == ([12, 12] if e.current_experience == 0 else [3, 3])  # base: every image; then K each
    assert sorted(seen) == list(range(6))
    for e, tr in zip(b.test_stream, b.train_stream):  # test experience e: every test image of session e's classes
        labels = torch.as_tensor(e.dataset.targets)
        assert sorted(set(labels.tolist())) == sorted(tr.classes_in_this_experience)
        assert len(labels) == 4 * len(tr.classes_in_this_experience)


def test_the_shots_are_seeded():
    train, test = _toy()
    kw = dict(test=test, base_classes=2, n_way=2, k_shot=3, sessions=2)
    a = _train_rows(fscil_benchmark(train, seed=5, **kw))
    assert a == _train_rows(fscil_benchmark(train, seed=5, **kw))
    assert a != _train_rows(fscil_benchmark(train, seed=6, **kw))
    # a class's shots depend on the seed and the class only, not on what else the sessions hold
    shots = {r[2] for r in a if r[1] == 4}
    other = fscil_benchmark(train, seed=5, test=test, base_classes=2, n_way=1, k_shot=3, sessions=3)
    assert shots == {r[2] for r in _train_rows(other) if r[1] == 4}


def test_unused_classes_are_dropped_and_the_rest_relabelled_in_their_order():
    train, test = _toy()
    names = [f"c{i}" for i in range(6)]
    b = fscil_benchmark(train, test=test, class_names=names, base_classes=1, n_way=1, k_shot=2, sessions=2,
                        class_order=[5, 1, 3, 0, 2, 4])
    assert b.class_names == ["c1", "c3", "c5"]  # the used classes in their original order
    assert [e.classes_in_this_experience for e in b.train_stream] == [[2], [0], [1]]  # 5, 1, 3 arrive in turn
    assert b.spec.num_classes == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(base_classes=4, n_way=2, k_shot=3, sessions=2), "8 classes; the data set has 6"),
    (dict(base_classes=2, n_way=2, k_shot=13, sessions=2), "k_shot=13 needs more"),
    (dict(base_classes=0, n_way=2, k_shot=3, sessions=2), "base_classes=0"),
    (dict(base_classes=2, n_way=2, k_shot=3, sessions=2, class_order=[0, 1, 2]), "class_order"),
    (dict(base_classes=2, n_way=2, k_shot="5", sessions=2), "k_shot='5' must be an int"),
])
def test_bad_fscil_arguments_are_named(kwargs, message):
    train, test = _toy()
    with pytest.raises(DataError, match=message):
        fscil_benchmark(train, test=test, **kwargs)


def test_in_memory_data_needs_a_test_split():
    train, _ = _toy()
    with pytest.raises(DataError, match="needs test="):
        fscil_benchmark(train, base_classes=2, n_way=2, k_shot=3, sessions=2)


def test_make_benchmark_refuses_split_options_for_fscil(tmp_path):
    with pytest.raises(DataError, match=r"takes no option \['n_experiences'\]"):
        make_benchmark("fscil_cifar10", tmp_path, n_experiences=5)
    assert "k_shot" in benchmark_options("fscil_gtsrb") and "k_shot" not in benchmark_options("split_gtsrb")


def test_experiment_config_checks_the_benchmark_args_of_its_benchmark():
    from avalanche_drcpsd.config import ConfigError
    from avalanche_drcpsd.experiments.run import ExperimentConfig

    with pytest.raises(ConfigError, match="unknown key.*'n_experiences'.*fscil_gtsrb"):
        ExperimentConfig(benchmark="fscil_gtsrb", benchmark_args={"n_experiences": 5})
    with pytest.raises(ConfigError, match="later_epochs=0"):
        ExperimentConfig(benchmark="fscil_gtsrb", later_epochs=0)
    ExperimentConfig(benchmark="fscil_gtsrb", benchmark_args={"k_shot": 1, "sessions": 0}, later_epochs=5)


def test_cifar100_is_read_from_torchvisions_layout_and_named_when_absent(tmp_path):
    with pytest.raises(MissingDataError, match="cifar-100-python/train"):
        make_benchmark("fscil_cifar100", tmp_path)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, per in (("train", 6), ("test", 2)):
        labels = np.repeat(np.arange(100), per)
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        with open(folder / split, "wb") as fh:
            pickle.dump({"data": data, "fine_labels": labels.tolist()}, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, fh)
    b = make_benchmark("fscil_cifar100", tmp_path, seed=1)  # the standard split: 60 base, 8 sessions 5-way 5-shot
    assert [len(e.dataset) for e in b.train_stream] == [360] + [25] * 8
    assert [len(e.dataset) for e in b.test_stream] == [120] + [10] * 8
    assert b.class_names[61] == "class61" and b.spec.image_shape == (3, 32, 32)


def test_fscil_gtsrb_preset_on_the_data(data_root):
    b = make_benchmark("fscil_gtsrb", data_root, seed=0, base_per_class=20, test_per_class=3)
    assert [len(e.dataset) for e in b.train_stream] == [23 * 20] + [25] * 4
    assert [len(e.classes_in_this_experience) for e in b.test_stream] == [23, 5, 5, 5, 5]
    assert b.class_names[14] == "stop"


def test_cpsd_min_steps_counts_the_projection_training_in_steps():
    from avalanche_drcpsd.cpsd import cpsd_steps

    assert cpsd_steps(5, 1, 64) == 1 and cpsd_steps(5, 1, 64, min_steps=7) == 7 and cpsd_steps(300, 2, 64, 3) == 10


def test_cpsd_phase_runs_at_least_cpsd_min_steps(mnist_small, one_thread, monkeypatch):
    import avalanche_drcpsd.plugins.generator as module
    from avalanche_drcpsd.plugins import CPSDGeneratorPlugin

    plugin = CPSDGeneratorPlugin(tiny_config(cpsd_min_steps=5, cpsd_max_images_per_class=4, cpsd_batch_size=8),
                                 class_names=mnist_small.class_names, verbose=False)
    real, calls = module.train_cpsd_projection, []

    def counting(*args, progress=None, **kwargs):
        steps = []
        out = real(*args, progress=steps.append, **kwargs)
        calls.append(len(steps))
        return out

    monkeypatch.setattr(module, "train_cpsd_projection", counting)
    exp = mnist_small.train_stream[0]
    x = torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))])
    plugin.learn_classes(x, torch.as_tensor(exp.dataset.targets))
    assert calls == [5, 5]  # 4 images at batch 8 are one step per epoch; 5 steps for each of the 2 classes


def test_session_accuracy_pools_seen_base_and_novel_classes():
    matrix = np.array([[0.9, 0.0, 0.0], [0.8, 0.5, 0.0], [0.7, 0.4, 0.6]])
    run = RunLogs("naive", 0, matrix, [0.0] * 3, info={"k_shot": "5", "test_sizes": "100 20 30"})
    acc = run.session_accuracy()
    assert acc["all"][1] == pytest.approx((0.8 * 100 + 0.5 * 20) / 120)
    assert acc["novel"][2] == pytest.approx((0.4 * 20 + 0.6 * 30) / 50)
    assert acc["base"].tolist() == [0.9, 0.8, 0.7] and np.isnan(acc["novel"][0])
    assert not RunLogs("naive", 0, matrix, [], info={"k_shot": ""}).is_fscil
    once = np.full((3, 3), np.nan)
    once[0] = [0.9, 0.2, 0.4]  # Joint: one evaluation (logged as training experience 0), after every session
    joint = RunLogs("joint", 0, once, [], info={"k_shot": "5", "test_sizes": "100 20 30"}).session_accuracy()
    assert np.isnan(joint["all"][:2]).all() and joint["base"][2] == 0.9
    assert joint["novel"][2] == pytest.approx((0.2 * 20 + 0.4 * 30) / 50)
    bad = RunLogs("naive", 0, matrix, [], info={"k_shot": "5", "test_sizes": "100 20"})
    with pytest.raises(ValueError, match="test_sizes='100 20'"):
        bad.session_accuracy()


def test_tiny_fscil_run_end_to_end(data_root, tmp_path, one_thread):
    """DR-CPSD and Naive on a slice of fscil_cifar10 (2 base classes, 2 sessions of 1-way 5-shot), then the report
    with the per-session accuracy on base and novel classes."""
    from avalanche_drcpsd.experiments.run import ExperimentConfig, run_experiment

    drcpsd = tiny_config(cpsd_min_steps=3, replay_min_steps=4, n_replay_per_class=8,
                         prompt_template="a photo of a {}").to_dict()
    base = dict(benchmark="fscil_cifar10", data_root=str(data_root), train_epochs=1, later_epochs=3, threads=1,
                benchmark_args={"base_classes": 2, "sessions": 2, "base_per_class": 16, "test_per_class": 8},
                drcpsd=drcpsd)
    for strategy in ("drcpsd", "naive"):
        exp = ExperimentConfig.from_dict({**base, "strategy": strategy})
        summary = run_experiment(exp, tmp_path / "runs" / strategy / "seed0", verbose=False, checkpoint=False)
        assert len(summary["history"]) == 3
    rows = build_report(str(tmp_path))
    assert {r["strategy"] for r in rows} == {"drcpsd", "naive"}
    with open(os.path.join(tmp_path, "sessions.csv"), newline="") as fh:
        sessions = list(csv.DictReader(fh))
    assert [(r["strategy"], r["session"]) for r in sessions] == [(s, str(i)) for s in ("drcpsd", "naive")
                                                                 for i in range(3)]
    assert sessions[0]["novel_mean"] == "nan" and 0.0 <= float(sessions[2]["novel_mean"]) <= 1.0
    assert os.path.isfile(os.path.join(tmp_path, "sessions.png"))
    assert "## Few-shot sessions" in open(os.path.join(tmp_path, "report.md")).read()
    assert session_rows({"naive": []}) == []
