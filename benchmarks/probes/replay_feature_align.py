"""Probe (not package code; issue 13, 2026-12-07): class-conditional feature alignment in dream replay.

For the classes present in both halves of a paired batch (``replay_classes="seen"``: the current classes), the
student's mean penultimate feature of their synthetic images is pulled onto that of their real images: weight
ALIGN times the mean over those classes of mean((mu_syn_c - mu_real_c) ** 2), added to the isolation loss. Usage:

    REPO=<checkout> ALIGN=3 python benchmarks/probes/replay_feature_align.py <replay_quality.py arguments>

The variant keeps its replay_quality.py name, so rows of different ALIGN need renaming. Measured and not adopted:
results/replay/README.md, "Aligning the current classes' synthetic and real features"."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.environ["REPO"], "benchmarks"))
import replay_quality as rq  # noqa: E402

from avalanche_drcpsd.plugins import dream_replay as dr  # noqa: E402

WEIGHT = float(os.environ["ALIGN"])
_stash = {}
_orig_forward = dr.DreamReplayPlugin.student_forward
_orig_iso = dr.isolation_loss


def student_forward(self, model, xs, xr):
    logits, h = _orig_forward(self, model, xs, xr)
    _stash["h"], _stash["n"] = h, xs.shape[0]
    return logits, h


def isolation_loss(logits_syn, y_syn, logits_real, y_real, kappa=0.05):
    loss = _orig_iso(logits_syn, y_syn, logits_real, y_real, kappa)
    h, n = _stash["h"], _stash["n"]
    hs, hr = h[:n], h[n:]
    terms = []
    for c in torch.unique(y_real).tolist():
        ms, mr = y_syn == c, y_real == c
        if ms.sum() >= 2 and mr.sum() >= 2:
            terms.append(((hs[ms].mean(0) - hr[mr].mean(0)) ** 2).mean())
    if terms:
        loss = loss + WEIGHT * torch.stack(terms).mean()
    return loss


dr.DreamReplayPlugin.student_forward = student_forward
dr.isolation_loss = isolation_loss
sys.exit(rq.main(sys.argv[1:]))
