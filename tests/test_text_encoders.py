"""Tests for avalanche_drcpsd.text_encoders: tiny models built and saved locally, nothing downloaded."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from avalanche_drcpsd.text_encoders import (
    CLIP_CONTEXT_LENGTH,
    CLIP_VOCAB_SIZE,
    HFCLIPTextEncoder,
    MissingWeightsError,
    OpenCLIPTextEncoder,
    TextEncoder,
    TextEncoderError,
    build_clip_tokenizer,
    default_text_encoder,
    load_text_encoder,
)

PROMPTS = ["a photo of a dog", "a photo of a cat", "an origami tyrannosaurus"]
TOKENIZER_PROMPTS = [
    "a photo of a dog",
    "A Photo of a CAT!",
    "",
    "an   origami\ttyrannosaurus, 3D render",
    "café déjà vu 123 -- it's what we'd've done",
    "a very long prompt " * 30,  # > 77 tokens: truncated, last id is <|endoftext|>
]
HIDDEN = 32
OC_CLIP, OC_CUSTOM = "drcpsd-test-tiny-clip", "drcpsd-test-tiny-custom-text"


def _tiny_clip_text_model(num_layers: int = 1, seed: int = 0) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        max_position_embeddings=CLIP_CONTEXT_LENGTH,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


class _NotATensor:
    """Any pickled object: weights-only loading must refuse it instead of running its reduce code."""


def _assert_frozen(encoder: TextEncoder) -> None:
    params = list(encoder.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not encoder.training and not encoder.model.training


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A saved tiny CLIPTextModel with tokenizer files beside it, and the original model."""
    root = tmp_path_factory.mktemp("hf")
    model = _tiny_clip_text_model()
    model.save_pretrained(root / "te")
    build_clip_tokenizer(root / "te")
    return root / "te", model


@pytest.fixture(scope="module")
def hf_dir_no_tokenizer(tmp_path_factory, hf_dir):
    root = tmp_path_factory.mktemp("hf_no_tok")
    hf_dir[1].save_pretrained(root / "te")
    return root / "te"


@pytest.fixture(scope="module")
def small_default_encoder():
    return default_text_encoder(hidden_size=16, num_heads=2, num_layers=1)


@pytest.fixture(scope="module")
def open_clip_configs(tmp_path_factory):
    """Register two tiny open_clip architectures: plain CLIP and CustomTextCLIP (text tower in model.text)."""
    config_dir = tmp_path_factory.mktemp("open_clip_configs")
    base = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": CLIP_VOCAB_SIZE, "width": HIDDEN, "heads": 2, "layers": 1},
    }
    (config_dir / f"{OC_CLIP}.json").write_text(json.dumps(base))
    (config_dir / f"{OC_CUSTOM}.json").write_text(json.dumps({**base, "custom_text": True}))
    open_clip.add_model_config(config_dir)
    return config_dir


