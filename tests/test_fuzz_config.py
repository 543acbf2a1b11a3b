"""Fuzzing the configuration parsers: any JSON-like input either builds a valid config or raises ``ConfigError``
(naming the field), never another exception; a config that builds survives a round trip through JSON."""

from __future__ import annotations

import dataclasses
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avalanche_drcpsd.config import ConfigError, DRCPSDConfig
from avalanche_drcpsd.experiments.run import ExperimentConfig

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DRCPSD_FIELDS = [f.name for f in dataclasses.fields(DRCPSDConfig)]
EXPERIMENT_FIELDS = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name != "drcpsd"]

scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["", "{}", "a photo of a {}", "{{}}", "{0.x}{}", "{[a]}{}", "{:%}{}", "cpu", "cuda:0",
                              "dpm", "token", "unet", "stable_diffusion", "\x00", "split_mnist", "resnet18",
                              "before_generator", "balanced", "/nonexistent/dir"]))
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8) | st.sampled_from(DRCPSD_FIELDS), children,
                                             max_size=4), max_leaves=12)


def _dicts(fields, values=json_values):
    """Dicts whose keys are mostly the real field names (so the values reach the field checks)."""
    return st.dictionaries(st.sampled_from(fields) | st.text(max_size=6), values, max_size=6)


def _builds_or_config_error(build, values, rebuild=None):
    try:
        config = build(values)
    except ConfigError as exc:
        assert str(exc), "a ConfigError says what is wrong"
        return None
    text = json.dumps(config.to_dict(), default=str)
    again = (rebuild or build)(json.loads(text))
    assert again.to_dict() == config.to_dict()
    return config


@SETTINGS
@given(_dicts(DRCPSD_FIELDS))
def test_drcpsd_config_from_any_json_object(values):
    _builds_or_config_error(DRCPSDConfig.from_dict, values)


@SETTINGS
@given(json_values)
def test_drcpsd_config_from_any_json_value(values):
    _builds_or_config_error(DRCPSDConfig.from_dict, values)


@SETTINGS
@given(_dicts(EXPERIMENT_FIELDS + ["drcpsd"], json_values | _dicts(DRCPSD_FIELDS)))
def test_experiment_config_from_any_json_object(values):
    _builds_or_config_error(ExperimentConfig.from_dict, values)


@SETTINGS
@given(json_values)
def test_experiment_config_from_any_json_value(values):
    _builds_or_config_error(ExperimentConfig.from_dict, values)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["n_experiences", "train_per_class", "test_per_class", "class_order",
                                        "verify", "cache_dir", "use_cache", "seed"]), json_values, max_size=4))
def test_benchmark_args(values):
    _builds_or_config_error(lambda v: ExperimentConfig.from_dict({"benchmark_args": v}), values,
                            rebuild=ExperimentConfig.from_dict)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_config_files_with_any_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "c.json"
    path.write_bytes(data)
    for load in (DRCPSDConfig.from_json, ExperimentConfig.from_json):
        try:
            load(str(path))
        except ConfigError:
            pass


def test_known_crashers_are_config_errors():
    """Inputs that once escaped as other exceptions."""
    cases = [
        (DRCPSDConfig.from_dict, {"prompt_template": "{0.x}{}"}),        # AttributeError in str.format
        (DRCPSDConfig.from_dict, {"prompt_template": "{[a]}{}"}),        # TypeError in str.format
        (DRCPSDConfig.from_dict, {"prompt_template": "{{}}"}),           # no placeholder at all
        (DRCPSDConfig.from_dict, {"generator_path": "a\x00b"}),
        (ExperimentConfig.from_dict, [1, 2]),                            # not an object
        (ExperimentConfig.from_dict, {"drcpsd": 3}),
        (ExperimentConfig.from_dict, {"benchmark_args": {"seed": 1}}),    # would collide with the experiment's seed
        (ExperimentConfig.from_dict, {"benchmark_args": {"epochs": 1}}),  # a TypeError in the builder, later
        (ExperimentConfig.from_dict, {"lr": float("inf")}),
        (ExperimentConfig.from_dict, {"lr": True}),
        (ExperimentConfig.from_dict, {"seed": -1}),
        (ExperimentConfig.from_dict, {"threads": 0}),
        (ExperimentConfig.from_dict, {"benchmark": ["split_mnist"]}),
        (ExperimentConfig.from_dict, {"classifier": "vgg"}),
        (ExperimentConfig.from_dict, {"data_root": 5}),
    ]
    for build, values in cases:
        try:
            build(values)
        except ConfigError as exc:
            assert str(exc)
        else:
            raise AssertionError(f"{values!r} was accepted")
