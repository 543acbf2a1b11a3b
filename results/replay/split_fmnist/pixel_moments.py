"""Offline probe, not package code: each class's kept set mapped onto its real training images' per-pixel mean
(``mean``) or per-pixel mean and standard deviation (``affine``), saved as a new ``_sets.pt`` for
``benchmarks/replay_quality.py``. ``replay_pixel_match="class_mean_histogram"`` is the package's ``mean``.

    DATA_ROOT=../shared/data python results/replay/split_fmnist/pixel_moments.py SETS.pt OUT.pt mean|affine
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../benchmarks"))
from generator_quality import real_sets  # noqa: E402

src, dst, mode = sys.argv[1], sys.argv[2], sys.argv[3]
sets = torch.load(src)
real = real_sets("split_fmnist", 6000, seed=7, data_root=os.environ.get("DATA_ROOT", "../shared/data"))
xr, yr = real["images"].float() / 255, real["labels"]
x, y = sets["images"].float() / 255, sets["labels"]
out = x.clone()
for k in y.unique().tolist():
    s, r = x[y == k], xr[yr == k]
    mu_s, mu_r = s.mean(0), r.mean(0)
    if mode == "mean":
        out[y == k] = (s - mu_s + mu_r).clamp(0, 1)
    else:
        ratio = (r.std(0) / (s.std(0) + 1e-3)).clamp(0.25, 4.0)
        out[y == k] = (mu_r + (s - mu_s) * ratio).clamp(0, 1)
    print(k, float(s.mean()), float(r.mean()), float(out[y == k].mean()))
torch.save(dict(sets, images=(out * 255).round().to(torch.uint8), variant=f"{sets.get('variant', '')}+pixel_{mode}"),
           dst)
