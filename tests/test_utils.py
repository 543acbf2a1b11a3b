"""Tests for avalanche_drcpsd.utils (weight interpolation, frozen copies, atomic writes) and
avalanche_drcpsd.features (penultimate features through a forward pre-hook)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from avalanche_drcpsd.features import find_head, forward_with_features
from avalanche_drcpsd.utils import (
    atomic_write,
    atomic_write_csv,
    atomic_write_text,
    frozen_copy,
    interpolate_state_dicts,
    running_stats_kept,
)


def _model(seed: int, batches: int) -> nn.Module:
    """Linear -> BatchNorm -> ReLU -> Linear, with ``batches`` training batches through the BatchNorm."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    m.train()
    with torch.no_grad():
        for _ in range(batches):
            m(torch.randn(8, 3))
    return m


@pytest.fixture
def old_new():
    return _model(0, batches=1), _model(1, batches=3)


# --- interpolate_state_dicts --------------------------------------------------------------------------
def test_interpolate_small_dicts_by_hand():
    old = {"w": torch.tensor([1.0, 2.0, -4.0]), "n": torch.tensor(3)}
    new = {"w": torch.tensor([3.0, 6.0, 4.0]), "n": torch.tensor(7)}
    half = interpolate_state_dicts(old, new, 0.5)
    assert half["w"].tolist() == [2.0, 4.0, 0.0]  # (1+3)/2, (2+6)/2, (-4+4)/2
    assert half["n"].item() == 7 and half["n"].dtype == torch.int64
    assert interpolate_state_dicts(old, new, 0.25)["w"].tolist() == [1.5, 3.0, -2.0]  # 0.75*old + 0.25*new
    assert interpolate_state_dicts(old, new, 0.1)["w"].tolist() == pytest.approx([1.2, 2.4, -3.2])
    assert interpolate_state_dicts(old, new, 0.0)["w"].tolist() == [1.0, 2.0, -4.0]
    assert interpolate_state_dicts(old, new, 1.0)["w"].tolist() == [3.0, 6.0, 4.0]
    assert interpolate_state_dicts(old, new, 0.0)["n"].item() == 7  # integers always from new


def test_interpolate_returns_new_tensors():
    old = {"w": torch.tensor([1.0]), "n": torch.tensor(3)}
    new = {"w": torch.tensor([3.0]), "n": torch.tensor(7)}
    out = interpolate_state_dicts(old, new, 0.5)
    out["w"].add_(100.0)
    out["n"].add_(100)
    assert new["w"].item() == 3.0 and new["n"].item() == 7 and old["w"].item() == 1.0


def test_interpolate_casts_old_to_new_dtype():
    out = interpolate_state_dicts({"w": torch.tensor([1.0], dtype=torch.float64)},
                                  {"w": torch.tensor([2.0], dtype=torch.float32)}, 0.5)
    assert out["w"].dtype == torch.float32 and out["w"].tolist() == [1.5]


def test_interpolate_average_of_two_models(old_new):
    old, new = old_new
    so, sn = old.state_dict(), new.state_dict()
    avg = interpolate_state_dicts(so, sn, 0.5)
    assert list(avg) == list(sn)
    for k in sn:
        if torch.is_floating_point(sn[k]):
            torch.testing.assert_close(avg[k], (so[k] + sn[k]) / 2, rtol=0, atol=1e-7)
        else:
            assert torch.equal(avg[k], sn[k]), k
    # the BatchNorm counter is an integer buffer and comes from new (3 batches), not an average with old (1)
    assert so["1.num_batches_tracked"].item() == 1 and sn["1.num_batches_tracked"].item() == 3
    assert avg["1.num_batches_tracked"].item() == 3
    # running statistics are floating buffers: averaged
    torch.testing.assert_close(avg["1.running_mean"], (so["1.running_mean"] + sn["1.running_mean"]) / 2)


def test_student_loaded_from_the_average(old_new):
    old, new = old_new
    student = _model(2, batches=0)
    student.load_state_dict(interpolate_state_dicts(old.state_dict(), new.state_dict(), 0.5))
    old_p, new_p = dict(old.named_parameters()), dict(new.named_parameters())
    names = [n for n, _ in student.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.detach(), 0.5 * (old_p[name].detach() + new_p[name].detach()), rtol=0, atol=1e-7)
    torch.testing.assert_close(student[1].running_var, 0.5 * (old[1].running_var + new[1].running_var))
    assert student[1].num_batches_tracked.item() == 3


def test_interpolate_mismatched_keys_raise(old_new):
    old, new = old_new
    bad = dict(new.state_dict())
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="extra.weight"):
        interpolate_state_dicts(old.state_dict(), bad, 0.5)
    missing = dict(new.state_dict())
    del missing["3.bias"]
    with pytest.raises(ValueError, match=r"3\.bias"):
        interpolate_state_dicts(old.state_dict(), missing, 0.5)
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError):
        interpolate_state_dicts(other.state_dict(), new.state_dict(), 0.5)


