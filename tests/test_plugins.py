"""The plugins act in the right phase, and each works on its own with stock Avalanche strategies."""

import copy
import math
import warnings

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import Naive, Replay
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from conftest import sgd_step_rates, tiny_config
from torch import nn

from avalanche_drcpsd import CPSDGeneratorPlugin, DistillPlugin, DreamReplayPlugin, MMDPlugin
from avalanche_drcpsd.input_space import InputSpace
from avalanche_drcpsd.plugins.dream_replay import align_head_norms, rehearsal_batches
from avalanche_drcpsd.utils import dataset_tensors

MARK = 0.123  # every pixel of a fake synthetic image


class MLP(nn.Module):
    """No BatchNorm, so weights alone define the function (the student-average test relies on it)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x))


class BNNet(nn.Module):
    """An MLP with one BatchNorm: its running statistics show which batches went through it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x))


class FakeSource:
    """A synthetic source whose images are constant MARK; it logs when it is asked."""

    def __init__(self, log):
        self.log = log
        self.learned_classes = []

    def sample_replay(self, classes, n_per_class):
        self.log.append(("sample_replay", tuple(classes)))
        y = torch.tensor(classes).repeat_interleave(n_per_class)
        return torch.full((len(y), 1, 28, 28), MARK), y

    def sample(self, classes, n_per_class, seed=0):
        return self.sample_replay(classes, n_per_class)


