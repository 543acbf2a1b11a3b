"""FID/KID through torch-fidelity with the project's own feature extractor (trained here, nothing downloaded)."""

import pytest
import torch

from avalanche_drcpsd.experiments.fidelity import FidelityError, fid_kid, train_feature_extractor
from avalanche_drcpsd.utils import dataset_tensors


@pytest.fixture(scope="module")
def mnist_images(mnist_small):
    xs, ys = zip(*(dataset_tensors(e.dataset.eval()) for e in mnist_small.train_stream))
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture(scope="module")
def extractor(mnist_images, tmp_path_factory):
    x, y = mnist_images
    return train_feature_extractor(x, y, tmp_path_factory.mktemp("extractor"), epochs=2, batch_size=64)


def test_fid_is_near_zero_for_identical_sets_and_grows_with_a_shift(mnist_images, extractor):
    x, _ = mnist_images
    same = fid_kid(x, x.clone(), extractor, kid_subsets=10)
    shifted = fid_kid(x, (x + 0.3).clamp(0, 1), extractor, kid_subsets=10)
    more = fid_kid(x, (x + 0.6).clamp(0, 1), extractor, kid_subsets=10)
    assert abs(same["fid"]) < 1e-3
    # KID is the unbiased MMD^2 estimate; with X = Y its value is 2 (mean_{i!=j} k_ij - mean_i k_ii) / m, an
    # O(1/m) term that is negative, not 0. It must be tiny against the KID of a real shift.
    assert abs(same["kid_mean"]) < 0.15 * shifted["kid_mean"]
    assert shifted["fid"] > 1.0 and more["fid"] > shifted["fid"]
    assert same["kid_mean"] < shifted["kid_mean"] < more["kid_mean"]


def test_fid_separates_classes(mnist_images, extractor):
    """Two halves of the same classes are closer than two different classes."""
    x, y = mnist_images
    zeros, ones = x[y == 0], x[y == 1]
    within = fid_kid(zeros[: len(zeros) // 2], zeros[len(zeros) // 2:], extractor, kid_subsets=10)["fid"]
    across = fid_kid(zeros[: len(zeros) // 2], ones, extractor, kid_subsets=10)["fid"]
    assert across > 3 * within


def test_bad_extractor_dir_and_inputs_are_named(tmp_path, mnist_images):
    x, _ = mnist_images
    with pytest.raises(FidelityError, match="lacks"):
        fid_kid(x, x, tmp_path)
    with pytest.raises(FidelityError, match="synthetic images of shape"):
        fid_kid(x, x[0], tmp_path)


class _Fixed(torch.nn.Module):
    """Predicts class 2 where an image's first pixel is above 0.5, class 0 elsewhere (whatever the label)."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(1)

    def forward(self, x):
        assert not self.training, "the confusion is measured in eval mode"
        hit = (x.flatten(1)[:, :1] > 0.5).float()
        return torch.cat([1 - hit, torch.zeros_like(hit), 2 * hit], 1)


def test_model_confusion_counts_predictions_per_true_class_and_restores_the_mode():
    from torch.utils.data import TensorDataset

    from avalanche_drcpsd.experiments.fidelity import model_confusion

    x = torch.zeros(6, 1, 2, 2)
    x[[1, 4, 5], 0, 0, 0] = 1.0  # predicted 2; the others 0
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    model = _Fixed().train()
    counts = model_confusion(model, [TensorDataset(x[:3], y[:3]), TensorDataset(x[3:], y[3:])], 3, batch_size=2)
    assert counts.tolist() == [[1, 0, 1], [2, 0, 0], [0, 0, 2]]
    assert model.training
    with pytest.raises(FidelityError, match="a label or prediction of 2; expected classes below num_classes=2"):
        model_confusion(model, TensorDataset(x, y), 2)
