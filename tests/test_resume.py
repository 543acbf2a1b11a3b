"""A tiny DR-CPSD run killed (SIGKILL, in a child process) inside every phase and resumed each time ends with the CSV
rows, accuracies and learned state of an uninterrupted run with the same seed, bit for bit on the CPU.

The kills use ``tests/kill_switch.py``'s ``"<exp>:<phase>[:<when>]"`` points, through the checkpointer's event hooks.
They form one chain: each process resumes from the checkpoint the previous one left and is killed one phase further
on, so every kill point is resumed from (and the resumed runs are themselves resumed)."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import tiny_config
from safetensors.torch import load_file

from avalanche_drcpsd.experiments.checkpoint import CHECKPOINT_DIR, EVENT_HOOKS, CheckpointError, load_checkpoint
from avalanche_drcpsd.experiments.run import ExperimentConfig, run_experiment

#: end-to-end runs: deselect with -m "not slow" for a quick loop
pytestmark = pytest.mark.slow

#: one process per entry, each killed at that point (``end``: after the phase's work, before its checkpoint;
#: ``start``: as it begins; ``checkpoint``: half-way through writing its checkpoint); then one that finishes
KILL_CHAIN = [
    "0:classifier",          # before any checkpoint exists: the resume starts from the beginning
    "0:cpsd:checkpoint",     # the CPSD checkpoint half written: resume from the generator's
    "0:eval",                # eval rows written, no checkpoint yet: they are cut and written again
    "1:generation",          # replay set generated, not yet checkpointed
    "1:classifier",          # training rows written after the generation checkpoint
    "1:generator",
    "1:cpsd:start",
    "1:replay",
    "1:eval",
]


def experiment() -> ExperimentConfig:
    return ExperimentConfig(benchmark="default", train_epochs=1, threads=1, eval_mb_size=500,
                            benchmark_args={"n_experiences": 2, "train_per_class": 40, "test_per_class": 20},
                            drcpsd=tiny_config(gap_samples_per_class=4))


def _child(argv, kill_at, log):  # runs in a forked child process: `drcpsd-run ARGV`, maybe killed by the hook
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    EVENT_HOOKS.clear()
    if kill_at:
        from kill_switch import KillSwitch

        EVENT_HOOKS.append(KillSwitch(kill_at))
    from avalanche_drcpsd.experiments.run import main

    sys.exit(main(argv))


_FORKSERVER = None


def _context():
    """Child processes forked from a server that has imported the package once: a process each, SIGKILL and all,
    without paying for torch/diffusers/avalanche imports each time (the server runs no torch computation, so
    forking it is safe)."""
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["avalanche_drcpsd.experiments.run", "avalanche_drcpsd.strategy",
                                            "avalanche_drcpsd.models", "avalanche_drcpsd.experiments.checkpoint",
                                            "avalanche.training", "avalanche.evaluation.metrics"])
    return _FORKSERVER


def _run_cli(config: Path, out: Path, *, kill_at=None, resume=False):
    """``drcpsd-run --config CONFIG --out OUT --quiet [--resume]`` in a child process: (exit code, its output)."""
    log = out.parent / "child.log"
    argv = ["--config", str(config), "--out", str(out), "--quiet"] + (["--resume"] if resume else [])
    proc = _context().Process(target=_child, args=(argv, kill_at, str(log)))
    proc.start()
    proc.join(600)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    return proc.exitcode, log.read_text() if log.exists() else ""


def _metric_rows(path: Path):
    """metrics.csv rows; the wall-clock PhaseTime values are the one thing two runs cannot share."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return [r[:2] + ["<time>"] if r[0].startswith("PhaseTime/") else r for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    summary = run_experiment(experiment(), str(out), verbose=False)
    assert not (out / CHECKPOINT_DIR).exists(), "a finished run deletes its checkpoint"
    return out, summary


