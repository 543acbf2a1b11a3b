"""The image grid ``g2_seed42_epyc_mean_match_tops.png``: a kept set as drawn, histogram-matched (the recipe),
shifted to the real mean image then histogram-matched (``class_mean_histogram``), and real training images, for
the four tops.

    DATA_ROOT=../shared/data python results/replay/split_fmnist/mean_match_grid.py SETS.pt OUT.png
"""
import os
import sys

import matplotlib
import torch
from torchvision.utils import make_grid

from avalanche_drcpsd.histogram import match_histogram, pixel_histogram, pixel_mean, shift_to_mean

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../benchmarks"))
from generator_quality import real_sets  # noqa: E402

sets, out = torch.load(sys.argv[1]), sys.argv[2]
real = real_sets("split_fmnist", 6000, seed=7, data_root=os.environ.get("DATA_ROOT", "../shared/data"))
xr, yr = real["images"].float() / 255, real["labels"]
x, y = sets["images"].float() / 255, sets["labels"]
names = {0: "T-shirt", 2: "pullover", 4: "coat", 6: "shirt"}
fig, axes = plt.subplots(4, 4, figsize=(16, 9))
for i, k in enumerate(names):
    s, r = x[y == k], xr[yr == k]
    versions = {"kept set as drawn": s, "histogram matched (recipe)": match_histogram(s, pixel_histogram(r)),
                "mean image, then histogram": match_histogram(shift_to_mean(s, pixel_mean(r)), pixel_histogram(r)),
                "real training images": r}
    for j, (title, imgs) in enumerate(versions.items()):
        ax = axes[i, j]
        ax.imshow(make_grid(imgs[:12], nrow=6, padding=1, pad_value=0.5)[0], cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
            ax.set_title(title)
        if j == 0:
            ax.set_ylabel(names[k])
fig.tight_layout()
fig.savefig(out, dpi=80)
