r"""The losses of DR-CPSD as small pure functions (tensors in, scalar tensor out).

Notation: :math:`\epsilon` the true noise, :math:`\hat\epsilon` the denoiser's prediction,
:math:`\mathrm{SNR}(t)=\bar\alpha_t/(1-\bar\alpha_t)`, :math:`h` penultimate classifier features.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "snr_from_alphas_cumprod",
    "min_snr_weights",
    "ldm_loss",
    "mmd_mean_match",
    "mmd_gaussian",
    "cpsd_loss",
    "isolation_loss",
    "balanced_kappa",
    "feature_distillation_loss",
    "logit_distillation_loss",
    "generative_distillation_loss",
]


def snr_from_alphas_cumprod(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    r""":math:`\mathrm{SNR}(t) = \bar\alpha_t / (1 - \bar\alpha_t)` for each timestep (shape ``(B,)``).

    The quantity of diffusers' ``training_utils.compute_snr`` (tested equal to float32 rounding), which takes a
    scheduler and computes :math:`(\sqrt{\bar\alpha_t}/\sqrt{1-\bar\alpha_t})^2`: that form differs from this one in
    the last bits at 642 of the 1000 timesteps of the linear schedule, so calling it would move every committed
    generator result away from its CSV. This form is kept; the generators' ``snr`` calls it."""
    a = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return a / (1.0 - a)


def min_snr_weights(snr: Tensor, gamma: Optional[float]) -> Tensor:
    r"""Min-SNR-:math:`\gamma` weights for epsilon prediction (Hang et al., ICCV 2023):
    :math:`w_t = \min(\mathrm{SNR}(t), \gamma) / \mathrm{SNR}(t)`; all ones when ``gamma`` is None."""
    if gamma is None:
        return torch.ones_like(snr)
    return torch.clamp(snr, max=gamma) / snr


def _per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def ldm_loss(noise_pred: Tensor, noise: Tensor, snr: Optional[Tensor] = None, gamma: Optional[float] = None) -> Tensor:
    r"""Denoising loss :math:`\mathcal{L}_{LDM} = \frac1B\sum_i w_i\,\lVert\hat\epsilon_i-\epsilon_i\rVert^2/d`
    with min-SNR weights :math:`w_i` (ones when ``snr`` or ``gamma`` is None)."""
    per = _per_sample_mse(noise_pred, noise)
    if snr is None or gamma is None:
        return per.mean()
    return (min_snr_weights(snr, gamma) * per).mean()


