"""Tests for avalanche_drcpsd.sd: a tiny random Stable Diffusion pipeline built from configs, saved with
``save_pretrained`` and loaded exactly as a user loads a real one. Nothing is downloaded."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from tiny_sd import HIDDEN, RES, build_tiny_sd

from avalanche_drcpsd import CPSDGeneratorPlugin, DRCPSDConfig
from avalanche_drcpsd.config import ConfigError
from avalanche_drcpsd.cpsd import CPSDProjection, train_cpsd_projection
from avalanche_drcpsd.generator import GeneratorError, make_sampling_scheduler
from avalanche_drcpsd.losses import cpsd_loss, ldm_loss
from avalanche_drcpsd.sd import (
    SD_OPTIONS,
    StableDiffusionError,
    StableDiffusionGenerator,
    draw_guidance_scales,
    load_generator,
    parse_dtype,
    pipeline_fingerprint,
    to_classifier_images,
    to_pipeline_images,
)
from avalanche_drcpsd.text_encoders import HFCLIPTextEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a photo of a dog"


@pytest.fixture(scope="module")
def sd_gen(sd_dir) -> StableDiffusionGenerator:
    return StableDiffusionGenerator.from_pretrained(sd_dir)


@pytest.fixture(scope="module")
def sd_text(sd_gen) -> HFCLIPTextEncoder:
    return sd_gen.load_text_encoder()


def _images(n: int, shape=(3, RES, RES), seed: int = 0) -> torch.Tensor:
    return torch.rand((n,) + tuple(shape), generator=torch.Generator().manual_seed(seed))


def _state(module: torch.nn.Module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module: torch.nn.Module, before) -> None:
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- loading ---------------------------------------------------------------------------------------------
def test_loads_frozen_with_the_pipelines_geometry_and_text_encoder(sd_dir, sd_gen, sd_text):
    assert isinstance(sd_gen, StableDiffusionGenerator) and sd_gen.frozen
    params = list(sd_gen.parameters())
    assert params and not any(p.requires_grad for p in params)
    sd_gen.train()
    assert not sd_gen.training and not sd_gen.unet.training and not sd_gen.vae.training
    assert (sd_gen.resolution, sd_gen.vae_scale_factor, sd_gen.latent_shape) == (RES, 2, (4, RES // 2, RES // 2))
    assert sd_gen.image_shape == (3, RES, RES) and sd_gen.prediction_type == "epsilon"
    assert sd_gen.scaling_factor == pytest.approx(0.18215)
    assert all(isinstance(p, AttnProcessor2_0) for p in sd_gen.unet.attn_processors.values())  # SDPA
    assert sd_gen.identity["fingerprint"] == pipeline_fingerprint(sd_dir) and len(sd_gen.fingerprint) == 64
    json.dumps(sd_gen.identity)
    # the pipeline's own text encoder and tokenizer, frozen, giving exactly the pipeline's prompt embeddings
    assert isinstance(sd_text, HFCLIPTextEncoder) and not any(p.requires_grad for p in sd_text.parameters())
    assert (sd_text.context_length, sd_text.hidden_size) == (77, HIDDEN)
    assert sd_text.identity["config"]["tokenizer"] == str((sd_dir / "tokenizer").resolve())
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), local_files_only=True)
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="")
    torch.testing.assert_close(sd_text.encode([PROMPT]), cond, rtol=0, atol=0)
    torch.testing.assert_close(sd_text.null_embedding()[None], uncond, rtol=0, atol=0)


def test_options_are_the_config_keys_and_reach_the_model(sd_dir):
    params = set(inspect.signature(StableDiffusionGenerator.from_pretrained).parameters)
    assert set(SD_OPTIONS) <= params
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    with pytest.raises(StableDiffusionError, match="'int8'"):
        parse_dtype("int8")
    gen = StableDiffusionGenerator.from_pretrained(sd_dir, torch_dtype="bf16", resolution=8, attention="default",
                                                   compile_unet=True, offload=True, vae_batch_size=3)
    assert gen.unet.dtype == torch.bfloat16 and gen.vae.dtype == torch.bfloat16
    assert gen.latent_shape == (4, 4, 4) and gen.offload and gen.vae_batch_size == 3
    assert not any(k.startswith("_orig_mod") for k in gen.state_dict())  # the compiled UNet stays out of the tree
    assert type(gen._unet_fn).__name__ == "OptimizedModule"
    with pytest.raises(StableDiffusionError, match="resolution=9"):
        StableDiffusionGenerator.from_pretrained(sd_dir, resolution=9)
    with pytest.raises(StableDiffusionError, match="attention='flash'"):
        StableDiffusionGenerator.from_pretrained(sd_dir, attention="flash")


def test_bfloat16_generator_keeps_float32_interfaces(sd_dir, sd_text):
    gen = StableDiffusionGenerator.from_pretrained(sd_dir, torch_dtype=torch.bfloat16, offload=True)
    z = gen.encode(_images(2))
    cond = sd_text.encode([PROMPT, PROMPT]).requires_grad_(True)
    eps = gen.predict_noise(z, torch.tensor([10, 900]), cond)
    assert z.dtype == eps.dtype == torch.float32 and eps.shape == z.shape
    eps.sum().backward()
    assert cond.grad is not None and torch.isfinite(cond.grad).all()
    x = gen.sample(cond.detach(), sd_text.null_embedding(), guidance_scale=(5.0, 9.0), num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == (2, 3, RES, RES) and 0 <= x.min() and x.max() <= 1


# --- errors ----------------------------------------------------------------------------------------------
def test_missing_directory_names_it_and_what_was_expected(tmp_path):
    missing = tmp_path / "sd-v1-5"
    with pytest.raises(StableDiffusionError) as info:
        StableDiffusionGenerator.from_pretrained(missing)
    msg = str(info.value)
    assert isinstance(info.value, GeneratorError)
    assert str(missing) in msg and "does not exist" in msg and "model_index.json" in msg and "unet/" in msg


def test_missing_components_are_each_named(sd_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd_dir, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):  # transformers 5 writes tokenizer.json only
        (broken / "tokenizer" / name).unlink(missing_ok=True)
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(StableDiffusionError) as info:
        StableDiffusionGenerator.from_pretrained(broken)
    msg = str(info.value).split("lacks")[1].split("; expected")[0]
    assert "vae/diffusion_pytorch_model.safetensors (or .bin)" in msg
    assert "tokenizer/vocab.json + tokenizer/merges.txt" in msg and "scheduler/scheduler_config.json" in msg
    assert "unet" not in msg and "text_encoder" not in msg and "model_index" not in msg  # only what is missing
    # through the plugin, as a user configures it: the same error, before any training
    plugin = CPSDGeneratorPlugin(DRCPSDConfig(generator="stable_diffusion", generator_path=str(broken)), verbose=False)
    with pytest.raises(StableDiffusionError, match="vae/diffusion_pytorch_model"):
        plugin.setup()
    with pytest.raises(GeneratorError, match="model_index.json.*generator_config.json"):
        load_generator(tmp_path)  # neither kind of generator directory


def test_text_encoder_width_must_match_cross_attention(sd_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(sd_dir, other)
    config = json.loads((other / "text_encoder" / "config.json").read_text())
    (other / "text_encoder" / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    with pytest.raises(StableDiffusionError, match="hidden_size 48.*cross_attention_dim is 32"):
        StableDiffusionGenerator.from_pretrained(other)


# --- the protocol ----------------------------------------------------------------------------------------
def test_encode_is_the_vae_posterior_mean_times_the_scaling_factor(sd_gen):
    x = _images(3, (1, 12, 10))  # grayscale, non-square classifier images
    z = sd_gen.encode(x)
    assert z.shape == (3, 4, RES // 2, RES // 2) and z.dtype == torch.float32
    assert torch.equal(z, sd_gen.encode(x))  # deterministic
    with torch.no_grad():
        expected = sd_gen.vae.encode(to_pipeline_images(x, RES)).latent_dist.mean * sd_gen.scaling_factor
    torch.testing.assert_close(z, expected)
    rgb = to_pipeline_images(x, RES)
    assert rgb.shape == (3, 3, RES, RES) and rgb.min() >= -1 and rgb.max() <= 1
    assert torch.equal(rgb[:, 0], rgb[:, 1])  # gray repeated on the three channels


def test_decode_returns_the_classifiers_shape(sd_dir):
    gen = StableDiffusionGenerator.from_pretrained(sd_dir, output_shape=(1, 12, 10), vae_batch_size=2)
    z = torch.randn(3, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(1))
    x = gen.decode(z)
    assert x.shape == (3, 1, 12, 10) and x.min() >= 0 and x.max() <= 1
    with torch.no_grad():
        rgb = ((gen.vae.decode(z / gen.scaling_factor).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(x, to_classifier_images(rgb, (1, 12, 10)))
    with pytest.raises(StableDiffusionError, match=r"\(2, 12, 10\)"):
        gen.set_output_shape((2, 12, 10))


def test_to_classifier_images_matches_pil_grayscale():
    rgb = _images(2, (3, 9, 7), seed=3)
    gray = to_classifier_images(rgb, (1, 9, 7))
    assert gray.shape == (2, 1, 9, 7)
    pixels = (rgb[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = torch.tensor(list(Image.fromarray(pixels).convert("L").getdata()), dtype=torch.float32).view(9, 7) / 255
    quantised = to_classifier_images((rgb[:1] * 255).round() / 255, (1, 9, 7))[0, 0]
    assert (quantised - pil).abs().max() <= 1 / 255 + 1e-6
    assert to_classifier_images(rgb, (3, 4, 5)).shape == (2, 3, 4, 5)
    assert torch.equal(to_classifier_images(gray, (3, 9, 7))[:, 2], gray[:, 0])


def test_v_prediction_is_converted_to_epsilon(tmp_path):
    gen = StableDiffusionGenerator.from_pretrained(build_tiny_sd(tmp_path / "v", prediction_type="v_prediction"))
    assert gen.prediction_type == "v_prediction"
    z_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    cond = torch.randn(2, 77, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v = gen.unet(z_t, t, encoder_hidden_states=cond).sample
    abar = gen.alphas_cumprod[t].view(2, 1, 1, 1)
    torch.testing.assert_close(gen.predict_noise(z_t, t, cond), abar.sqrt() * v + (1 - abar).sqrt() * z_t)


def test_shared_noise_snr_and_ldm_loss(sd_gen):
    z0 = sd_gen.encode(_images(4))
    z_t, noise, t = sd_gen.noisy(z0, torch.Generator().manual_seed(5))
    a = sd_gen.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(z_t, a.sqrt() * z0 + (1 - a).sqrt() * noise)
    torch.testing.assert_close(sd_gen.snr(t), (a / (1 - a)).flatten())
    cond = torch.randn(4, 77, HIDDEN, generator=torch.Generator().manual_seed(2))
    loss = sd_gen.training_loss(_images(4), cond, snr_gamma=5.0, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ldm_loss(sd_gen.predict_noise(z_t, t, cond), noise, sd_gen.snr(t), 5.0)
    torch.testing.assert_close(loss, expected)


# --- CPSD on the frozen pipeline -------------------------------------------------------------------------
def test_cpsd_steps_lower_the_loss_on_a_fixed_batch_and_only_the_projection_learns(sd_gen, sd_text):
    tokens = sd_text.encode([PROMPT])[0]
    projection = CPSDProjection(77, HIDDEN, mode="token")
    assert projection.linear.weight.shape == (77, 77)
    torch.testing.assert_close(projection(tokens[None])[0], tokens)  # identity at initialisation
    z0 = sd_gen.encode(_images(4, seed=7))
    z_t, noise, t = sd_gen.noisy(z0, torch.Generator().manual_seed(3))  # fixed noise and timesteps
    before_weights = _state(sd_gen)
    optimizer = torch.optim.AdamW(projection.parameters(), lr=1e-2, weight_decay=0.0)

    def loss():
        cond = projection(tokens[None]).expand(4, -1, -1)
        return cpsd_loss(sd_gen.predict_noise(z_t, t, cond), noise, sd_gen.snr(t), 5.0, 0.003, "mean")

    first = loss()
    for _ in range(5):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    assert loss().item() < first.item()
    assert all(p.grad is None for p in sd_gen.parameters())
    _assert_unchanged(sd_gen, before_weights)


def test_train_cpsd_projection_runs_on_stable_diffusion(sd_gen, sd_text):
    tokens = sd_text.encode([PROMPT])[0]
    before = _state(sd_gen)
    projection = train_cpsd_projection(sd_gen, tokens, _images(4, (1, 12, 12)), epochs=1, batch_size=2, lr=1e-3,
                                       generator=torch.Generator().manual_seed(0))
    assert not torch.equal(projection.linear.weight, torch.eye(77))
    _assert_unchanged(sd_gen, before)
    assert not any(p.requires_grad for p in sd_gen.parameters())


# --- sampling --------------------------------------------------------------------------------------------
def test_sampling_is_seeded_and_per_image_guidance(sd_gen, sd_text):
    cond = sd_text.encode(["a photo of a dog", "a photo of a cat", "a photo of a dog"])
    null = sd_text.null_embedding()
    kw = dict(guidance_scale=(5.0, 9.0), num_inference_steps=2)
    a = sd_gen.sample(cond, null, generator=torch.Generator().manual_seed(3), **kw)
    b = sd_gen.sample(cond, null, generator=torch.Generator().manual_seed(3), **kw)
    c = sd_gen.sample(cond, null, generator=torch.Generator().manual_seed(4), **kw)
    assert a.shape == (3, 3, RES, RES) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    w = draw_guidance_scales((5.0, 9.0), 1000, torch.Generator().manual_seed(0))
    assert 5.0 <= w.min() and w.max() <= 9.0 and w.std() > 0.5
    assert torch.equal(draw_guidance_scales(7.0, 3), torch.full((3,), 7.0))


def test_sampling_equals_diffusers_pipeline_with_the_same_solver(sd_dir, sd_gen, sd_text):
    """Our DPM-Solver++ loop with a fixed guidance scale = StableDiffusionPipeline's own call on the same weights,
    prompt embeddings, scheduler and initial noise."""
    cond, null = sd_text.encode([PROMPT]), sd_text.null_embedding()
    ours = sd_gen.sample(cond, null, guidance_scale=7.0, num_inference_steps=3,
                         generator=torch.Generator().manual_seed(11))
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), local_files_only=True)
    pipe.scheduler = make_sampling_scheduler("dpm", {**pipe.scheduler.config}, clip_x0=False)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    latents = torch.randn((1, 4, RES // 2, RES // 2), generator=torch.Generator().manual_seed(11))
    theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=null[None], guidance_scale=7.0, num_inference_steps=3,
                  latents=latents, output_type="pt").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# --- through the plugin, as a user configures it ---------------------------------------------------------
def test_plugin_with_stable_diffusion_learns_projections_only(sd_dir, tmp_path, monkeypatch):
    config = DRCPSDConfig(generator="stable_diffusion", generator_path=str(sd_dir), cpsd_batch_size=2,
                          cpsd_max_images_per_class=4, cpsd_lr=1e-3, n_replay_per_class=3, sampling_steps=2,
                          sample_batch_size=2, generator_steps=7, gap_samples_per_class=0)
    plugin = CPSDGeneratorPlugin(config, class_names=["zero", "one"], verbose=False)
    plugin.setup()
    gen = plugin.generator
    assert isinstance(gen, StableDiffusionGenerator) and not plugin.trainable
    assert plugin.text_encoder.identity["checkpoint"] == str((sd_dir / "text_encoder").resolve())
    monkeypatch.setattr(plugin, "train_generator", lambda *a, **k: pytest.fail("the frozen UNet must not train"))
    before = _state(gen)
    images = _images(8, (1, 12, 12), seed=5)
    labels = torch.tensor([0, 1] * 4)
    plugin.learn_classes(images, labels)
    _assert_unchanged(gen, before)
    assert plugin.buffer.classes == [0, 1] and plugin.buffer.prompts[1] == "a photo of a one"
    tokens = plugin.text_encoder.encode(["a photo of a one"])[0]
    assert plugin.buffer.embeddings[1].shape == (77, HIDDEN)
    assert not torch.allclose(plugin.buffer.embeddings[1], tokens)  # the projection was trained
    # replay images take the classifier's shape; each class has its own seed, so a class alone gives the same set
    x, y = plugin.sample([0, 1], 3, seed=5)
    assert x.shape == (6, 1, 12, 12) and 0 <= x.min() and x.max() <= 1 and y.tolist() == [0, 0, 0, 1, 1, 1]
    x1, _ = plugin.sample([1], 3, seed=5)
    assert torch.equal(x1, x[3:])
    # the run state points to the pipeline instead of copying its frozen weights
    gen.save_pretrained(tmp_path / "state")
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["generator_config.json"]
    reloaded = load_generator(tmp_path / "state")
    assert isinstance(reloaded, StableDiffusionGenerator)
    assert reloaded.fingerprint == gen.fingerprint and reloaded.output_shape == (1, 12, 12)


def test_saved_pointer_refuses_a_changed_pipeline(sd_dir, tmp_path):
    source = tmp_path / "pipeline"
    shutil.copytree(sd_dir, source)
    StableDiffusionGenerator.from_pretrained(source).save_pretrained(tmp_path / "state")
    scheduler = source / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "beta_end": 0.013}))
    with pytest.raises(StableDiffusionError, match="changed since"):
        StableDiffusionGenerator.from_pretrained(tmp_path / "state")


def test_config_generator_options(sd_dir):
    config = DRCPSDConfig(generator="stable_diffusion", generator_path=str(sd_dir),
                          generator_options={"torch_dtype": "bfloat16", "resolution": 8})
    plugin = CPSDGeneratorPlugin(config, verbose=False)
    plugin.setup()
    assert plugin.generator.unet.dtype == torch.bfloat16 and plugin.generator.resolution == 8
    assert DRCPSDConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="only apply to generator='stable_diffusion'"):
        DRCPSDConfig(generator_options={"offload": True})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['dtype'\]"):
        DRCPSDConfig(generator="stable_diffusion", generator_path="x", generator_options={"dtype": "bf16"})
    with pytest.raises(ConfigError, match="'int8'"):
        DRCPSDConfig(generator="stable_diffusion", generator_path="x", generator_options={"torch_dtype": "int8"})


def test_random_pipeline_builder_used_by_the_benchmark(tmp_path):
    """benchmarks/generation_speed.py's random SD-shaped pipeline (timing only: it lives with the benchmark)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "generation_speed", Path(__file__).resolve().parents[1] / "benchmarks" / "generation_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    directory = module.save_random_pipeline(tmp_path / "rand", resolution=16, unet_channels=(8, 16, 16),
                                     vae_channels=(8, 8, 8, 8), text_hidden_size=16)
    gen = StableDiffusionGenerator.from_pretrained(directory)
    assert gen.vae_scale_factor == 8 and gen.latent_shape == (4, 2, 2)  # SD's factor 8
    assert list(gen.unet.config.down_block_types) == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    text = gen.load_text_encoder()
    x = gen.sample(text.encode([PROMPT]), text.null_embedding(), num_inference_steps=1,
                   generator=torch.Generator().manual_seed(0))
    assert x.shape == (1, 3, 16, 16)


def test_vae_latent_sample_draws_from_the_posterior_around_its_mean(sd_dir):
    """vae_latent="sample" (the original CPSD code's latent_dist.sample()) gives different latents on each call,
    spread around the deterministic "mode" latents; a bad value names itself."""
    mode = StableDiffusionGenerator.from_pretrained(sd_dir)
    sample = StableDiffusionGenerator.from_pretrained(sd_dir, vae_latent="sample")
    x = _images(2)
    z0 = mode.encode(x)
    assert torch.equal(z0, mode.encode(x))
    torch.manual_seed(0)
    z1, z2 = sample.encode(x), sample.encode(x)
    assert not torch.equal(z1, z2) and z1.shape == z0.shape
    assert float((z1 - z0).abs().mean()) < float(z0.abs().mean()) + 1.0
    with pytest.raises(StableDiffusionError, match="vae_latent='mean'"):
        StableDiffusionGenerator.from_pretrained(sd_dir, vae_latent="mean")
    with pytest.raises(ConfigError, match="vae_latent"):
        DRCPSDConfig(generator="stable_diffusion", generator_path=str(sd_dir), generator_options={"vae_latent": "x"})
