"""The two commands end to end: drcpsd-train-cpsd (image folder -> embedding buffer) and drcpsd-sample (buffer ->
PNGs in the cache layout + a grid), with the offline generator and with a tiny Stable Diffusion directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from avalanche_drcpsd import EmbeddingBuffer
from avalanche_drcpsd.experiments.cli import load_image_folder, sample_main, train_cpsd_main
from avalanche_drcpsd.generator import DiffusionGenerator

pytestmark = pytest.mark.usefixtures("one_thread")

ENCODER = {"kind": "default", "hidden_size": 16, "num_layers": 1, "num_heads": 2}
QUIET = ["--quiet"]


@pytest.fixture(scope="module")
def offline_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("offline") / "generator"
    torch.manual_seed(0)
    DiffusionGenerator.build(image_shape=(1, 8, 8), cross_attention_dim=16, block_out_channels=(8, 16),
                             attention_head_dim=4, patch_size=1).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """<root>/<class_name>/*.png|jpg with images of different sizes and modes."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for name, size in (("cat", (10, 12)), ("hot_dog", (7, 7))):
        (root / name).mkdir()
        for i in range(3):
            pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / (f"{i}.png" if i else f"{i}.jpg"))
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def _pngs(task: Path):
    return sorted(p.relative_to(task).as_posix() for p in task.rglob("*.png"))


def test_load_image_folder(image_folder):
    x, y, names = load_image_folder(image_folder, (1, 8, 8))
    assert x.shape == (6, 1, 8, 8) and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [0, 0, 0, 1, 1, 1] and names == ["cat", "hot dog"]
    x, _, _ = load_image_folder(image_folder, (3, 5, 4), max_per_class=1)
    assert x.shape == (2, 3, 5, 4)


def test_offline_generator_train_then_sample(offline_dir, image_folder, tmp_path, monkeypatch, capsys):
    buffer_file = tmp_path / "emb.safetensors"
    assert train_cpsd_main([str(offline_dir), str(image_folder), "--out", str(buffer_file), "--epochs", "1",
                            "--batch-size", "2", "--lr", "1e-3", "--text-encoder", json.dumps(ENCODER)] + QUIET) == 0
    buffer = EmbeddingBuffer.load(buffer_file)
    assert buffer.classes == [0, 1] and buffer.prompts == {0: "a photo of a cat", 1: "a photo of a hot dog"}
    assert buffer.null.shape == (77, 16) and buffer.encoder_identity["kind"] == "default"
    assert "a photo of a hot dog" in capsys.readouterr().out

    out = tmp_path / "synthetic"
    argv = [str(offline_dir), str(buffer_file), "--class", "1", "--num-samples", "3", "--out", str(out), "--steps",
            "2", "--guidance", "2", "--seed", "4"] + QUIET
    assert sample_main(argv) == 0
    task = out / "task_0"
    assert _pngs(task) == ["1/0.png", "1/1.png", "1/2.png"] and (out / "grid_task_0.png").is_file()
    manifest = json.loads((task / "manifest.json").read_text())
    assert manifest["settings"]["seeds"] == {"1": 5} and manifest["settings"]["guidance_scale"] == 2.0
    with Image.open(task / "1" / "2.png") as img:
        assert img.mode == "L" and img.size == (8, 8)
    # a second run finds the matching task and does not call the model
    monkeypatch.setattr(DiffusionGenerator, "sample", lambda *a, **k: pytest.fail("the cache should be reused"))
    before = (task / "1" / "0.png").stat().st_mtime_ns
    assert sample_main(argv) == 0
    assert (task / "1" / "0.png").stat().st_mtime_ns == before


def test_stable_diffusion_train_then_sample(sd_dir, image_folder, tmp_path):
    buffer_file = tmp_path / "emb.safetensors"
    assert train_cpsd_main([str(sd_dir), str(image_folder), "--out", str(buffer_file), "--batch-size", "3",
                            "--prompt-template", "a picture of a {}"] + QUIET) == 0
    buffer = EmbeddingBuffer.load(buffer_file)
    assert buffer.prompts[0] == "a picture of a cat" and buffer.embeddings[0].shape == (77, 32)
    assert buffer.encoder_identity["checkpoint"] == str((sd_dir / "text_encoder").resolve())  # the pipeline's own
    out = tmp_path / "synthetic"
    assert sample_main([str(sd_dir), str(buffer_file), "--num-samples", "2", "--out", str(out), "--steps", "2",
                        "--image-shape", "1", "12", "10", "--task", "3"] + QUIET) == 0
    task = out / "task_3"
    assert _pngs(task) == ["0/0.png", "0/1.png", "1/0.png", "1/1.png"]
    manifest = json.loads((task / "manifest.json").read_text())
    assert manifest["settings"]["guidance_scale"] == [5.0, 9.0] and manifest["settings"]["steps"] == 2
    assert manifest["settings"]["generator"]["class"] == "StableDiffusionGenerator"
    with Image.open(task / "1" / "1.png") as img:
        assert img.mode == "L" and img.size == (10, 12)


def _error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv + QUIET)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_bad_paths_and_arguments_give_clear_errors(offline_dir, sd_dir, image_folder, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert f"directory {str(missing)!r} does not exist" in _error(sample_main, [str(missing), "x.safetensors"], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    buffer_file = tmp_path / "emb.safetensors"
    err = _error(train_cpsd_main, [str(empty), str(image_folder)], capsys)
    assert "model_index.json" in err and "generator_config.json" in err and str(empty) in err
    assert "file 'x.safetensors' does not exist" in _error(sample_main, [str(offline_dir), "x.safetensors"], capsys)
    # no class folder; a prompt template without '{}'; the default 64-d encoder on a 16-d generator
    assert "no class sub-folder" in _error(train_cpsd_main, [str(offline_dir), str(empty)], capsys)
    assert "prompt_template" in _error(train_cpsd_main, [str(offline_dir), str(image_folder), "--prompt-template",
                                                         "a cat"], capsys)
    err = _error(train_cpsd_main, [str(offline_dir), str(image_folder), "--out", str(buffer_file)], capsys)
    assert "hidden size 64" in err and "--text-encoder" in err and not buffer_file.exists()
    # a buffer without the requested class, and embeddings made for another generator
    train_cpsd_main([str(offline_dir), str(image_folder), "--out", str(buffer_file), "--text-encoder",
                     json.dumps(ENCODER), "--max-images-per-class", "1"] + QUIET)
    assert "classes [5] are not in the embedding buffer" in _error(
        sample_main, [str(offline_dir), str(buffer_file), "--class", "5"], capsys)
    assert "made for another generator" in _error(sample_main, [str(sd_dir), str(buffer_file)], capsys)
    assert "--image-shape only applies" in _error(
        sample_main, [str(offline_dir), str(buffer_file), "--image-shape", "3", "8", "8"], capsys)
    assert "--guidance takes one scale or LOW HIGH" in _error(
        sample_main, [str(offline_dir), str(buffer_file), "--guidance", "1", "2", "3"], capsys)


def test_installed_console_script(offline_dir, tmp_path):
    """The entry point declared in setup.cfg, run as a user runs it (skipped until the package is reinstalled)."""
    script = Path(sys.executable).parent / "drcpsd-sample"
    if not script.is_file():
        pytest.skip("drcpsd-sample is not installed in this environment (pip install -e . registers it)")
    g = torch.Generator().manual_seed(0)
    buffer = EmbeddingBuffer(null=torch.randn(77, 16, generator=g))
    buffer.add(4, torch.randn(77, 16, generator=g), "a photo of a four")
    buffer.save(tmp_path / "emb.safetensors")
    out = tmp_path / "synthetic"
    result = subprocess.run([str(script), str(offline_dir), str(tmp_path / "emb.safetensors"), "--num-samples", "2",
                             "--steps", "1", "--out", str(out), "--quiet"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert _pngs(out / "task_0") == ["4/0.png", "4/1.png"] and "2 images of classes [4]" in result.stdout