def test_killed_in_every_phase_and_resumed_equals_an_uninterrupted_run(reference, tmp_path):
    ref, ref_summary = reference
    config = tmp_path / "experiment.json"
    config.write_text(json.dumps(experiment().to_dict()))
    out = tmp_path / "run"
    positions, sequence = [], []
    for i, kill_at in enumerate(KILL_CHAIN):
        code, output = _run_cli(config, out, kill_at=kill_at, resume=i > 0)
        assert code == -signal.SIGKILL, f"{kill_at}: exit code {code}\n{output[-3000:]}"
        ckpt = load_checkpoint(str(out))  # verified against its manifest
        positions.append(None if ckpt is None else (ckpt.experience, ckpt.phase))
        sequence.append(None if ckpt is None else int(ckpt.name.split("-")[1]))
        if ckpt is not None:  # only the latest checkpoint is kept (a half-written one is not used)
            names = sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir() if p.name.startswith("ckpt-"))
            assert ckpt.name in names and len(names) <= 2, names
    # each kill left the checkpoint of the phase before the one it interrupted
    assert positions == [None, (0, "generator"), (0, "cpsd"), (0, "eval"), (1, "generation"), (1, "classifier"),
                         (1, "generator"), (1, "cpsd"), (1, "replay")]
    # each process went on from the checkpoint it found instead of starting over: the checkpoints are numbered on
    # (a full run writes 10; the half-written one took number 3; a fresh start would begin again at 1)
    assert sequence == [None, 2, 4, 5, 6, 7, 8, 9, 10]
    code, output = _run_cli(config, out, resume=True)
    assert code == 0, output[-3000:]
    assert not (out / CHECKPOINT_DIR).exists()

    # no row lost or repeated: the logs are those of the uninterrupted run
    for name in ("training_results.csv", "eval_results.csv"):
        assert (out / "logs" / name).read_text() == (ref / "logs" / name).read_text(), name
    assert _metric_rows(out / "logs" / "metrics.csv") == _metric_rows(ref / "logs" / "metrics.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_average_accuracy"] == ref_summary["final_average_accuracy"]
    assert [h["stream_accuracy"] for h in summary["history"]] == [h["stream_accuracy"] for h in ref_summary["history"]]
    assert summary["phase_time_s"].keys() == ref_summary["phase_time_s"].keys()
    # and so is the learned state, bit for bit
    for name in ("classifier.safetensors", "embeddings.safetensors",
                 "generator/unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(out / "state" / name), load_file(ref / "state" / name)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name

    # resuming a finished run does nothing and returns its summary
    again = run_experiment(experiment(), str(out), verbose=False, resume=True)
    assert again == summary


def test_resume_refuses_another_configuration(tmp_path):
    """A checkpoint is only resumed with the configuration that wrote it (here: one written by hand)."""
    from avalanche_drcpsd.experiments.checkpoint import CheckpointStore

    exp = experiment()
    CheckpointStore(str(tmp_path / CHECKPOINT_DIR)).write([], {
        "position": {"index": 0, "experience": 0, "phase": "classifier"}, "experiment": exp.to_dict()})
    other = ExperimentConfig.from_dict({**exp.to_dict(), "lr": 0.1})
    with pytest.raises(CheckpointError, match=r"lr: 0\.05 -> 0\.1"):
        run_experiment(other, str(tmp_path), verbose=False, resume=True)
    with pytest.raises(CheckpointError, match="drcpsd' only"):
        run_experiment(ExperimentConfig.from_dict({**exp.to_dict(), "strategy": "naive"}), str(tmp_path),
                       verbose=False, resume=True)


def test_resume_accepts_a_configuration_saved_before_a_field_was_added():
    """A run saved before an option existed resumes when the option is at its default (the saved config lacks
    it), and is refused when it is not."""
    from avalanche_drcpsd.experiments.run import _check_same_experiment

    exp = experiment()
    saved = exp.to_dict()
    del saved["drcpsd"]["replay_min_steps"]
    _check_same_experiment(saved, exp, "out")
    changed = ExperimentConfig.from_dict({**exp.to_dict(), "drcpsd": {**exp.drcpsd.to_dict(), "replay_min_steps": 100}})
    with pytest.raises(CheckpointError, match=r"drcpsd\.replay_min_steps: 0 -> 100"):
        _check_same_experiment(saved, changed, "out")


def _reference_and_killed_run(exp: ExperimentConfig, tmp_path: Path, kills):
    """An uninterrupted run of ``exp``, and the same run killed at each of ``kills`` in turn (a process each,
    resumed by the next) and then finished: (reference folder, its summary, the killed run's folder)."""
    ref = tmp_path / "reference"
    ref_summary = run_experiment(exp, str(ref), verbose=False)
    config = tmp_path / "experiment.json"
    config.write_text(json.dumps(exp.to_dict()))
    out = tmp_path / "run"
    for i, kill_at in enumerate(kills):
        code, output = _run_cli(config, out, kill_at=kill_at, resume=i > 0)
        assert code == -signal.SIGKILL, f"{kill_at}: exit code {code}\n{output[-3000:]}"
    code, output = _run_cli(config, out, resume=True)
    assert code == 0, output[-3000:]
    return ref, ref_summary, out


def _assert_same_end(ref, ref_summary, out) -> None:
    """The killed-and-resumed run ended as the uninterrupted one: accuracy, classifier, embeddings, generator, rows."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_average_accuracy"] == ref_summary["final_average_accuracy"]
    for name in ("classifier.safetensors", "embeddings.safetensors",
                 "generator/unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(out / "state" / name), load_file(ref / "state" / name)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
    assert (out / "logs" / "eval_results.csv").read_text() == (ref / "logs" / "eval_results.csv").read_text()


def test_resumed_run_keeps_the_kept_sets_ema_weights_and_fresh_teacher(tmp_path):
    """The issue-13 levers keep their state across a kill: with ``replay_draw="once"`` the kept synthetic sets of
    the old classes (a fresh process must not draw them again from the changed generator), the EMA weights that
    became the generator, and fresh-sample generative distillation from a teacher rebuilt from them."""
    exp = ExperimentConfig(benchmark="default", train_epochs=1, threads=1, eval_mb_size=500,
                           benchmark_args={"n_experiences": 3, "train_per_class": 40, "test_per_class": 20},
                           drcpsd=tiny_config(gap_samples_per_class=4, replay_draw="once", generator_ema_decay=0.9,
                                              generator_distill_source="fresh"))
    ref, ref_summary, out = _reference_and_killed_run(exp, tmp_path, ["1:eval", "2:generator"])
    _assert_same_end(ref, ref_summary, out)


def test_a_run_that_skips_the_last_generator_phase_resumes_bit_for_bit(tmp_path):
    """``generator_last_experience="skip"``: killed in the last experience (after its classifier phase and in its
    replay), the resumed run skips the generator phase there too and ends as the uninterrupted one."""
    exp = experiment()
    exp = ExperimentConfig.from_dict({**exp.to_dict(), "drcpsd": {**exp.drcpsd.to_dict(),
                                                                  "generator_last_experience": "skip"}})
    ref, ref_summary, out = _reference_and_killed_run(exp, tmp_path, ["1:classifier", "1:replay"])
    assert ref_summary["phase_time_s"]["generator"] > 0, "experience 0's generator phase still runs"
    assert _metric_rows(out / "logs" / "metrics.csv") == _metric_rows(ref / "logs" / "metrics.csv")
    assert not any(r[0] == "PhaseTime/generator/Exp001" for r in _metric_rows(out / "logs" / "metrics.csv"))
    for name in ("classifier.safetensors", "embeddings.safetensors"):
        a, b = load_file(out / "state" / name), load_file(ref / "state" / name)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
    learned = sorted(load_file(out / "state" / "embeddings.safetensors"))
    assert learned == [f"class_{k}" for k in range(5)] + ["null"], "experience 1's classes (5-9) were not learned"


def test_a_run_with_cpsd_before_the_generator_resumes_bit_for_bit(tmp_path):
    """``cpsd_order="before_generator"`` (the original code's order): killed as a generator phase starts (its CPSD
    phase checkpointed), the resumed run continues with that experience's generator phase, conditioned on the CPSD
    embeddings just learned, and ends as the uninterrupted one."""
    exp = experiment()
    exp = ExperimentConfig.from_dict({**exp.to_dict(), "drcpsd": {**exp.drcpsd.to_dict(),
                                                                  "cpsd_order": "before_generator"}})
    ref, ref_summary, out = _reference_and_killed_run(exp, tmp_path, ["0:generator:start", "1:generator:start"])
    _assert_same_end(ref, ref_summary, out)
