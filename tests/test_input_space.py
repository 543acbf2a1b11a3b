"""The classifier's input space (issue 15): normalised images are learned, not assumed, and replayed images lie
where the real ones do."""

import pytest
import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from conftest import tiny_config

from avalanche_drcpsd import CPSDGeneratorPlugin, DRCPSDConfig
from avalanche_drcpsd.config import ConfigError
from avalanche_drcpsd.data import MNIST_CLASSES, DataError
from avalanche_drcpsd.input_space import InputSpace, find_normalize
from avalanche_drcpsd.models import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = 0.1307, 0.3081  # Avalanche's SplitMNIST default Normalize
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def test_normalize_space_maps_pixels_both_ways():
    space = InputSpace.from_normalize([MEAN], [STD], channels=1)
    assert space.low == pytest.approx((-MEAN / STD,)) and space.high == pytest.approx(((1 - MEAN) / STD,))
    u = torch.rand(4, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    x = space.from_unit(u)
    assert torch.allclose(x, (u - MEAN) / STD, atol=1e-6)
    assert torch.allclose(space.to_unit(x), u, atol=1e-6)
    assert not space.is_unit
    unit = InputSpace.unit(1)
    assert unit.is_unit and unit.to_unit(u) is u and unit.from_unit(u) is u


def test_three_channel_space_is_per_channel():
    space = InputSpace.from_normalize(CIFAR_MEAN, CIFAR_STD, channels=3)
    u = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    expected = (u - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    assert torch.allclose(space.from_unit(u), expected, atol=1e-6)
    assert InputSpace.from_normalize([0.5], [0.5], 3).low == (-1.0, -1.0, -1.0), "one value serves every channel"
    with pytest.raises(ValueError, match="2 values for images of 3 channel"):
        InputSpace.from_normalize([0.5, 0.5], [0.5, 0.5], 3)


def _pixels(n=64, channels=1, seed=0):
    u = torch.rand(n, channels, 6, 6, generator=torch.Generator().manual_seed(seed))
    u[0, :, 0, 0], u[0, :, 0, 1] = 0.0, 1.0  # black and white pixels, as natural images hold
    return u


def test_resolve_takes_the_config_then_the_transforms_then_the_data():
    u = _pixels()
    x = (u - MEAN) / STD
    data = torch.utils.data.TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    learned = InputSpace.resolve(DRCPSDConfig(), data, x)
    assert learned.low == pytest.approx((-MEAN / STD,), abs=1e-6)
    assert learned.high == pytest.approx(((1 - MEAN) / STD,), abs=1e-6)
    assert "min/max" in learned.source
    assert InputSpace.resolve(DRCPSDConfig(), data, u).is_unit, "images in [0, 1] are pixels"
    given = InputSpace.resolve(DRCPSDConfig(input_range=(-1, 1)), data, x)
    assert given.low == (-1.0,) and given.high == (1.0,) and "input_range" in given.source
    normalised = InputSpace.resolve(DRCPSDConfig(input_mean=[MEAN], input_std=[STD]), data, x)
    assert normalised.low == pytest.approx((-MEAN / STD,))
    flat = torch.full((4, 1, 3, 3), 2.0)
    with pytest.raises(DataError, match="constant in a channel"):
        InputSpace.resolve(DRCPSDConfig(), torch.utils.data.TensorDataset(flat), flat)


def test_check_names_the_range_seen_and_the_settings():
    space = InputSpace.unit(1)
    with pytest.raises(DataError, match=r"experience 3: channel 0 holds values in \[-0\.5, 2\.5\], outside the input "
                                        r"range \[0, 1\].*input_range=\(low, high\).*input_mean/input_std"):
        space.check(torch.tensor([-0.5, 2.5]).view(2, 1, 1, 1), "experience 3")
    with pytest.raises(DataError, match="has 1 channel"):
        space.check(torch.zeros(2, 3, 4, 4), "experience 0")
    space.check(torch.full((1, 1, 2, 2), 1.0 + 1e-4), "rounding")  # within the tolerance


@pytest.mark.parametrize("values, match", [
    (dict(input_range=(1.0, 0.0)), r"input_range=\(1\.0, 0\.0\) must be \(low, high\) with low < high"),
    (dict(input_range=(0.0, 1.0, 2.0)), "must be \\(low, high\\)"),
    (dict(input_range=(0, 1), input_mean=[0.1], input_std=[0.3]), "give one description"),
    (dict(input_mean=[0.1]), "give both"),
    (dict(input_mean=[0.1], input_std=[0.0]), r"input_std=\(0\.0,\) must be > 0"),
    (dict(input_mean=[0.1, 0.2], input_std=[0.3, 0.3, 0.3]), "one value per channel"),
    (dict(input_mean="0.1", input_std=[0.3]), "must be a list of numbers"),
    (dict(input_range=(0, float("nan"))), "finite number"),
])
def test_bad_input_settings_name_the_field(values, match):
    with pytest.raises(ConfigError, match=match):
        DRCPSDConfig(**values)


def test_input_settings_round_trip_through_json():
    cfg = DRCPSDConfig(input_mean=0.5, input_std=[0.25])
    assert cfg.input_mean == (0.5,) and cfg.input_std == (0.25,)
    again = DRCPSDConfig.from_dict(cfg.to_dict())
    assert again == cfg and cfg.to_dict()["input_std"] == [0.25]


# --- through the generator plugin -----------------------------------------------------------------------------
def _run_plugin(experiences, **overrides):
    torch.manual_seed(0)
    gp = CPSDGeneratorPlugin(tiny_config(replay_draw="once", **overrides), class_names=list(MNIST_CLASSES),
                             verbose=False)
    model = SmallCNN(width=8, feature_dim=16)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1, eval_mb_size=64,
                     evaluator=EvaluationPlugin(loggers=[]), device="cpu", plugins=[gp])
    for e in experiences:
        strategy.train(e)
    return gp


def _normalised_stream(stream):
    """``stream``'s experiences with their images normalised as Avalanche's SplitMNIST does."""
    from torchvision.transforms import Normalize

    normalize = Normalize((MEAN,), (STD,))
    out = []
    for e in stream:  # both transform groups, as Avalanche's classic benchmarks set them
        ds = e.dataset.train().replace_current_transform_group(normalize)
        ds = ds.eval().replace_current_transform_group(normalize).train()
        out.append(_WithDataset(e, ds))
    return out


class _WithDataset:
    """An experience whose data set is replaced (the rest read from the original)."""

    def __init__(self, experience, dataset):
        self._experience, self.dataset = experience, dataset

    def __getattr__(self, name):
        return getattr(self._experience, name)


def test_normalised_inputs_train_the_same_generator_and_replay_in_their_space(mnist_small):
    """The same seeded run on [0, 1] images and on Normalize(0.1307, 0.3081)-ed ones: the generator learns the
    same pixels (its kept replay sets agree to one 8-bit level), and the replay images handed to the classifier
    are the normalised pixels."""
    stream = mnist_small.train_stream[:3]
    unit = _run_plugin(stream)
    norm = _run_plugin(_normalised_stream(stream))
    assert unit.input_space.is_unit
    assert norm.input_space.low == pytest.approx((-MEAN / STD,), abs=1e-5)
    assert "Normalize" in norm.input_space.source
    assert sorted(norm.kept) == sorted(unit.kept) == [0, 1, 2, 3]
    for k in unit.kept:
        assert (norm.kept[k].int() - unit.kept[k].int()).abs().max() <= 1, k
    x_unit, y_unit = unit.sample_replay([0, 1], 8)
    x_norm, y_norm = norm.sample_replay([0, 1], 8)
    assert torch.equal(y_unit, y_norm)
    assert torch.allclose(x_norm, (x_unit - MEAN) / STD, atol=2 / 255 / STD)
    assert x_norm.min() < -0.4 and x_norm.max() > 1.5, "replayed in the classifier's (normalised) space"


def test_images_outside_the_configured_range_are_refused_before_training(mnist_small):
    stream = _normalised_stream(mnist_small.train_stream[:1])
    with pytest.raises(DataError, match=r"experience 0: channel 0 holds values in \[-0\.4242, 2\.821\].*"
                                        r"input_range=\(0\.0, 1\.0\)"):
        _run_plugin(stream, input_range=(0.0, 1.0))


def test_a_later_experience_outside_the_learned_range_is_refused(mnist_small):
    stream = list(mnist_small.train_stream[:1]) + _normalised_stream(mnist_small.train_stream[1:2])
    with pytest.raises(DataError, match=r"experience 1: channel 0 holds values .* outside the input range \[0, 1\]"):
        _run_plugin(stream)


def test_reference_replay_augment_is_refused_for_normalised_inputs(mnist_small):
    with pytest.raises(ConfigError, match="replay_augment='reference' transforms images in \\[0, 1\\]"):
        _run_plugin(_normalised_stream(mnist_small.train_stream[:1]), replay_augment="reference")


def test_find_normalize_reads_nested_transforms(mnist_small):
    from torchvision.transforms import Compose, Normalize

    assert find_normalize(mnist_small.train_stream[0].dataset) is None, "the package's builders hand pixels"
    ds = mnist_small.train_stream[0].dataset.replace_current_transform_group(Compose([Normalize((MEAN,), (STD,))]))
    mean, std = find_normalize(ds)
    assert mean == pytest.approx((MEAN,)) and std == pytest.approx((STD,))
    assert find_normalize(ds.eval()) is None, "only the current group's transforms count (eval has none here)"
    assert find_normalize(object()) is None
