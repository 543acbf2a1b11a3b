"""``generator_last_experience="skip"``: the last experience's generator and CPSD phases are left out, the
classifier is the one ``train`` gives bit for bit, and a stream trained after it is refused."""

import pytest
import torch
from avalanche.training.plugins import EvaluationPlugin
from conftest import tiny_config

from avalanche_drcpsd import DRCPSD
from avalanche_drcpsd.config import ConfigError
from avalanche_drcpsd.data import MNIST_CLASSES
from avalanche_drcpsd.models import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")


def _strategy(**overrides):
    torch.manual_seed(0)
    model = SmallCNN(width=8, feature_dim=16)
    return DRCPSD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                  criterion=torch.nn.CrossEntropyLoss(), config=tiny_config(replay_draw="once", **overrides),
                  class_names=list(MNIST_CLASSES), train_mb_size=16, train_epochs=1, eval_mb_size=64,
                  evaluator=EvaluationPlugin(loggers=[]), device="cpu", verbose=False)


def test_skip_leaves_out_the_last_generator_phase_and_keeps_the_classifier(mnist_small):
    stream = mnist_small.train_stream[:3]
    runs = {}
    for mode in ("train", "skip"):
        strategy = _strategy(generator_last_experience=mode)
        strategy.train(stream)
        runs[mode] = strategy
    trained, skipped = runs["train"], runs["skip"]
    assert trained.generator_plugin.learned_classes == [0, 1, 2, 3, 4, 5]
    assert skipped.generator_plugin.learned_classes == [0, 1, 2, 3]
    assert skipped.generator_plugin.unlearned == [4, 5]
    assert trained.generator_plugin.unlearned == []
    assert (2, "generator") in trained.timer.seconds and (2, "generator") not in skipped.timer.seconds
    assert (2, "replay") in skipped.timer.seconds, "the last experience's replay still runs"
    for (name, a), b in zip(trained.model.state_dict().items(), skipped.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match=r"classes \[4, 5\].*generator_last_experience='train'"):
        skipped.train(mnist_small.train_stream[3])


def test_skip_only_at_the_last_experience_of_the_stream_being_trained(mnist_small):
    strategy = _strategy(generator_last_experience="skip")
    for experience in mnist_small.train_stream[:2]:  # one at a time: the origin stream is the 2-experience slice
        strategy.train(experience)
    assert strategy.generator_plugin.learned_classes == [0, 1]
    assert strategy.generator_plugin.unlearned == [2, 3]


def test_skip_is_refused_where_the_last_replay_needs_its_own_classes():
    with pytest.raises(ConfigError, match="generator_last_experience='skip' with replay_classes='seen'"):
        tiny_config(generator_last_experience="skip", replay_classes="seen").validate()
    with pytest.raises(ConfigError, match=r"generator_last_experience='never'.*\['train', 'skip'\]"):
        tiny_config(generator_last_experience="never").validate()