def mmd_mean_match(noise_pred: Tensor, noise: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    r"""The reference's "MMD": a mean match, i.e. a linear-kernel MMD between predicted and true noise,
    :math:`\mathcal{L}_{MMD} = \frac1d\lVert\sum_i w_i\hat\epsilon_i - \sum_i w_i\epsilon_i\rVert^2`
    (``weights`` are the min-SNR weights; ones when None)."""
    w = torch.ones(noise.shape[0], device=noise.device) if weights is None else weights.float()
    shape = (-1,) + (1,) * (noise.dim() - 1)
    diff = (w.view(shape) * (noise_pred.float() - noise.float())).sum(0)
    return diff.pow(2).mean()


def mmd_gaussian(x: Tensor, y: Tensor, bandwidths: Sequence[float] = (0.5, 1.0, 2.0, 4.0)) -> Tensor:
    r"""Biased estimate of the squared kernel MMD with a sum of RBF kernels,
    :math:`\mathrm{MMD}^2 = \overline{k(x,x')} + \overline{k(y,y')} - 2\,\overline{k(x,y)}`,
    :math:`k(a,b)=\sum_s \exp(-\lVert a-b\rVert^2 / (2 s^2 \bar m))`, where :math:`\bar m` is the mean squared
    distance of the pooled samples (a scale-free median-like heuristic). Inputs ``(N, ...)`` and ``(M, ...)``."""
    x = x.flatten(1).float()
    y = y.flatten(1).float()
    z = torch.cat([x, y], 0)
    d2 = torch.cdist(z, z).pow(2)
    scale = d2.detach().mean().clamp_min(1e-12)
    k = sum(torch.exp(-d2 / (2.0 * s * s * scale)) for s in bandwidths)
    n = x.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2.0 * k[:n, n:].mean()


def cpsd_loss(
    noise_pred: Tensor,
    noise: Tensor,
    snr: Tensor,
    gamma: Optional[float] = 5.0,
    lam: float = 0.003,
    kind: str = "mean",
) -> Tensor:
    r"""CPSD objective :math:`\mathcal{L}_{CPSD} = \mathcal{L}_{LDM} + \lambda\,\mathcal{L}_{MMD}`,
    with :math:`\mathcal{L}_{MMD}` = :func:`mmd_mean_match` (``kind="mean"``, SNR-weighted as in the reference)
    or :func:`mmd_gaussian` between predicted and true noise (``kind="gaussian"``)."""
    if kind not in ("mean", "gaussian"):
        raise ValueError(f"kind={kind!r}; expected 'mean' or 'gaussian'")
    loss = ldm_loss(noise_pred, noise, snr, gamma)
    if lam == 0:
        return loss
    if kind == "mean":
        mmd = mmd_mean_match(noise_pred, noise, min_snr_weights(snr, gamma))
    elif kind == "gaussian":
        mmd = mmd_gaussian(noise_pred, noise)
    return loss + lam * mmd


def isolation_loss(logits_syn: Tensor, y_syn: Tensor, logits_real: Tensor, y_real: Tensor,
                   kappa: float = 0.05) -> Tensor:
    r"""Real-synthetic isolation: :math:`\mathcal{L}_{CE} = CE(\hat y^{syn}, \bar y) + \kappa\,CE(\hat y^{real}, y)`."""
    return F.cross_entropy(logits_syn, y_syn) + kappa * F.cross_entropy(logits_real, y_real)


def balanced_kappa(kappa: float, n_new_classes: int, n_old_classes: int) -> float:
    r"""Class-balanced isolation weight :math:`\kappa_t = \kappa\,|C_{new}|/|C_{old}|`.

    The isolation loss averages the CE over each half of a paired batch, so with equal halves every old class
    (synthetic half, :math:`|C_{old}|` classes) weighs :math:`1/|C_{old}|` and every new class
    :math:`\kappa/|C_{new}|`; with :math:`\kappa = 1` this weight makes all classes equal. For experiences of
    equal size it is the 1/(t+1) real vs 1 - 1/(t+1) replay weighting of generative replay with distillation
    (Masip et al., 2023): :math:`\kappa_t = 1/t`."""
    if n_new_classes < 1 or n_old_classes < 1:
        raise ValueError(f"balanced_kappa needs >= 1 new and >= 1 old class, got {n_new_classes} and {n_old_classes}")
    return kappa * n_new_classes / n_old_classes


def feature_distillation_loss(h_student_old: Tensor, h_old: Tensor, h_student_new: Tensor, h_new: Tensor,
                              pi: float = 1.0, old_weight: float = 1.0) -> Tensor:
    r"""Teacher-student distillation on penultimate features:
    :math:`\mathcal{L}_{Distill} = w_{old}\,MSE(h_s, h_{old}) + \pi\,MSE(h_s, h_{new})`, where each teacher's term uses
    the student's features on the same inputs that teacher saw (``h_student_old`` pairs with ``h_old``)."""
    return old_weight * F.mse_loss(h_student_old, h_old) + pi * F.mse_loss(h_student_new, h_new)


def logit_distillation_loss(logits_student: Tensor, logits_teacher: Tensor, classes: Sequence[int],
                            temperature: float = 2.0) -> Tensor:
    r"""Knowledge distillation (Hinton et al., 2015; as in LwF, Li & Hoiem, 2016) restricted to the teacher's
    classes :math:`C`:
    :math:`T^2\,\frac{1}{B}\sum_i KL\big(\sigma(z^{t}_{i,C}/T)\,\Vert\,\sigma(z^{s}_{i,C}/T)\big)`.
    In dream replay the old teacher's old-class logits are distilled on the whole paired batch, so the student
    inherits what the old teacher learned from *real* old-class images, not only what the synthetic images show."""
    idx = torch.as_tensor(list(classes), dtype=torch.long, device=logits_student.device)
    if idx.numel() == 0:
        raise ValueError("logit_distillation_loss needs at least one class")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    log_p = F.log_softmax(logits_student.index_select(1, idx) / temperature, dim=1)
    q = F.softmax(logits_teacher.index_select(1, idx) / temperature, dim=1)
    return temperature ** 2 * F.kl_div(log_p, q, reduction="batchmean")


def generative_distillation_loss(noise_pred_student: Tensor, noise_pred_teacher: Tensor) -> Tensor:
    r"""Generative distillation (Masip et al., 2023): :math:`\lVert\hat\epsilon_{\theta}(x_t,t,c)-
    \hat\epsilon_{\theta^{-}}(x_t,t,c)\rVert^2` on old-class samples and embeddings, where
    :math:`\theta^{-}` is the frozen previous generator."""
    return _per_sample_mse(noise_pred_student, noise_pred_teacher).mean()
