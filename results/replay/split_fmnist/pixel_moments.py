"""Offline probe, not package code: each class's kept set mapped onto its real training images' per-pixel mean
(``mean``) or per-pixel mean and standard deviation (``affine``), or onto the means of K k-means clusters of
its real images (``clusterK``: the synthetic images are split among the clusters in the real images' proportions by
a balanced nearest-centroid assignment, then each group is shifted onto its centroid), saved as a new ``_sets.pt``
for ``benchmarks/replay_quality.py``. ``mean`` and ``clusterK`` shift with the package's
``avalanche_drcpsd.histogram.shift_to_mean`` (``replay_pixel_match="class_mean_histogram"`` is ``mean``). The committed
screen rows were made before they did (``mean`` at f11d6d7, ``cluster4`` at dcbfdb9, each writing ``s - mean + target``
itself): at 1 thread those sets differ from today's in 14 and 1 of 3.92 M pixels, by one grey level each.

    DATA_ROOT=../shared/data python results/replay/split_fmnist/pixel_moments.py SETS.pt OUT.pt mean|affine|cluster4
"""
import os
import sys

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../benchmarks"))
from generator_quality import real_sets  # noqa: E402

from avalanche_drcpsd.histogram import shift_to_mean  # noqa: E402

src, dst, mode = sys.argv[1], sys.argv[2], sys.argv[3]
if mode not in ("mean", "affine") and not (mode.startswith("cluster") and mode[len("cluster"):].isdigit()):
    raise SystemExit(f"mode {mode!r}: expected mean, affine or clusterK (e.g. cluster4)")
sets = torch.load(src)
real = real_sets("split_fmnist", 6000, seed=7, data_root=os.environ.get("DATA_ROOT", "../shared/data"))
xr, yr = real["images"].float() / 255, real["labels"]
x, y = sets["images"].float() / 255, sets["labels"]
out = x.clone()
for k in y.unique().tolist():
    s, r = x[y == k], xr[yr == k]
    mu_s, mu_r = s.mean(0), r.mean(0)
    if mode == "mean":
        out[y == k] = shift_to_mean(s, mu_r)
    elif mode.startswith("cluster"):
        km = KMeans(int(mode[len("cluster"):]), n_init=4, random_state=0).fit(r.flatten(1).numpy())
        centres = torch.from_numpy(km.cluster_centers_).float()
        share = np.bincount(km.labels_, minlength=len(centres)) / len(r)
        slots = np.floor(share * len(s)).astype(int)
        slots[np.argsort(-(share * len(s) - slots))[: len(s) - slots.sum()]] += 1
        column_cluster = np.repeat(np.arange(len(centres)), slots)
        cost = torch.cdist((s - mu_s + mu_r).flatten(1), centres).numpy()[:, column_cluster]
        rows, cols = linear_sum_assignment(cost)
        group = torch.from_numpy(column_cluster[cols[np.argsort(rows)]])
        for j in group.unique().tolist():
            out[(y == k).nonzero()[group == j, 0]] = shift_to_mean(s[group == j], centres[j].view_as(s[0]))
    elif mode == "affine":
        ratio = (r.std(0) / (s.std(0) + 1e-3)).clamp(0.25, 4.0)
        out[y == k] = (mu_r + (s - mu_s) * ratio).clamp(0, 1)
    print(k, float(s.mean()), float(r.mean()), float(out[y == k].mean()))
torch.save(dict(sets, images=(out * 255).round().to(torch.uint8), variant=f"{sets.get('variant', '')}+pixel_{mode}"),
           dst)
