"""Avalanche's own benchmarks, models, loggers and plugins with DRCPSD and each plugin, unchanged (issue 15).

Avalanche's classic builders read MNIST's ``.gz`` files without downloading but extract them beside the archives;
the shared data folder is read-only in CI, so they get a temporary copy."""

import csv
import shutil

import pytest
import torch
from avalanche.benchmarks.classic import SplitMNIST
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.logging import CSVLogger, TextLogger
from avalanche.models import IncrementalClassifier, MTSimpleMLP, SimpleCNN, SimpleMLP, SlimResNet18
from avalanche.training import Naive, Replay
from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin
from conftest import TEST_THREADS, tiny_config
from torch import nn

from avalanche_drcpsd import DRCPSD, CPSDGeneratorPlugin, DistillPlugin, DreamReplayPlugin, MMDPlugin
from avalanche_drcpsd.models import SmallCNN
from avalanche_drcpsd.plugins import DRCPSDPlugin
from avalanche_drcpsd.utils import PHASES, experience_classes

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = 0.1307, 0.3081


@pytest.fixture(scope="module")
def avalanche_root(data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("avalanche_data")
    shutil.copytree(data_root / "MNIST", root / "MNIST")
    return root


def _split_mnist(root, **kwargs):
    return SplitMNIST(n_experiences=5, seed=0, fixed_class_order=list(range(10)), dataset_root=str(root), **kwargs)


def _slice(dataset, n, seed):
    """``n`` random items of an experience's data set (sorted by class, so its first n would hold one class)."""
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return dataset.subset(sorted(idx.tolist()))


def _small_stream(benchmark, n_exp=2, n_train=300, n_test=200):
    """A stream made with Avalanche's generic ``benchmark_from_datasets`` (no classes timeline) over slices."""
    return benchmark_from_datasets(
        train=[_slice(benchmark.train_stream[k].dataset, n_train, k) for k in range(n_exp)],
        test=[_slice(benchmark.test_stream[k].dataset, n_test, 100 + k) for k in range(n_exp)])


@pytest.fixture(scope="module")
def normalised(avalanche_root):
    """Avalanche's SplitMNIST with its default transforms (ToTensor + Normalize(0.1307, 0.3081))."""
    return _split_mnist(avalanche_root)


@pytest.fixture(scope="module")
def pixels(avalanche_root):
    """The same benchmark with the images left in [0, 1]."""
    return _split_mnist(avalanche_root, train_transform=None, eval_transform=None)  # its images are tensors


def _common(model, loggers=(), **extra):
    metrics = [accuracy_metrics(experience=True, stream=True), loss_metrics(epoch=True)]
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=1, eval_mb_size=256,
                evaluator=EvaluationPlugin(*metrics, loggers=list(loggers)), device="cpu", **extra)


def test_streams_without_a_classes_timeline_give_their_classes_from_the_targets(normalised):
    stream = _small_stream(normalised, n_train=40, n_test=10)
    exp = stream.train_stream[1]
    assert not hasattr(exp, "classes_in_this_experience")
    assert experience_classes(exp) == [2, 3]
    assert experience_classes(normalised.train_stream[1]) == [2, 3]


def _old_class_accuracy(strategy, stream):
    results = strategy.eval(stream.test_stream)
    return results["Top1_Acc_Exp/eval_phase/test_stream/Exp000"]  # benchmark_from_datasets: no task in names


def _behaviour_run(benchmark, name):
    stream = _small_stream(benchmark)
    torch.manual_seed(0)
    model = SmallCNN(width=16, feature_dim=64)
    common = _common(model)
    common["train_epochs"] = 2
    if name == "naive":
        strategy = Naive(**common)
    else:
        # the end-to-end test's budget (tests/test_end_to_end.py); the last experience needs no generator
        cfg = tiny_config(unet_block_out_channels=(32, 64, 64), generator_steps=250, generator_batch_size=32,
                          n_replay_per_class=200, sampling_steps=8, guidance_scale=3.0, replay_batch_real=32,
                          replay_batch_syn=32, cpsd_batch_size=32, cpsd_max_images_per_class=32,
                          gap_samples_per_class=0, kappa=1.0, kappa_schedule="balanced", replay_kd_weight=3.0,
                          replay_lr=0.01, replay_epochs=10, generator_last_experience="skip")
        strategy = DRCPSD(config=cfg, verbose=False, **common)
    strategy.train(stream.train_stream)  # the whole stream in one call
    return strategy, _old_class_accuracy(strategy, stream)