# --- frozen_copy -------------------------------------------------------------------------------------
def test_frozen_copy(old_new):
    model, _ = old_new
    model.train()
    teacher = frozen_copy(model)
    assert teacher is not model
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    # the original is untouched: still training, still trainable
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    # same values, independent storage
    for (k, a), (_, b) in zip(model.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(a, b), k
        assert a.data_ptr() != b.data_ptr(), k
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(model[0].weight, teacher[0].weight)
    bias = model[3].bias.detach().clone()
    with torch.no_grad():
        teacher[3].bias.fill_(123.0)
    assert torch.equal(model[3].bias, bias)
    # eval mode: the teacher's BatchNorm uses running statistics, so batches do not change its buffers
    before = teacher[1].running_mean.clone()
    teacher(torch.randn(4, 3))
    assert torch.equal(teacher[1].running_mean, before)


def test_running_stats_kept_normalises_by_the_batch_and_restores_the_buffers_even_on_error():
    m = _model(0, batches=2)
    before = {k: b.clone() for k, b in m[1].named_buffers()}
    x = 5 + 3 * torch.randn(16, 3)
    with running_stats_kept(m):
        h = m[1](m[0](x))
        assert not torch.equal(m[1].running_mean, before["running_mean"])  # the pass itself updates them
    # train mode inside: normalised by the batch's own statistics (mean 0 per feature before the affine map)
    torch.testing.assert_close(((h - m[1].bias) / m[1].weight).mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    for k, b in m[1].named_buffers():
        assert torch.equal(b, before[k]), k
    with pytest.raises(RuntimeError, match="boom"):
        with running_stats_kept(m):
            m(x)
            raise RuntimeError("boom")
    assert all(torch.equal(b, before[k]) for k, b in m[1].named_buffers())
    m(x)  # outside the block the running statistics move again
    assert not torch.equal(m[1].running_mean, before["running_mean"])


# --- atomic_write ------------------------------------------------------------------------------------
def test_atomic_write_success(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def write(tmp):
        assert os.path.dirname(tmp) == str(tmp_path)  # same directory, so os.replace is atomic
        assert tmp != str(path)
        with open(tmp, "w") as fh:
            fh.write("new")

    atomic_write(path, write)
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_atomic_write_keeps_old_file_when_write_fails(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, write)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_atomic_write_cleans_up_on_keyboard_interrupt_and_missing_tmp(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def interrupted(tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)

    def removes_its_tmp(tmp):
        os.remove(tmp)
        raise ValueError("gave up")

    with pytest.raises(ValueError, match="gave up"):  # the original error, not a FileNotFoundError
        atomic_write(path, removes_its_tmp)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_atomic_write_csv_takes_the_union_of_columns_in_first_seen_order(tmp_path):
    path = tmp_path / "out" / "summary.csv"
    atomic_write_csv(path, [{"strategy": "naive", "acc": 0.5}, {"strategy": "drcpsd", "acc": 0.7, "fid": 3.25}])
    assert path.read_text().splitlines() == ["strategy,acc,fid", "naive,0.5,", "drcpsd,0.7,3.25"]
    assert [p.name for p in path.parent.iterdir()] == ["summary.csv"], "no temporary file is left behind"
    atomic_write_text(path, "replaced\n")
    assert path.read_text() == "replaced\n"


def test_atomic_write_creates_missing_directories(tmp_path):
    path = tmp_path / "a" / "b" / "f.bin"
    atomic_write(str(path), lambda tmp: open(tmp, "wb").write(b"\x00\x01"))
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path / "a" / "b") == ["f.bin"]


# --- features ----------------------------------------------------------------------------------------
def test_forward_with_features_returns_input_of_last_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(6, 1, 2, 2)
    logits, h = forward_with_features(model, x)
    manual_h = torch.relu(x.flatten(1) @ model[1].weight.T + model[1].bias)
    manual_logits = manual_h @ model[3].weight.T + model[3].bias
    assert h.shape == (6, 5) and logits.shape == (6, 3)
    torch.testing.assert_close(h, manual_h)
    torch.testing.assert_close(logits, manual_logits)
    assert len(model[3]._forward_pre_hooks) == 0  # the hook is removed afterwards


def test_forward_with_features_small_case_by_hand():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, -1.0]]))
        model[0].bias.copy_(torch.tensor([0.0, 0.5]))
        model[2].weight.copy_(torch.tensor([[2.0, 3.0]]))
        model[2].bias.copy_(torch.tensor([1.0]))
    # x = (1, 3): first layer (1, 1 - 3 + 0.5) = (1, -1.5) -> ReLU (1, 0) -> logits 2*1 + 3*0 + 1 = 3
    logits, h = forward_with_features(model, torch.tensor([[1.0, 3.0]]))
    assert h.tolist() == [[1.0, 0.0]]
    assert logits.tolist() == [[3.0]]
    # a named layer: the input of the first Linear is x itself
    _, h0 = forward_with_features(model, torch.tensor([[1.0, 3.0]]), layer="0")
    assert h0.tolist() == [[1.0, 3.0]]


def test_find_head():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 4)), nn.Identity())
    assert find_head(model) is model[1][1]
    assert find_head(model, "0") is model[0]
    with pytest.raises(ValueError, match="no nn.Linear"):
        find_head(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="'head'"):
        find_head(model, "head")


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write(target, lambda tmp: open(tmp, "w").write("x"))
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~mask)
