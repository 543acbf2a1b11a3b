"""Build ``avalanche_drcpsd/_embedded/mnist_mini.npz``: the small real MNIST subset behind the ``"default"``
benchmark (no data root needed).

Selection: from the original MNIST IDX files, for each digit, the first 200 train and the first 50 test
images after a seeded permutation (``select_per_class(labels, k, seed=0)``, numpy ``default_rng(0)``), kept in
their original file order. Arrays: ``x_train`` uint8 (2000, 28, 28), ``y_train`` int64, ``x_test`` uint8
(500, 28, 28), ``y_test`` int64, plus ``train_index``/``test_index`` (int64: the rows taken from the original
files), saved with ``np.savez_compressed``.

Usage (from the project root)::

    .venv/bin/python tools/make_embedded_dataset.py [--data-root ../shared/data] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avalanche_drcpsd.data import (  # noqa: E402
    EMBEDDED_TEST_PER_CLASS,
    EMBEDDED_TRAIN_PER_CLASS,
    read_idx_images,
    read_idx_labels,
    select_per_class,
)

SEED = 0


def build(data_root: Path) -> dict[str, np.ndarray]:
    """The arrays of the embedded data set, read from ``data_root/MNIST/raw``."""
    raw = data_root / "MNIST" / "raw"
    arrays: dict[str, np.ndarray] = {}
    for split, prefix, k in (("train", "train", EMBEDDED_TRAIN_PER_CLASS), ("test", "t10k", EMBEDDED_TEST_PER_CLASS)):
        images = read_idx_images(raw / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx_labels(raw / f"{prefix}-labels-idx1-ubyte.gz")
        rows = select_per_class(labels, k, SEED)
        arrays[f"x_{split}"] = np.ascontiguousarray(images[rows])
        arrays[f"y_{split}"] = labels[rows].astype(np.int64)
        arrays[f"{split}_index"] = rows.astype(np.int64)
    return arrays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "avalanche_drcpsd" / "_embedded" / "mnist_mini.npz")
    args = parser.parse_args(argv)
    arrays = build(args.data_root)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    counts = np.bincount(arrays["y_train"]).tolist(), np.bincount(arrays["y_test"]).tolist()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.3f} MB); per class train/test: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
