"""Per-class caption lists (issue 14): the file formats and their errors, CPSD trained on caption prompts, the
buffer that keeps their embeddings, and sampling that draws one caption per image."""

import json

import pytest
import torch
from conftest import tiny_config

from avalanche_drcpsd import CPSDGeneratorPlugin, DRCPSDConfig, EmbeddingBuffer
from avalanche_drcpsd.captions import CaptionError, caption_prompts, load_captions
from avalanche_drcpsd.config import ConfigError
from avalanche_drcpsd.cpsd import train_cpsd_projection
from avalanche_drcpsd.utils import dataset_tensors

NAMES = ["zero", "one", "two"]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_json_and_text_files_read_the_same_captions(tmp_path):
    as_json = _write(tmp_path, "c.json", json.dumps({"zero": ["a round digit", "thin"], "1": ["a stroke"],
                                                      "two": ["curved", "curved"]}))
    as_text = _write(tmp_path, "c.txt", "# class<TAB>caption\nzero\ta round digit\n\n0\tthin\n1\ta stroke\n"
                                        "two\tcurved\ntwo\tcurved\n")
    expected = {0: ["a round digit", "thin"], 1: ["a stroke"], 2: ["curved"]}  # duplicates dropped, in order
    assert load_captions(as_json, NAMES) == expected
    assert load_captions(as_text, NAMES) == expected
    assert caption_prompts("a photo of zero", ["thin"]) == ["a photo of zero, thin"]


@pytest.mark.parametrize("name, text, words", [
    ("a.json", '{"three": ["x"]}', ["'three'", "class names"]),
    ("b.json", '{"7": ["x"]}', ["class id 7", "3 classes"]),
    ("c.json", '{"zero": []}', ["'zero'", "non-empty list"]),
    ("d.json", '["x"]', ["list", "expected an object"]),
    ("e.json", '{"zero": ["ok", "  "]}', ["empty caption", "class 0"]),
    ("f.txt", "zero a digit\n", ["line 1", "no tab"]),
    ("g.txt", "\n# only a comment\n", ["no caption"]),
    ("h.json", "{broken", ["not valid JSON"]),
])
def test_bad_caption_files_name_what_is_wrong(tmp_path, name, text, words):
    with pytest.raises(CaptionError) as err:
        load_captions(_write(tmp_path, name, text), NAMES)
    for w in words:
        assert w in str(err.value)


def test_missing_file_and_bad_path_are_refused_before_training(tmp_path):
    with pytest.raises(CaptionError, match="does not exist"):
        CPSDGeneratorPlugin(tiny_config(captions_file=str(tmp_path / "none.json")), class_names=NAMES)
    with pytest.raises(ConfigError, match="captions_file=3"):
        DRCPSDConfig(captions_file=3)
    with pytest.raises(CaptionError, match="class 1"):
        CPSDGeneratorPlugin(tiny_config(), captions={1: []})


class _Denoiser(torch.nn.Module):
    """The smallest object train_cpsd_projection accepts; it records the conditions it is given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.conds = []

    def encode(self, x):
        return x

    def noisy(self, z0, generator):
        return z0, torch.zeros_like(z0), torch.zeros(z0.shape[0], dtype=torch.long)

    def predict_noise(self, z, t, cond):
        self.conds.append(cond.detach().clone())
        return z * 0 + cond.mean() + self.w

    def snr(self, t):
        return torch.ones(t.shape[0])


def test_cpsd_trains_on_a_random_caption_per_image():
    tokens = torch.stack([torch.full((3, 4), float(k)) for k in range(3)])  # caption k: every value k
    den = _Denoiser()
    train_cpsd_projection(den, tokens, torch.rand(16, 1, 4, 4), mode="hidden", batch_size=8, lr=0.0,
                          snr_gamma=None, lam=0.0, generator=torch.Generator().manual_seed(0))
    per_image = torch.cat([c[:, 0, 0] for c in den.conds])  # lr 0: the projection stays the identity
    assert per_image.shape == (16,) and set(per_image.tolist()) <= {0.0, 1.0, 2.0}
    assert len(set(per_image.tolist())) > 1, "each image draws its own caption"
    with pytest.raises(ValueError, match=r"\(L, D\) or \(K, L, D\)"):
        train_cpsd_projection(den, torch.zeros(4), torch.rand(2, 1, 4, 4))


def test_buffer_keeps_caption_embeddings_and_draws_among_them(tmp_path):
    buf = EmbeddingBuffer(null=torch.zeros(3, 4))
    buf.add(0, torch.zeros(3, 4), "zero")
    buf.add(1, torch.ones(3, 4), "one")
    caps = torch.stack([torch.full((3, 4), 10.0 + k) for k in range(3)])
    buf.add_captions(1, caps, ["one, a", "one, b", "one, c"])
    g = torch.Generator().manual_seed(0)
    drawn = buf.draw(1, 64, g)
    assert drawn.shape == (64, 3, 4) and set(drawn[:, 0, 0].tolist()) == {10.0, 11.0, 12.0}
    state = g.get_state()
    assert torch.equal(buf.draw(0, 5, g), torch.zeros(5, 3, 4))
    assert torch.equal(g.get_state(), state), "a class without captions draws nothing"
    path = tmp_path / "emb.safetensors"
    buf.save(path)
    back = EmbeddingBuffer.load(path)
    assert back.caption_prompts == {1: ["one, a", "one, b", "one, c"]}
    assert torch.equal(back.caption_embeddings[1], caps) and back.classes == [0, 1]
    with pytest.raises(ValueError, match="one per prompt"):
        buf.add_captions(0, caps, ["only one"])
    with pytest.raises(KeyError, match="class 5"):
        buf.add_captions(5, caps, ["a", "b", "c"])


def test_plugin_learns_caption_embeddings_and_samples_with_them(mnist_small, one_thread, monkeypatch):
    captions = {0: ["a round shape", "an oval"]}
    plugin = CPSDGeneratorPlugin(tiny_config(), class_names=[str(k) for k in range(10)], captions=captions,
                                 verbose=False)
    x, y = dataset_tensors(mnist_small.train_stream[0].dataset.eval())
    plugin.learn_classes(x, y)
    buf = plugin.buffer
    classes = sorted(set(y.tolist()))
    assert buf.caption_prompts == {0: [f"{plugin.prompt(0)}, a round shape", f"{plugin.prompt(0)}, an oval"]}
    assert buf.caption_embeddings[0].shape == (2, *buf.embeddings[0].shape)
    assert not torch.equal(buf.caption_embeddings[0][0], buf.caption_embeddings[0][1])
    seen = []
    original = plugin.generator.sample

    def spy(cond, null, **kwargs):
        seen.append(cond.detach().clone())
        return original(cond, null, **kwargs)

    monkeypatch.setattr(plugin.generator, "sample", spy)
    plugin.sample(classes, 6, seed=3)
    by_class = dict(zip(classes, seen))
    rows = by_class[0].flatten(1)
    options = buf.caption_embeddings[0].flatten(1)
    assert all(any(torch.equal(r, o) for o in options) for r in rows), "class 0 images use its caption embeddings"
    other = classes[1]
    assert torch.equal(by_class[other], buf.embeddings[other].expand(6, -1, -1)), "no captions: the class embedding"
    settings = plugin.cache_settings(classes, 6, 3)
    assert settings["caption_prompts"] == {"0": buf.caption_prompts[0]}
    assert "caption_prompts" not in plugin.cache_settings([other], 6, 3), "uncaptioned manifests are unchanged"
