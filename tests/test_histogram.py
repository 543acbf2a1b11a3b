"""Per-class pixel-histogram matching of the replay sets (``replay_pixel_match="class_histogram"``, issue 13), and
the per-pixel shift to the class's mean image before it (``"class_mean_histogram"``)."""

import pytest
import torch
from conftest import tiny_config

from avalanche_drcpsd import CPSDGeneratorPlugin
from avalanche_drcpsd.config import ConfigError
from avalanche_drcpsd.histogram import match_histogram, pixel_histogram, pixel_mean, shift_to_mean
from avalanche_drcpsd.synthetic_cache import to_uint8
from avalanche_drcpsd.utils import dataset_tensors


def _cdf(hist):
    return hist.double().cumsum(-1) / hist.double().sum(-1, keepdim=True)


def test_pixel_histogram_counts_every_pixel_per_channel():
    x = torch.zeros(2, 3, 4, 4)
    x[:, 1] = 1.0
    x[0, 2, 0, 0] = 0.5
    h = pixel_histogram(x)
    assert h.shape == (3, 256) and h.dtype == torch.int64
    assert h[0, 0] == 32 and h[1, 255] == 32
    assert h[2, 0] == 31 and h[2, 128] == 1  # 0.5 * 255 = 127.5 rounds to 128
    assert torch.equal(pixel_histogram(to_uint8(x)), h), "uint8 images count the same levels"


def test_matching_gives_the_target_distribution_and_keeps_each_images_pixel_order():
    g = torch.Generator().manual_seed(0)
    # a "hazy" set: few exact zeros, most of the mass in a faint speckle and mid greys
    source = (torch.rand(64, 1, 8, 8, generator=g) ** 2 * 0.8 + 0.02).clamp(0, 1)
    # the "real" target: 60% black background, the rest bright
    real = torch.where(torch.rand(200, 1, 8, 8, generator=g) < 0.6, torch.zeros(()),
                       0.5 + 0.5 * torch.rand(200, 1, 8, 8, generator=g))
    target = pixel_histogram(real)
    out = match_histogram(source, target)
    assert out.shape == source.shape and out.dtype == source.dtype and 0 <= out.min() and out.max() <= 1
    # the matched set's distribution is the target's up to the ties of 8-bit levels
    assert (_cdf(pixel_histogram(out)) - _cdf(target)).abs().max() < 0.02
    assert abs((out == 0).float().mean() - 0.6) < 0.02 and (source == 0).float().mean() < 0.01
    # monotone: a brighter input pixel never comes out darker
    order = source.flatten().argsort()
    assert (out.flatten()[order].diff() >= 0).all()


