"""benchmarks/kept_set_stats.py: how kept sets differ from real images."""

import pytest
import torch
from conftest import benchmark_module


def test_intensity_stats_measure_brightness_and_the_dark_background():
    ks = benchmark_module("kept_set_stats")
    x = torch.zeros(4, 1, 4, 4)
    x[:, :, :2, :2] = torch.tensor([0.2, 0.4, 0.6, 0.8]).view(4, 1, 1, 1)  # a lit quarter of each image
    row = ks.intensity_stats(x)
    assert row["dark_share"] == pytest.approx(0.75)
    assert row["garment_q50"] == pytest.approx(0.5)  # the lit pixels' own brightness, background left out
    assert row["mean_q50"] == pytest.approx(0.5 / 4)
    assert row["mean_q10"] < row["mean_q90"]


def test_separability_tells_apart_what_differs_and_not_what_does_not(one_thread):
    ks = benchmark_module("kept_set_stats")
    g = torch.Generator().manual_seed(0)
    real = torch.rand(500, 1, 8, 8, generator=g) * 0.5
    same = torch.rand(500, 1, 8, 8, generator=g) * 0.5
    brighter = same + 0.4
    assert ks.separability(brighter, real, seed=0, epochs=3) > 0.95
    assert ks.separability(same, real, seed=0, epochs=3) < 0.7
    with pytest.raises(ValueError, match="at least 10 images.*got 9 synthetic"):
        ks.separability(same[:9], real, seed=0)
    assert 0.0 <= ks.separability(brighter[:50], real, seed=0, epochs=1) <= 1.0  # a set of 50: 40 + 40 to train


def test_binomial_blur_keeps_a_constant_image_and_smooths_a_point():
    ks = benchmark_module("kept_set_stats")
    flat = torch.full((1, 3, 5, 5), 0.3)
    assert torch.allclose(ks.binomial_blur(flat), flat)
    point = torch.zeros(1, 1, 5, 5)
    point[0, 0, 2, 2] = 1.0
    out = ks.binomial_blur(point)
    assert out[0, 0, 2, 2] == pytest.approx(0.25) and out.sum() == pytest.approx(1.0)