def _perturbed_open_clip_model(name: str) -> torch.nn.Module:
    """An open_clip model whose weights differ from any fresh init (so loading is observable)."""
    model = open_clip.create_model(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model.eval()


def _text_tower(model: torch.nn.Module) -> torch.nn.Module:
    return model.text if hasattr(model, "text") else model


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------


def test_build_clip_tokenizer_matches_open_clip_ids(tmp_path):
    tokenizer = build_clip_tokenizer(tmp_path)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    reference = SimpleTokenizer()(TOKENIZER_PROMPTS, context_length=CLIP_CONTEXT_LENGTH)
    for prompt, ref_row in zip(TOKENIZER_PROMPTS, reference):
        ids = tokenizer(prompt, max_length=CLIP_CONTEXT_LENGTH, truncation=True).input_ids
        assert ids == ref_row[: len(ids)].tolist(), prompt
        assert not ref_row[len(ids) :].any(), prompt  # open_clip pads with 0
        assert ids[0] == 49406 and ids[-1] == 49407


def test_build_clip_tokenizer_without_dir_is_cached_per_process():
    first, second = build_clip_tokenizer(), build_clip_tokenizer()
    assert first.name_or_path == second.name_or_path
    assert first("a dog").input_ids == [49406, 320, 1929, 49407]


# --------------------------------------------------------------------------------------------------
# transformers CLIPTextModel
# --------------------------------------------------------------------------------------------------


def test_hf_encoder_matches_original_model(hf_dir):
    directory, original = hf_dir
    encoder = HFCLIPTextEncoder.from_pretrained(directory)
    _assert_frozen(encoder)
    assert (encoder.context_length, encoder.hidden_size) == (CLIP_CONTEXT_LENGTH, HIDDEN)
    assert encoder.identity["kind"] == "hf_clip"
    assert encoder.identity["config"]["tokenizer"] == str(directory.resolve())
    json.dumps(encoder.identity)

    out = encoder.encode(PROMPTS)
    assert out.shape == (len(PROMPTS), CLIP_CONTEXT_LENGTH, HIDDEN) and out.dtype == torch.float32
    ids = encoder.tokenize(PROMPTS)
    assert ids.shape == (len(PROMPTS), CLIP_CONTEXT_LENGTH)
    with torch.no_grad():
        expected = original(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_hf_encoder_same_prompt_identical_different_prompts_differ(hf_dir):
    encoder = HFCLIPTextEncoder.from_pretrained(hf_dir[0])
    out = encoder.encode(PROMPTS)
    assert torch.equal(encoder.encode(PROMPTS), out)
    torch.testing.assert_close(encoder.encode(PROMPTS[:1])[0], out[0])  # independent of the batch
    for i in range(len(PROMPTS)):
        for j in range(i + 1, len(PROMPTS)):
            assert not torch.allclose(out[i], out[j])
    assert torch.equal(encoder.null_embedding(), encoder.encode([""])[0])
    assert not torch.allclose(encoder.null_embedding(), out[0])


def test_hf_encoder_without_tokenizer_files_uses_bundled_bpe(hf_dir_no_tokenizer):
    encoder = HFCLIPTextEncoder.from_pretrained(hf_dir_no_tokenizer)
    assert encoder.identity["config"]["tokenizer"].startswith("open_clip:")
    expected = build_clip_tokenizer()(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(encoder.tokenize(PROMPTS), expected)


def test_hf_encoder_stable_diffusion_layout_and_spec(tmp_path, hf_dir):
    hf_dir[1].save_pretrained(tmp_path / "text_encoder")
    build_clip_tokenizer(tmp_path / "tokenizer")
    via_subfolder = HFCLIPTextEncoder.from_pretrained(tmp_path, subfolder="text_encoder")
    via_spec = load_text_encoder({"kind": "hf_clip", "path": str(tmp_path), "subfolder": "text_encoder"})
    for encoder in (via_subfolder, via_spec):
        assert isinstance(encoder, HFCLIPTextEncoder)
        assert encoder.identity["config"]["tokenizer"] == str((tmp_path / "tokenizer").resolve())
    reference = HFCLIPTextEncoder.from_pretrained(hf_dir[0]).encode(PROMPTS)
    torch.testing.assert_close(via_spec.encode(PROMPTS), reference, rtol=0, atol=0)


def test_hf_encoder_loads_bin_weights_only(tmp_path, hf_dir):
    directory, original = hf_dir
    original.config.save_pretrained(tmp_path)
    torch.save(original.state_dict(), tmp_path / "pytorch_model.bin")
    encoder = HFCLIPTextEncoder.from_pretrained(tmp_path)
    reference = HFCLIPTextEncoder.from_pretrained(directory).encode(PROMPTS)
    torch.testing.assert_close(encoder.encode(PROMPTS), reference, rtol=0, atol=0)
    torch.save({**original.state_dict(), "extra": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(TextEncoderError, match="refusing to unpickle"):
        HFCLIPTextEncoder.from_pretrained(tmp_path)


def test_hf_encoder_stays_frozen_and_feeds_autograd(hf_dir):
    encoder = HFCLIPTextEncoder.from_pretrained(hf_dir[0])
    parent = torch.nn.Sequential(encoder)
    parent.train()
    _assert_frozen(encoder)
    emb = encoder.encode(PROMPTS[:1])[0]
    assert not emb.requires_grad and not emb.is_inference()
    projection = torch.nn.Linear(CLIP_CONTEXT_LENGTH, CLIP_CONTEXT_LENGTH)
    projection(emb.T).sum().backward()  # a per-class token-axis projection trains on it
    assert projection.weight.grad is not None


def test_hf_encoder_low_precision_returns_float32(hf_dir):
    encoder = load_text_encoder({"kind": "hf_clip", "path": str(hf_dir[0]), "dtype": "bfloat16"})
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    out = encoder.encode(PROMPTS)
    assert out.dtype == torch.float32
    reference = HFCLIPTextEncoder.from_pretrained(hf_dir[0]).encode(PROMPTS)
    torch.testing.assert_close(out, reference, rtol=0.1, atol=0.1)


# --------------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [OC_CLIP, OC_CUSTOM])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_open_clip_encoder_matches_model(tmp_path, open_clip_configs, name, fmt):
    model = _perturbed_open_clip_model(name)
    checkpoint = tmp_path / f"tiny.{fmt}"
    if fmt == "pt":
        torch.save(model.state_dict(), checkpoint)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))

    encoder = OpenCLIPTextEncoder.from_checkpoint(name, checkpoint)
    _assert_frozen(encoder)
    assert (encoder.context_length, encoder.hidden_size) == (77, HIDDEN)
    assert encoder.identity["kind"] == "open_clip" and encoder.identity["model"] == name
    assert encoder.identity["checkpoint"] == str(checkpoint.resolve())
    json.dumps(encoder.identity)
    assert not any(k.startswith("visual") for k in encoder.state_dict())  # vision tower dropped

    ids = encoder.tokenize(PROMPTS)
    assert torch.equal(ids, open_clip.get_tokenizer(name)(PROMPTS))
    out = encoder.encode(PROMPTS)
    assert out.shape == (len(PROMPTS), 77, HIDDEN) and out.dtype == torch.float32

    tower = _text_tower(model)
    with torch.no_grad():
        # open_clip's own per-token path: last block's output with ln_final applied
        last_block = model.forward_intermediates(
            text=ids, text_indices=1, normalize_intermediates=True, intermediates_only=True
        )["text_intermediates"][-1]
        # open_clip's forward_intermediates takes another attention kernel path than encode's; float32
        # reassociation between the two was measured at up to ~1.4e-5 absolute on near-zero entries
        torch.testing.assert_close(out, last_block, rtol=1e-5, atol=5e-5)
        # pooling our states at <|endoftext|> and projecting gives open_clip's encode_text
        pooled = out[torch.arange(len(PROMPTS)), ids.argmax(dim=-1)] @ tower.text_projection
        torch.testing.assert_close(pooled, model.encode_text(ids), rtol=1e-5, atol=5e-5)
        # the weights came from the checkpoint, not from a fresh init
        fresh = _text_tower(open_clip.create_model(name).eval())
        assert torch.equal(encoder.model.token_embedding.weight, tower.token_embedding.weight)
        assert not torch.allclose(encoder.model.token_embedding.weight, fresh.token_embedding.weight)


def test_open_clip_encoder_via_spec(tmp_path, open_clip_configs):
    model = _perturbed_open_clip_model(OC_CLIP)
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    encoder = load_text_encoder({"kind": "open_clip", "model": OC_CLIP, "checkpoint": str(tmp_path / "tiny.pt")})
    assert isinstance(encoder, OpenCLIPTextEncoder)
    out = encoder.encode(PROMPTS)
    assert torch.equal(out, encoder.encode(PROMPTS))
    assert not torch.allclose(out[0], out[1])
    assert encoder.null_embedding().shape == (77, HIDDEN)


# --------------------------------------------------------------------------------------------------
# default encoder
# --------------------------------------------------------------------------------------------------


def test_default_encoder_is_deterministic_and_documented():
    first, second = default_text_encoder(), default_text_encoder()
    _assert_frozen(first)
    assert "NOT pretrained" in default_text_encoder.__doc__
    assert first.identity["kind"] == "default" and first.identity["config"]["pretrained"] is False
    json.dumps(first.identity)
    for (k1, v1), (k2, v2) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert torch.equal(first.encode(PROMPTS), second.encode(PROMPTS))
    assert first.weights_fingerprint() == second.weights_fingerprint()
    other = default_text_encoder(seed=1)
    assert not torch.allclose(other.encode(PROMPTS), first.encode(PROMPTS))
    assert other.weights_fingerprint() != first.weights_fingerprint()


def test_default_encoder_leaves_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    default_text_encoder(seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    expected = torch.rand(4)
    torch.manual_seed(123)
    default_text_encoder(seed=8)
    assert torch.equal(torch.rand(4), expected)


def test_default_encoder_shapes_and_specs():
    encoder = default_text_encoder(hidden_size=16, num_heads=2, num_layers=1, context_length=20)
    assert encoder.encode(PROMPTS).shape == (len(PROMPTS), 20, 16)
    assert encoder.tokenize(["a photo of a dog " * 10])[0, -1].item() == 49407  # truncated to L, ends with EOT
    assert encoder.null_embedding().shape == (20, 16)
    default = load_text_encoder(None)
    assert (default.context_length, default.hidden_size) == (77, 64)
    assert torch.equal(default.encode(PROMPTS), default_text_encoder().encode(PROMPTS))
    small = load_text_encoder(
        {"kind": "default", "hidden_size": 16, "num_heads": 2, "num_layers": 1, "context_length": 20}
    )
    assert torch.equal(small.encode(PROMPTS), encoder.encode(PROMPTS))


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


def test_hf_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(MissingWeightsError, match="save_pretrained") as info:
        HFCLIPTextEncoder.from_pretrained(missing)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, TextEncoderError)


def test_hf_missing_config(tmp_path):
    with pytest.raises(TextEncoderError, match="config.json") as info:
        load_text_encoder({"kind": "hf_clip", "path": str(tmp_path)})
    assert str(tmp_path) in str(info.value) and "save_pretrained" in str(info.value)


def test_hf_wrong_model_type_and_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(TextEncoderError, match="'bert'"):
        HFCLIPTextEncoder.from_pretrained(tmp_path)
    CLIPTextConfig(hidden_size=HIDDEN, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(MissingWeightsError, match="no weights") as info:
        HFCLIPTextEncoder.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_hf_checkpoint_missing_keys(tmp_path, hf_dir):
    _tiny_clip_text_model(num_layers=2).config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((hf_dir[0] / "model.safetensors").read_bytes())
    with pytest.raises(TextEncoderError, match="lacks"):
        HFCLIPTextEncoder.from_pretrained(tmp_path)


def test_open_clip_unknown_model_name(tmp_path):
    with pytest.raises(TextEncoderError, match="ViT-Nope-99") as info:
        OpenCLIPTextEncoder.from_checkpoint("ViT-Nope-99", tmp_path / "missing.pt")  # the name is checked first
    assert "ViT-B-32" in str(info.value)


def test_open_clip_missing_checkpoint(tmp_path, open_clip_configs):
    missing = tmp_path / "missing.pt"
    with pytest.raises(MissingWeightsError) as info:
        load_text_encoder({"kind": "open_clip", "model": OC_CLIP, "checkpoint": str(missing)})
    assert str(missing) in str(info.value) and isinstance(info.value, FileNotFoundError)


def test_open_clip_refuses_pickled_objects_and_wrong_architectures(tmp_path, open_clip_configs):
    state_dict = open_clip.create_model(OC_CLIP).state_dict()
    torch.save({"state_dict": state_dict, "extra": _NotATensor()}, tmp_path / "pickled.pt")
    with pytest.raises(TextEncoderError, match="pickled.pt"):
        OpenCLIPTextEncoder.from_checkpoint(OC_CLIP, tmp_path / "pickled.pt")
    del state_dict["ln_final.weight"]
    torch.save(state_dict, tmp_path / "partial.pt")
    with pytest.raises(TextEncoderError, match="ln_final.weight"):
        OpenCLIPTextEncoder.from_checkpoint(OC_CLIP, tmp_path / "partial.pt")


def test_open_clip_unsupported_text_tower(tmp_path):
    coca = next(n for n in open_clip.list_models() if "multimodal_cfg" in open_clip.get_model_config(n))
    with pytest.raises(TextEncoderError, match="CoCa") as info:
        OpenCLIPTextEncoder.from_checkpoint(coca, tmp_path / "missing.pt")
    assert repr(coca) in str(info.value)


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"kind": "clip-xl"}, r"'clip-xl'.*\['default', 'hf_clip', 'open_clip'\]"),
        ({"kind": "hf_clip"}, r"lacks \['path'\]"),
        ({"kind": "open_clip", "model": OC_CLIP}, r"lacks \['checkpoint'\]"),
        ({"kind": "default", "hiden_size": 8}, r"unexpected keys \['hiden_size'\]"),
        ("default", r"got str 'default'"),
        ({"kind": "default", "hidden_size": 30, "num_heads": 4}, r"hidden_size=30.*num_heads=4"),
        ({"kind": "default", "num_layers": 0}, r"num_layers must be a positive int, got 0"),
        ({"kind": "hf_clip", "path": ".", "dtype": "int8"}, r"dtype.*'int8'"),
    ],
)
def test_load_text_encoder_bad_specs(spec, match):
    with pytest.raises(TextEncoderError, match=match):
        load_text_encoder(spec)


@pytest.mark.parametrize(
    "prompts, match",
    [
        ("a dog", r"single str 'a dog'"),
        ([], r"empty sequence"),
        (["a dog", 3], r"prompts\[1\] is int 3"),
        (None, r"got NoneType None"),
        ({"a dog"}, r"got set \{'a dog'\}"),
    ],
)
def test_bad_prompts(small_default_encoder, prompts, match):
    with pytest.raises(TextEncoderError, match=match):
        small_default_encoder.encode(prompts)