def test_drcpsd_on_avalanche_normalised_split_mnist_keeps_old_classes(normalised, pixels):
    """Avalanche's SplitMNIST with its default Normalize, on a stream made with ``benchmark_from_datasets``:
    DR-CPSD keeps clearly more of the first experience's classes than Naive, and about as much as the same
    seeded run on [0, 1] images (before issue 15 it kept 0.087 against 0.643)."""
    # the slow test of this file: every core it owns (the fixture restores one thread after)
    torch.set_num_threads(TEST_THREADS)
    drcpsd, acc_norm = _behaviour_run(normalised, "drcpsd")
    _, acc_pixels = _behaviour_run(pixels, "drcpsd")
    _, acc_naive = _behaviour_run(normalised, "naive")
    print(f"old-class accuracy: DR-CPSD normalised {acc_norm:.3f}, [0, 1] {acc_pixels:.3f}; Naive {acc_naive:.3f}")
    space = drcpsd.generator_plugin.input_space
    assert "Normalize" in space.source and space.low == pytest.approx((-MEAN / STD,), abs=1e-5)
    assert acc_norm >= acc_naive + 0.3
    assert abs(acc_norm - acc_pixels) <= 0.1


@pytest.mark.parametrize("name", ["simple_mlp", "simple_cnn_3ch", "slim_resnet18", "incremental", "mt_simple_mlp"])
def test_avalanche_models_run_every_drcpsd_phase(name, mnist_small):
    """Each Avalanche model through two experiences of DRCPSD (tiny budgets): replay runs, the student has the
    model's architecture, and a head that grew (``IncrementalClassifier``) is averaged at its grown size."""
    from avalanche_drcpsd.data import MNIST_CLASSES

    three = name in ("simple_cnn_3ch", "slim_resnet18")
    models = {
        "simple_mlp": lambda: SimpleMLP(num_classes=10, hidden_size=64, hidden_layers=2),
        "simple_cnn_3ch": lambda: SimpleCNN(num_classes=10),
        "slim_resnet18": lambda: SlimResNet18(nclasses=10, nf=4),
        "incremental": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(),
                                             IncrementalClassifier(32, initial_out_features=2)),
        "mt_simple_mlp": lambda: MTSimpleMLP(hidden_size=32),
    }
    torch.manual_seed(0)
    model = models[name]()
    benchmark = _rgb_benchmark(mnist_small) if three else mnist_small
    strategy = DRCPSD(config=tiny_config(), class_names=list(MNIST_CLASSES), verbose=False, **_common(model))
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience)
    assert strategy.replay_plugin.replayed_batches > 0, "the replay phase ran"
    assert type(strategy.model) is type(model)
    x = torch.rand(5, 3, 32, 32) if three else torch.rand(5, 1, 28, 28)
    logits = strategy.model(x, 0) if name == "mt_simple_mlp" else strategy.model(x)
    assert logits.shape[1] >= 4 and torch.isfinite(logits).all()
    if name == "incremental":
        assert strategy.model[-1].classifier.out_features == 4, "the head grew to the 4 classes seen"
    if three:
        assert strategy.generator_plugin.generator.spec.image_shape == (3, 32, 32)


def _rgb_benchmark(benchmark):
    """The first two experiences of ``benchmark`` with its images repeated to 3 channels and padded to 32x32
    (what SimpleCNN and SlimResNet18 take)."""
    import dataclasses

    from avalanche_drcpsd.data import make_tensor_benchmark
    from avalanche_drcpsd.utils import dataset_tensors

    def tensors(stream):
        xs, ys = zip(*(dataset_tensors(e.dataset) for e in stream[:2]))
        return torch.nn.functional.pad(torch.cat(xs).repeat(1, 3, 1, 1), (2, 2, 2, 2)), torch.cat(ys)

    spec = dataclasses.replace(benchmark.spec, image_shape=(3, 32, 32), class_names=benchmark.spec.class_names[:4],
                               n_experiences=2, classes_per_exp=(2, 2), class_order=())
    return make_tensor_benchmark(spec, tensors(benchmark.train_stream), tensors(benchmark.test_stream))


