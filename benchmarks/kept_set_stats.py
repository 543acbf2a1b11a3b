"""How a generator's kept sets differ from real images, class by class, in numbers a classifier would notice.

    python benchmarks/kept_set_stats.py --sets /work/runs/gen/split_fmnist/profile_sets.pt \\
        --data-root ../shared/data --out results/generator/split_fmnist/profile_kept_stats.csv

For each class of a ``<variant>_sets.pt`` of ``benchmarks/generator_quality.py`` (or several, comma-separated) and
for as many real training images of that class (drawn with ``--real-seed``), one row per source:

* ``mean_q10`` ... ``mean_q90``: quantiles of the images' mean intensity (0 black, 1 white);
* ``garment_q10`` ... ``garment_q90``: quantiles of each image's mean over its pixels above 0.05 (the object's
  brightness, without the background);
* ``dark_share``: share of pixels below 0.05 (the black background, where the data set has one);
* ``separable`` (synthetic rows): held-out accuracy of the CAS classifier (a ``SmallCNN``) trained to tell the
  class's kept images from its real ones (four fifths of each side to train, one fifth held out: 400 + 400 and
  100 + 100 for sets of 500; 0.5: indistinguishable), and ``separable_blur`` the same with
  both sides blurred by a 3x3 binomial filter first (what is left once the finest texture is gone).

FID and CAS say *how much* the sets differ; these say *how*: a set that is brighter, hazier or easier to tell
from real images than another is a set a classifier learns through cues its real test images do not carry.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor

from avalanche_drcpsd.experiments.fidelity import classification_accuracy_score

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generator_quality import real_sets  # noqa: E402  (a sibling script)

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
DARK = 0.05


def intensity_stats(x: Tensor) -> Dict[str, float]:
    """Quantiles of the mean and object brightness of images ``x`` in [0, 1] ``(N, C, H, W)``, and their dark
    share."""
    q = torch.tensor(QUANTILES)
    mean = x.mean((1, 2, 3))
    lit = x > DARK
    garment = (x * lit).sum((1, 2, 3)) / lit.sum((1, 2, 3)).clamp(min=1)
    row: Dict[str, float] = {}
    for name, v in (("mean", mean), ("garment", garment)):
        for p, value in zip(QUANTILES, v.quantile(q).tolist()):
            row[f"{name}_q{round(p * 100)}"] = round(value, 4)
    row["dark_share"] = round(float((~lit).float().mean()), 4)
    return row


def binomial_blur(x: Tensor) -> Tensor:
    """3x3 binomial low-pass of ``(N, C, H, W)``, border replicated."""
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None]) / 16
    c = x.shape[1]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3).contiguous(), groups=c)


def separability(synthetic: Tensor, real: Tensor, *, seed: int, epochs: int = 15) -> float:
    """Held-out accuracy of the CAS classifier (:func:`~avalanche_drcpsd.experiments.fidelity.
    classification_accuracy_score`: a ``SmallCNN``, cosine-annealed SGD) trained to tell ``synthetic`` (label 1)
    from ``real`` (label 0) images: as many of each side (the smaller count), four fifths to train and one fifth
    held out; the mean of the two sides' accuracies (the held-out sides are equal)."""
    n = min(len(synthetic), len(real))
    if n < 10:
        raise ValueError(f"separability needs at least 10 images of each side; got {len(synthetic)} synthetic and "
                         f"{len(real)} real")
    n_train = n - n // 5
    x = torch.cat([synthetic[:n_train], real[:n_train]])
    y = torch.cat([torch.ones(n_train), torch.zeros(n_train)]).long()
    xt = torch.cat([synthetic[n_train:n], real[n_train:n]])
    yt = torch.cat([torch.ones(n - n_train), torch.zeros(n - n_train)]).long()
    per_side = classification_accuracy_score(x, y, xt, yt, epochs=epochs, seed=seed)
    return round(sum(per_side.values()) / len(per_side), 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", required=True, help="comma-separated <variant>_sets.pt files")
    parser.add_argument("--real-seed", type=int, default=7, help="which real images (not the kept sets' own seed)")
    parser.add_argument("--seed", type=int, default=0, help="the separability classifiers' seed")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--out", required=True, help="CSV to write")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = [p for p in args.sets.split(",") if p]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        parser.error(f"--sets: no such file {missing}")
    sets = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    benchmarks = {s["benchmark"] for s in sets}
    if len(benchmarks) != 1:
        parser.error(f"--sets come from several benchmarks {sorted(benchmarks)}; give one benchmark's sets")
    n = max(int((s["labels"] == k).sum()) for s in sets for k in s["labels"].unique())
    real = real_sets(benchmarks.pop(), n, seed=args.real_seed, data_root=args.data_root)
    rows: List[Dict[str, Any]] = []
    for cls in sorted(int(k) for k in real["labels"].unique()):
        xr = real["images"][real["labels"] == cls].float() / 255
        rows.append({"source": f"real{n}_seed{args.real_seed}", "class": cls, **intensity_stats(xr)})
        print(f"class {cls} real: median mean {rows[-1]['mean_q50']}, dark share {rows[-1]['dark_share']}", flush=True)
        for path, s in zip(paths, sets):
            xs = s["images"][s["labels"] == cls].float() / 255
            if not len(xs):
                continue
            row = {"source": s.get("variant", os.path.basename(path)), "class": cls, **intensity_stats(xs)}
            row["separable"] = separability(xs, xr, seed=args.seed + cls)
            row["separable_blur"] = separability(binomial_blur(xs), binomial_blur(xr), seed=args.seed + cls)
            rows.append(row)
            print(f"class {cls} {row['source']}: median mean {row['mean_q50']}, dark share {row['dark_share']}, "
                  f"separable {row['separable']} / blurred {row['separable_blur']}", flush=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
