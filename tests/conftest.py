"""Shared fixtures: where the real data is, and tiny DR-CPSD configurations that run in seconds on a CPU."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from avalanche_drcpsd import DRCPSDConfig

DATA_ROOT = Path(os.environ.get("DRCPSD_DATA_ROOT", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

TINY_ENCODER = {"kind": "default", "hidden_size": 16, "num_layers": 1, "num_heads": 2}


def tiny_config(**overrides) -> DRCPSDConfig:
    """A DR-CPSD config whose every phase runs in about a second on a slice of MNIST."""
    values = dict(
        text_encoder=TINY_ENCODER, unet_block_out_channels=(16, 32), unet_attention_head_dim=8, patch_size=2,
        generator_steps=4, generator_batch_size=16, cpsd_batch_size=8, cpsd_max_images_per_class=8,
        n_replay_per_class=8, sampling_steps=2, sample_batch_size=16, guidance_scale=2.0,
        replay_batch_real=16, replay_batch_syn=16, gap_samples_per_class=4,
    )
    values.update(overrides)
    return DRCPSDConfig(**values)


def benchmark_module(name: str):
    """The script ``benchmarks/<name>.py`` imported as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sgd_step_rates(monkeypatch) -> list:
    """Patch ``torch.optim.SGD.step`` to record the first group's learning rate at every step; returns the list
    it appends to (``monkeypatch.undo()`` stops it)."""
    rates = []
    step = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    return rates


# Under pytest-xdist (``-n 2``, what CI runs) each worker owns one of the 2 cores: one intra-op thread apiece.
TEST_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(TEST_THREADS)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny models: as fast alone, and ~100x faster than 2 threads when another
    process keeps the 2 cores busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "MNIST" / "raw").is_dir():
        pytest.skip(f"real data not found at {DATA_ROOT} (set DRCPSD_DATA_ROOT)")
    return DATA_ROOT


@pytest.fixture(scope="session")
def mnist_small(data_root):
    """Split-MNIST, 5 experiences, 40 train / 20 test images per class."""
    from avalanche_drcpsd.data import split_mnist

    return split_mnist(data_root, train_per_class=40, test_per_class=20, seed=0)


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion pipeline directory (tests/tiny_sd.py), built once per session."""
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "pipeline")
