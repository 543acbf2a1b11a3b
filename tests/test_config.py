"""Tests for avalanche_drcpsd.config.DRCPSDConfig: reference defaults, validation messages, JSON round trips."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avalanche_drcpsd.config import ConfigError, DRCPSDConfig

FIELD_NAMES = [f.name for f in dataclasses.fields(DRCPSDConfig)]


# --- defaults --------------------------------------------------------------------------------------
def test_reference_defaults():
    c = DRCPSDConfig()
    assert c.kappa == 0.05
    assert c.pi == 1.0
    assert c.lambda_mmd == 0.003
    assert c.snr_gamma == 5
    assert c.cpsd_lr == 1e-4
    assert c.cpsd_batch_size == 4
    assert c.cpsd_epochs == 1
    assert c.sampling_steps == 20
    assert c.guidance_scale == (5.0, 9.0)
    assert c.replay_epochs == 1
    assert c.replay_batch_real == 16
    assert c.replay_batch_syn == 16
    assert c.student_init == "average"
    assert c.ema_alpha == 0.1
    assert c.n_replay_per_class == 6000
    assert c.sampler == "dpm"
    assert c.projection == "token"
    # a few more that the rest of the package relies on
    assert c.prompt_template == "a photo of a {}"
    assert c.mmd_kind == "mean"
    assert c.replay_lr is None
    assert c.kappa_schedule == "constant"
    assert c.replay_kd_weight == 0.0 and c.replay_kd_temperature == 2.0  # package option, off
    assert c.distill_targets == "split"
    assert c.generator == "unet" and c.generator_path is None
    assert c.unet_block_out_channels == (32, 64, 64)
    assert c.device == "cpu"


# --- invalid values --------------------------------------------------------------------------------
# (keyword arguments, substrings the message must contain: the field name and the bad value)
INVALID = [
    (dict(kappa=-0.5), ["kappa", "-0.5"]),
    (dict(pi=-1), ["pi", "-1"]),
    (dict(lambda_mmd=-0.003), ["lambda_mmd", "-0.003"]),
    (dict(cond_dropout=1.0), ["cond_dropout", "1.0"]),
    (dict(cond_dropout=-0.1), ["cond_dropout", "-0.1"]),
    (dict(sampler="euler"), ["sampler", "'euler'"]),
    (dict(projection="both"), ["projection", "'both'"]),
    (dict(mmd_kind="rbf"), ["mmd_kind", "'rbf'"]),
    (dict(student_init="mean"), ["student_init", "'mean'"]),
    (dict(distill_targets="old"), ["distill_targets", "'old'"]),
    (dict(cpsd_order="never"), ["cpsd_order", "'never'"]),
    (dict(generator="gan"), ["generator", "'gan'"]),
    (dict(prompt_template="a photo of a cat"), ["prompt_template", "'a photo of a cat'"]),
    (dict(prompt_template="{} and {}"), ["prompt_template", "'{} and {}'"]),
    (dict(prompt_template=3), ["prompt_template", "3"]),
    (dict(unet_block_out_channels=(8, 12)), ["unet_block_out_channels", "12"]),
    (dict(unet_block_out_channels=(4,)), ["unet_block_out_channels", "4"]),
    (dict(unet_block_out_channels=(8, 8, 8, 8, 8)), ["unet_block_out_channels", "(8, 8, 8, 8, 8)"]),
    (dict(unet_block_out_channels=[]), ["unet_block_out_channels", "[]"]),
    (dict(unet_block_out_channels=(8, 16.0)), ["unet_block_out_channels", "16.0"]),
    (dict(guidance_scale=(9, 5)), ["guidance_scale", "9.0", "5.0"]),
    (dict(guidance_scale=(1.0, 2.0, 3.0)), ["guidance_scale", "3.0"]),
    (dict(guidance_scale=(-1.0, 2.0)), ["guidance_scale", "-1.0"]),
    (dict(guidance_scale=-2.0), ["guidance_scale", "-2.0"]),
    (dict(guidance_scale="7"), ["guidance_scale", "'7'"]),
    (dict(guidance_scale=(5.0, "9")), ["guidance_scale", "'9'"]),
    (dict(cpsd_epochs=True), ["cpsd_epochs", "True"]),
    (dict(replay_batch_syn=False), ["replay_batch_syn", "False"]),
    (dict(rehearsal_batch_syn=-1), ["rehearsal_batch_syn", "-1"]),
    (dict(rehearsal_batch_syn=2.5), ["rehearsal_batch_syn", "2.5"]),
    (dict(replay_head_align="bic"), ["replay_head_align", "'bic'"]),
    (dict(rehearsal_target="soft"), ["rehearsal_target", "'soft'"]),
    (dict(rehearsal_kd_weight=-1.0), ["rehearsal_kd_weight", "-1.0"]),
    (dict(cpsd_batch_size=2.0), ["cpsd_batch_size", "2.0"]),
    (dict(sampling_steps="20"), ["sampling_steps", "'20'"]),
    (dict(sampling_steps=0), ["sampling_steps", "0"]),
    (dict(n_replay_per_class=-5), ["n_replay_per_class", "-5"]),
    (dict(patch_size=0), ["patch_size", "0"]),
    (dict(seed=-1), ["seed", "-1"]),
    (dict(generator_steps=1.5), ["generator_steps", "1.5"]),
    (dict(cpsd_max_images_per_class=0), ["cpsd_max_images_per_class", "0"]),
    (dict(cpsd_lr=float("nan")), ["cpsd_lr", "nan"]),
    (dict(cpsd_lr=float("inf")), ["cpsd_lr", "inf"]),
    (dict(cpsd_lr=0.0), ["cpsd_lr", "0.0"]),
    (dict(generator_lr=-1e-3), ["generator_lr", "-0.001"]),
    (dict(snr_gamma=0), ["snr_gamma", "0"]),
    (dict(replay_lr=0.0), ["replay_lr", "0.0"]),
    (dict(replay_lr="0.1"), ["replay_lr", "'0.1'"]),
    (dict(replay_kd_weight=-1.0), ["replay_kd_weight", "-1.0"]),
    (dict(kappa_schedule="linear"), ["kappa_schedule", "'linear'"]),
    (dict(replay_kd_temperature=0), ["replay_kd_temperature", "0"]),
    (dict(ema_alpha=0.0), ["ema_alpha", "0.0"]),
    (dict(ema_alpha=1.5), ["ema_alpha", "1.5"]),
    (dict(beta_schedule="cosine"), ["beta_schedule", "'cosine'"]),
    (dict(generator="stable_diffusion"), ["generator_path", "stable_diffusion"]),
    (dict(generator_path=5), ["generator_path", "5"]),
    (dict(text_encoder="clip"), ["text_encoder", "'clip'"]),
    (dict(device="gpu"), ["device", "'gpu'"]),
    (dict(device=0), ["device", "0"]),
]


@pytest.mark.parametrize("kwargs,needles", INVALID, ids=[next(iter(k)) + "=" + repr(next(iter(k.values())))
                                                          for k, _ in INVALID])
def test_invalid_value_raises_config_error_naming_field_and_value(kwargs, needles):
    with pytest.raises(ConfigError) as info:
        DRCPSDConfig(**kwargs)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    # from_dict (the JSON path) gives the same error
    with pytest.raises(ConfigError) as info2:
        DRCPSDConfig.from_dict(kwargs)
    assert str(info2.value) == msg


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_unknown_key_in_from_dict_is_named():
    with pytest.raises(ConfigError) as info:
        DRCPSDConfig.from_dict({"kapa": 0.1, "kappa": 0.1})
    msg = str(info.value)
    assert "'kapa'" in msg and "unknown" in msg
    assert "kappa" in msg  # the valid fields are listed


def test_from_dict_rejects_non_dict():
    with pytest.raises(ConfigError, match="list"):
        DRCPSDConfig.from_dict([("kappa", 0.1)])


def test_valid_edge_values_are_accepted():
    c = DRCPSDConfig(kappa=0.0, cond_dropout=0.0, ema_alpha=1.0, guidance_scale=(3, 3), seed=0, generator_steps=0,
                     unet_block_out_channels=[8, 16, 24, 32], device="cuda:1", generator="stable_diffusion",
                     generator_path="/models/sd", text_encoder={"kind": "default"})
    assert c.guidance_scale == (3.0, 3.0) and all(isinstance(g, float) for g in c.guidance_scale)
    assert c.unet_block_out_channels == (8, 16, 24, 32)
    assert DRCPSDConfig(guidance_scale=7).guidance_scale == 7


# --- JSON ---------------------------------------------------------------------------------------------
def test_from_json_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as info:
        DRCPSDConfig.from_json(path)
    assert str(path) in str(info.value) and "does not exist" in str(info.value)


def test_from_json_invalid_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"kappa": 0.1,,}')
    with pytest.raises(ConfigError) as info:
        DRCPSDConfig.from_json(path)
    assert str(path) in str(info.value) and "not valid JSON" in str(info.value)


def test_from_json_non_object_and_invalid_value(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="list"):
        DRCPSDConfig.from_json(path)
    path.write_text(json.dumps({"kappa": -1}))
    with pytest.raises(ConfigError, match="kappa=-1"):
        DRCPSDConfig.from_json(path)


def test_json_file_round_trip(tmp_path):
    c = DRCPSDConfig(kappa=0.2, guidance_scale=(2.0, 4.0), unet_block_out_channels=(16, 32), replay_lr=0.01,
                     text_encoder={"kind": "default", "hidden_size": 16}, mmd_kind="gaussian")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(c.to_dict()))
    assert DRCPSDConfig.from_json(path) == c


def test_to_dict_from_dict_round_trip():
    c = DRCPSDConfig(kappa=0.3, pi=0.5, guidance_scale=(1.0, 2.0), unet_block_out_channels=[8, 16],
                     cpsd_max_images_per_class=10, sampler="ddim")
    d = c.to_dict()
    assert d["guidance_scale"] == [1.0, 2.0] and d["unet_block_out_channels"] == [8, 16]
    assert json.loads(json.dumps(d)) == d  # plain JSON data
    assert set(d) == set(FIELD_NAMES)
    assert DRCPSDConfig.from_dict(d) == c
    assert DRCPSDConfig.from_dict(DRCPSDConfig().to_dict()) == DRCPSDConfig()
    scalar = DRCPSDConfig(guidance_scale=4.5)
    assert scalar.to_dict()["guidance_scale"] == 4.5
    assert DRCPSDConfig.from_dict(scalar.to_dict()) == scalar


def test_replace_validates_and_copies():
    c = DRCPSDConfig()
    d = c.replace(kappa=0.5, sampler="ddim")
    assert d.kappa == 0.5 and d.sampler == "ddim"
    assert c.kappa == 0.05 and c.sampler == "dpm"  # the original is unchanged
    assert d.replace(kappa=0.05, sampler="dpm") == c
    with pytest.raises(ConfigError, match="kappa=-1"):
        c.replace(kappa=-1)
    with pytest.raises(ConfigError, match="'kapa'"):
        c.replace(kapa=0.1)


# --- bad values that once slipped through (regressions) -------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(cpsd_lr=10 ** 400), dict(cond_dropout=10 ** 400),
                                    dict(guidance_scale=[1, 10 ** 400])])
def test_huge_int_raises_config_error(kwargs):
    with pytest.raises(ConfigError):
        DRCPSDConfig.from_dict(kwargs)


@pytest.mark.parametrize("device", ["cuda:abc", "mpsfoo", "cuda:"])
def test_malformed_device_string_is_rejected(device):
    with pytest.raises(ConfigError, match="device"):
        DRCPSDConfig(device=device)


@pytest.mark.parametrize("template", ["a {} of {kind}", "{}{", "a {} {0}"])
def test_unformattable_prompt_template_is_rejected(template):
    with pytest.raises(ConfigError, match="prompt_template"):
        DRCPSDConfig(prompt_template=template)


# --- property: from_dict never raises anything but ConfigError ---------------------------------------------
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=5),
    st.lists(st.integers(), max_size=4),
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELD_NAMES + ["junk"]), VALUES))
def test_from_dict_only_raises_config_error(values):
    try:
        config = DRCPSDConfig.from_dict(values)
    except ConfigError as exc:
        assert str(exc)  # a message, always
        if "junk" in values:
            assert "junk" in str(exc)
        return
    assert "junk" not in values
    # a config that was accepted is valid and survives the JSON round trip
    assert config.validate() is config
    assert DRCPSDConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for key, value in values.items():
        got = getattr(config, key)
        if isinstance(value, list):
            assert list(got) == [float(v) for v in value] if key == "guidance_scale" else list(got) == value
        elif isinstance(value, float) and math.isnan(value):
            raise AssertionError(f"{key}=nan was accepted")
        elif key in ("input_mean", "input_std") and isinstance(value, (int, float)):
            assert got == (float(value),), (key, value, got)  # one value for every channel
        else:
            assert got == value, (key, value, got)


@pytest.mark.parametrize("preset", [[], {}, 3, None])
def test_a_preset_that_is_not_a_name_is_a_config_error(preset):
    """Found by the JSON fuzzer: an unhashable preset raised TypeError instead of naming itself."""
    with pytest.raises(ConfigError, match=r"preset=.* is not valid; expected one of \['reference'\]"):
        DRCPSDConfig.from_dict({"preset": preset})


def test_the_replay_group_is_the_flat_replay_fields_with_the_same_defaults():
    """``ReplayConfig`` (DreamReplayPlugin's settings) reads its fields from the flat config: every name it maps to
    exists there, with the same default, and the plugin built from a config holds that config's values."""
    from avalanche_drcpsd import DreamReplayPlugin
    from avalanche_drcpsd.config import ReplayConfig

    flat = {f.name: f for f in dataclasses.fields(DRCPSDConfig)}
    for name, flat_name in ReplayConfig.FLAT.items():
        assert flat_name in flat, flat_name
        assert getattr(ReplayConfig(), name) == flat[flat_name].default, name
    assert set(ReplayConfig.FLAT) == {f.name for f in dataclasses.fields(ReplayConfig)}
    cfg = DRCPSDConfig(replay_batch_real=8, replay_step_ema=0.2, replay_grad_clip=1.5, kappa=0.3)
    group = DreamReplayPlugin.from_config(None, cfg, verbose=False).config
    assert (group.batch_real, group.step_ema, group.grad_clip, group.kappa) == (8, 0.2, 1.5, 0.3)
    assert group == ReplayConfig.from_config(cfg)


@pytest.mark.parametrize("flat, plugin, message", [
    ({"replay_grad_clip": 0}, {"grad_clip": 0}, "{}=0 must be > 0"),
    ({"replay_epoch_length": "zip"}, {"epoch_length": "zip"}, "{}='zip' is not valid"),
    ({"replay_min_steps": -1}, {"min_steps": -1}, "{}=-1 must be >= 0"),
    ({"replay_lr_schedule": "cos"}, {"lr_schedule": "cos"}, "{}='cos' is not valid"),
])
def test_a_bad_replay_setting_is_named_as_the_caller_wrote_it(flat, plugin, message):
    from avalanche_drcpsd import DreamReplayPlugin

    with pytest.raises(ConfigError, match=re.escape(message.format(*flat))):
        DRCPSDConfig(**flat)
    with pytest.raises(ConfigError, match=re.escape(message.format(*plugin))):
        DreamReplayPlugin(None, **plugin)
    with pytest.raises(ConfigError, match=r"unknown DreamReplayPlugin field\(s\) \['replay_grad_clip'\]"):
        DreamReplayPlugin(None, replay_grad_clip=1.0)


#: the generator recipe issue 13 gave every CPU profile (kept sets drawn once, EMA weights, no generative
#: distillation, one attention head); the GPU profiles run it too
ISSUE13_GENERATOR = {"replay_draw": "once", "generator_ema_decay": 0.999, "generator_distill_weight": 0.0,
                     "unet_attention_head_dim": 1}


@pytest.mark.parametrize("benchmark", ["split_mnist", "split_fmnist", "split_cifar10", "split_gtsrb"])
def test_every_profile_loads_and_the_gpu_profile_has_the_cpu_profiles_generator_recipe(benchmark):
    from pathlib import Path

    from avalanche_drcpsd.experiments.run import ExperimentConfig

    root = Path(__file__).resolve().parents[1] / "experiments"
    cpu = ExperimentConfig.from_json(str(root / f"{benchmark}_cpu.json")).drcpsd
    gpu = ExperimentConfig.from_json(str(root / f"{benchmark}_gpu.json")).drcpsd
    assert gpu.device == "cuda"
    for name, value in ISSUE13_GENERATOR.items():
        assert getattr(gpu, name) == value, name
    if benchmark != "split_cifar10":  # its CPU profile keeps the redraw recipe its committed results used
        same = ("replay_draw", "generator_ema_decay", "generator_distill_weight", "unet_attention_head_dim",
                "generator_last_experience", "replay_classes", "guidance_scale", "student_init",
                "generator_noise_offset", "replay_pixel_match", "rehearsal_batch_syn", "rehearsal_target",
                "rehearsal_kd_weight")
        assert {n: getattr(gpu, n) for n in same} == {n: getattr(cpu, n) for n in same}


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_classifier_name_builds_a_net_that_ends_in_its_feature_head(shape):
    """Each ``ExperimentConfig.classifier`` name is accepted and built by ``make_classifier`` into a net whose last
    ``nn.Linear`` (the head feature distillation reads the input of) maps its features to the classes; a name
    outside the list is refused before anything is built, with the list."""
    import torch

    from avalanche_drcpsd.experiments.run import CLASSIFIERS, ExperimentConfig
    from avalanche_drcpsd.models import make_classifier

    widths = {}
    for name in CLASSIFIERS:
        assert ExperimentConfig(classifier=name).classifier == name
        torch.manual_seed(0)
        net = make_classifier(name, num_classes=7, image_shape=shape).eval()
        head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        assert head.out_features == 7
        with torch.no_grad():
            assert net(torch.rand(2, *shape)).shape == (2, 7)
        widths[name] = (head.in_features, next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)).out_channels)
    assert widths["small_cnn"] == (128, 32)
    assert widths["wide_cnn"] == (256, 64)
    with pytest.raises(ConfigError, match=re.escape("classifier='wide'; expected one of ['small_cnn', 'wide_cnn'")):
        ExperimentConfig(classifier="wide")
    with pytest.raises(ValueError, match="classifier='wide'; expected 'small_cnn', 'wide_cnn' or 'resnet18'"):
        make_classifier("wide", num_classes=7, image_shape=shape)
