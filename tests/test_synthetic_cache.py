"""Tests for avalanche_drcpsd.synthetic_cache and its use by CPSDGeneratorPlugin.sample_replay: DDDR's layout,
atomic files with the manifest last, reuse only on a matching manifest, corruption and disk-full handling."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from avalanche_drcpsd import CPSDGeneratorPlugin, DRCPSDConfig, EmbeddingBuffer
from avalanche_drcpsd.generator import DiffusionGenerator
from avalanche_drcpsd.synthetic_cache import (
    CacheWriteError,
    CorruptCacheError,
    SyntheticCache,
    SyntheticCacheError,
    generator_identity,
    quantize,
    tensor_sha256,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 6, 5)


def _settings(**changes):
    values = {"classes": [3, 7], "n_per_class": 2, "image_shape": list(SHAPE), "seeds": {"3": 10, "7": 14},
              "guidance_scale": (5.0, 9.0), "sampler": "dpm", "steps": 20, "generator": {"weights_sha256": "ab"}}
    values.update(changes)
    return values


class CountingGenerate:
    """``generate()`` for the cache: random images of the settings' shape; counts its calls."""

    def __init__(self, shape=SHAPE, classes=(3, 7), n=2, seed=0):
        self.calls, self.shape, self.classes, self.n, self.seed = 0, shape, classes, n, seed

    def __call__(self):
        self.calls += 1
        g = torch.Generator().manual_seed(self.seed + self.calls)
        y = torch.tensor(self.classes).repeat_interleave(self.n)
        return torch.rand((len(y),) + tuple(self.shape), generator=g), y


def _no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


# --- layout and round trip -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,mode", [((1, 6, 5), "L"), ((3, 4, 4), "RGB")])
def test_write_then_read_back_in_dddr_layout(tmp_path, shape, mode):
    cache = SyntheticCache(tmp_path / "cache")
    settings = _settings(image_shape=list(shape))
    gen = CountingGenerate(shape=shape)
    x, y, cached = cache.get_or_generate(2, settings, gen)
    assert not cached and gen.calls == 1
    raw, _ = CountingGenerate(shape=shape)()
    torch.testing.assert_close(x, quantize(raw), rtol=0, atol=0)  # what is returned is what the PNGs hold
    assert y.tolist() == [3, 3, 7, 7]
    task = tmp_path / "cache" / "task_2"
    assert sorted(p.relative_to(task).as_posix() for p in task.rglob("*.png")) == ["3/0.png", "3/1.png", "7/0.png",
                                                                                     "7/1.png"]
    with Image.open(task / "7" / "1.png") as img:
        assert img.mode == mode and img.size == (shape[2], shape[1])
    manifest = json.loads((task / "manifest.json").read_text())
    assert manifest["format"] == "avalanche_drcpsd.SyntheticCache/1" and manifest["task"] == 2
    assert manifest["settings"]["seeds"] == {"3": 10, "7": 14} and manifest["settings"]["guidance_scale"] == [5.0, 9.0]
    for entry in manifest["files"]:
        assert entry["sha256"] == hashlib.sha256((task / entry["path"]).read_bytes()).hexdigest()
    assert _no_temp_files(tmp_path)

    x2, y2, cached = cache.get_or_generate(2, settings, gen)
    assert cached and gen.calls == 1  # the second call does not generate
    assert torch.equal(x2, x) and torch.equal(y2, y)
    assert SyntheticCache(tmp_path / "cache").load(2, settings) is not None  # a new process (resume) reads it too


def test_settings_mismatch_is_not_reused_and_stale_files_go(tmp_path):
    cache = SyntheticCache(tmp_path)
    gen = CountingGenerate()
    cache.get_or_generate(0, _settings(), gen)
    assert cache.load(0, _settings(steps=10)) is None
    assert cache.load(1, _settings()) is None  # another task
    fewer = CountingGenerate(n=1)
    with pytest.warns(UserWarning, match=r"other settings \(changed: \['n_per_class', 'steps'\]\)"):
        x, y, cached = cache.get_or_generate(0, _settings(steps=10, n_per_class=1), fewer)
    assert not cached and fewer.calls == 1 and len(y) == 2
    assert sorted(p.name for p in (tmp_path / "task_0" / "3").iterdir()) == ["0.png"]  # 1.png of the old set removed
    assert cache.load(0, _settings()) is None and cache.load(0, _settings(steps=10, n_per_class=1)) is not None


