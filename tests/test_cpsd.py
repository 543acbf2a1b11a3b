"""Tests for avalanche_drcpsd.cpsd: the identity-initialised projection, the embedding buffer and its file
format, and the CPSD training loop on a tiny frozen diffusion generator."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import save_file

from avalanche_drcpsd.cpsd import CPSDProjection, EmbeddingBuffer, train_cpsd_projection
from avalanche_drcpsd.generator import DiffusionGenerator
from avalanche_drcpsd.losses import cpsd_loss

L, D = 6, 16  # token positions and hidden size of the tiny "text encoder" states


pytestmark = pytest.mark.usefixtures("one_thread")


# --- CPSDProjection ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["token", "hidden"])
def test_projection_identity_initialisation_is_exact(mode):
    x = torch.randn(3, L, D, generator=torch.Generator().manual_seed(0))
    proj = CPSDProjection(L, D, mode)
    n = L if mode == "token" else D
    assert proj.linear.weight.shape == (n, n)
    assert torch.equal(proj.linear.weight, torch.eye(n))
    assert torch.equal(proj.linear.bias, torch.zeros(n))
    out = proj(x)
    assert out.shape == (3, L, D)
    assert torch.equal(out, x)


def test_projection_token_mode_mixes_positions():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, L, D, generator=g)
    proj = CPSDProjection(L, D, "token")
    w = torch.randn(L, L, generator=g)
    b = torch.randn(L, generator=g)
    with torch.no_grad():
        proj.linear.weight.copy_(w)
        proj.linear.bias.copy_(b)
    # e[b, m, d] = sum_l W[m, l] x[b, l, d] + b[m]
    expected = torch.einsum("ml,bld->bmd", w, x) + b[None, :, None]
    torch.testing.assert_close(proj(x), expected, rtol=1e-5, atol=1e-5)


def test_projection_token_mode_small_case_by_hand():
    # L = 2, D = 1: W = [[0, 1], [1, 1]], b = [10, 20]; tokens [3, 5] -> [0*3 + 1*5 + 10, 1*3 + 1*5 + 20] = [15, 28]
    proj = CPSDProjection(2, 1, "token")
    with torch.no_grad():
        proj.linear.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
        proj.linear.bias.copy_(torch.tensor([10.0, 20.0]))
    out = proj(torch.tensor([[[3.0], [5.0]]]))
    assert out.tolist() == [[[15.0], [28.0]]]


def test_projection_hidden_mode_is_per_token_linear():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, L, D, generator=g)
    proj = CPSDProjection(L, D, "hidden")
    w = torch.randn(D, D, generator=g)
    b = torch.randn(D, generator=g)
    with torch.no_grad():
        proj.linear.weight.copy_(w)
        proj.linear.bias.copy_(b)
    expected = torch.einsum("ed,bld->ble", w, x) + b[None, None, :]
    torch.testing.assert_close(proj(x), expected, rtol=1e-5, atol=1e-5)


def test_projection_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode='both'"):
        CPSDProjection(L, D, "both")


# --- EmbeddingBuffer ---------------------------------------------------------------------------------
@pytest.fixture
def buffer():
    g = torch.Generator().manual_seed(3)
    buf = EmbeddingBuffer(null=torch.randn(L, D, generator=g),
                          encoder_identity={"kind": "default", "config": {"hidden_size": D, "seed": 0}})
    buf.add(7, torch.randn(L, D, generator=g), "a photo of a seven")
    buf.add(2, torch.randn(L, D, generator=g), "a photo of a two")
    buf.add(4, torch.randn(L, D, generator=g), "a photo of a café")
    return buf


def test_buffer_add_stack_contains_classes(buffer):
    assert buffer.classes == [2, 4, 7]
    assert len(buffer) == 3
    assert 7 in buffer and torch.tensor(2) in buffer and 3 not in buffer
    stacked = buffer.stack([7, 2, 7])
    assert stacked.shape == (3, L, D)
    assert torch.equal(stacked[0], buffer.embeddings[7])
    assert torch.equal(stacked[1], buffer.embeddings[2])
    assert torch.equal(stacked[2], buffer.embeddings[7])
    assert buffer.prompts == {7: "a photo of a seven", 2: "a photo of a two", 4: "a photo of a café"}


def test_buffer_add_stores_a_detached_float_copy():
    buf = EmbeddingBuffer()
    e = torch.ones(L, D, dtype=torch.float64, requires_grad=True)
    buf.add(0, e, "p")
    stored = buf.embeddings[0]
    assert stored.dtype == torch.float32 and not stored.requires_grad
    with torch.no_grad():
        e.add_(1.0)
    assert torch.equal(stored, torch.ones(L, D))  # later changes to the source do not leak in


def test_buffer_stack_missing_class_raises(buffer):
    with pytest.raises(KeyError, match=r"\[5\]"):
        buffer.stack([2, 5])


def test_buffer_add_rejects_wrong_rank_and_null_shape_mismatch(buffer):
    with pytest.raises(ValueError, match=r"\(1, 6, 16\)"):
        buffer.add(1, torch.zeros(1, L, D))
    with pytest.raises(ValueError, match=r"\(6, 8\).*\(6, 16\)"):
        buffer.add(1, torch.zeros(L, 8))
    assert 1 not in buffer


def test_buffer_save_load_round_trip(buffer, tmp_path):
    path = tmp_path / "sub" / "buffer.safetensors"
    buffer.save(path)
    assert sorted(os.listdir(tmp_path / "sub")) == ["buffer.safetensors"]  # no temp files left behind
    loaded = EmbeddingBuffer.load(path)
    assert loaded.classes == [2, 4, 7]
    for c in buffer.classes:
        assert torch.equal(loaded.embeddings[c], buffer.embeddings[c])
    assert loaded.prompts == buffer.prompts
    assert torch.equal(loaded.null, buffer.null)
    assert loaded.encoder_identity == {"kind": "default", "config": {"hidden_size": D, "seed": 0}}
    assert torch.equal(loaded.stack([4, 7]), buffer.stack([4, 7]))


def test_buffer_round_trip_without_null(tmp_path):
    buf = EmbeddingBuffer()
    buf.add(0, torch.full((2, 3), 0.5), "zero")
    buf.save(str(tmp_path / "b.safetensors"))
    loaded = EmbeddingBuffer.load(str(tmp_path / "b.safetensors"))
    assert loaded.null is None
    assert loaded.encoder_identity == {}
    assert loaded.prompts == {0: "zero"}
    assert loaded.embeddings[0].tolist() == [[0.5] * 3] * 2


def test_buffer_load_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        EmbeddingBuffer.load(path)
    assert str(path) in str(info.value)


def test_buffer_load_rejects_foreign_safetensors(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"class_0": torch.zeros(L, D)}, str(path))
    with pytest.raises(ValueError, match="not an embedding buffer"):
        EmbeddingBuffer.load(path)
    save_file({"class_0": torch.zeros(L, D)}, str(path), metadata={"format": "something/else"})
    with pytest.raises(ValueError, match="something/else"):
        EmbeddingBuffer.load(path)


# --- train_cpsd_projection ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_generator():
    torch.manual_seed(0)
    return DiffusionGenerator.build(image_shape=(1, 8, 8), cross_attention_dim=D, block_out_channels=(8, 16),
                                    attention_head_dim=4, patch_size=1)


@pytest.fixture(scope="module")
def class_data():
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    tokens = torch.randn(L, D, generator=torch.Generator().manual_seed(2))
    return images, tokens


def _fixed_cpsd_loss(gen, projection, tokens, images, lam=0.003, kind="mean"):
    """CPSD loss on a fixed set of (noise, timesteps): 4 draws per image from a seeded torch.Generator."""
    z0 = gen.encode(images.repeat(4, 1, 1, 1))
    z_t, noise, t = gen.noisy(z0, torch.Generator().manual_seed(123))
    with torch.no_grad():
        cond = projection(tokens.unsqueeze(0)).expand(z_t.shape[0], -1, -1)
        return cpsd_loss(gen.predict_noise(z_t, t, cond), noise, gen.snr(t), 5.0, lam, kind).item()


@pytest.mark.parametrize("mode", ["token", "hidden"])
def test_train_cpsd_projection_lowers_loss_and_leaves_generator_alone(tiny_generator, class_data, mode):
    gen = tiny_generator
    images, tokens = class_data
    params_before = {k: v.detach().clone() for k, v in gen.named_parameters()}
    # mixed flags, so that "restored" is distinguishable from "all set to True"
    flags = {k: i % 2 == 0 for i, (k, _) in enumerate(gen.named_parameters())}
    for k, p in gen.named_parameters():
        p.requires_grad_(flags[k])
        p.grad = None

    before = _fixed_cpsd_loss(gen, CPSDProjection(L, D, mode), tokens, images)
    steps = []
    projection = train_cpsd_projection(gen, tokens, images, mode=mode, epochs=5, batch_size=4, lr=1e-2,
                                       generator=torch.Generator().manual_seed(5), progress=steps.append)
    after = _fixed_cpsd_loss(gen, projection, tokens, images)

    assert math.isfinite(before) and math.isfinite(after)
    assert after < before - 1e-3, (before, after)
    assert isinstance(projection, CPSDProjection) and projection.mode == mode and not projection.training
    assert not torch.equal(projection.linear.weight, torch.eye(projection.linear.weight.shape[0]))
    assert steps == [1] * (5 * 4)  # 5 epochs x ceil(16 / 4) batches
    for k, p in gen.named_parameters():
        assert torch.equal(p, params_before[k]), k
        assert p.requires_grad == flags[k], k
        assert p.grad is None, k


def test_train_cpsd_projection_restores_flags_when_interrupted(tiny_generator, class_data):
    gen = tiny_generator
    images, tokens = class_data
    for p in gen.parameters():
        p.requires_grad_(True)

    def boom(_):
        assert not any(p.requires_grad for p in gen.parameters())  # frozen while training
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        train_cpsd_projection(gen, tokens, images[:4], epochs=1, batch_size=4, progress=boom,
                              generator=torch.Generator().manual_seed(0))
    assert all(p.requires_grad for p in gen.parameters())


def test_train_cpsd_projection_is_deterministic_for_a_seeded_generator(tiny_generator, class_data):
    gen = tiny_generator
    images, tokens = class_data
    runs = [train_cpsd_projection(gen, tokens, images[:8], epochs=1, batch_size=4, lr=1e-2, lam=0.5,
                                  mmd_kind="gaussian", generator=torch.Generator().manual_seed(9))
            for _ in range(2)]
    assert torch.equal(runs[0].linear.weight, runs[1].linear.weight)
    assert torch.equal(runs[0].linear.bias, runs[1].linear.bias)
