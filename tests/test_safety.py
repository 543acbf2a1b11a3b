"""Faults and bad input: corrupt checkpoints are detected, checkpoints never unpickle objects, a full disk gives a clear
error and keeps the previous checkpoint, a non-finite loss stops the run naming the phase and experience, and bad
data is refused before training."""

from __future__ import annotations

import errno
import json
import os
import shutil
import types

import pytest
import torch
from conftest import tiny_config
from kill_switch import KillSwitch
from kill_switch import kill_at as killed_at

from avalanche_drcpsd.data import DataError
from avalanche_drcpsd.experiments.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointStore,
    CorruptCheckpointError,
    NonFiniteError,
    load_checkpoint,
)
from avalanche_drcpsd.experiments.run import ExperimentConfig, main, run_experiment
from avalanche_drcpsd.logging import MetricsCSVLogger, ResumableCSVLogger
from avalanche_drcpsd.utils import WriteError, atomic_write, check_experience_data


class _Killed(BaseException):
    """Stands for SIGKILL in-process (the subprocess tests in test_resume.py use the real signal)."""


def experiment(**overrides) -> ExperimentConfig:
    values = dict(benchmark="default", train_epochs=1, threads=1, eval_mb_size=500,
                  benchmark_args={"n_experiences": 2, "train_per_class": 20, "test_per_class": 10},
                  drcpsd=tiny_config(gap_samples_per_class=0))
    values.update(overrides)
    return ExperimentConfig(**values)


def _raise_killed():
    raise _Killed()