# --- corruption ------------------------------------------------------------------------------------------
def test_corrupted_png_is_detected(tmp_path):
    cache = SyntheticCache(tmp_path)
    gen = CountingGenerate()
    cache.get_or_generate(0, _settings(), gen)
    victim = tmp_path / "task_0" / "7" / "0.png"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError) as info:
        cache.load(0, _settings())
    assert str(victim) in str(info.value) and "SHA-256" in str(info.value)
    with pytest.raises(CorruptCacheError):
        SyntheticCache(tmp_path, on_corrupt="error").get_or_generate(0, _settings(), gen)
    assert gen.calls == 1
    with pytest.warns(UserWarning, match="regenerating task 0"):
        _, _, cached = cache.get_or_generate(0, _settings(), gen)  # default: regenerate the task
    assert not cached and gen.calls == 2
    assert cache.load(0, _settings()) is not None  # whole again


def test_missing_png_and_a_png_of_the_wrong_shape_are_detected(tmp_path):
    cache = SyntheticCache(tmp_path)
    cache.get_or_generate(0, _settings(), CountingGenerate())
    (tmp_path / "task_0" / "3" / "1.png").unlink()
    with pytest.raises(CorruptCacheError, match="cannot be read"):
        cache.load(0, _settings())
    cache.save(0, _settings(), *CountingGenerate()())
    manifest_path = tmp_path / "task_0" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    Image.new("L", (9, 9)).save(tmp_path / "task_0" / "3" / "0.png")  # a valid PNG, but not the recorded one
    wrong = (tmp_path / "task_0" / "3" / "0.png").read_bytes()
    manifest["files"][0]["sha256"] = hashlib.sha256(wrong).hexdigest()  # even with a matching hash
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptCacheError, match=r"not a valid PNG of shape \(1, 6, 5\)"):
        cache.load(0, _settings())


