"""Tests for avalanche_drcpsd.generator: geometry, the lossless encode/decode, save/load, sampling, training."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from avalanche_drcpsd.generator import (
    DiffusionGenerator,
    GeneratorError,
    GeneratorSpec,
    guided_denoise,
    make_sampling_scheduler,
)

L, D = 4, 16  # condition tokens and cross-attention width


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(image_shape=(1, 8, 8), patch_size=1, channels=(8, 16), seed=0) -> DiffusionGenerator:
    torch.manual_seed(seed)
    return DiffusionGenerator.build(image_shape=image_shape, cross_attention_dim=D, block_out_channels=channels,
                                    attention_head_dim=4, patch_size=patch_size)


@pytest.fixture(scope="module")
def gen():
    return _tiny().eval()


def _conds(b: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, L, D, generator=g), torch.randn(L, D, generator=g)


# --- geometry and the lossless encoding ------------------------------------------------------------------
def test_build_mnist_geometry():
    g = _tiny(image_shape=(1, 28, 28), patch_size=2, channels=(8, 16, 16))
    # multiple = patch 2 * 2**(3 - 1) = 8 -> 28 rounds up to 32; latent: 1 * 2 * 2 channels, 32 / 2 = 16
    assert g.spec == GeneratorSpec(image_shape=(1, 28, 28), patch_size=2, model_size=32)
    assert g.spec.latent_shape == (4, 16, 16)
    assert g.unet.config.in_channels == 4 and g.unet.config.out_channels == 4
    assert g.unet.config.sample_size == 16
    # cross-attention everywhere but the first level when there are more than two levels
    assert list(g.unet.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert list(g.unet.config.up_block_types) == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    z = g.encode(torch.rand(2, 1, 28, 28))
    assert z.shape == (2, 4, 16, 16)


def test_build_rejects_bad_image_shape():
    with pytest.raises(GeneratorError, match=r"\(28, 28\)"):
        DiffusionGenerator.build(image_shape=(28, 28), cross_attention_dim=D, block_out_channels=(8, 16))


@pytest.mark.parametrize("image_shape,patch_size,channels,latent", [
    ((1, 28, 28), 2, (8, 16, 16), (4, 16, 16)),
    ((1, 8, 8), 1, (8, 16), (1, 8, 8)),
    ((3, 10, 6), 2, (8, 16), (12, 6, 6)),  # multiple 4: side 10 -> 12, non-square, padded off-centre rows
])
def test_encode_decode_round_trip(image_shape, patch_size, channels, latent):
    g = _tiny(image_shape=image_shape, patch_size=patch_size, channels=channels)
    x = torch.rand((3,) + tuple(image_shape), generator=torch.Generator().manual_seed(0))
    x[0].fill_(0.0)
    x[1].fill_(1.0)
    z = g.encode(x)
    assert g.spec.latent_shape == latent
    assert z.shape == (3,) + latent
    assert z.min() >= -1.0 and z.max() <= 1.0
    torch.testing.assert_close(g.decode(z), x, rtol=0, atol=1e-6)


def test_encode_maps_to_minus_one_one_and_pads_with_minus_one():
    g = _tiny(image_shape=(1, 6, 6), patch_size=1, channels=(8, 16))  # multiple 2 -> model size 6, no padding
    assert g.spec.model_size == 6
    x = torch.tensor([0.0, 0.25, 0.5, 1.0]).repeat(9)[:36].view(1, 1, 6, 6)
    torch.testing.assert_close(g.encode(x), x * 2 - 1)  # 0 -> -1, 0.25 -> -0.5, 0.5 -> 0, 1 -> 1
    g = _tiny(image_shape=(1, 5, 5), patch_size=1, channels=(8, 16))  # 5 -> 6: one row/column of padding
    z = g.encode(torch.ones(1, 1, 5, 5))
    assert z.shape == (1, 1, 6, 6)
    # top = left = (6 - 5) // 2 = 0: the image sits at [0:5, 0:5], padding at the last row and column
    assert torch.equal(z[0, 0, :5, :5], torch.ones(5, 5))
    assert torch.equal(z[0, 0, 5, :], -torch.ones(6)) and torch.equal(z[0, 0, :, 5], -torch.ones(6))


def test_decode_clamps_to_unit_interval(gen):
    z = torch.full((1,) + gen.spec.latent_shape, 3.0)
    z[..., 0, 0] = -5.0
    out = gen.decode(z)
    assert out.max().item() == 1.0 and out.min().item() == 0.0


@pytest.mark.parametrize("shape", [(2, 1, 8, 7), (2, 3, 8, 8), (1, 8, 8)])
def test_encode_rejects_wrong_shape(gen, shape):
    with pytest.raises(GeneratorError) as info:
        gen.encode(torch.zeros(shape))
    assert str(shape) in str(info.value)
    assert "(B, 1, 8, 8)" in str(info.value)


# --- save / load -----------------------------------------------------------------------------------
def test_save_load_round_trip(gen, tmp_path):
    gen.save_pretrained(tmp_path / "g")
    assert (tmp_path / "g" / "generator_config.json").is_file()
    assert (tmp_path / "g" / "unet" / "config.json").is_file()
    assert (tmp_path / "g" / "scheduler" / "scheduler_config.json").is_file()
    assert not [n for n in os.listdir(tmp_path / "g") if n.startswith(".tmp-")]
    raw = json.loads((tmp_path / "g" / "generator_config.json").read_text())
    assert raw == {"_class_name": "DiffusionGenerator", "image_shape": [1, 8, 8], "patch_size": 1, "model_size": 8}

    loaded = DiffusionGenerator.from_pretrained(tmp_path / "g").eval()
    assert loaded.spec == gen.spec
    torch.testing.assert_close(loaded.alphas_cumprod, gen.alphas_cumprod, rtol=0, atol=0)
    for (k, a), (k2, b) in zip(gen.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k

    cond, null = _conds(3)
    z = torch.randn(3, *gen.spec.latent_shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 500, 999])
    with torch.no_grad():
        assert torch.equal(loaded.predict_noise(z, t, cond), gen.predict_noise(z, t, cond))
    # DDIM: the same images for the same seed (the default DPM sampler: test_save_load_same_dpm_samples)
    kw = dict(guidance_scale=3.0, num_inference_steps=3, sampler="ddim")
    a = gen.sample(cond, null, generator=torch.Generator().manual_seed(4), **kw)
    b = loaded.sample(cond, null, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b)


def test_save_load_same_dpm_samples(gen, tmp_path):
    gen.save_pretrained(tmp_path / "g")
    loaded = DiffusionGenerator.from_pretrained(tmp_path / "g").eval()
    fresh_steps = make_sampling_scheduler("dpm", gen.noise_scheduler.config)
    loaded_steps = make_sampling_scheduler("dpm", loaded.noise_scheduler.config)
    fresh_steps.set_timesteps(3)
    loaded_steps.set_timesteps(3)
    assert loaded_steps.timesteps.tolist() == fresh_steps.timesteps.tolist()
    assert int(loaded_steps.timesteps[0]) == 999, "few-step sampling starts from the last training timestep"
    cond, null = _conds(3)
    kw = dict(guidance_scale=3.0, num_inference_steps=3)  # default sampler: "dpm"
    a = gen.sample(cond, null, generator=torch.Generator().manual_seed(4), **kw)
    b = loaded.sample(cond, null, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b)


def test_from_pretrained_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(GeneratorError) as info:
        DiffusionGenerator.from_pretrained(missing)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_from_pretrained_without_generator_config(gen, tmp_path):
    gen.save_pretrained(tmp_path / "g")
    os.remove(tmp_path / "g" / "generator_config.json")
    with pytest.raises(GeneratorError) as info:
        DiffusionGenerator.from_pretrained(tmp_path / "g")
    assert "generator_config.json" in str(info.value) and str(tmp_path / "g") in str(info.value)
    assert "unet" not in str(info.value).split("lacks")[1].split("]")[0]  # only the missing file is listed


def test_from_pretrained_without_unet_and_scheduler(gen, tmp_path):
    gen.save_pretrained(tmp_path / "g")
    shutil.rmtree(tmp_path / "g" / "unet")
    shutil.rmtree(tmp_path / "g" / "scheduler")
    with pytest.raises(GeneratorError) as info:
        DiffusionGenerator.from_pretrained(tmp_path / "g")
    msg = str(info.value)
    assert os.path.join("unet", "config.json") in msg
    assert os.path.join("scheduler", "scheduler_config.json") in msg
    assert "generator_config.json'" not in msg.split("lacks")[1]


def test_channel_mismatch_is_rejected(gen):
    spec = GeneratorSpec(image_shape=(3, 8, 8), patch_size=1, model_size=8)  # needs 3 channels, UNet has 1
    with pytest.raises(GeneratorError, match="1/1"):
        DiffusionGenerator(gen.unet, gen.noise_scheduler, spec)


# --- sampling --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(guidance_scale=2.5),
    dict(guidance_scale=1.0),  # no guidance: the single-batch path
    dict(guidance_scale=(5.0, 9.0)),
    dict(guidance_scale=[0.0, 3.0]),
    dict(guidance_scale=4.0, sampler="ddim"),
])
def test_sample_shape_range_and_determinism(gen, kwargs):
    cond, null = _conds(3)
    a = gen.sample(cond, null, num_inference_steps=3, generator=torch.Generator().manual_seed(7), **kwargs)
    b = gen.sample(cond, null, num_inference_steps=3, generator=torch.Generator().manual_seed(7), **kwargs)
    c = gen.sample(cond, null, num_inference_steps=3, generator=torch.Generator().manual_seed(8), **kwargs)
    assert a.shape == (3, 1, 8, 8)
    assert a.dtype == torch.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_guidance_and_sampler_change_the_output(gen):
    cond, null = _conds(2)

    def run(**kw):
        return gen.sample(cond, null, num_inference_steps=3, generator=torch.Generator().manual_seed(0), **kw)

    base = run(guidance_scale=2.0)
    assert not torch.equal(base, run(guidance_scale=6.0))


def test_guidance_interval_guides_only_the_steps_inside_it(gen, monkeypatch):
    """Steps whose t / T lies in the interval make one batched call for both halves (2B inputs), the others the
    conditional call alone (B); the interval (0, 1) is every step, one holding no step is no guidance at all."""
    cond, null = _conds(2)
    calls = []
    original = gen.predict_noise

    def spy(z_t, t, c):
        calls.append((int(t[0]), z_t.shape[0]))
        return original(z_t, t, c)

    monkeypatch.setattr(gen, "predict_noise", spy)

    def run(**kw):
        calls.clear()
        out = gen.sample(cond, null, num_inference_steps=4, generator=torch.Generator().manual_seed(0), **kw)
        return out, list(calls)

    full, full_calls = run(guidance_scale=3.0)
    assert [t for t, _ in full_calls] == [999, 749, 499, 249] and all(n == 4 for _, n in full_calls)
    part, part_calls = run(guidance_scale=3.0, guidance_interval=(0.0, 0.6))
    assert part_calls == [(999, 2), (749, 2), (499, 4), (249, 4)]
    assert torch.equal(run(guidance_scale=3.0, guidance_interval=(0.0, 1.0))[0], full)
    assert not torch.equal(part, full)
    none, none_calls = run(guidance_scale=3.0, guidance_interval=(0.0, 0.1))
    assert all(n == 2 for _, n in none_calls) and torch.equal(none, run(guidance_scale=1.0)[0])


def test_samplers_differ_on_a_well_behaved_denoiser(gen, monkeypatch):
    """An untrained UNet's x0 estimate at t=999 is huge, so every sampler clamps to the same 0/1 image; a stand-in
    denoiser whose x0 estimate is sqrt(abar_t) * z_t keeps the images in range, where DDIM and DPM-Solver differ."""
    cond, null = _conds(2)
    abar = gen.alphas_cumprod

    def predict_noise(z_t, t, c):
        return z_t * (1 - abar[t.long()]).sqrt().view(-1, 1, 1, 1)

    monkeypatch.setattr(gen, "predict_noise", predict_noise)
    kw = dict(guidance_scale=2.0, num_inference_steps=3)
    dpm = gen.sample(cond, null, generator=torch.Generator().manual_seed(0), **kw)
    ddim = gen.sample(cond, null, generator=torch.Generator().manual_seed(0), sampler="ddim", **kw)
    assert 0.0 < float(dpm.mean()) < 1.0 and 0.0 < float(ddim.mean()) < 1.0
    assert not torch.equal(dpm, ddim)
    # the stochastic DPM-Solver++ adds noise from the sampling generator at every step: reproducible from its seed,
    # and another stream after the same starting noise gives other images
    sde = gen.sample(cond, null, generator=torch.Generator().manual_seed(0), sampler="dpm_sde", **kw)
    assert torch.equal(sde, gen.sample(cond, null, generator=torch.Generator().manual_seed(0), sampler="dpm_sde", **kw))
    assert 0.0 < float(sde.mean()) < 1.0 and not torch.equal(sde, dpm)
    z = torch.randn((2,) + gen.spec.latent_shape, generator=torch.Generator().manual_seed(0))
    ends = []
    for seed in (1, 2):
        scheduler = make_sampling_scheduler("dpm_sde", gen.noise_scheduler.config)
        scheduler.set_timesteps(3)
        ends.append(guided_denoise(predict_noise, scheduler, z * scheduler.init_noise_sigma, cond, null,
                                   torch.full((2,), 2.0), generator=torch.Generator().manual_seed(seed)))
    assert not torch.equal(*ends)


def test_sample_does_not_track_gradients(gen):
    cond, null = _conds(1)
    cond.requires_grad_(True)
    out = gen.sample(cond, null, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert not out.requires_grad


def test_sample_rejects_unknown_sampler(gen):
    cond, null = _conds(1)
    with pytest.raises(GeneratorError, match="sampler='euler'"):
        gen.sample(cond, null, sampler="euler", num_inference_steps=2)


def test_make_sampling_scheduler(gen):
    cfg = gen.noise_scheduler.config
    with pytest.raises(GeneratorError, match="sampler='bogus'"):
        make_sampling_scheduler("bogus", cfg)
    dpm = make_sampling_scheduler("dpm", cfg)
    ddim = make_sampling_scheduler("ddim", cfg)
    assert make_sampling_scheduler("dpm_sde", cfg).config.algorithm_type == "sde-dpmsolver++"
    assert type(dpm).__name__ == "DPMSolverMultistepScheduler"
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    assert type(ddim).__name__ == "DDIMScheduler"
    for s in (dpm, ddim):  # same noise schedule as training
        assert s.config.num_train_timesteps == cfg.num_train_timesteps
        assert s.config.beta_schedule == cfg.beta_schedule
        torch.testing.assert_close(s.alphas_cumprod.float(), gen.alphas_cumprod)


# --- noise and training ----------------------------------------------------------------------------------
def test_noisy_and_snr(gen):
    z0 = gen.encode(torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    z_t, noise, t = gen.noisy(z0, torch.Generator().manual_seed(3))
    z_t2, noise2, t2 = gen.noisy(z0, torch.Generator().manual_seed(3))
    assert torch.equal(z_t, z_t2) and torch.equal(noise, noise2) and torch.equal(t, t2)
    assert t.shape == (4,) and t.dtype == torch.int64 and (t >= 0).all() and (t < 1000).all()
    a = gen.alphas_cumprod[t].view(4, 1, 1, 1)
    torch.testing.assert_close(z_t, a.sqrt() * z0 + (1 - a).sqrt() * noise)
    snr = gen.snr(t)
    torch.testing.assert_close(snr, (a / (1 - a)).flatten())


def test_training_loss_decreases_on_a_fixed_batch():
    g = _tiny(seed=0).train()
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(8, L, D, generator=torch.Generator().manual_seed(1))

    def loss():
        return g.training_loss(images, cond, snr_gamma=5.0, generator=torch.Generator().manual_seed(11))

    before = loss()
    assert before.dim() == 0 and math.isfinite(before.item())
    assert before.item() == pytest.approx(loss().item(), rel=1e-6)  # same seed, same noise and timesteps
    opt = torch.optim.AdamW(g.parameters(), lr=3e-3)
    for _ in range(10):
        opt.zero_grad()
        loss().backward()
        opt.step()
    after = loss().item()
    assert math.isfinite(after)
    assert after < 0.9 * before.item(), (before.item(), after)


def test_training_loss_rejects_wrong_images(gen):
    with pytest.raises(GeneratorError):
        gen.training_loss(torch.rand(2, 1, 9, 9), torch.zeros(2, L, D))
