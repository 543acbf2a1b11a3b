"""Tests for avalanche_drcpsd.losses: every loss against numbers worked out by hand on tiny tensors.

The expected values are written as arithmetic on literal numbers (with the working in comments), never by
calling the formula under test again.
"""

from __future__ import annotations

import math

import pytest
import torch

from avalanche_drcpsd.losses import (
    balanced_kappa,
    cpsd_loss,
    feature_distillation_loss,
    generative_distillation_loss,
    isolation_loss,
    ldm_loss,
    logit_distillation_loss,
    min_snr_weights,
    mmd_gaussian,
    mmd_mean_match,
    snr_from_alphas_cumprod,
)


def approx(value: float, rel: float = 1e-6, abs: float = 1e-6):
    return pytest.approx(value, rel=rel, abs=abs)


@pytest.fixture
def pred_noise():
    """pred - noise = [[1, 2], [2, 3]]; per-sample MSE: (1+4)/2 = 2.5 and (4+9)/2 = 6.5."""
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    noise = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    return pred, noise


# --- SNR and min-SNR weights --------------------------------------------------------------------------
def test_snr_from_alphas_cumprod_by_hand():
    alphas_cumprod = torch.tensor([0.9, 0.5, 0.2, 0.75])
    timesteps = torch.tensor([0, 2, 1, 3, 0])
    snr = snr_from_alphas_cumprod(alphas_cumprod, timesteps)
    # 0.9/0.1 = 9, 0.2/0.8 = 0.25, 0.5/0.5 = 1, 0.75/0.25 = 3
    assert snr.shape == (5,)
    assert snr.dtype == torch.float32
    assert snr.tolist() == [approx(9.0, rel=1e-5), approx(0.25), approx(1.0), approx(3.0), approx(9.0, rel=1e-5)]


def test_snr_from_alphas_cumprod_float64_schedule_gives_float32():
    snr = snr_from_alphas_cumprod(torch.tensor([0.8, 0.6], dtype=torch.float64), torch.tensor([1, 0]))
    # 0.6/0.4 = 1.5, 0.8/0.2 = 4
    assert snr.dtype == torch.float32
    assert snr.tolist() == [approx(1.5), approx(4.0)]