class PhaseProbe(SupervisedPlugin):
    """Logs training iterations and fails if a synthetic image reaches a training minibatch."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def before_forward(self, strategy, **kwargs):
        is_syn = (strategy.mb_x == MARK).flatten(1).all(1)
        assert not is_syn.any(), "a synthetic image reached the classifier during the real-data phase"
        self.log.append(("train_iteration", strategy.experience.current_experience))

    def after_training_exp(self, strategy, **kwargs):
        self.log.append(("after_training_exp", strategy.experience.current_experience))


def _naive(model, plugins, epochs=1):
    ev = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), criterion=nn.CrossEntropyLoss(),
                 train_mb_size=16, train_epochs=epochs, eval_mb_size=64, plugins=plugins, evaluator=ev)


def test_dream_replay_with_naive_replays_only_after_real_training(mnist_small):
    log = []
    source = FakeSource(log)
    replay = DreamReplayPlugin(source, n_replay_per_class=8, batch_real=16, batch_syn=8, verbose=False)
    # the probe is registered first, so its after_training_exp entry precedes replay's work in the log
    strategy = _naive(MLP(), [PhaseProbe(log), replay])
    strategy.train(mnist_small.train_stream[0])
    assert not any(e[0] == "sample_replay" for e in log), "no replay may happen in the first experience"
    assert replay.replayed_batches == 0
    strategy.train(mnist_small.train_stream[1])
    samples = [i for i, e in enumerate(log) if e[0] == "sample_replay"]
    last_iteration = max(i for i, e in enumerate(log) if e == ("train_iteration", 1))
    assert len(samples) == 1 and log[samples[0]][1] == (0, 1), "old classes 0 and 1 are replayed once"
    assert samples[0] > last_iteration, "synthetic data was requested before the real training ended"
    steps = -(-len(mnist_small.train_stream[1].dataset) // 16)
    assert replay.replayed_batches == steps, "one replay epoch = as many paired batches as real batches"


def test_replay_classes_seen_draws_old_and_current_classes(mnist_small):
    log = []
    replay = DreamReplayPlugin(FakeSource(log), n_replay_per_class=4, batch_real=16, batch_syn=8,
                               replay_classes="seen", verbose=False)
    strategy = _naive(MLP(), [replay])
    strategy.train(mnist_small.train_stream[0])
    strategy.train(mnist_small.train_stream[1])
    assert log == [("sample_replay", (0, 1, 2, 3))]
    with pytest.raises(ValueError, match="replay_classes='all'"):
        DreamReplayPlugin(FakeSource([]), replay_classes="all")


class PixelReader(nn.Module):
    """A 'teacher' whose prediction is the class written in the first pixel (class / 10)."""

    def forward(self, x):
        return nn.functional.one_hot((x[:, 0, 0, 0] * 10).round().long(), 10).float()


def test_teacher_filter_drops_misassigned_images_and_keeps_a_class_none_of_whose_pass():
    replay = DreamReplayPlugin(FakeSource([]), replay_filter="teacher", verbose=False)
    replay.distill.old_teacher = PixelReader()
    replay.distill.new_teacher = PixelReader()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    predicted = torch.tensor([0, 1, 1, 1, 2, 0, 0, 0])
    x = (predicted.float() / 10).view(-1, 1, 1, 1).expand(-1, 1, 28, 28)
    xf, yf, kept = replay.filter_by_teachers(x, y, old_classes=[0, 1], device="cpu")
    assert yf.tolist() == [0, 1, 1, 2, 3, 3], "image 1 (a 0 read as 1) and image 5 (a 2 read as 0) are dropped"
    assert kept == pytest.approx(6 / 8)
    with pytest.raises(ValueError, match="replay_filter='old'"):
        DreamReplayPlugin(FakeSource([]), replay_filter="old")


def test_teacher_filter_runs_in_replay_and_reports_the_kept_share(mnist_small):
    replay = DreamReplayPlugin(FakeSource([]), n_replay_per_class=4, batch_real=16, batch_syn=8,
                               replay_filter="teacher", verbose=False)
    strategy = _naive(MLP(), [replay])
    strategy.train(mnist_small.train_stream[0])
    strategy.train(mnist_small.train_stream[1])
    assert 0 < replay.stats[1]["filter_kept"] <= 1


def _initial_student(mnist_small, **replay_kwargs):
    """Two experiences of a Naive strategy with dream replay: (model, replay plugin, {"student": the replay
    student's state as replay began in experience 1})."""
    model = MLP()
    replay = DreamReplayPlugin(FakeSource([]), n_replay_per_class=4, batch_real=16, batch_syn=4, verbose=False,
                               **replay_kwargs)
    strategy = _naive(model, [replay])
    strategy.train(mnist_small.train_stream[0])
    captured = {}
    original = replay._make_optimizer

    def spy(strat):
        captured["student"] = copy.deepcopy(strat.model.state_dict())
        return original(strat)

    replay._make_optimizer = spy
    strategy.train(mnist_small.train_stream[1])
    return model, replay, captured


def test_student_starts_as_average_of_teachers(mnist_small):
    model, replay, captured = _initial_student(mnist_small)
    old = replay.distill.old_teacher.state_dict()
    new = replay.distill.new_teacher.state_dict()
    for k, v in captured["student"].items():
        torch.testing.assert_close(v, 0.5 * (old[k] + new[k]))
    # the teachers differ, so the average is a real mix, and replay then moved the student
    assert any(not torch.equal(old[k], new[k]) for k in old)
    assert any(not torch.equal(captured["student"][k], model.state_dict()[k]) for k in old)


def test_ema_student_init_uses_alpha(mnist_small):
    replay = DreamReplayPlugin(FakeSource([]), n_replay_per_class=4, student_init="ema", ema_alpha=0.1, verbose=False)
    assert replay.config.alpha == pytest.approx(0.1)
    with pytest.raises(ValueError, match="student_init='bogus'"):
        DreamReplayPlugin(FakeSource([]), student_init="bogus")


def test_fresh_student_is_a_seeded_new_initialisation(mnist_small):
    """student_init='fresh': the replay student starts from reset_parameters under seed + experience, not from
    either teacher, and the global random stream is left as it was."""
    _, replay, captured = _initial_student(mnist_small, student_init="fresh", seed=7)
    torch.manual_seed(7 + 1)
    expected = MLP().state_dict()  # the same modules reset in the same order
    for k, v in captured["student"].items():
        torch.testing.assert_close(v, expected[k])
    new = replay.distill.new_teacher.state_dict()
    assert all(not torch.equal(captured["student"][k], new[k]) for k in new)
    # the fork: calling it again leaves the global state unchanged
    state = torch.random.get_rng_state()
    again = DreamReplayPlugin.fresh_student(replay.distill.new_teacher, 8)
    assert torch.equal(torch.random.get_rng_state(), state)
    for k, v in again.items():
        torch.testing.assert_close(v, expected[k])


def test_fresh_student_refuses_parameters_it_cannot_reset():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.head(x) * self.scale

    with pytest.raises(ValueError, match="scale"):
        DreamReplayPlugin.fresh_student(Scaled(), 0)


def test_distill_plugin_with_replay_adds_feature_loss(mnist_small):
    losses = {}

    class LossProbe(SupervisedPlugin):
        def before_backward(self, strategy, **kwargs):
            losses.setdefault(strategy.experience.current_experience, []).append(float(strategy.loss.detach()))

    def run(alpha):
        torch.manual_seed(0)
        losses.clear()
        model = MLP()
        ev = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
        distill = DistillPlugin(alpha=alpha)
        strategy = Replay(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                          criterion=nn.CrossEntropyLoss(), mem_size=20, train_mb_size=16, train_epochs=1,
                          plugins=[distill, LossProbe()], evaluator=ev)
        for exp in mnist_small.train_stream[:2]:
            strategy.train(exp)
        return distill, dict(losses)

    distill, with_kd = run(alpha=10.0)
    _, without = run(alpha=0.0)
    assert distill.old_teacher is not None
    assert with_kd[0] == pytest.approx(without[0]), "no teacher, no distillation in the first experience"
    # At the first minibatch of experience 1 the student *is* the old teacher: the term and its gradient are 0,
    # so both runs take the same first step. At the second minibatch they differ only by the term, now > 0.
    assert with_kd[1][0] == pytest.approx(without[1][0])
    assert with_kd[1][1] > without[1][1] + 1e-6


def test_mmd_plugin_publishes_per_class_gap(mnist_small):
    x_test, y_test = dataset_tensors(mnist_small.test_stream[0].dataset)

    class RealishSource:
        learned_classes = [0, 1]
        input_space = InputSpace.unit(1)  # the real images are pixels already

        def replayed_samples(self, classes, n_per_class, seed=0):
            (c,) = classes
            if c == 0:  # class 0: the real images themselves -> gap ~ 0
                x = x_test[y_test == 0][:n_per_class]
            else:  # class 1: noise -> large gap
                x = torch.rand(n_per_class, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
            return x, torch.full((len(x),), c)

    model = MLP()
    mmd = MMDPlugin(RealishSource(), samples_per_class=10)
    strategy = _naive(model, [mmd])
    results = strategy.eval(mnist_small.test_stream[:1])
    names = sorted(k for k in results if k.startswith("RealSynMMD"))
    assert names == ["RealSynMMD/eval_phase/test_stream/Class000", "RealSynMMD/eval_phase/test_stream/Class001"]
    gap0, gap1 = results[names[0]], results[names[1]]
    assert gap0 == pytest.approx(0.0, abs=1e-5)
    assert gap1 > 0.1


def test_mmd_plugin_measures_samples_it_is_given(mnist_small):
    """``use_samples``: the gap of the next evaluation is measured on the given images (the first
    ``samples_per_class`` of each class); a class given too few is sampled from the source."""
    x_test, y_test = dataset_tensors(mnist_small.test_stream[0].dataset)
    asked = []

    class NoiseSource:
        learned_classes = [0, 1]
        input_space = InputSpace.unit(1)

        def replayed_samples(self, classes, n_per_class, seed=0):
            asked.extend(classes)
            return torch.rand(n_per_class, 1, 28, 28), torch.full((n_per_class,), classes[0])

    mmd = MMDPlugin(NoiseSource(), samples_per_class=10)
    strategy = _naive(MLP(), [mmd])
    given = torch.cat([x_test[y_test == 0][:12], torch.rand(3, 1, 28, 28)])
    mmd.use_samples(given, torch.tensor([0] * 12 + [1] * 3), trained=0)
    results = strategy.eval(mnist_small.test_stream[:1])
    assert results["RealSynMMD/eval_phase/test_stream/Class000"] == pytest.approx(0.0, abs=1e-5)
    assert results["RealSynMMD/eval_phase/test_stream/Class001"] > 0.1
    assert asked == [1], "class 1 was given 3 images, fewer than samples_per_class: the plugin drew its own"
    with pytest.raises(ValueError, match="15 images but 2 labels"):
        mmd.use_samples(given, torch.tensor([0, 1]), trained=0)


def test_generator_plugin_with_naive_learns_buffer_and_samples(mnist_small):
    gen = CPSDGeneratorPlugin(tiny_config(), class_names=mnist_small.class_names, verbose=False)
    strategy = _naive(MLP(), [gen])
    strategy.train(mnist_small.train_stream[0])
    assert gen.learned_classes == [0, 1]
    assert gen.replay_record is None, "nothing to replay in the first experience"
    strategy.train(mnist_small.train_stream[1])
    assert gen.learned_classes == [0, 1, 2, 3]
    # the replay set of experience 1 was generated before training, for the old classes only
    assert gen.replay_record[0] == (0, 1) and gen.replay_record[2].shape == (16, 1, 28, 28)
    for phase in ("generation", "generator", "cpsd"):
        assert gen.timer.seconds[(1, phase)] > 0
    x, y = gen.sample([3], 5, seed=7)
    x2, _ = gen.sample([3], 5, seed=7)
    assert x.shape == (5, 1, 28, 28) and torch.equal(x, x2), "sampling is reproducible under a seed"
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert gen.buffer.prompts[3] == "a photo of a three"


def test_frozen_generator_is_not_trained(mnist_small):
    cfg = tiny_config()
    gen = CPSDGeneratorPlugin(cfg, verbose=False)
    strategy = _naive(MLP(), [gen])
    strategy.train(mnist_small.train_stream[0])
    before = copy.deepcopy(gen.generator.state_dict())
    gen.trainable = False  # what a frozen pretrained backend does
    strategy.train(mnist_small.train_stream[1])
    after = gen.generator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert gen.learned_classes == [0, 1, 2, 3], "CPSD embeddings are still learned for the new classes"


def test_replay_publishes_loss_terms_and_clips_gradients(mnist_small):
    replay = DreamReplayPlugin(FakeSource([]), n_replay_per_class=8, batch_real=16, batch_syn=8, grad_clip=1e-3,
                               verbose=False)
    strategy = _naive(MLP(), [replay])
    for exp in mnist_small.train_stream[:2]:
        strategy.train(exp)
    stats = replay.stats[1]
    assert set(stats) == {f"{k}_{a}" for k in ("isolation", "distill", "grad_norm") for a in ("mean", "max")}
    assert stats["isolation_mean"] > 0 and stats["grad_norm_max"] > 1e-3, "norms are recorded before clipping"
    with pytest.raises(ValueError, match="grad_clip=0"):
        DreamReplayPlugin(FakeSource([]), grad_clip=0)


@pytest.mark.parametrize("optimizer", ["fresh", "continue"])
def test_cosine_replay_schedule_anneals_the_rate_and_restores_the_strategy_optimizer(mnist_small, monkeypatch,
                                                                                   optimizer):
    """lr_schedule="cosine": every replay step runs at the cosine of its step (from the replay rate to 0); the
    strategy optimiser's own rate is what it was before the phase, also when replay continued it."""
    replay = DreamReplayPlugin(FakeSource([]), n_replay_per_class=8, batch_real=16, batch_syn=8, lr_schedule="cosine",
                               optimizer=optimizer, verbose=False)
    strategy = _naive(MLP(), [replay])
    strategy.train(mnist_small.train_stream[0])
    rates = sgd_step_rates(monkeypatch)
    strategy.train(mnist_small.train_stream[1])
    steps = replay.replayed_batches
    replay_rates = rates[-steps:]  # the classifier phase's steps come first, at the strategy's constant 0.05
    expected = [0.05 * 0.5 * (1 + math.cos(math.pi * i / steps)) for i in range(steps)]
    assert replay_rates == pytest.approx(expected, abs=1e-9)
    assert rates[0] == 0.05 and strategy.optimizer.param_groups[0]["lr"] == 0.05


def test_replay_logit_distillation_is_off_by_default_and_keeps_old_teacher_outputs(mnist_small):
    """kd_weight > 0 adds the old teacher's old-class logit distillation: it is traced, and the student ends
    closer to the old teacher's old-class predictions than the same replay without it."""
    from avalanche_drcpsd.losses import logit_distillation_loss

    exps = mnist_small.train_stream[:2]
    results = {}
    for weight in (0.0, 5.0):
        torch.manual_seed(0)
        replay = DreamReplayPlugin(FakeSource([]), n_replay_per_class=8, batch_real=16, batch_syn=8,
                                   kd_weight=weight, verbose=False)
        strategy = _naive(MLP(), [replay])
        for exp in exps:
            strategy.train(exp)
        x, _ = dataset_tensors(exps[1].dataset.eval())
        with torch.no_grad():
            gap = logit_distillation_loss(strategy.model(x[:64]), replay.distill.old_teacher(x[:64]),
                                          sorted(exps[0].classes_in_this_experience))
        results[weight] = (replay.stats[1], gap.item())
    assert "logit_kd_mean" not in results[0.0][0]
    assert results[5.0][0]["logit_kd_mean"] > 0
    assert results[5.0][1] < results[0.0][1]
    with pytest.raises(ValueError, match="kd_weight=-1"):
        DreamReplayPlugin(FakeSource([]), kd_weight=-1)


def test_balanced_kappa_schedule_weighs_new_classes_by_their_share(mnist_small):
    replay = DreamReplayPlugin(FakeSource([]), n_replay_per_class=8, batch_real=16, batch_syn=8, kappa=1.0,
                               kappa_schedule="balanced", verbose=False)
    strategy = _naive(MLP(), [replay])
    for exp in mnist_small.train_stream[:3]:
        strategy.train(exp)
    sizes = [len(e.classes_in_this_experience) for e in mnist_small.train_stream[:3]]
    assert replay.effective_kappa[1] == pytest.approx(sizes[1] / sizes[0])
    assert replay.effective_kappa[2] == pytest.approx(sizes[2] / (sizes[0] + sizes[1]))
    constant = DreamReplayPlugin(FakeSource([]), n_replay_per_class=8, batch_real=16, batch_syn=8, kappa=0.05,
                                 verbose=False)
    strategy = _naive(MLP(), [constant])
    for exp in mnist_small.train_stream[:2]:
        strategy.train(exp)
    assert constant.effective_kappa == {1: 0.05}
    with pytest.raises(ValueError, match="kappa_schedule='linear'"):
        DreamReplayPlugin(FakeSource([]), kappa_schedule="linear")


def test_replay_min_steps_adds_epochs_and_few_steps_warn(mnist_small):
    """With ``min_steps`` the phase runs whole extra epochs until it has made that many optimiser steps; a phase
    of fewer than FEW_REPLAY_STEPS steps warns, naming the count and the options that raise it."""
    from avalanche_drcpsd.plugins.dream_replay import FEW_REPLAY_STEPS, replay_epochs_for

    assert replay_epochs_for(13, 1) == 1
    assert replay_epochs_for(13, 1, 100) == 8  # ceil(100 / 13)
    assert replay_epochs_for(13, 10, 100) == 10  # never fewer than asked
    assert replay_epochs_for(200, 1, 100) == 1
    with pytest.raises(ValueError, match="steps_per_epoch=0"):
        replay_epochs_for(0, 1)

    steps = -(-len(mnist_small.train_stream[1].dataset) // 16)  # paired batches per epoch (the real side is longer)
    assert steps < FEW_REPLAY_STEPS
    few = DreamReplayPlugin(FakeSource([]), n_replay_per_class=8, batch_real=16, batch_syn=8, verbose=False)
    strategy = _naive(MLP(), [few])
    strategy.train(mnist_small.train_stream[0])
    with pytest.warns(UserWarning, match=rf"only {steps} optimiser steps \(1 epoch\(s\) of {steps} paired batches\)"
                                         r".*replay_min_steps"):
        strategy.train(mnist_small.train_stream[1])
    assert few.epochs_used == {1: 1} and few.replayed_batches == steps

    enough = DreamReplayPlugin(FakeSource([]), n_replay_per_class=8, batch_real=16, batch_syn=8,
                               min_steps=FEW_REPLAY_STEPS, verbose=False)
    strategy = _naive(MLP(), [enough])
    strategy.train(mnist_small.train_stream[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*optimiser steps.*")
        strategy.train(mnist_small.train_stream[1])
    epochs = -(-FEW_REPLAY_STEPS // steps)
    assert enough.epochs_used == {1: epochs} and enough.replayed_batches == epochs * steps >= FEW_REPLAY_STEPS
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match=f"min_steps={bad!r}"):
            DreamReplayPlugin(FakeSource([]), min_steps=bad)


def test_each_plugin_owns_its_run_state(mnist_small):
    """state_dict() holds exactly the declared run state (copies), load_state_dict() restores it, and a missing or
    unknown entry is refused by name."""
    replay = DreamReplayPlugin(FakeSource([]), n_replay_per_class=4, batch_real=16, batch_syn=4, verbose=False)
    strategy = _naive(MLP(), [replay])
    strategy.train(mnist_small.train_stream[0])
    strategy.train(mnist_small.train_stream[1])
    state = replay.state_dict()
    assert set(state) == set(DreamReplayPlugin.state_attributes)
    assert state["seen_classes"] == replay.seen_classes and state["seen_classes"] is not replay.seen_classes
    assert replay.state_dict(copy_values=False)["seen_classes"] is replay.seen_classes  # the live objects
    assert 1 in state["stats"] and state["replayed_batches"] > 0
    fresh = DreamReplayPlugin(FakeSource([]), n_replay_per_class=4, verbose=False)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    with pytest.raises(KeyError, match=r"missing \['stats'\].*unexpected \['extra'\]"):
        fresh.load_state_dict({**{k: v for k, v in state.items() if k != "stats"}, "extra": 1})
    for plugin in (CPSDGeneratorPlugin(tiny_config(), verbose=False), DistillPlugin(), MMDPlugin(FakeSource([]))):
        assert set(plugin.state_dict()) == set(type(plugin).state_attributes)


class MinibatchProbe(SupervisedPlugin):
    """Logs, per training iteration, the experience, the batch size and the synthetic images' labels."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def before_forward(self, strategy, **kwargs):
        is_syn = (strategy.mb_x == MARK).flatten(1).all(1)
        assert len(strategy.mb_y) == len(strategy.mb_x) == len(strategy.mbatch[-1])
        self.log.append((strategy.experience.current_experience, len(strategy.mb_x),
                         sorted(set(strategy.mb_y[is_syn].tolist())), int(is_syn.sum())))


def test_rehearsal_appends_old_class_images_to_each_classifier_minibatch(mnist_small):
    log = []
    replay = DreamReplayPlugin(FakeSource([]), n_replay_per_class=8, batch_real=16, batch_syn=8, rehearsal_batch=5,
                               verbose=False)
    probe = MinibatchProbe(log)
    strategy = _naive(MLP(), [replay, probe])  # the probe after the plugin: it sees the joined minibatch
    strategy.train(mnist_small.train_stream[0])
    assert log and all(n_syn == 0 for exp, _, _, n_syn in log), "experience 0 has no old class to rehearse"
    log.clear()
    strategy.train(mnist_small.train_stream[1])
    assert log and all(exp == 1 and n_syn == 5 and set(labels) <= {0, 1} for exp, _, labels, n_syn in log)
    assert set().union(*(labels for _, _, labels, _ in log)) == {0, 1}
    assert replay.replayed_batches > 0, "dream replay still follows the classifier phase"
    assert replay._rehearsal is None, "the rehearsal stream ends with the experience"


def test_rehearsal_batches_show_each_image_once_per_pass_and_follow_their_seed():
    x = torch.arange(10).float().view(10, 1)
    y = torch.arange(10)

    def labels(seed):
        stream = rehearsal_batches(x, y, 4, seed=seed)
        batches = [next(stream) for _ in range(5)]
        assert all(len(b[1]) == 4 and torch.equal(b[0].view(-1).long(), b[1]) for b in batches)
        return torch.cat([b[1] for b in batches])

    seen = labels(3)
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:20].tolist()) == list(range(10))
    assert torch.equal(seen, labels(3)) and not torch.equal(seen, labels(4))
    with pytest.raises(ValueError, match="empty"):
        next(rehearsal_batches(x[:0], y[:0], 4, seed=0))


def test_weight_aligning_scales_the_new_classes_logits_to_the_old_norms():
    torch.manual_seed(0)
    head = nn.Linear(6, 5)
    with torch.no_grad():
        head.weight[2:4] *= 3.0  # the new classes' rows: three times longer
    h = torch.randn(7, 6)
    before = head(h)
    gamma = align_head_norms(head, [0, 1], [2, 3])
    norms = head.weight.detach().norm(dim=1)
    assert float(norms[2:4].mean()) == pytest.approx(float(norms[:2].mean()), rel=1e-5)
    assert gamma < 1.0
    after = head(h)
    assert torch.allclose(after[:, 2:4], gamma * before[:, 2:4], atol=1e-6)
    assert torch.equal(after[:, [0, 1, 4]], before[:, [0, 1, 4]]), "old and unseen classes untouched"
    assert align_head_norms(head, [], [2, 3]) == 1.0
    with pytest.raises(ValueError, match="nn.Linear head, got Conv2d"):
        align_head_norms(nn.Conv2d(1, 1, 1), [0], [1])


def test_replay_head_align_runs_after_each_replay_phase(mnist_small):
    replay = DreamReplayPlugin(FakeSource([]), n_replay_per_class=8, batch_real=16, batch_syn=8,
                               head_align="weight_norm", verbose=False)
    model = MLP()
    strategy = _naive(model, [replay])
    strategy.train(mnist_small.train_stream[0])
    strategy.train(mnist_small.train_stream[1])
    norms = model.head.weight.detach().norm(dim=1)
    assert float(norms[2:4].mean()) == pytest.approx(float(norms[:2].mean()), rel=1e-5)
    assert replay.stats[1]["head_gamma"] > 0
    assert "head_gamma" not in DreamReplayPlugin(FakeSource([]), verbose=False).stats


class LossProbe(SupervisedPlugin):
    """Registered after the replay plugin: the loss beyond the minibatch's own CE, at every iteration."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def before_backward(self, strategy, **kwargs):
        assert not (strategy.mb_x == MARK).flatten(1).all(1).any(), "a rehearsed image joined the minibatch"
        ce = nn.functional.cross_entropy(strategy.mb_output, strategy.mb_y)
        self.log.append((strategy.experience.current_experience, float(strategy.loss - ce)))


def _rehearse_two_experiences(mnist_small, probe, **settings):
    """A naive strategy with a replay plugin rehearsing 5 fake images per minibatch (``settings`` on top) and
    ``probe(replay, log)`` registered after it, trained on experiences 0 and 1: ``(log of 0, log of 1)``."""
    log = []
    replay = DreamReplayPlugin(FakeSource([]), n_replay_per_class=8, batch_real=16, batch_syn=8, rehearsal_batch=5,
                               verbose=False, **settings)
    strategy = _naive(MLP(), [replay, probe(replay, log)])
    strategy.train(mnist_small.train_stream[0])
    first = list(log)
    log.clear()
    strategy.train(mnist_small.train_stream[1])
    assert replay._pending is None
    return first, log


def test_rehearsal_towards_the_teacher_distils_it_outside_the_minibatch(mnist_small):
    first, log = _rehearse_two_experiences(mnist_small, lambda replay, log: LossProbe(log), rehearsal_target="teacher")
    assert first and all(extra == pytest.approx(0.0, abs=1e-6) for _, extra in first), "nothing to rehearse at first"
    extras = [extra for _, extra in log]
    assert len(extras) > 1 and extras[0] == pytest.approx(0.0, abs=1e-6), "the model starts as the old teacher"
    assert all(extra > 0 for extra in extras[1:]), "the old teacher's KD on the rehearsed images is added"


class JoinedKDProbe(SupervisedPlugin):
    """Registered after the replay plugin: the rehearsed images in the minibatch, and the loss beyond the
    minibatch's CE against the old teacher's KD on the minibatch's outputs for them."""

    def __init__(self, replay, log):
        super().__init__()
        self.replay, self.log = replay, log

    def before_backward(self, strategy, **kwargs):
        from avalanche_drcpsd.losses import logit_distillation_loss

        is_syn = (strategy.mb_x == MARK).flatten(1).all(1)
        ce = nn.functional.cross_entropy(strategy.mb_output, strategy.mb_y)
        kd = 0.0
        if is_syn.any():
            with torch.no_grad():
                z_old = self.replay.distill.old_teacher(strategy.mb_x[is_syn])
            kd = float(logit_distillation_loss(strategy.mb_output[is_syn], z_old, sorted(self.replay.seen_classes),
                                               self.replay.config.kd_temperature))
        self.log.append((int(is_syn.sum()), sorted(set(strategy.mb_y[is_syn].tolist())), float(strategy.loss - ce),
                         kd))


class SeenKDProbe(SupervisedPlugin):
    """Registered after the replay plugin: the rehearsal's added loss against the old teacher's KD over the old
    classes and over every seen class, recomputed on the same images."""

    def __init__(self, replay, log):
        super().__init__()
        self.replay, self.log = replay, log

    def before_training_iteration(self, strategy, **kwargs):
        self.xs = self.replay._pending  # the rehearsed images the replay plugin just set aside

    def before_backward(self, strategy, **kwargs):
        from avalanche_drcpsd.losses import logit_distillation_loss

        ce = nn.functional.cross_entropy(strategy.mb_output, strategy.mb_y)
        if self.xs is None:
            return
        with torch.no_grad():
            z_old, z = self.replay.distill.old_teacher(self.xs), strategy.model(self.xs)
        t = self.replay.config.kd_temperature
        self.log.append((float(strategy.loss - ce), float(logit_distillation_loss(z, z_old, [0, 1], t)),
                         float(logit_distillation_loss(z, z_old, [0, 1, 2, 3], t))))


def test_rehearsal_towards_the_teacher_over_every_seen_class(mnist_small):
    first, log = _rehearse_two_experiences(mnist_small, SeenKDProbe, rehearsal_target="teacher_seen")
    assert not first, "nothing to rehearse at first"
    assert len(log) > 1 and log[0][0] == pytest.approx(0.0, abs=1e-6)
    for extra, kd_old, kd_seen in log[1:]:
        assert extra == pytest.approx(kd_seen, rel=1e-4, abs=1e-6), "distilled over classes 0-3"
        assert kd_seen != pytest.approx(kd_old, rel=1e-3), "not over the old classes alone"


def test_rehearsal_kd_weight_scales_the_teachers_distillation(mnist_small):
    """Two runs alike but for ``rehearsal_kd_weight``: the first iteration after the first that distils (identical
    models until then) adds exactly that weight times the distillation."""
    extras = {}
    for weight in (1.0, 3.0):
        torch.manual_seed(0)
        _, log = _rehearse_two_experiences(mnist_small, lambda replay, log: LossProbe(log), rehearsal_target="teacher",
                                           rehearsal_kd_weight=weight, seed=0)
        extras[weight] = [extra for _, extra in log]
    assert extras[1.0][0] == extras[3.0][0] == pytest.approx(0.0, abs=1e-6)
    assert extras[1.0][1] > 0
    assert extras[3.0][1] == pytest.approx(3.0 * extras[1.0][1], rel=1e-5)


def test_rehearsal_towards_labels_and_teacher_joins_the_minibatch_and_distils_its_outputs(mnist_small):
    first, log = _rehearse_two_experiences(mnist_small, JoinedKDProbe, rehearsal_target="label_teacher")
    assert first and all(n == 0 and extra == pytest.approx(0.0, abs=1e-6) for n, _, extra, _ in first)
    assert len(log) > 1 and all(n == 5 and set(classes) <= {0, 1} for n, classes, _, _ in log), \
        "five old-class images joined every minibatch with their labels"
    assert log[0][2] == pytest.approx(0.0, abs=1e-6), "the model starts as the old teacher"
    for _, _, extra, kd in log[1:]:
        assert extra > 0 and extra == pytest.approx(kd, rel=1e-5, abs=1e-7), \
            "the added loss is the old teacher's KD on the minibatch's outputs for the rehearsed images"


def test_split_bn_normalises_each_half_apart_and_keeps_the_real_halfs_running_statistics():
    """bn="split": the synthetic half's logits are the student's on that half alone (its own batch statistics),
    not those of one joint pass, and the running statistics end as a pass of the real half alone leaves them."""
    torch.manual_seed(0)
    xs, xr = torch.rand(8, 1, 28, 28) * 0.2, torch.rand(16, 1, 28, 28)  # unlike statistics
    outputs = {}
    for bn in ("joint", "split"):
        model = BNNet().train()
        replay = DreamReplayPlugin(FakeSource([]), bn=bn, verbose=False)
        replay.distill.set_new_teacher(model)  # gives the feature layer
        alone, real_only = copy.deepcopy(model), copy.deepcopy(model)
        logits, h = replay.student_forward(model, xs, xr)
        assert logits.shape == (24, 10) and h.shape == (24, 16)
        outputs[bn] = logits
        with torch.no_grad():
            real_only(xr)
        if bn == "split":
            torch.testing.assert_close(logits[:8], alone(xs))
            torch.testing.assert_close(logits[8:], alone(xr))
            torch.testing.assert_close(model.body[2].running_mean, real_only.body[2].running_mean)
            torch.testing.assert_close(model.body[2].running_var, real_only.body[2].running_var)
        else:
            torch.testing.assert_close(logits, alone(torch.cat([xs, xr])))
            assert not torch.allclose(model.body[2].running_mean, real_only.body[2].running_mean)
    assert not torch.allclose(outputs["joint"][:8], outputs["split"][:8])
    with pytest.raises(ValueError, match="bn='mixed'"):
        DreamReplayPlugin(FakeSource([]), bn="mixed")


def test_split_bn_replay_runs_and_the_flat_field_is_validated(mnist_small):
    from avalanche_drcpsd.config import ConfigError, DRCPSDConfig, ReplayConfig

    replay = DreamReplayPlugin.from_config(FakeSource([]), DRCPSDConfig(replay_bn="split", n_replay_per_class=8,
                                                                        replay_batch_syn=8, replay_batch_real=16),
                                           verbose=False)
    assert replay.config.bn == "split" and ReplayConfig().bn == "joint"
    strategy = _naive(BNNet(), [replay])
    for exp in mnist_small.train_stream[:2]:
        strategy.train(exp)
    assert replay.replayed_batches > 0 and replay.stats[1]["isolation_mean"] > 0
    with pytest.raises(ConfigError, match="replay_bn='both'"):
        DRCPSDConfig(replay_bn="both")


def test_every_rehearsal_target_joins_the_minibatch_or_is_distilled():
    from avalanche_drcpsd.config import CHOICES
    from avalanche_drcpsd.plugins.dream_replay import _REHEARSAL_DISTILS, _REHEARSAL_JOINS

    assert set(CHOICES["rehearsal_target"]) == _REHEARSAL_JOINS | _REHEARSAL_DISTILS
