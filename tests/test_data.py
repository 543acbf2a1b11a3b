"""Tests of avalanche_drcpsd.data: readers, selection, the four file benchmarks, the embedded default and the
errors on bad input. Real data is read from ``$DRCPSD_DATA_ROOT`` or ``../shared/data``; tests that need a
data set skip (with the reason) when it is absent. Runs in a few seconds: file benchmarks use 20/10 images
per class, and only those images are decoded."""

from __future__ import annotations

import gzip
import io
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from avalanche_drcpsd import data as D
from avalanche_drcpsd.data import (
    BENCHMARKS,
    BenchmarkSpec,
    ChecksumError,
    DataError,
    MissingDataError,
    make_benchmark,
    read_idx_images,
    read_idx_labels,
    read_packed_npz,
    select_per_class,
    split_default,
)

DATA = Path(os.environ.get("DRCPSD_DATA_ROOT", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
EXPECTED = {
    # name: (files under DATA, image shape, classes per experience for n_experiences=5, first class names)
    "split_mnist": ("MNIST/raw", (1, 28, 28), (2,) * 5, ["zero", "one", "two"]),
    "split_fmnist": ("FashionMNIST/raw", (1, 28, 28), (2,) * 5, ["T-shirt/top", "Trouser", "Pullover"]),
    "split_cifar10": ("cifar10/cifar10_jpeg_q75.npz", (3, 32, 32), (2,) * 5, CIFAR_NAMES[:3]),
    "split_gtsrb": ("gtsrb/gtsrb32_webp.npz", (3, 32, 32), (9, 9, 9, 8, 8), ["speed limit 20 km/h"]),
}


def needs(rel: str):
    """Skip unless ``DATA/rel`` exists."""
    return pytest.mark.skipif(
        not (DATA / rel).exists(), reason=f"data not found: {DATA / rel} (set DRCPSD_DATA_ROOT to ../shared/data)"
    )


def stream_tensors(stream) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, y, t) of every experience of a stream, in dataset order."""
    out = []
    for exp in stream:
        xs, ys, ts = zip(*DataLoader(exp.dataset, batch_size=1024, shuffle=False))
        out.append((torch.cat(xs), torch.cat(ys), torch.cat(ts)))
    return out


def check_benchmark(bm, name: str, shape, per_exp, names_prefix, train_k: int, test_k: int) -> None:
    """Everything a builder promises, checked on a built benchmark."""
    spec = bm.spec
    assert isinstance(spec, BenchmarkSpec) and spec.name == name
    assert spec.image_shape == shape and spec.classes_per_exp == per_exp
    assert bm.class_names[: len(names_prefix)] == names_prefix and bm.class_names == list(spec.class_names)
    assert len(bm.train_stream) == len(bm.test_stream) == len(per_exp)
    start = 0
    for stream, k in ((bm.train_stream, train_k), (bm.test_stream, test_k)):
        start = 0
        for exp, (x, y, t), n_cls in zip(stream, stream_tensors(stream), per_exp):
            expected_classes = list(range(start, start + n_cls))  # natural order
            start += n_cls
            assert sorted(exp.classes_in_this_experience) == expected_classes
            assert x.dtype == torch.float32 and tuple(x.shape[1:]) == shape
            assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
            assert y.dtype == torch.int64 and sorted(y.unique().tolist()) == expected_classes
            assert torch.bincount(y - start + n_cls).tolist() == [k] * n_cls
            assert exp.task_label == 0 and set(exp.dataset.targets_task_labels) == {0} and (t == 0).all()
    assert start == len(bm.class_names)


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------
def idx_bytes(array: np.ndarray) -> bytes:
    """A hand-built IDX file: magic (0, 0, type 0x08, ndim), big-endian dims, the data."""
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_images_and_labels_handbuilt(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 0, 255], dtype=np.uint8)
    wrap = gzip.compress if compress else (lambda b: b)
    (tmp_path / "img").write_bytes(wrap(idx_bytes(images)))
    (tmp_path / "lbl").write_bytes(wrap(idx_bytes(labels)))
    # the bytes themselves, spelled out once: magic 0x00000803, dims 2, 3, 4
    assert idx_bytes(images)[:16] == bytes.fromhex("00000803" "00000002" "00000003" "00000004")

    got = read_idx_images(tmp_path / "img")
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, images)
    got_labels = read_idx_labels(tmp_path / "lbl")
    assert got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_labels, [7, 0, 255])


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx_images(tmp_path / "bad")
    (tmp_path / "short").write_bytes(idx_bytes(np.zeros((2, 3, 3), np.uint8))[:-1])
    with pytest.raises(DataError, match="3, 3"):
        read_idx_images(tmp_path / "short")
    (tmp_path / "labels").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match="expected uint8 images"):
        read_idx_images(tmp_path / "labels")


def write_packed(path: Path, images: np.ndarray, labels: np.ndarray, fmt: str = "PNG") -> None:
    """A packed .npz as in ../shared/data/README.md (both splits hold the same images)."""
    from PIL import Image

    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    arrays = {}
    for split in ("train", "test"):
        arrays.update({f"{split}_bytes": np.concatenate(blobs), f"{split}_offsets": offsets, f"{split}_labels": labels})
    np.savez(path, classes=np.array(["a", "b"]), **arrays)


def test_read_packed_npz_decodes_selects_and_caches(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1, 0, 1, 1], dtype=np.int64)
    write_packed(tmp_path / "toy.npz", images, labels)
    cache = tmp_path / "cache"

    x, y = read_packed_npz(tmp_path / "toy.npz", "train", cache_dir=cache, workers=2)
    assert x.dtype == np.uint8 and x.shape == (7, 5, 6, 3) and y.dtype == np.int64
    np.testing.assert_array_equal(x, images)  # PNG is lossless
    np.testing.assert_array_equal(y, labels)
    cached = sorted(p.name for p in cache.iterdir())
    assert len(cached) == 1 and cached[0].startswith("toy-train-") and cached[0].endswith(".npy")  # no temp left

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(D, "_decode_images", no_decoding)
    x2, _ = read_packed_npz(tmp_path / "toy.npz", "train", cache_dir=cache)
    np.testing.assert_array_equal(x2, images)
    xs, ys = read_packed_npz(tmp_path / "toy.npz", "train", indices=np.array([5, 1]), cache_dir=cache)
    np.testing.assert_array_equal(xs, images[[5, 1]])
    np.testing.assert_array_equal(ys, labels[[5, 1]])
    monkeypatch.undo()

    # not cached + indices: only those are decoded, nothing is written
    xs, _ = read_packed_npz(tmp_path / "toy.npz", "test", indices=np.array([2]), cache_dir=cache)
    np.testing.assert_array_equal(xs, images[[2]])
    assert len(list(cache.iterdir())) == 1
    with pytest.raises(DataError, match="'val'"):
        read_packed_npz(tmp_path / "toy.npz", "val")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AVALANCHE_DRCPSD_CACHE", str(tmp_path))
    assert D.default_cache_dir() == tmp_path
    monkeypatch.delenv("AVALANCHE_DRCPSD_CACHE")
    assert D.default_cache_dir() == Path.home() / ".cache" / "avalanche_drcpsd"


# ---------------------------------------------------------------------------------------------------------------
# Selection and spec
# ---------------------------------------------------------------------------------------------------------------
def test_select_per_class():
    labels = np.repeat(np.arange(4), [10, 5, 3, 8])
    rows = select_per_class(labels, 4, seed=0)
    assert np.all(np.diff(rows) > 0)
    assert np.bincount(labels[rows]).tolist() == [4, 4, 3, 4]  # a class with fewer than k gives all it has
    np.testing.assert_array_equal(rows, select_per_class(labels, 4, seed=0))
    assert not np.array_equal(rows, select_per_class(labels, 4, seed=1))
    np.testing.assert_array_equal(select_per_class(labels, None), np.arange(len(labels)))
    with pytest.raises(DataError, match="k=0"):
        select_per_class(labels, 0)


def test_balanced_classes_per_exp_and_spec():
    assert D.balanced_classes_per_exp(43, 5) == (9, 9, 9, 8, 8)
    assert D.balanced_classes_per_exp(10, 3) == (4, 3, 3)
    assert D.balanced_classes_per_exp(10, 10) == (1,) * 10
    spec = BenchmarkSpec("x", ("cat", "dog", "cow"), (3, 8, 8), 2, (2, 1), "a photo of a {}", (2, 0, 1))
    assert spec.classes_in_experience(0) == (2, 0) and spec.classes_in_experience(1) == (1,)
    assert spec.prompt(1) == "a photo of a dog" and spec.num_classes == 3
    assert BenchmarkSpec("x", ("a", "b"), (1, 2, 2), 1, (2,)).class_order == (0, 1)
    with pytest.raises(DataError, match="classes_per_exp"):
        BenchmarkSpec("x", ("a", "b"), (1, 2, 2), 2, (2, 1))


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------------------------
def test_default_benchmark_needs_no_data_root():
    bm = make_benchmark("default", None)
    check_benchmark(bm, "default", (1, 28, 28), (2,) * 5, ["zero", "one"], train_k=200, test_k=50)
    assert bm.spec.prompt(3) == "a photo of the handwritten digit three"
    small = split_default(n_experiences=2, train_per_class=20, test_per_class=10, seed=3)
    check_benchmark(small, "default", (1, 28, 28), (5, 5), ["zero"], train_k=20, test_k=10)
    # file options are accepted and ignored for "default", so one set of kwargs serves every name
    make_benchmark("default", "/nonexistent", train_per_class=1, test_per_class=1, cache_dir="/nonexistent")


def test_default_benchmark_is_deterministic_and_seeded():
    kw = dict(train_per_class=15, test_per_class=5)
    a, b, c = split_default(seed=1, **kw), split_default(seed=1, **kw), split_default(seed=2, **kw)
    xa, xb, xc = (stream_tensors(bm.train_stream)[0][0] for bm in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_class_order_and_task000_metric_names():
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import Naive

    bm = split_default(n_experiences=2, train_per_class=4, test_per_class=2, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert sorted(bm.train_stream[0].classes_in_this_experience) == [5, 6, 7, 8, 9]
    assert bm.spec.classes_in_experience(0) == (9, 8, 7, 6, 5)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    strategy = Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=8, eval_mb_size=16, device="cpu",
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
    )  # fmt: skip
    results = strategy.eval(bm.test_stream[:1])
    assert any(k.endswith("/Task000/Exp000") for k in results), sorted(results)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_file_benchmark(name, tmp_path):
    rel, shape, per_exp, names = EXPECTED[name]
    if not (DATA / rel).exists():
        pytest.skip(f"data not found: {DATA / rel} (set DRCPSD_DATA_ROOT to ../shared/data)")
    bm = make_benchmark(name, DATA, train_per_class=20, test_per_class=10, cache_dir=tmp_path)
    check_benchmark(bm, name, shape, per_exp, names, train_k=20, test_k=10)
    assert len(bm.class_names) == {"split_gtsrb": 43}.get(name, 10)
    if name == "split_cifar10":
        assert bm.class_names == CIFAR_NAMES


@needs("cifar10/cifar10_jpeg_q75.npz")
def test_file_benchmark_is_deterministic(tmp_path):
    kw = dict(n_experiences=2, train_per_class=5, test_per_class=5, cache_dir=tmp_path)
    a = D.split_cifar10(DATA, seed=0, **kw)
    b = D.split_cifar10(DATA, seed=0, **kw)
    c = D.split_cifar10(DATA, seed=1, **kw)
    (xa, ya, _), (xb, yb, _), (xc, _, _) = (stream_tensors(bm.train_stream)[1] for bm in (a, b, c))
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)


@needs("MNIST/raw")
def test_verify_md5_passes_on_real_mnist():
    bm = D.split_mnist(DATA, n_experiences=1, train_per_class=1, test_per_class=1, verify=True)
    assert len(bm.train_stream[0].dataset) == 10


# ---------------------------------------------------------------------------------------------------------------
# Errors (raised before any work, naming the bad value)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_experiences=0), "n_experiences=0"),
        (dict(n_experiences=11), "n_experiences=11 must be in 1..10"),
        (dict(n_experiences=2.5), "n_experiences=2.5 must be an int"),
        (dict(train_per_class=0), "train_per_class=0"),
        (dict(test_per_class=-3), "test_per_class=-3"),
        (dict(seed=-1), "seed=-1"),
        (dict(class_order=[0, 1, 2]), r"class_order=\[0, 1, 2\]"),
    ],
)
def test_bad_values_raise_data_error(kwargs, match):
    with pytest.raises(DataError, match=match):
        split_default(**kwargs)


def test_unknown_benchmark_lists_valid_names():
    with pytest.raises(DataError, match="'split_svhn'") as info:
        make_benchmark("split_svhn", DATA)
    assert all(name in str(info.value) for name in BENCHMARKS)
    assert isinstance(info.value, ValueError)


def test_missing_data_root_and_files(tmp_path):
    with pytest.raises(DataError, match="'split_mnist' needs a data_root"):
        make_benchmark("split_mnist", None)
    with pytest.raises(MissingDataError, match="not a folder"):
        make_benchmark("split_cifar10", tmp_path / "nope")
    for name in ("split_mnist", "split_fmnist", "split_cifar10", "split_gtsrb"):
        with pytest.raises(FileNotFoundError) as info:
            make_benchmark(name, tmp_path)
        expected = tmp_path / D._SOURCES[name].files[0]
        assert str(expected) in str(info.value) and "README.md" in str(info.value)
        assert isinstance(info.value, MissingDataError) and isinstance(info.value, ValueError)


def test_bad_values_checked_before_files(tmp_path):
    with pytest.raises(DataError, match="train_per_class=0"):
        make_benchmark("split_gtsrb", tmp_path, train_per_class=0)  # no files there: the value error wins


def test_bad_md5_raises_checksum_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for rel in D._SOURCES["split_mnist"].files:
        (tmp_path / rel).write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte.gz"):
        D.split_mnist(tmp_path, verify=True)