def test_loggers_eval_streams_and_lr_scheduler_work_with_drcpsd(mnist_small, tmp_path):
    """TextLogger, CSVLogger (and TensorBoard when installed), ``eval_streams`` during training and
    ``LRSchedulerPlugin`` with ``strategy.train(stream)`` on a whole stream."""
    from avalanche_drcpsd.data import MNIST_CLASSES

    text_file = open(tmp_path / "log.txt", "w")
    loggers = [TextLogger(text_file), CSVLogger(str(tmp_path / "csv"))]
    try:
        from avalanche.logging import TensorboardLogger

        loggers.append(TensorboardLogger(str(tmp_path / "tb")))
    except ImportError:
        pass
    model = SmallCNN(width=8, feature_dim=16)
    common = _common(model, loggers)
    scheduler = torch.optim.lr_scheduler.StepLR(common["optimizer"], step_size=1, gamma=0.5)
    strategy = DRCPSD(config=tiny_config(), class_names=list(MNIST_CLASSES), verbose=False,
                      plugins=[LRSchedulerPlugin(scheduler)], eval_every=1, **common)
    strategy.train(mnist_small.train_stream[:2], eval_streams=[mnist_small.test_stream[:2]])
    # LRSchedulerPlugin resets the rate at each experience (its default), then steps once per epoch
    assert scheduler.get_last_lr() == [0.05 * 0.5]
    strategy.eval(mnist_small.test_stream[:2])  # hands the loggers what the last experience published
    loggers[1].close()  # CSVLogger
    if len(loggers) > 2:
        loggers[2].writer.close()  # TensorboardLogger: its SummaryWriter
        assert any((tmp_path / "tb").rglob("events.out.tfevents.*")), "TensorBoard wrote its event file"
    text_file.close()
    text = (tmp_path / "log.txt").read_text()
    assert "Top1_Acc_Exp" in text and "PhaseTime/replay/Exp001" in text
    with open(tmp_path / "csv" / "eval_results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["eval_exp"] for r in rows} >= {"0", "1"}
    assert strategy.replay_plugin.replayed_batches > 0


@pytest.mark.parametrize("template", ["naive", "replay"])
def test_each_plugin_works_on_avalanche_templates(template, normalised):
    """CPSDGeneratorPlugin, DreamReplayPlugin, DistillPlugin and MMDPlugin on Naive and Replay, on Avalanche's
    normalised SplitMNIST (a stream without a classes timeline)."""
    stream = _small_stream(normalised, n_train=48, n_test=16)
    cfg = tiny_config()
    gen = CPSDGeneratorPlugin(cfg, verbose=False)
    distill = DistillPlugin(during_training=False)
    replay = DreamReplayPlugin.from_config(gen, cfg, distill=distill, verbose=False)
    mmd = MMDPlugin(gen, samples_per_class=4)
    model = SmallCNN(width=8, feature_dim=16)
    common = _common(model, plugins=[gen, distill, replay, mmd])
    strategy = Naive(**common) if template == "naive" else Replay(mem_size=20, **common)
    strategy.train(stream.train_stream)
    results = strategy.eval(stream.test_stream)
    assert gen.learned_classes == [0, 1, 2, 3]
    assert "Normalize" in gen.input_space.source
    assert replay.replayed_batches > 0
    assert any(k.startswith("RealSynMMD") for k in results)


def test_class_ids_need_not_start_at_zero(mnist_small):
    """A stream of classes {2, 3} then {6, 7} (``benchmark_from_datasets``: no classes timeline)."""
    from avalanche_drcpsd.data import MNIST_CLASSES

    stream = benchmark_from_datasets(train=[mnist_small.train_stream[k].dataset for k in (1, 3)],
                                     test=[mnist_small.test_stream[k].dataset for k in (1, 3)])
    model = SmallCNN(width=8, feature_dim=16)
    strategy = DRCPSD(config=tiny_config(replay_draw="once"), class_names=list(MNIST_CLASSES), verbose=False,
                      **_common(model))
    strategy.train(stream.train_stream)
    assert strategy.generator_plugin.learned_classes == [2, 3, 6, 7]
    assert sorted(strategy.generator_plugin.kept) == [2, 3]
    assert strategy.replay_plugin.seen_classes == {2, 3, 6, 7}
    assert strategy.replay_plugin.replayed_batches > 0


def test_a_multi_head_model_on_several_tasks_is_refused():
    from avalanche_drcpsd.features import check_single_task

    class Experience:
        current_experience = 1
        task_labels = [1]

    with pytest.raises(ValueError, match=r"experience 1 has task labels \[1\].*MTSimpleMLP.*single-head model"):
        check_single_task(MTSimpleMLP(hidden_size=8), Experience())
    check_single_task(SimpleMLP(hidden_size=8), Experience())  # a single head ignores task labels
    Experience.task_labels = [0]
    check_single_task(MTSimpleMLP(hidden_size=8), Experience())


def test_remapped_class_ids_of_avalanche_split_mnist(avalanche_root):
    """``class_ids_from_zero_from_first_exp=True`` with a seeded class order: the ids are remapped so the first
    experience holds 0 and 1, and DRCPSD learns them as any other ids."""
    from avalanche_drcpsd.data import MNIST_CLASSES

    benchmark = SplitMNIST(n_experiences=5, seed=3, class_ids_from_zero_from_first_exp=True,
                           dataset_root=str(avalanche_root))
    assert benchmark.train_stream[0].classes_in_this_experience == [0, 1]
    stream = _small_stream(benchmark, n_train=48, n_test=16)
    model = SmallCNN(width=8, feature_dim=16)
    strategy = DRCPSD(config=tiny_config(), class_names=list(MNIST_CLASSES), verbose=False, **_common(model))
    strategy.train(stream.train_stream)
    assert strategy.generator_plugin.learned_classes == [0, 1, 2, 3]
    assert "Normalize" in strategy.generator_plugin.input_space.source


def test_ids_from_zero_in_each_experience_draw_a_warning(avalanche_root):
    """``class_ids_from_zero_in_each_exp=True`` reuses ids 0 and 1 in every experience: the generator would learn
    nothing new, and the user is told why."""
    from avalanche_drcpsd.data import MNIST_CLASSES

    benchmark = SplitMNIST(n_experiences=5, seed=0, class_ids_from_zero_in_each_exp=True,
                           dataset_root=str(avalanche_root))
    stream = _small_stream(benchmark, n_train=32, n_test=8)
    model = SmallCNN(width=8, feature_dim=16)
    strategy = DRCPSD(config=tiny_config(), class_names=list(MNIST_CLASSES), verbose=False, **_common(model))
    strategy.train(stream.train_stream[0])
    with pytest.warns(UserWarning, match=r"experience 1 holds only classes the generator has learned already "
                                         r"\(\[0, 1\]\).*class_ids_from_zero_in_each_exp"):
        strategy.train(stream.train_stream[1])


class _PhaseRecorder(DRCPSDPlugin):
    """Records the phases DRCPSD announces, as ``(experience, event)``."""

    def __init__(self):
        super().__init__()
        self.events = []
        for phase in PHASES:
            for when in ("before", "after"):
                setattr(self, f"{when}_{phase}", self._recorder(f"{when}_{phase}"))

    def _recorder(self, event):
        def record(strategy, experience, **kwargs):
            assert strategy.experience.current_experience == experience
            self.events.append((experience, event))
        return record


def test_drcpsd_announces_every_phase_to_its_plugins_before_and_after_it(normalised):
    """A plugin hears ``before_<phase>`` / ``after_<phase>`` of every phase in the order they run: the first
    experience has no replay set to draw nor old class to replay; ``cpsd_order`` puts CPSD before the generator."""
    stream = _small_stream(normalised, n_train=48, n_test=16)
    model = SmallCNN(width=8, feature_dim=16)
    recorder = _PhaseRecorder()
    strategy = DRCPSD(config=tiny_config(cpsd_order="before_generator", gap_samples_per_class=0),
                      class_names=[str(k) for k in range(10)], verbose=False, plugins=[recorder], **_common(model))
    for experience in stream.train_stream:
        strategy.train(experience)
    pairs = lambda exp, *phases: [(exp, f"{w}_{p}") for p in phases for w in ("before", "after")]  # noqa: E731
    assert recorder.events == (pairs(0, "classifier", "cpsd", "generator")
                               + pairs(1, "generation", "classifier", "cpsd", "generator", "replay"))
    assert {p for (_, p) in strategy.timer.seconds} == set(PHASES)


def test_train_from_refuses_an_unknown_phase_and_needs_the_new_classes_of_a_learning_phase(normalised):
    stream = _small_stream(normalised, n_train=16, n_test=8)
    model = SmallCNN(width=8, feature_dim=16)
    strategy = DRCPSD(config=tiny_config(), class_names=[str(k) for k in range(10)], verbose=False,
                      **_common(model))
    with pytest.raises(ValueError, match=r"phase='eval': expected one of \('generation'"):
        strategy.train_from(stream.train_stream[0], "eval")
    with pytest.raises(ValueError, match=r"phase='cpsd'\) needs new_classes"):
        strategy.train_from(stream.train_stream[0], "cpsd")


def test_the_plugin_interface_has_a_before_and_after_callback_for_every_phase():
    callbacks = {name for name in vars(DRCPSDPlugin) if name.startswith(("before_", "after_"))}
    assert callbacks == {f"{w}_{p}" for p in PHASES for w in ("before", "after")}
    assert DRCPSD.PLUGIN_CLASS is DRCPSDPlugin