def test_snr_from_alphas_cumprod_is_diffusers_compute_snr():
    """The same quantity as diffusers' ``compute_snr`` on a real schedule, to float32 rounding (its sqrt-then-square
    differs from a / (1 - a) in the last bits, which is why the package keeps its one-line form: see losses.py)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    timesteps = torch.tensor([0, 1, 10, 250, 500, 999, 999, 3])
    ours = snr_from_alphas_cumprod(scheduler.alphas_cumprod, timesteps)
    torch.testing.assert_close(ours, compute_snr(scheduler, timesteps), rtol=1e-6, atol=0)


def test_min_snr_weights_gamma_5():
    snr = torch.tensor([10.0, 2.0, 5.0, 20.0])
    # min(10, 5)/10 = 0.5; min(2, 5)/2 = 1; min(5, 5)/5 = 1; min(20, 5)/20 = 0.25
    assert min_snr_weights(snr, 5.0).tolist() == [0.5, 1.0, 1.0, 0.25]


def test_min_snr_weights_none_is_ones():
    snr = torch.tensor([10.0, 2.0, 0.1])
    w = min_snr_weights(snr, None)
    assert w.tolist() == [1.0, 1.0, 1.0]
    assert w.shape == snr.shape


# --- LDM loss --------------------------------------------------------------------------------------
def test_ldm_loss_unweighted(pred_noise):
    pred, noise = pred_noise
    # per-sample MSE 2.5 and 6.5 -> mean 4.5
    assert ldm_loss(pred, noise).item() == approx(4.5)
    # snr given but gamma None, or gamma given but snr None: unweighted as well
    assert ldm_loss(pred, noise, torch.tensor([10.0, 2.0]), None).item() == approx(4.5)
    assert ldm_loss(pred, noise, None, 5.0).item() == approx(4.5)


def test_ldm_loss_min_snr_weighted(pred_noise):
    pred, noise = pred_noise
    # SNR 10 -> w 0.5, SNR 2 -> w 1: (0.5*2.5 + 1*6.5)/2 = (1.25 + 6.5)/2 = 3.875
    loss = ldm_loss(pred, noise, torch.tensor([10.0, 2.0]), 5.0)
    assert loss.item() == approx(3.875)


def test_ldm_loss_per_sample_mean_over_all_dims():
    # (B, C, H, W) = (2, 1, 2, 2): sample 0 differs by 2 in one of 4 entries -> 4/4 = 1;
    # sample 1 differs by 1 everywhere -> 1. With SNR (20, 1), gamma 5: w = (0.25, 1) -> (0.25 + 1)/2 = 0.625.
    pred = torch.zeros(2, 1, 2, 2)
    noise = torch.zeros(2, 1, 2, 2)
    noise[0, 0, 0, 0] = 2.0
    noise[1] = 1.0
    assert ldm_loss(pred, noise).item() == approx(1.0)
    assert ldm_loss(pred, noise, torch.tensor([20.0, 1.0]), 5.0).item() == approx(0.625)


def test_ldm_loss_half_inputs_are_computed_in_float32(pred_noise):
    pred, noise = pred_noise
    loss = ldm_loss(pred.half(), noise.half())
    assert loss.dtype == torch.float32
    assert loss.item() == approx(4.5)


# --- mean-match MMD ---------------------------------------------------------------------------------
def test_mmd_mean_match_unweighted(pred_noise):
    pred, noise = pred_noise
    # sum_i (pred_i - noise_i) = [1, 2] + [2, 3] = [3, 5]; mean of squares = (9 + 25)/2 = 17
    assert mmd_mean_match(pred, noise).item() == approx(17.0)


def test_mmd_mean_match_weighted(pred_noise):
    pred, noise = pred_noise
    # 0.5*[1, 2] + 1*[2, 3] = [2.5, 4]; (6.25 + 16)/2 = 11.125
    assert mmd_mean_match(pred, noise, torch.tensor([0.5, 1.0])).item() == approx(11.125)


def test_mmd_mean_match_cancels_opposite_errors():
    # errors +1 and -1 on the same entry cancel in the sum (a mean match, not an MSE)
    pred = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    noise = torch.zeros(2, 2)
    assert mmd_mean_match(pred, noise).item() == 0.0


def test_mmd_mean_match_4d():
    # (2, 1, 1, 2): errors [[1, 1]] and [[3, -1]] -> sum [4, 0] -> (16 + 0)/2 = 8
    pred = torch.tensor([[[[1.0, 1.0]]], [[[3.0, -1.0]]]])
    assert mmd_mean_match(pred, torch.zeros_like(pred)).item() == approx(8.0)


# --- Gaussian-kernel MMD ----------------------------------------------------------------------------
def test_mmd_gaussian_identical_sets_is_zero():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    assert abs(mmd_gaussian(x, x.clone()).item()) < 1e-6


def test_mmd_gaussian_shifted_sets_positive_and_grows_with_shift():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g)
    y = torch.randn(16, 4, generator=g)
    near = mmd_gaussian(x, y).item()
    far = mmd_gaussian(x, y + 3.0).item()
    assert far > 0.1
    assert far > near


def test_mmd_gaussian_1d_single_points_by_hand():
    # x = {0}, y = {1}: pooled squared distances [[0, 1], [1, 0]] -> mean scale = 2/4 = 0.5.
    x, y = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    # one bandwidth s = 1: k(x, y) = exp(-1 / (2 * 1 * 0.5)) = e^-1; k(x, x) = k(y, y) = 1
    assert mmd_gaussian(x, y, bandwidths=(1.0,)).item() == approx(2.0 - 2.0 * math.exp(-1.0))  # 1.2642411
    # default bandwidths (0.5, 1, 2, 4): 2 s^2 * 0.5 = s^2 -> k(x, y) = e^-4 + e^-1 + e^-1/4 + e^-1/16,
    # k(x, x) = k(y, y) = 4
    kxy = math.exp(-4.0) + math.exp(-1.0) + math.exp(-0.25) + math.exp(-0.0625)  # 2.1044089
    assert mmd_gaussian(x, y).item() == approx(8.0 - 2.0 * kxy)  # 3.7911822


def test_mmd_gaussian_1d_two_vs_one_by_hand():
    # x = {0, 2}, y = {1}: pooled z = (0, 2, 1); squared distances [[0, 4, 1], [4, 0, 1], [1, 1, 0]],
    # mean over the 9 entries = 12/9 = 4/3. Bandwidth 1: k = exp(-d2 / (2 * 4/3)) = exp(-3 d2 / 8).
    x, y = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0]])
    kxx = (1.0 + math.exp(-1.5) + math.exp(-1.5) + 1.0) / 4  # d2 = 0, 4, 4, 0
    kyy = 1.0
    kxy = (math.exp(-0.375) + math.exp(-0.375)) / 2  # d2 = 1, 1
    assert mmd_gaussian(x, y, bandwidths=(1.0,)).item() == approx(kxx + kyy - 2 * kxy, rel=1e-5)  # 0.2369865


def test_mmd_gaussian_scale_free():
    # the scale heuristic makes the estimate invariant to a common rescaling of both sets
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g) + 0.5
    assert mmd_gaussian(10.0 * x, 10.0 * y).item() == approx(mmd_gaussian(x, y).item(), rel=1e-4)


def test_mmd_gaussian_has_finite_gradient():
    x = torch.tensor([[0.0, 1.0], [2.0, 0.0]], requires_grad=True)
    y = torch.tensor([[1.0, 1.0], [0.0, 0.0], [3.0, 3.0]])
    mmd_gaussian(x, y).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --- CPSD loss --------------------------------------------------------------------------------------
def test_cpsd_loss_mean_kind(pred_noise):
    pred, noise = pred_noise
    snr = torch.tensor([10.0, 2.0])
    # LDM (weighted) 3.875 + 0.1 * weighted mean-match 11.125 = 3.875 + 1.1125 = 4.9875
    assert cpsd_loss(pred, noise, snr, gamma=5.0, lam=0.1, kind="mean").item() == approx(4.9875)
    # gamma None: unweighted LDM 4.5 + 0.1 * unweighted mean match 17 = 6.2
    assert cpsd_loss(pred, noise, snr, gamma=None, lam=0.1, kind="mean").item() == approx(6.2)


def test_cpsd_loss_gaussian_kind(pred_noise):
    pred, noise = pred_noise
    snr = torch.tensor([10.0, 2.0])
    # pooled z = p0 (1,2), p1 (3,4), n0 (0,0), n1 (1,1); squared distances:
    # p0-p1 8, p0-n0 5, p0-n1 1, p1-n0 25, p1-n1 13, n0-n1 2; mean over 16 entries = 2*54/16 = 6.75
    # -> k(d2) = sum_s exp(-d2 / (2 s^2 6.75)) = sum_s exp(-d2 / (13.5 s^2)), s in (0.5, 1, 2, 4)
    def k(d2: float) -> float:
        return sum(math.exp(-d2 / (13.5 * s * s)) for s in (0.5, 1.0, 2.0, 4.0))

    kxx = (4 + 4 + 2 * k(8)) / 4
    kyy = (4 + 4 + 2 * k(2)) / 4
    kxy = (k(5) + k(1) + k(25) + k(13)) / 4
    mmd = kxx + kyy - 2 * kxy
    loss = cpsd_loss(pred, noise, snr, gamma=5.0, lam=0.5, kind="gaussian")
    assert loss.item() == approx(3.875 + 0.5 * mmd, rel=1e-5)


def test_cpsd_loss_lambda_zero_is_ldm(pred_noise):
    pred, noise = pred_noise
    snr = torch.tensor([10.0, 2.0])
    for kind in ("mean", "gaussian"):
        assert cpsd_loss(pred, noise, snr, gamma=5.0, lam=0.0, kind=kind).item() == approx(3.875)


def test_cpsd_loss_unknown_kind_raises(pred_noise):
    pred, noise = pred_noise
    with pytest.raises(ValueError, match="kind='rbf'"):
        cpsd_loss(pred, noise, torch.tensor([10.0, 2.0]), lam=0.1, kind="rbf")


# --- classifier losses --------------------------------------------------------------------------------
def test_isolation_loss_by_hand():
    logits_syn = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    y_syn = torch.tensor([0, 2])
    logits_real = torch.tensor([[2.0, 0.0]])
    y_real = torch.tensor([1])
    # CE(syn) row 0: -log(e^1 / (e^1 + 2)) = log(e + 2) - 1 = 0.5514447; row 1: log 3 = 1.0986123; mean 0.8250285
    ce_syn = ((math.log(math.e + 2.0) - 1.0) + math.log(3.0)) / 2
    # CE(real): -log(e^0 / (e^2 + e^0)) = log(1 + e^2) = 2.1269280
    ce_real = math.log(1.0 + math.exp(2.0))
    assert isolation_loss(logits_syn, y_syn, logits_real, y_real, kappa=0.05).item() == approx(ce_syn + 0.05 * ce_real)
    assert isolation_loss(logits_syn, y_syn, logits_real, y_real, kappa=0.05).item() == approx(0.9313749)
    assert isolation_loss(logits_syn, y_syn, logits_real, y_real, kappa=0.0).item() == approx(ce_syn)
    assert isolation_loss(logits_syn, y_syn, logits_real, y_real, kappa=1.0).item() == approx(ce_syn + ce_real)


def test_feature_distillation_loss_by_hand():
    h_student_old = torch.tensor([[1.0, 2.0]])
    h_old = torch.tensor([[0.0, 0.0]])  # MSE: (1 + 4)/2 = 2.5
    h_student_new = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    h_new = torch.tensor([[1.0, 3.0], [2.0, 0.0]])  # diffs 0, -2, -2, 0 -> MSE (0+4+4+0)/4 = 2
    assert feature_distillation_loss(h_student_old, h_old, h_student_new, h_new, pi=1.0).item() == approx(4.5)
    assert feature_distillation_loss(h_student_old, h_old, h_student_new, h_new, pi=0.5).item() == approx(3.5)
    assert feature_distillation_loss(h_student_old, h_old, h_student_new, h_new, pi=0.0).item() == approx(2.5)


def test_generative_distillation_loss_by_hand(pred_noise):
    student, teacher = pred_noise
    # per-sample MSE 2.5 and 6.5 -> 4.5
    assert generative_distillation_loss(student, teacher).item() == approx(4.5)
    assert generative_distillation_loss(teacher, teacher).item() == 0.0


def test_generative_distillation_loss_gradient_by_hand():
    # d/ds mean_i mean_j (s_ij - t_ij)^2 = 2 (s - t) / (B * d) = 2 (s - t) / 4
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    generative_distillation_loss(s, t).backward()
    assert s.grad.tolist() == [[0.5, 1.0], [1.0, 1.5]]


def test_cpsd_loss_rejects_unknown_kind_even_without_mmd():
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="kind='bogus'"):
        cpsd_loss(x, x, torch.ones(2), 5.0, lam=0.0, kind="bogus")


# --- logit distillation (package option of dream replay) ---------------------------------------------
def test_logit_distillation_loss_by_hand():
    """Row 1, classes {0, 1}, T = 2: teacher [2 ln 3, 0]/2 -> q = (3/4, 1/4); student [0, 0] -> p = (1/2, 1/2);
    KL(q || p) = 3/4 ln(3/2) + 1/4 ln(1/2). Row 2: equal logits -> 0. Class 2's logits are ignored.
    batchmean over 2 rows, times T^2 = 4."""
    student = torch.tensor([[0.0, 0.0, 5.0], [1.0, 2.0, -3.0]])
    teacher = torch.tensor([[2 * math.log(3.0), 0.0, 100.0], [1.0, 2.0, 7.0]])
    kl_row1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    expected = 4 * kl_row1 / 2
    assert logit_distillation_loss(student, teacher, [0, 1], temperature=2.0).item() == approx(expected)


def test_logit_distillation_loss_temperature_one_by_hand():
    """T = 1: teacher [ln 3, 0] -> (3/4, 1/4), student [0, 0] -> (1/2, 1/2); one row, factor T^2 = 1."""
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert logit_distillation_loss(student, teacher, [0, 1], temperature=1.0).item() == approx(expected)


def test_logit_distillation_loss_only_moves_the_chosen_logits():
    student = torch.zeros(1, 3, requires_grad=True)
    teacher = torch.tensor([[3.0, 0.0, 0.0]])
    logit_distillation_loss(student, teacher, [0, 1]).backward()
    assert student.grad[0, 2].item() == 0.0
    assert student.grad[0, 0].item() < 0 < student.grad[0, 1].item()  # pulls class 0 up, class 1 down


@pytest.mark.parametrize("classes, temperature, match", [([], 2.0, "at least one class"),
                                                        ([0], 0.0, "temperature=0.0"),
                                                        ([0], -1.0, "temperature=-1.0")])
def test_logit_distillation_loss_rejects_bad_arguments(classes, temperature, match):
    with pytest.raises(ValueError, match=match):
        logit_distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), classes, temperature=temperature)


# --- class-balanced isolation weight ------------------------------------------------------------------
@pytest.mark.parametrize("kappa, new, old, expected", [(1.0, 2, 2, 1.0), (1.0, 2, 8, 0.25), (0.5, 9, 18, 0.25),
                                                       (1.0, 8, 27, 8 / 27)])
def test_balanced_kappa_by_hand(kappa, new, old, expected):
    assert balanced_kappa(kappa, new, old) == approx(expected)


def test_balanced_kappa_makes_every_class_weigh_the_same():
    """Equal halves of B images: an old class gets weight 1/|old| of the synthetic CE, a new class
    kappa_t/|new| of the real CE; kappa = 1 balances them."""
    k = balanced_kappa(1.0, 2, 6)
    assert 1 / 6 == approx(k / 2)


@pytest.mark.parametrize("new, old", [(0, 2), (2, 0)])
def test_balanced_kappa_rejects_empty_class_sets(new, old):
    with pytest.raises(ValueError, match="balanced_kappa needs"):
        balanced_kappa(1.0, new, old)
