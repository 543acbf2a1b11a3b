"""Bad input fails early: a clear error naming the bad value, raised before any training starts."""

import pytest
import torch
from conftest import TINY_ENCODER
from torch import nn

from avalanche_drcpsd import DRCPSD, ConfigError, DRCPSDConfig
from avalanche_drcpsd.data import DataError, MissingDataError, make_benchmark
from avalanche_drcpsd.experiments.run import ExperimentConfig, main
from avalanche_drcpsd.generator import GeneratorError
from avalanche_drcpsd.text_encoders import TextEncoderError


class Boom(nn.Module):
    """A model that fails the test if anything ever trains it."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(784, 10)

    def forward(self, x):
        raise AssertionError("training started despite bad input")


def _strategy(**cfg):
    model = Boom()
    return DRCPSD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                  config=DRCPSDConfig(**cfg), verbose=False)


def test_missing_text_encoder_directory_fails_at_construction(tmp_path):
    missing = tmp_path / "no_encoder"
    with pytest.raises(TextEncoderError, match="no_encoder"):
        _strategy(text_encoder={"kind": "hf_clip", "path": str(missing)})


def test_missing_open_clip_checkpoint_fails_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        _strategy(text_encoder={"kind": "open_clip", "model": "ViT-B-32",
                                "checkpoint": str(tmp_path / "missing.safetensors")})


def test_unknown_text_encoder_kind(tmp_path):
    with pytest.raises(TextEncoderError, match="'bert'"):
        _strategy(text_encoder={"kind": "bert"})


def test_missing_generator_directory_fails_at_construction(tmp_path):
    with pytest.raises(GeneratorError, match="gen_dir"):
        _strategy(text_encoder=TINY_ENCODER, generator_path=str(tmp_path / "gen_dir"))


def test_invalid_config_value_names_field_and_value():
    with pytest.raises(ConfigError, match=r"kappa=-0\.5"):
        DRCPSDConfig(kappa=-0.5)
    with pytest.raises(ConfigError, match="sampler='euler'.*'dpm'"):
        DRCPSDConfig(sampler="euler")


def test_data_root_without_files_names_the_missing_file(tmp_path):
    with pytest.raises(MissingDataError, match="train-images-idx3-ubyte"):
        make_benchmark("split_mnist", tmp_path)
    with pytest.raises(DataError, match="'split_imagenet'"):
        make_benchmark("split_imagenet", tmp_path)


def test_experiment_config_rejects_unknown_fields_and_values():
    with pytest.raises(ConfigError, match="'epochs'"):
        ExperimentConfig.from_dict({"epochs": 3})
    with pytest.raises(ConfigError, match="strategy='icarl'"):
        ExperimentConfig(strategy="icarl")
    with pytest.raises(ConfigError, match="kappa"):
        ExperimentConfig.from_dict({"drcpsd": {"kappa": "high"}})


def test_cli_reports_bad_config_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"drcpsd": {"guidance_scale": [9, 5]}}')
    with pytest.raises(SystemExit) as info:
        main(["--config", str(bad), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert "guidance_scale=(9.0, 5.0)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "nothing is written for a config that fails validation"


def test_cli_threads_override_is_validated(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--threads", "0", "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert "threads=0 must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