def _stopped_run(out, kill_at: str, monkeypatch) -> None:
    monkeypatch.setattr(KillSwitch, "fire", staticmethod(_raise_killed))
    with killed_at(kill_at), pytest.raises(_Killed):
        run_experiment(experiment(), str(out), verbose=False)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped inside the generator phase of experience 1: its checkpoint is that of the classifier phase
    (it holds every kind of file: model, optimiser, generator, buffer, teacher, replay set, random states)."""
    out = tmp_path_factory.mktemp("stopped")
    with pytest.MonkeyPatch.context() as mp:
        _stopped_run(out, "1:generator", mp)
    return out


@pytest.fixture
def copy_of(stopped, tmp_path):
    shutil.copytree(stopped, tmp_path / "run")
    return tmp_path / "run"


def _files(out):
    ckpt = load_checkpoint(str(out))
    return ckpt, {name: os.path.join(ckpt.directory, name) for name in ckpt.manifest["files"]}


# --- what a checkpoint holds --------------------------------------------------------------------------------------
def test_checkpoint_holds_every_piece_of_state(stopped):
    ckpt, files = _files(stopped)
    assert (ckpt.experience, ckpt.phase) == (1, "classifier")
    assert set(files) == {"model.safetensors", "optimizer.pt", "generator.safetensors", "embeddings.safetensors",
                          "old_teacher.safetensors", "replay.safetensors", "rng.pt", "state.pt"}
    m = ckpt.manifest
    assert m["experiment"] == json.loads(json.dumps(experiment().to_dict()))
    logs = m["logs"]
    assert set(logs) == {"logs/training_results.csv", "logs/eval_results.csv", "logs/metrics.csv"}
    assert logs["logs/eval_results.csv"]["rows"] == 1 + 2  # header + experience 0 evaluated on 2 experiences
    assert logs["logs/training_results.csv"]["rows"] == 1 + 2  # header + one epoch in each experience
    assert m["new_classes"] == [5, 6, 7, 8, 9] and m["learned_before"] == [0, 1, 2, 3, 4]
    assert m["replay"] == {"classes": [0, 1, 2, 3, 4], "n_per_class": 8}
    rng = ckpt.load_data("rng.pt")
    assert {"torch", "numpy", "python", "generators"} <= set(rng)
    assert any(k.endswith("CPSDGeneratorPlugin.rng") for k in rng["generators"])
    optim = ckpt.load_data("optimizer.pt")
    assert optim["state"] and all("momentum_buffer" in s for s in optim["state"].values())
    x = ckpt.load_tensors("replay.safetensors")[0]["x"]
    assert x.shape == (5 * 8, 1, 28, 28)


# --- corruption ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, message", [
    ("flip", r"model\.safetensors.*SHA-256"),
    ("truncate", r"generator\.safetensors.*bytes"),
    ("delete", r"replay\.safetensors.*missing"),
    ("manifest", r"manifest.*not valid JSON"),
    ("pointer", r"pointer.*not a checkpoint name"),
])
def test_corrupt_checkpoint_is_detected_before_anything_changes(copy_of, damage, message):
    ckpt, files = _files(copy_of)
    if damage == "flip":
        data = bytearray(open(files["model.safetensors"], "rb").read())
        data[len(data) // 2] ^= 0x01
        open(files["model.safetensors"], "wb").write(bytes(data))
    elif damage == "truncate":
        with open(files["generator.safetensors"], "r+b") as fh:
            fh.truncate(100)
    elif damage == "delete":
        os.remove(files["replay.safetensors"])
    elif damage == "manifest":
        with open(os.path.join(ckpt.directory, "manifest.json"), "a") as fh:
            fh.write("}{")
    else:
        (copy_of / CHECKPOINT_DIR / "LATEST").write_text("../../etc")
    with pytest.raises(CorruptCheckpointError, match=message):
        load_checkpoint(str(copy_of))
    logs = {p: p.read_bytes() for p in (copy_of / "logs").iterdir()}
    with pytest.raises(CorruptCheckpointError, match=message):
        run_experiment(experiment(), str(copy_of), verbose=False, resume=True)
    assert {p: p.read_bytes() for p in (copy_of / "logs").iterdir()} == logs, "the logs are left as they were"


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_files_are_never_unpickled_as_objects(copy_of, monkeypatch):
    """A checkpoint whose optimizer.pt holds a pickled callable (with a manifest updated to match) is refused and the
    code never runs: torch.load(weights_only=True) only reads tensors and plain data."""
    monkeypatch.chdir(copy_of)
    ckpt, files = _files(copy_of)
    torch.save({"state": {}, "param_groups": [], "x": _Exploit()}, files["optimizer.pt"])
    manifest_path = os.path.join(ckpt.directory, "manifest.json")
    manifest = json.load(open(manifest_path))
    from avalanche_drcpsd.utils import sha256_file

    manifest["files"]["optimizer.pt"].update(bytes=os.path.getsize(files["optimizer.pt"]),
                                             sha256=sha256_file(files["optimizer.pt"]))
    json.dump(manifest, open(manifest_path, "w"))
    ckpt = load_checkpoint(str(copy_of))  # the hashes match: only the safe loader stands in the way
    with pytest.raises(CorruptCheckpointError, match="refusing to load.*optimizer.pt"):
        ckpt.load_data("optimizer.pt")
    with pytest.raises(CorruptCheckpointError, match="refusing to load"):
        run_experiment(experiment(), str(copy_of), verbose=False, resume=True)
    assert not (copy_of / "PWNED").exists()


# --- a full disk --------------------------------------------------------------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(copy_of, monkeypatch):
    before, _ = _files(copy_of)
    store = CheckpointStore(str(copy_of / CHECKPOINT_DIR))
    from avalanche_drcpsd.experiments.checkpoint import _Entry

    monkeypatch.setattr(os, "replace", _enospc)
    with pytest.raises(WriteError, match=f"No space left on device.*previous checkpoint \\({before.name}\\) is kept") \
            as info:
        store.write([_Entry("model.safetensors", b"x" * 100)], {"position": {"index": 1, "experience": 1,
                                                                             "phase": "classifier"}})
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    after = load_checkpoint(str(copy_of))
    assert after.name == before.name and after.manifest == before.manifest
    assert sorted(p.name for p in (copy_of / CHECKPOINT_DIR).iterdir()) == ["LATEST", before.name]


def test_disk_full_during_a_run_stops_it_with_a_clear_error(tmp_path, monkeypatch, capsys):
    config = tmp_path / "exp.json"
    config.write_text(json.dumps(experiment().to_dict()))
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        if os.sep + CHECKPOINT_DIR + os.sep in str(dst):
            _enospc()
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    assert main(["--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device (disk full" in err and "checkpoint" in err and "--resume" in err


def test_disk_full_in_a_csv_log_or_an_atomic_write(tmp_path, monkeypatch):
    class Full:
        def write(self, *a):
            _enospc()

        def flush(self):
            pass

    logger = MetricsCSVLogger(tmp_path)
    logger._fh = Full()
    logger._writer = __import__("csv").writer(logger._fh)
    with pytest.raises(WriteError, match=r"metrics\.csv.*No space left on device \(disk full"):
        logger.log_single_metric("a", 1.0, 0)
    csv_logger = ResumableCSVLogger(str(tmp_path))
    csv_logger.eval_file = Full()
    with pytest.raises(WriteError, match=r"eval_results\.csv.*disk full"):
        csv_logger.print_eval_metrics(0, 0, 0.5, 0.1, 0.0)
    target = tmp_path / "f.json"
    target.write_text("old")
    monkeypatch.setattr(os, "replace", _enospc)
    with pytest.raises(WriteError, match=r"f\.json.*No space left on device.*previous version"):
        atomic_write(target, lambda tmp: open(tmp, "w").write("new"))
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


# --- non-finite losses --------------------------------------------------------------------------------------------
def test_non_finite_classifier_loss_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", lambda self, x, y: (x.sum() * float("nan")))
    with pytest.raises(NonFiniteError, match="phase 'classifier' of experience 0.*no checkpoint"):
        run_experiment(experiment(), str(tmp_path), verbose=False)


def test_non_finite_generator_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import avalanche_drcpsd.generator_training as G  # the generator phase's loop

    real = G.ldm_loss
    monkeypatch.setattr(G, "ldm_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteError, match="phase 'generator' of experience 0.*checkpoint \\(ckpt-\\d+\\) is kept"):
        run_experiment(experiment(), str(tmp_path), verbose=False)
    ckpt = load_checkpoint(str(tmp_path))
    assert (ckpt.experience, ckpt.phase) == (0, "classifier")


def test_non_finite_cpsd_loss_is_caught_at_the_end_of_its_phase(tmp_path, monkeypatch):
    import avalanche_drcpsd.cpsd as C

    real = C.cpsd_loss
    monkeypatch.setattr(C, "cpsd_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteError, match="phase 'cpsd' of experience 0: the CPSD embedding of class 0"):
        run_experiment(experiment(), str(tmp_path), verbose=False)
    assert (load_checkpoint(str(tmp_path)).experience, load_checkpoint(str(tmp_path)).phase) == (0, "generator")


# --- bad data -----------------------------------------------------------------------------------------------------
def _dataset(x, y):
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset

    return _make_taskaware_tensor_classification_dataset(x, y, targets=y.tolist(), task_labels=0)


def test_check_experience_data_names_the_problem():
    x = torch.rand(6, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    check_experience_data(_dataset(x, y), image_shape=(1, 28, 28), num_classes=3, experience=0)
    with pytest.raises(DataError, match=r"experience 2: label\(s\) \[3\] out of range.*0\.\.2"):
        check_experience_data(_dataset(x, torch.tensor([0, 1, 3, 0, 1, 2])), image_shape=(1, 28, 28),
                              num_classes=3, experience=2)
    with pytest.raises(DataError, match=r"label\(s\) \[-1\]"):
        check_experience_data(_dataset(x, torch.tensor([0, 1, -1, 0, 1, 2])), image_shape=(1, 28, 28),
                              num_classes=3, experience=0)
    with pytest.raises(DataError, match=r"shape \(1, 28, 28\), expected \(3, 32, 32\)"):
        check_experience_data(_dataset(x, y), image_shape=(3, 32, 32), num_classes=3, experience=0)
    bad = x.clone()
    bad[5, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="item 5 holds non-finite values"):
        check_experience_data(_dataset(bad, y), image_shape=(1, 28, 28), num_classes=3, experience=0)
    with pytest.raises(DataError, match=r"values in \[255, 255\], expected images in \[0, 1\]"):
        check_experience_data(_dataset(x * 0 + 255, y), image_shape=(1, 28, 28), num_classes=3, experience=0)
    with pytest.raises(DataError, match="integer class ids"):
        check_experience_data(_dataset(x, y.float() + 0.5), image_shape=(1, 28, 28), num_classes=3, experience=0)


def test_run_refuses_data_the_classifier_cannot_learn_before_training(tmp_path, monkeypatch):
    import avalanche_drcpsd.data as D

    real = D.make_benchmark

    def fewer_outputs(*a, **k):
        bench = real(*a, **k)
        spec = bench.spec
        bench.spec = types.SimpleNamespace(num_classes=4, image_shape=spec.image_shape, name=spec.name)
        return bench

    monkeypatch.setattr(D, "make_benchmark", fewer_outputs)
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", lambda *a: pytest.fail("training started"))
    with pytest.raises(DataError, match=r"experience 0: label\(s\) \[4\] out of range; the classifier has 4"):
        run_experiment(experiment(), str(tmp_path), verbose=False)


def test_a_fresh_run_discards_an_old_checkpoint(copy_of, capsys, monkeypatch):
    monkeypatch.setattr(KillSwitch, "fire", staticmethod(_raise_killed))
    with killed_at("0:classifier:start"), pytest.raises(_Killed):
        run_experiment(experiment(), str(copy_of), verbose=False)
    assert "discarding the checkpoint" in capsys.readouterr().err
    assert load_checkpoint(str(copy_of)) is None
    assert (copy_of / "logs" / "eval_results.csv").read_text().count("\n") == 1  # header only: logs start over