def test_matching_refuses_a_target_that_does_not_fit_the_images():
    with pytest.raises(ValueError, match=r"\(3, 256\)"):
        match_histogram(torch.rand(2, 3, 4, 4), torch.ones(1, 256, dtype=torch.long))
    with pytest.raises(ValueError, match="positive total"):
        match_histogram(torch.rand(2, 1, 4, 4), torch.zeros(1, 256, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        pixel_histogram(torch.rand(4, 4))


def test_an_unknown_pixel_match_is_refused_before_training():
    with pytest.raises(ConfigError, match="replay_pixel_match"):
        tiny_config(replay_pixel_match="histogram").validate()


def test_kept_sets_are_the_same_draws_matched_to_each_class_real_histogram(mnist_small, one_thread):
    """Two plugins trained alike, one matching: its kept set of each class is the other's set matched to that
    class's real pixel histogram (recorded while learning it), and its black share is the real images'."""
    x0, y0 = dataset_tensors(mnist_small.train_stream[0].dataset.eval())
    plain = CPSDGeneratorPlugin(tiny_config(n_replay_per_class=6), verbose=False)
    matched = CPSDGeneratorPlugin(tiny_config(n_replay_per_class=6, replay_pixel_match="class_histogram"),
                                  verbose=False)
    for plugin in (plain, matched):
        plugin.learn_classes(x0, y0)
        plugin.begin_experience(1)
    assert plain.pixel_histograms == {} and sorted(matched.pixel_histograms) == [0, 1]
    for k in (0, 1):
        hist = matched.pixel_histograms[k]
        assert torch.equal(hist, pixel_histogram(x0[y0 == k]))
        assert hist.sum() == (y0 == k).sum() * 28 * 28
        expected = to_uint8(match_histogram(plain.kept[k].float() / 255, hist))
        assert torch.equal(matched.kept[k], expected)
        # the tiny generator's draws sit on a few levels, which a look-up table cannot split: the matched set's
        # mean intensity moves to the real images', not exactly onto it
        real_mean = x0[y0 == k].mean()
        assert abs(matched.kept[k].float().mean() / 255 - real_mean) < abs(plain.kept[k].float().mean() / 255
                                                                           - real_mean)
    # what the measurements draw for a class with no kept set (just learned) is matched too
    x, y = matched.replayed_samples([1], 5, seed=3)
    raw, _ = plain.sample([1], 5, seed=3)
    assert torch.equal(x, match_histogram(raw, matched.pixel_histograms[1]))


def test_the_histograms_are_part_of_the_plugin_state(mnist_small, one_thread):
    x0, y0 = dataset_tensors(mnist_small.train_stream[0].dataset.eval())
    plugin = CPSDGeneratorPlugin(tiny_config(generator_steps=1, replay_pixel_match="class_histogram"), verbose=False)
    plugin.learn_classes(x0, y0)
    restored = CPSDGeneratorPlugin(tiny_config(replay_pixel_match="class_histogram"), verbose=False)
    restored.load_state_dict(plugin.state_dict())
    assert sorted(restored.pixel_histograms) == [0, 1]
    assert all(torch.equal(restored.pixel_histograms[k], plugin.pixel_histograms[k]) for k in (0, 1))


def test_shift_to_mean_gives_the_target_mean_image_and_keeps_each_images_differences():
    g = torch.Generator().manual_seed(0)
    hazy = 0.3 + 0.2 * torch.rand(32, 1, 6, 6, generator=g)  # far from both bounds: no clipping
    target = torch.full((1, 6, 6), 0.3)
    target[:, :, :3] = 0.55  # the real class is bright on the left and dark on the right
    out = shift_to_mean(hazy, target)
    assert out.shape == hazy.shape and out.dtype == hazy.dtype
    assert torch.allclose(pixel_mean(out), target, atol=1e-6)
    assert torch.allclose(out - out.mean(0), hazy - hazy.mean(0), atol=1e-6), "each image keeps its differences"
    # where the shift would leave [0, 1], the pixels are clipped
    assert shift_to_mean(torch.full((2, 1, 2, 2), 0.9), torch.ones(1, 2, 2) * 1.5 - 0.4).max() == 1.0
    assert torch.equal(pixel_mean(to_uint8(hazy)), pixel_mean(to_uint8(hazy).float() / 255)), "uint8 reads as levels"


def test_shift_to_mean_refuses_a_target_that_does_not_fit_the_images():
    with pytest.raises(ValueError, match=r"\(1, 4, 4\)"):
        shift_to_mean(torch.rand(2, 1, 4, 4), torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="empty"):
        pixel_mean(torch.rand(0, 1, 4, 4))


def test_mean_matched_sets_are_shifted_to_the_class_mean_image_then_histogram_matched(mnist_small, one_thread):
    """Two plugins trained alike: with ``class_mean_histogram`` each kept set is the histogram-only plugin's draw
    shifted to its class's real mean image, then matched to the same histogram; it is part of the state."""
    x0, y0 = dataset_tensors(mnist_small.train_stream[0].dataset.eval())
    hist = CPSDGeneratorPlugin(tiny_config(n_replay_per_class=6, replay_pixel_match="class_histogram"), verbose=False)
    mean = CPSDGeneratorPlugin(tiny_config(n_replay_per_class=6, replay_pixel_match="class_mean_histogram"),
                               verbose=False)
    for plugin in (hist, mean):
        plugin.learn_classes(x0, y0)
    assert hist.pixel_means == {} and sorted(mean.pixel_means) == [0, 1]
    raw, y = hist.sample([0, 1], 6, seed=3)
    x, _ = mean.match_pixels(raw, y)
    for k in (0, 1):
        assert torch.equal(mean.pixel_histograms[k], hist.pixel_histograms[k])
        assert torch.allclose(mean.pixel_means[k], x0[y0 == k].float().mean(0))
        expected = match_histogram(shift_to_mean(raw[y == k], mean.pixel_means[k]), mean.pixel_histograms[k])
        assert torch.equal(x[y == k], expected)
        assert not torch.equal(x[y == k], hist.match_pixels(raw, y)[0][y == k]), "the shift changes the set"
    restored = CPSDGeneratorPlugin(tiny_config(replay_pixel_match="class_mean_histogram"), verbose=False)
    restored.load_state_dict(mean.state_dict())
    assert all(torch.equal(restored.pixel_means[k], mean.pixel_means[k]) for k in (0, 1))
