"""Memory in one unit: the bytes a strategy keeps from one experience to the next (``baselines.memory_bytes``),
by hand on built strategies and measured on a tiny real ER run's ``run_info.csv``."""

import csv

import pytest
import torch
from avalanche.training.plugins import EvaluationPlugin
from conftest import tiny_config

from avalanche_drcpsd import DRCPSD
from avalanche_drcpsd.data import MNIST_CLASSES
from avalanche_drcpsd.experiments import baselines
from avalanche_drcpsd.experiments.baselines import MEMORY_PARTS, make_baseline, memory_bytes, memory_info
from avalanche_drcpsd.experiments.run import RUN_INFO, ExperimentConfig, run_experiment
from avalanche_drcpsd.models import SmallCNN
from avalanche_drcpsd.utils import frozen_copy

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 28, 28)
PIXELS = 28 * 28


def _common(model=None):
    model = model or SmallCNN(width=8, feature_dim=16)
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                criterion=torch.nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1, eval_mb_size=64,
                evaluator=EvaluationPlugin(loggers=[]), device="cpu")


def _module_bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _parts_add_up(parts):
    assert set(parts) == set(MEMORY_PARTS) | {"total"}
    assert parts["total"] == sum(parts[k] for k in MEMORY_PARTS)
    assert all(isinstance(v, int) and v >= 0 for v in parts.values())


def test_tiny_er_run_keeps_the_bytes_of_its_stored_images(tmp_path):
    """ER200 on 2 experiences of 120 images: its buffer holds 100 + 100 images, 200 x 784 bytes at uint8."""
    exp = ExperimentConfig(strategy="er200", benchmark_args={"n_experiences": 2, "train_per_class": 60,
                                                             "test_per_class": 5},
                           train_epochs=1, train_mb_size=32, threads=1)
    summary = run_experiment(exp, tmp_path / "er", verbose=False)
    with open(tmp_path / "er" / "logs" / RUN_INFO, newline="") as fh:
        info = {r["key"]: r["value"] for r in csv.DictReader(fh)}
    assert int(info["memory_bytes"]) == 200 * PIXELS == summary["memory_bytes"]
    assert int(info["memory_real_images_bytes"]) == 200 * PIXELS
    for part in ("generator", "embeddings", "synthetic", "teacher"):
        assert int(info[f"memory_{part}_bytes"]) == 0, part
    assert int(info["stored_real_images"]) * PIXELS == int(info["memory_bytes"])


def test_drcpsd_breakdown_sums_to_its_total_and_counts_kept_sets():
    model = SmallCNN(width=8, feature_dim=16)
    strategy = DRCPSD(config=tiny_config(), class_names=list(MNIST_CLASSES), verbose=False, **_common(model))
    assert memory_bytes(strategy, "drcpsd", SHAPE)["generator"] == 0, "built with the first experience"
    strategy.generator_plugin.build_generator(SHAPE)  # as the first experience does
    before = memory_bytes(strategy, "drcpsd", SHAPE)
    _parts_add_up(before)
    assert before["real_images"] == 0 and before["synthetic"] == 0 and before["teacher"] == 0
    assert before["generator"] == _module_bytes(strategy.generator) > 0
    null = strategy.buffer.null
    assert before["embeddings"] == null.numel() * 4, "the null embedding alone (float32)"

    for c in (0, 1):
        strategy.buffer.add(c, torch.randn_like(null), f"a photo of a {MNIST_CLASSES[c]}")
    strategy.generator_plugin.kept = {0: torch.zeros(5, *SHAPE, dtype=torch.uint8),
                                      1: torch.zeros(3, *SHAPE, dtype=torch.uint8)}
    strategy.distill_plugin.old_teacher = frozen_copy(model)
    after = memory_bytes(strategy, "drcpsd", SHAPE, n_train_images=1000)
    _parts_add_up(after)
    assert after["synthetic"] == 8 * PIXELS
    assert after["embeddings"] == 3 * null.numel() * 4
    assert after["teacher"] == _module_bytes(model)
    assert after["real_images"] == 0, "DR-CPSD stores no real image whatever the training set"
    assert after["total"] == after["generator"] + 3 * null.numel() * 4 + 8 * PIXELS + _module_bytes(model)

    # replay_pixel_match="class_histogram": each learned class's real pixel histogram counts with the kept sets
    strategy.generator_plugin.pixel_histograms = {0: torch.zeros(SHAPE[0], 256, dtype=torch.long)}
    assert memory_bytes(strategy, "drcpsd", SHAPE)["synthetic"] == 8 * PIXELS + SHAPE[0] * 256 * 8
    # "class_mean_histogram": and its real mean image, float32
    strategy.generator_plugin.pixel_means = {0: torch.zeros(SHAPE)}
    assert memory_bytes(strategy, "drcpsd", SHAPE)["synthetic"] == 8 * PIXELS + SHAPE[0] * 256 * 8 + PIXELS * 4
    del strategy.generator_plugin.pixel_histograms, strategy.generator_plugin.pixel_means
    del strategy.generator_plugin.kept  # a plugin from before kept sets existed: none counted
    assert memory_bytes(strategy, "drcpsd", SHAPE)["synthetic"] == 0


def test_baselines_memory_by_hand():
    class Spec:
        image_shape = SHAPE

    naive = memory_bytes(make_baseline("naive", _common(), Spec), "naive", SHAPE, n_train_images=1000)
    assert naive["total"] == 0
    joint = memory_bytes(make_baseline("joint", _common(), Spec), "joint", SHAPE, n_train_images=1000)
    assert joint["total"] == joint["real_images"] == 1000 * PIXELS, "Joint keeps the whole training set"

    lwf = make_baseline("lwf", _common(), Spec)
    assert memory_bytes(lwf, "lwf", SHAPE)["total"] == 0, "no previous model before the first experience ends"
    plugin = next(p for p in lwf.plugins if hasattr(p, "lwf"))
    plugin.lwf.prev_model = frozen_copy(lwf.model)
    parts = memory_bytes(lwf, "lwf", SHAPE)
    assert parts["teacher"] == parts["total"] == _module_bytes(lwf.model) > 0

    genreplay = make_baseline("genreplay", _common(), Spec)
    parts = memory_bytes(genreplay, "genreplay", SHAPE, n_train_images=1000)
    assert parts["generator"] == parts["total"] == _module_bytes(genreplay.generator_strategy.model) > 0

    info = memory_info(parts)
    assert list(info) == ["memory_bytes"] + [f"memory_{k}_bytes" for k in MEMORY_PARTS]
    assert info["memory_bytes"] == parts["total"]


def test_bad_image_shape_is_refused():
    with pytest.raises(ValueError, match=r"image_shape=\(28, 28\)"):
        baselines.memory_bytes(object(), "naive", (28, 28))