def test_unreadable_or_foreign_manifest_means_incomplete(tmp_path):
    cache = SyntheticCache(tmp_path)
    cache.get_or_generate(0, _settings(), CountingGenerate())
    (tmp_path / "task_0" / "manifest.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache.load(0, _settings()) is None
    (tmp_path / "task_0" / "manifest.json").write_text(json.dumps({"format": "other", "settings": _settings()}))
    assert cache.load(0, _settings()) is None


# --- writing failures ------------------------------------------------------------------------------------
def test_disk_full_names_the_path_and_leaves_no_usable_task(tmp_path, monkeypatch):
    import avalanche_drcpsd.synthetic_cache as module

    cache = SyntheticCache(tmp_path)
    cache.get_or_generate(0, _settings(steps=10), CountingGenerate())  # an older complete task, other settings
    real = module._write_bytes
    calls = []

    def full_disk(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(module, "_write_bytes", full_disk)
    with pytest.raises(CacheWriteError) as info, pytest.warns(UserWarning):
        cache.get_or_generate(0, _settings(), CountingGenerate())
    msg = str(info.value)
    assert str(calls[2]) in msg and "disk full" in msg and str(tmp_path / "task_0") in msg
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, SyntheticCacheError)
    assert not (tmp_path / "task_0" / "manifest.json").exists()  # neither the old nor a partial new task is used
    assert cache.load(0, _settings()) is None and cache.load(0, _settings(steps=10)) is None
    assert _no_temp_files(tmp_path)
    monkeypatch.setattr(module, "_write_bytes", real)
    gen = CountingGenerate()
    _, _, cached = cache.get_or_generate(0, _settings(), gen)
    assert not cached and gen.calls == 1


def test_bad_inputs(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SyntheticCacheError, match="not a directory"):
        SyntheticCache(tmp_path / "file")
    with pytest.raises(ValueError, match="on_corrupt='ignore'"):
        SyntheticCache(tmp_path, on_corrupt="ignore")
    with pytest.raises(SyntheticCacheError, match=r"image_shape \(1, 6, 5\)"):
        SyntheticCache(tmp_path).save(0, _settings(), torch.rand(4, 3, 6, 5), torch.zeros(4))
    # the config checks the value, the plugin the file system (when it opens the cache, before any training)
    config = DRCPSDConfig(synthetic_cache_dir=str(tmp_path / "file"))
    with pytest.raises(SyntheticCacheError, match="file' exists and is not a directory"):
        CPSDGeneratorPlugin(config)
    assert DRCPSDConfig(synthetic_cache_dir=tmp_path / "c").synthetic_cache_dir == str(tmp_path / "c")


def test_identities():
    a = torch.arange(6.0).view(2, 3)
    assert tensor_sha256(a) == tensor_sha256(a.clone()) != tensor_sha256(a.view(3, 2))
    assert tensor_sha256(a) != tensor_sha256(a + 1e-6)
    gen = _offline_generator()
    identity = generator_identity(gen)
    assert identity["class"] == "DiffusionGenerator" and identity["spec"]["image_shape"] == (1, 8, 8)
    with torch.no_grad():
        gen.unet.conv_out.bias.add_(1.0)  # a trained generator makes other images
    assert generator_identity(gen)["weights_sha256"] != identity["weights_sha256"]


# --- through CPSDGeneratorPlugin.sample_replay --------------------------------------------------------------
D = 16


def _offline_generator() -> DiffusionGenerator:
    torch.manual_seed(0)
    return DiffusionGenerator.build(image_shape=(1, 8, 8), cross_attention_dim=D, block_out_channels=(8, 16),
                                    attention_head_dim=4, patch_size=1).eval()


def _plugin(gen, cache_dir, **overrides) -> CPSDGeneratorPlugin:
    values = dict(sampling_steps=2, guidance_scale=2.0, sample_batch_size=4, synthetic_cache_dir=str(cache_dir))
    values.update(overrides)
    plugin = CPSDGeneratorPlugin(DRCPSDConfig(**values), class_names=["zero", "one", "two"], generator=gen,
                                 verbose=False)
    g = torch.Generator().manual_seed(1)
    buffer = EmbeddingBuffer(null=torch.randn(4, D, generator=g))
    for cls in (0, 2):
        buffer.add(cls, torch.randn(4, D, generator=g), plugin.prompt(cls))
    plugin.buffer = buffer
    plugin._exp = 1
    return plugin


def test_sample_replay_writes_then_reuses_the_cache_without_calling_the_model(tmp_path, monkeypatch):
    gen = _offline_generator()
    calls = []
    original = gen.sample
    monkeypatch.setattr(gen, "sample", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = _plugin(gen, tmp_path)
    x, y = first.sample_replay([0, 2], 5)
    assert len(calls) == 4 and x.shape == (10, 1, 8, 8) and y.tolist() == [0] * 5 + [2] * 5  # 2 batches per class
    manifest = json.loads((tmp_path / "task_1" / "manifest.json").read_text())
    settings = manifest["settings"]
    assert settings["prompts"] == {"0": "a photo of a zero", "2": "a photo of a two"}
    assert settings["seeds"] == {"0": first._default_seed(), "2": first._default_seed() + 2}
    assert settings["embeddings_sha256"]["2"] == tensor_sha256(first.buffer.embeddings[2])
    assert settings["generator"] == json.loads(json.dumps(generator_identity(gen)))
    assert settings["image_shape"] == [1, 8, 8] and settings["steps"] == 2 and settings["sampler"] == "dpm"

    resumed = _plugin(gen, tmp_path)  # a new run on the same generator and buffer
    x2, y2 = resumed.sample_replay([0, 2], 5)
    assert len(calls) == 4  # read from disk, the model was not called
    assert torch.equal(x2, x) and torch.equal(y2, y)
    # without a cache the same seeds give the same images (up to the PNG's 8 bits)
    plain, _ = _plugin(gen, tmp_path, synthetic_cache_dir=None).sample_replay([0, 2], 5)
    torch.testing.assert_close(quantize(plain), x, rtol=0, atol=0)

    other = _plugin(gen, tmp_path, guidance_scale=3.0)  # other settings: not reused
    with pytest.warns(UserWarning, match="guidance_scale"):
        other.sample_replay([0, 2], 5)
    assert len(calls) == 4 + 4 + 4


def test_plugin_cache_dir_argument_overrides_the_config(tmp_path):
    plugin = CPSDGeneratorPlugin(DRCPSDConfig(synthetic_cache_dir=str(tmp_path / "a")), cache_dir=str(tmp_path / "b"),
                                 verbose=False)
    assert plugin.cache.root == tmp_path / "b"
    assert CPSDGeneratorPlugin(DRCPSDConfig(), verbose=False).cache is None
    with pytest.raises(RuntimeError, match="no synthetic cache"):
        CPSDGeneratorPlugin(DRCPSDConfig(), verbose=False).sample_cached([0], 1, task=0)
