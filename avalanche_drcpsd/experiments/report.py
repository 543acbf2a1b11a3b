"""Rebuild a benchmark's summary, plots and report from its CSV folders alone.

    python -m avalanche_drcpsd.experiments.report results/split_mnist

reads every run under ``<folder>/runs/<strategy>/seed<k>/logs/`` (Avalanche ``CSVLogger``'s
``eval_results.csv``, this package's ``metrics.csv`` and ``run_info.csv``) and writes, atomically:

* ``summary.csv``: per strategy, mean and std over seeds of the final average accuracy, the final stream
  accuracy, the average forgetting and the wall time, with the stored real images, generator parameters and
  ``memory_bytes`` (what the strategy keeps from one experience to the next beyond the classifier,
  :func:`avalanche_drcpsd.experiments.baselines.memory_bytes`; empty for runs whose ``run_info.csv`` predates it);
* ``accuracy.png``: average accuracy on the experiences seen so far after each experience, per strategy (mean
  over seeds, min-max band);
* ``accuracy_memory.png``: final average accuracy (mean over seeds, std error bar) against ``memory_bytes``
  (log axis; the strategies that keep nothing at 0), one point per strategy with a known memory;
* ``accuracy_matrix.png``: per strategy, the seed-mean accuracy on experience *j* after training on *i*;
* ``confusion.png``: per strategy, which class each class's test images are taken for after the last experience
  (the runs' ``logs/confusion.csv`` summed over seeds, each row divided by its sum), for the strategies whose
  runs wrote one;
* ``mmd_gap.png``: the real-vs-synthetic gap (mean over the learned classes) after each experience, for the
  strategies that publish it;
* ``targets.csv``: DR-CPSD against the comparison's targets (:data:`TARGETS`, :func:`target_checks`): each
  target, the figures it compares and the margin in accuracy points (negative: missed by that much);
* ``report.md``: all of the above with the command that produced the runs (``command.txt``) and, when the
  folder has one, the hand-written ``notes.md`` (why a target is missed), included as it is.

``python -m avalanche_drcpsd.experiments.report --index results`` then gathers every benchmark's ``summary.csv`` into
``results/comparison.csv`` and the table between the comparison markers of ``results/README.md``.

Definitions (Lopez-Paz & Ranzato, 2017; Chaudhry et al., 2018), with :math:`a_{i,j}` the accuracy on the test
set of experience *j* after training on experience *i* and *T* experiences:
final average accuracy :math:`\\frac1T\\sum_j a_{T,j}`; average forgetting
:math:`\\frac1{T-1}\\sum_{j<T}\\max_{i<T} a_{i,j} - a_{T,j}`. The stream accuracy is Avalanche's
``Top1_Acc_Stream`` (all test images pooled), the figure ``drcpsd-run`` prints.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..data import FSCIL_BENCHMARKS, SPLIT_BENCHMARKS
from ..utils import atomic_write, atomic_write_csv, atomic_write_text
from .baselines import STRATEGIES, is_joint
from .run import CONFUSION

__all__ = ["RunLogs", "load_run", "find_runs", "summarise", "target_checks", "build_report", "plot_accuracy",
           "plot_accuracy_memory", "plot_confusion", "annotated_grid", "plot_sessions", "session_rows", "main",
           "TARGETS"]

STREAM_ACC = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
MMD_PREFIX = "RealSynMMD/eval_phase/test_stream/Class"


#: the comparison's targets for DR-CPSD per benchmark folder: ``min_accuracy``, a final average accuracy to reach;
#: ``max_joint_gap``, at most this far (accuracy, 0-1) under Joint. On every benchmark DR-CPSD is also to be above
#: every baseline that stores as many real images or more (Joint, the upper bound, excepted: ``is_joint``).
TARGETS: Dict[str, Dict[str, float]] = {
    "split_mnist": {"min_accuracy": 0.92},
    "split_fmnist": {"max_joint_gap": 0.10},
    "split_gtsrb": {"min_accuracy": 0.80},
}
METHOD = "drcpsd"
NOTES = "notes.md"


class ReportError(ValueError):
    """A folder or CSV file the report cannot use (the message names it and what was expected)."""


@dataclass
class RunLogs:
    """One run as read back from its CSV folder."""

    strategy: str
    seed: int
    matrix: np.ndarray  # (trained experiences, evaluated experiences); rows of untrained steps are NaN
    stream_accuracy: List[float]  # after each evaluation
    info: Dict[str, str] = field(default_factory=dict)
    mmd_gap: List[float] = field(default_factory=list)  # mean over classes, after each evaluation
    fid: List[float] = field(default_factory=list)  # real vs synthetic, after each experience
    kid: List[float] = field(default_factory=list)
    #: ``logs/confusion.csv``: test images of class i predicted as j after the last experience (None: not written)
    confusion: Optional[np.ndarray] = None
    class_names: List[str] = field(default_factory=list)

    @property
    def final_average_accuracy(self) -> float:
        return float(np.nanmean(self.matrix[self._last_row()]))

    @property
    def average_forgetting(self) -> float:
        """Mean over the experiences before the last of (best earlier accuracy - final accuracy); 0.0 when the
        run was evaluated once only (Joint) or no earlier evaluation of an experience exists."""
        last = self._last_row()
        earlier = self.matrix[:last, : self.matrix.shape[1] - 1]
        seen = ~np.isnan(earlier).all(axis=0)  # experiences evaluated before the last evaluation
        if not seen.any():
            return 0.0
        best = np.nanmax(earlier[:, seen], axis=0)
        return float(np.mean(best - self.matrix[last, : self.matrix.shape[1] - 1][seen]))

    @property
    def seen_accuracy(self) -> np.ndarray:
        """After each experience *i*: the mean accuracy over the experiences seen so far,
        :math:`\\frac1{i+1}\\sum_{j\\le i} a_{i,j}` (NaN where the run was not evaluated, e.g. Joint before the end)."""
        out = np.full(self.matrix.shape[0], np.nan)
        for i in range(self.matrix.shape[0]):
            row = self.matrix[i, : i + 1]
            if not np.isnan(row).any():
                out[i] = float(row.mean())
        return out

    @property
    def is_fscil(self) -> bool:
        """A few-shot class-incremental run (``k_shot`` in its ``run_info.csv``): experience 0 is the base session."""
        return bool(self.info.get("k_shot", "").strip())

    def session_accuracy(self) -> Dict[str, np.ndarray]:
        """After each session *i* (FSCIL papers' figures): ``all``, the accuracy on every test image of the classes
        seen so far (the test experiences ``0..i`` pooled, weighted by their sizes); ``base``, on the base
        session's classes (experience 0); ``novel``, on the classes of sessions ``1..i`` pooled (NaN after the
        base session). NaN where the run was not evaluated (Joint: its one evaluation counts as after the last
        session). Needs ``test_sizes`` in
        ``run_info.csv``."""
        sizes = np.array([float(v) for v in self.info.get("test_sizes", "").split()])
        n = self.matrix.shape[1]
        if len(sizes) != n:
            raise ReportError(f"run {self.strategy}/seed{self.seed}: run_info.csv's test_sizes="
                              f"{self.info.get('test_sizes', '')!r} does not give {n} test experience sizes")
        matrix = self.matrix
        if is_joint(self.strategy):  # one evaluation, after learning every session at once: the last session's
            matrix = np.full_like(self.matrix, np.nan)
            matrix[n - 1] = self.matrix[self._last_row()]
        out = {k: np.full(n, np.nan) for k in ("all", "base", "novel")}
        for i in range(n):
            row, w = matrix[i, : i + 1], sizes[: i + 1]
            if np.isnan(row).any():
                continue
            out["all"][i] = float((row * w).sum() / w.sum())
            out["base"][i] = float(row[0])
            if i > 0:
                out["novel"][i] = float((row[1:] * w[1:]).sum() / w[1:].sum())
        return out

    def _last_row(self) -> int:
        rows = [i for i in range(self.matrix.shape[0]) if not np.isnan(self.matrix[i]).all()]
        if not rows:
            raise ReportError(f"run {self.strategy}/seed{self.seed} has no evaluation rows")
        return rows[-1]


def _read_csv(path: str) -> List[Dict[str, str]]:
    if not os.path.isfile(path):
        raise ReportError(f"{path!r} does not exist; expected a CSV written by a drcpsd-run / compare run")
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def load_run(log_dir: str) -> RunLogs:
    """Read ``eval_results.csv``, ``metrics.csv`` and ``run_info.csv`` of one run's ``logs/`` folder."""
    rows = _read_csv(os.path.join(log_dir, "eval_results.csv"))
    needed = {"eval_exp", "training_exp", "eval_accuracy"}
    if not rows or not needed <= set(rows[0]):
        raise ReportError(f"{log_dir}/eval_results.csv lacks rows or columns {sorted(needed)}")
    n_eval = max(int(r["eval_exp"]) for r in rows) + 1
    n_train = max(int(r["training_exp"]) for r in rows) + 1
    matrix = np.full((max(n_train, n_eval), n_eval), np.nan)
    for r in rows:  # a later row for the same cell (a resumed run's re-evaluation) replaces the earlier one
        matrix[int(r["training_exp"]), int(r["eval_exp"])] = float(r["eval_accuracy"])
    info = {r["key"]: r["value"] for r in _read_csv(os.path.join(log_dir, "run_info.csv"))}
    stream, mmd, fidelity = [], {}, {"RealSynFID": {}, "RealSynKID": {}}
    for r in _read_csv(os.path.join(log_dir, "metrics.csv")):
        name = r["name"]
        if name == STREAM_ACC:
            stream.append(float(r["value"]))
        elif name.startswith(MMD_PREFIX):
            mmd.setdefault(int(float(r["x"])), []).append(float(r["value"]))
        elif name.split("/")[0] in fidelity:
            fidelity[name.split("/")[0]][int(name.rsplit("Exp", 1)[1])] = float(r["value"])
    confusion, names = None, []
    if os.path.isfile(os.path.join(log_dir, CONFUSION)):  # runs made before it have none
        table = _read_csv(os.path.join(log_dir, CONFUSION))
        confusion = np.array([[int(r[str(j)]) for j in range(len(table))] for r in table])
        names = [r["name"] for r in table]
    return RunLogs(strategy=info.get("strategy", "?"), seed=int(info.get("seed", 0)), matrix=matrix,
                   stream_accuracy=stream, info=info, mmd_gap=[float(np.mean(v)) for _, v in sorted(mmd.items())],
                   fid=[v for _, v in sorted(fidelity["RealSynFID"].items())],
                   kid=[v for _, v in sorted(fidelity["RealSynKID"].items())], confusion=confusion,
                   class_names=names)


def find_runs(folder: str) -> Dict[str, List[RunLogs]]:
    """Every run under ``<folder>/runs/<strategy>/seed<k>/logs`` (or ``<folder>/runs/<strategy>/logs``)."""
    root = os.path.join(folder, "runs")
    if not os.path.isdir(root):
        raise ReportError(f"{folder!r} has no runs/ folder; expected <folder>/runs/<strategy>/seed<k>/logs/")
    runs: Dict[str, List[RunLogs]] = {}
    for strategy in sorted(os.listdir(root)):
        sdir = os.path.join(root, strategy)
        candidates = [os.path.join(sdir, "logs")] + [os.path.join(sdir, d, "logs") for d in sorted(os.listdir(sdir))
                                                     if re.fullmatch(r"seed\d+", d)]
        for log_dir in candidates:
            if os.path.isfile(os.path.join(log_dir, "run_info.csv")):  # written last: the run finished
                runs.setdefault(strategy, []).append(load_run(log_dir))
    if not runs:
        raise ReportError(f"no finished run under {root!r} (a finished run has logs/run_info.csv)")
    return runs


def _mean_std(values: Sequence[float]) -> tuple:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarise(runs: Dict[str, List[RunLogs]]) -> List[Dict[str, object]]:
    """One row per strategy: mean and std over seeds (std 0 for a single seed)."""
    rows = []
    for strategy, rs in runs.items():
        row: Dict[str, object] = {"strategy": strategy, "seeds": " ".join(str(r.seed) for r in rs)}
        metrics = {
            "final_average_accuracy": [r.final_average_accuracy for r in rs],
            "final_stream_accuracy": [r.stream_accuracy[-1] if r.stream_accuracy else math.nan for r in rs],
            "average_forgetting": [r.average_forgetting for r in rs],
            "wall_time_s": [float(r.info.get("wall_time_s", "nan")) for r in rs],
        }
        fid_exp = min((len(r.fid) for r in rs), default=0)  # experiences with a FID in every seed
        if fid_exp:
            metrics["final_fid"] = [r.fid[fid_exp - 1] for r in rs]
            metrics["final_kid"] = [r.kid[fid_exp - 1] for r in rs]
        for name, values in metrics.items():
            mean, std = _mean_std(values)
            row[f"{name}_mean"], row[f"{name}_std"] = round(mean, 4), round(std, 4)
        if fid_exp:
            row["fid_after_experiences"] = fid_exp
        row["stored_real_images"] = int(float(rs[0].info.get("stored_real_images", 0)))
        row["generator_parameters"] = int(float(rs[0].info.get("generator_parameters", 0)))
        row["memory_bytes"] = _memory_bytes(rs)
        rows.append(row)
    return sorted(rows, key=lambda r: -float(r["final_average_accuracy_mean"]))


def _memory_bytes(runs: Sequence[RunLogs]):
    """The seeds' ``memory_bytes`` (their mean, rounded: a buffer's fill may differ by seed), or ``""`` when no
    ``run_info.csv`` of them has it (a run written before the column existed)."""
    values = []
    for r in runs:
        text = r.info.get("memory_bytes", "")
        try:
            values.append(float(text))
        except ValueError:
            if text.strip():
                raise ReportError(f"run {r.strategy}/seed{r.seed}: memory_bytes={text!r} in run_info.csv is not a "
                                  "number") from None
    values = [v for v in values if math.isfinite(v)]
    return int(round(float(np.mean(values)))) if values else ""


def target_checks(rows: Sequence[Dict[str, object]], benchmark: str, method: str = METHOD) -> List[Dict[str, object]]:
    """``method`` against the comparison's targets, from :func:`summarise` rows (means over seeds).

    One row per target: ``target`` (in words), ``value`` (the method's final average accuracy), ``reference``
    (the figure it is held against), ``margin_points`` = 100 x (value - reference) for "above a baseline" and
    "at least", 100 x (gap allowed - (Joint - value)) for "within N points of Joint", and ``met`` (margin > 0,
    or >= 0 for the thresholds). Nothing when the method was not run."""
    by_name = {str(r["strategy"]): r for r in rows}
    if method not in by_name:
        return []
    mine = by_name[method]
    acc = float(mine["final_average_accuracy_mean"])
    budget = int(mine["stored_real_images"])
    checks: List[Dict[str, object]] = []

    def add(target: str, reference: float, margin: float, met: bool) -> None:
        checks.append({"target": target, "value": round(acc, 4), "reference": round(reference, 4),
                       "margin_points": round(100 * margin, 2), "met": met})

    wanted = TARGETS.get(benchmark, {})
    if "min_accuracy" in wanted:
        t = wanted["min_accuracy"]
        add(f"final average accuracy >= {t:.2f}", t, acc - t, acc >= t)
    joint_name = next((name for name in by_name if is_joint(name)), None)
    if "max_joint_gap" in wanted and joint_name is not None:
        t, joint = wanted["max_joint_gap"], float(by_name[joint_name]["final_average_accuracy_mean"])
        add(f"within {100 * t:.0f} points of {joint_name}", joint, t - (joint - acc), joint - acc <= t)
    for r in rows:  # summarise's order: best first
        name = str(r["strategy"])
        if name == method or is_joint(name) or int(r["stored_real_images"]) < budget:
            continue
        other = float(r["final_average_accuracy_mean"])
        add(f"above {name} ({r['stored_real_images']} real images)", other, acc - other, acc > other)
    return checks


def _color(strategy: str) -> Optional[str]:
    """The same matplotlib colour for a strategy in every plot and report (None: the next of the cycle)."""
    names = list(STRATEGIES)
    return f"C{names.index(strategy) % 10}" if strategy in names else None


def _save_png(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def annotated_grid(ax, grid: np.ndarray, *, vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis",
                   fmt: Callable[[float], str] = "{:.2f}".format, fontsize: float = 6, hide_below: float = 0.0,
                   aspect: Optional[str] = None):
    """``grid`` drawn on ``ax`` as an image with each finite cell's value written on it (``fmt``; cells whose
    magnitude is under ``hide_below`` left blank): black on the light cells of a sequential colour map (values
    above 0.6 of its range) and on every cell of a diverging one (``vmin < 0``), white on the dark ones. Returns
    the image (for a colour bar). The accuracy matrix and confusion plots here and the generator benchmark's heat
    maps share it."""
    im = ax.imshow(grid, vmin=vmin, vmax=vmax, cmap=cmap, aspect=aspect)
    for (i, j), v in np.ndenumerate(grid):
        if np.isnan(v) or abs(v) < hide_below:
            continue
        light = vmin < 0 or (v - vmin) > 0.6 * (vmax - vmin)
        ax.text(j, i, fmt(v), ha="center", va="center", fontsize=fontsize, color="black" if light else "white")
    return im


def plot_accuracy(runs: Dict[str, List[RunLogs]], path: str) -> None:
    """Average accuracy on the experiences seen so far after each experience, per strategy (mean over seeds,
    min-max band; Joint, evaluated once, as a dashed level), written to ``path`` (PNG)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    n_exp = max(r.matrix.shape[1] for rs in runs.values() for r in rs)
    for strategy, rs in runs.items():
        label = f"{strategy} ({len(rs)} seed{'s' * (len(rs) > 1)})"
        if is_joint(strategy):  # evaluated once, after training on everything: a level, not a curve
            finals = [r.final_average_accuracy for r in rs]
            ax.axhline(float(np.mean(finals)), ls="--", lw=1.2, color="k", label=f"{label}: upper bound, all at once")
            if len(rs) > 1:
                ax.axhspan(min(finals), max(finals), color="k", alpha=0.1)
            continue
        curves = np.array([r.seen_accuracy for r in rs])  # (seeds, experiences), NaN where not evaluated
        xs = np.arange(1, curves.shape[1] + 1)
        keep = ~np.isnan(curves).any(axis=0)
        if not keep.any():
            continue
        a = curves[:, keep]
        line, = ax.plot(xs[keep], a.mean(0), marker="o", label=label, color=_color(strategy))
        if len(rs) > 1:
            ax.fill_between(xs[keep], a.min(0), a.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("experiences learned")
    ax.set_ylabel("average accuracy on the seen experiences")
    ax.set_xticks(np.arange(1, n_exp + 1))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_png(fig, path)


def plot_accuracy_memory(rows: Sequence[Dict[str, object]], path: str) -> bool:
    """Final average accuracy (mean over seeds, std as error bar) against ``memory_bytes`` on a log axis, one
    point per :func:`summarise` row with the strategy's usual colour, written to ``path`` (PNG). A strategy that
    keeps nothing (0 bytes) sits at 0, left of a linear stretch of one decade (matplotlib's ``symlog``); rows
    without a memory (old ``run_info.csv``) are left out. Returns False, writing nothing, when no row has one."""
    points = [r for r in rows if r.get("memory_bytes", "") != ""]
    if not points:
        return False
    plt = _pyplot()
    memory = [int(r["memory_bytes"]) for r in points]
    positive = [m for m in memory if m > 0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r, m in zip(points, memory):
        strategy = str(r["strategy"])
        ax.errorbar([m], [float(r["final_average_accuracy_mean"])], yerr=[float(r["final_average_accuracy_std"])],
                    fmt="s" if is_joint(strategy) else "o", capsize=3, color=_color(strategy), label=strategy)
        ax.annotate(strategy, (m, float(r["final_average_accuracy_mean"])), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)
    if min(memory) == 0:  # 0 has no logarithm: a linear decade below the smallest positive value holds it
        floor = 10.0 ** (math.floor(math.log10(min(positive))) - 1) if positive else 1.0
        ax.set_xscale("symlog", linthresh=floor, linscale=1.0)
        ax.set_xlim(left=-floor * 0.3)
    else:
        ax.set_xscale("log")
    ax.set_xlabel("memory kept between experiences beyond the classifier (bytes)")
    ax.set_ylabel("final average accuracy")
    ax.set_ylim(0, 1.05)  # room for the label of a point near 1
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_png(fig, path)
    return True


def plot_confusion(runs: Dict[str, List[RunLogs]], path: str) -> bool:
    """Per strategy, the share of each class's test images taken for each class after the last experience (the
    seeds' ``confusion.csv`` counts summed, each row over its sum), in percent on the cells for up to 20 classes,
    written to ``path`` (PNG). Returns False, writing nothing, when no run has a confusion."""
    shown = {s: [r.confusion for r in rs if r.confusion is not None] for s, rs in runs.items()}
    shown = {s: c for s, c in shown.items() if c and len({m.shape for m in c}) == 1}
    if not shown:
        return False
    plt = _pyplot()
    n = len(shown)
    k = next(iter(shown.values()))[0].shape[0]
    cols = min(4, n)
    size = 1.2 + 0.3 * min(k, 20)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(size * cols, size * -(-n // cols)), squeeze=False)
    for ax, (strategy, counts) in zip(axes.flat, shown.items()):
        total = np.sum(counts, axis=0).astype(float)
        share = total / np.maximum(total.sum(1, keepdims=True), 1)
        annotated_grid(ax, share, fmt=lambda v: f"{100 * v:.0f}", fontsize=5,
                       hide_below=0.005 if share.shape[0] <= 20 else math.inf)
        ax.set_title(f"{strategy} ({len(counts)} seed{'s' * (len(counts) > 1)})", fontsize=8)
        ax.set_xlabel("taken for", fontsize=7)
        ax.set_ylabel("test class", fontsize=7)
        ax.tick_params(labelsize=5)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("share of each class's test images (percent) after the last experience", fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)
    return True


def _optional_plot(written: List[str], out: str, name: str, draw: Callable[[str], bool]) -> None:
    """``draw(<out>/<name>)`` for a plot that only some folders have: its name joins ``written`` when it was drawn;
    when it was not (no run has what it shows), a copy left from runs since removed is deleted."""
    path = os.path.join(out, name)
    if draw(path):
        written.append(name)
    elif os.path.exists(path):
        os.remove(path)


def _plots(runs: Dict[str, List[RunLogs]], out: str, rows: Sequence[Dict[str, object]]) -> List[str]:
    plt = _pyplot()
    written = []
    plot_accuracy(runs, os.path.join(out, "accuracy.png"))
    written.append("accuracy.png")
    _optional_plot(written, out, "accuracy_memory.png", lambda path: plot_accuracy_memory(rows, path))

    n = len(runs)
    cols = min(4, n)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(3.2 * cols, 3 * -(-n // cols)), squeeze=False)
    for ax, (strategy, rs) in zip(axes.flat, runs.items()):
        with warnings.catch_warnings():  # Joint's rows before the last are all NaN (it is evaluated once)
            warnings.simplefilter("ignore", RuntimeWarning)
            m = np.nanmean(np.stack([r.matrix for r in rs]), axis=0)
        if is_joint(strategy):  # its one evaluation row, after training on all experiences at once
            m = m[~np.isnan(m).all(axis=1)][-1:]
            ax.set_yticks([0], ["all"])
        annotated_grid(ax, m)
        ax.set_title(strategy, fontsize=9)
        ax.set_xlabel("evaluated on experience")
        ax.set_ylabel("after training on")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    _save_png(fig, os.path.join(out, "accuracy_matrix.png"))
    written.append("accuracy_matrix.png")
    _optional_plot(written, out, "confusion.png", lambda path: plot_confusion(runs, path))

    for attr, label, png in (("mmd_gap", "real-vs-synthetic MMD (mean over classes)", "mmd_gap.png"),
                             ("fid", "real-vs-synthetic FID (project extractor)", "fid.png"),
                             ("kid", "real-vs-synthetic KID (project extractor)", "kid.png")):
        curves_by = {s: [getattr(r, attr) for r in rs if getattr(r, attr)] for s, rs in runs.items()}
        curves_by = {s: c for s, c in curves_by.items() if c}
        if not curves_by:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for strategy, curves in curves_by.items():
            k = min(len(c) for c in curves)
            ax.plot(range(1, k + 1), np.mean([c[:k] for c in curves], 0), marker="o", label=strategy,
                    color=_color(strategy))
        ax.set_xlabel("experiences learned")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        _save_png(fig, os.path.join(out, png))
        written.append(png)
    return written


def session_rows(runs: Dict[str, List[RunLogs]]) -> List[Dict[str, object]]:
    """FSCIL runs: one row per (strategy, session) with the mean and std over seeds of
    :meth:`RunLogs.session_accuracy` (``all``, ``base``, ``novel``); [] when no run is FSCIL."""
    rows = []
    for strategy, rs in runs.items():
        rs = [r for r in rs if r.is_fscil]
        if not rs:
            continue
        curves = [r.session_accuracy() for r in rs]
        for i in range(min(len(c["all"]) for c in curves)):
            if all(np.isnan(c["all"][i]) for c in curves):
                continue
            row: Dict[str, object] = {"strategy": strategy, "session": i, "seeds": " ".join(str(r.seed) for r in rs)}
            for key in ("all", "base", "novel"):
                values = [c[key][i] for c in curves]
                mean, std = (math.nan, math.nan) if any(np.isnan(values)) else _mean_std(values)
                row[f"{key}_mean"], row[f"{key}_std"] = round(mean, 4), round(std, 4)
            rows.append(row)
    return rows


def plot_sessions(rows: Sequence[Dict[str, object]], path: str) -> None:
    """FSCIL: accuracy on all seen, base and novel classes after each session, one panel each (``path``, PNG)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax, key, title in zip(axes, ("all", "base", "novel"),
                              ("all classes seen so far", "base-session classes", "novel classes (sessions 1..i)")):
        for strategy in dict.fromkeys(str(r["strategy"]) for r in rows):
            pts = [(int(r["session"]), float(r[f"{key}_mean"])) for r in rows
                   if r["strategy"] == strategy and not math.isnan(float(r[f"{key}_mean"]))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="s" if is_joint(strategy) else "o", ls="--" if is_joint(strategy) else "-",
                    label=strategy, color=_color(strategy))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("session (0: base)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _save_png(fig, path)


def _session_lines(rows: Sequence[Dict[str, object]]) -> List[str]:
    def cell(r, key):
        v = float(r[f"{key}_mean"])
        return "" if math.isnan(v) else f"{v:.3f}"

    sessions = sorted({int(r["session"]) for r in rows})
    lines = ["## Few-shot sessions", "",
             "Accuracy after each session on every test image of the classes seen so far (all), on the base "
             "session's classes (base) and on the novel classes of sessions 1..i pooled (novel); means over seeds "
             "(`sessions.csv`, `sessions.png`). Joint is evaluated once, after learning everything.", "",
             "| strategy | " + " | ".join(f"session {i} all / base / novel" for i in sessions) + " |",
             "|---|" + "---|" * len(sessions)]
    for strategy in dict.fromkeys(str(r["strategy"]) for r in rows):
        by = {int(r["session"]): r for r in rows if r["strategy"] == strategy}
        cells = [(" / ".join(filter(None, (cell(by[i], k) for k in ("all", "base", "novel")))) if i in by else "")
                 for i in sessions]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return lines + [""]


def build_report(folder: str, title: Optional[str] = None) -> List[Dict[str, object]]:
    """Write ``summary.csv``, the plots and ``report.md`` in ``folder`` from its runs' CSV files."""
    runs = find_runs(folder)
    rows = summarise(runs)

    atomic_write_csv(os.path.join(folder, "summary.csv"), rows)  # FID/KID columns exist for DR-CPSD only
    plots = _plots(runs, folder, rows)

    command = os.path.join(folder, "command.txt")
    lines = [f"# {title or os.path.basename(os.path.normpath(folder))}", ""]
    if os.path.isfile(command):
        lines += ["Produced by", "", "```", open(command, encoding="utf-8").read().strip(), "```", ""]
    lines += ["Rebuilt from the CSV folders by `python -m avalanche_drcpsd.experiments.report " + folder + "`.", "",
              "| strategy | seeds | final average accuracy | final stream accuracy | average forgetting | "
              "wall time (s) | stored real images | generator parameters | memory (bytes) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['seeds']} | {r['final_average_accuracy_mean']:.4f} ± "
            f"{r['final_average_accuracy_std']:.4f} | {r['final_stream_accuracy_mean']:.4f} ± "
            f"{r['final_stream_accuracy_std']:.4f} | {r['average_forgetting_mean']:.4f} ± "
            f"{r['average_forgetting_std']:.4f} | {r['wall_time_s_mean']:.0f} ± {r['wall_time_s_std']:.0f} | "
            f"{r['stored_real_images']} | {r['generator_parameters']} | {_cell(r['memory_bytes'])} |")
    fid_rows = [r for r in rows if "final_fid_mean" in r]
    if fid_rows:
        lines += ["", "| strategy | after experiences learned | FID | KID |", "|---|---|---|---|"]
        lines += [f"| {r['strategy']} | {r['fid_after_experiences']} | {r['final_fid_mean']:.3f} ± "
                  f"{r['final_fid_std']:.3f} | {r['final_kid_mean']:.4f} ± {r['final_kid_std']:.4f} |"
                  for r in fid_rows]
        lines += ["", "FID/KID: real test images of the learned classes against as many synthetic samples per class, "
                  "features of the project's extractor trained on the benchmark (`feature_extractor/`)."]
    lines += ["", "Final average accuracy: mean over experiences of the accuracy on each after the last one; "
              "stream accuracy: all test images pooled; ± is the standard deviation over seeds. Memory: the bytes "
              "a strategy keeps from one experience to the next beyond the classifier (stored real images at one "
              "byte per value, generator weights, CPSD embeddings, kept synthetic sets, teacher copies; "
              "`memory_*_bytes` in each run's `run_info.csv`), n/a for runs recorded before it was measured.", ""]
    name = os.path.basename(os.path.normpath(folder))
    checks = target_checks(rows, name)
    if checks:
        atomic_write_csv(os.path.join(folder, "targets.csv"), checks)
        seeds = str(next(r["seeds"] for r in rows if r["strategy"] == METHOD))
        lines += [f"## Targets ({METHOD}, seeds {seeds})", "",
                  "| target | " + METHOD + " | against | margin (points) | |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c['target']} | {c['value']:.4f} | {c['reference']:.4f} | {c['margin_points']:+.1f} | "
                  f"{'met' if c['met'] else '**missed**'} |" for c in checks]
        missed = sum(not c["met"] for c in checks)
        lines += ["", f"{len(checks) - missed} of {len(checks)} met. A negative margin is how many accuracy points "
                  "the target is missed by (means over seeds; `targets.csv`).", ""]
    elif os.path.exists(os.path.join(folder, "targets.csv")):
        os.remove(os.path.join(folder, "targets.csv"))
    sessions = session_rows(runs)
    if sessions:
        atomic_write_csv(os.path.join(folder, "sessions.csv"), sessions)
        plot_sessions(sessions, os.path.join(folder, "sessions.png"))
        plots.append("sessions.png")
        lines += _session_lines(sessions)
    notes = os.path.join(folder, NOTES)
    if os.path.isfile(notes):
        lines += [f"## Notes (written by hand in `{NOTES}`, not rebuilt from the CSVs)", "",
                  open(notes, encoding="utf-8").read().strip(), ""]
    for p in plots:
        lines += [f"![{p[:-4]}]({p})", ""]
    for strategy, rs in runs.items():
        for r in rs:
            rel = os.path.join("runs", strategy, f"seed{r.seed}")
            if not os.path.isdir(os.path.join(folder, rel)):
                rel = os.path.join("runs", strategy)
            grids = sorted(f for f in os.listdir(os.path.join(folder, rel)) if re.fullmatch(r"samples_exp\d+\.png", f))
            if grids:
                lines += [f"Synthetic samples of {strategy}, seed {r.seed} (one row per learned class):", ""]
                lines += [f"![{g}]({rel}/{g})" for g in grids] + [""]
    atomic_write_text(os.path.join(folder, "report.md"), "\n".join(lines))
    return rows


def _cell(value: object) -> str:
    return "n/a" if value == "" else str(value)


INDEX_BEGIN = ("<!-- comparison table: begin (written by python -m avalanche_drcpsd.experiments.report "
               "--index {root}) -->")
INDEX_END = "<!-- comparison table: end -->"


def comparison_rows(root: str, studies: bool = False) -> List[Dict[str, object]]:
    """Every ``<root>/<benchmark>/summary.csv`` written by :func:`build_report`, as one list of rows with a
    ``benchmark`` column (the public benchmarks in their usual order, split then FSCIL; other summaries are
    skipped). A folder not named after a benchmark (a study of one recipe change, e.g. ``split_mnist_fresh``) is
    left out unless ``studies``, then it follows the benchmarks by name."""
    order = SPLIT_BENCHMARKS + FSCIL_BENCHMARKS
    rows: List[Dict[str, object]] = []
    names = [n for n in os.listdir(root) if studies or n in order]
    for name in sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n)):
        path = os.path.join(root, name, "summary.csv")
        if not os.path.isfile(path):
            continue
        with open(path, newline="", encoding="utf-8") as fh:
            summary = list(csv.DictReader(fh))
        if summary and "final_average_accuracy_mean" in summary[0]:
            rows += [{"benchmark": name, **r} for r in summary]
    if not rows:
        raise ReportError(f"no <benchmark>/summary.csv written by this report under {root!r}")
    return rows


def comparison_table(rows: Sequence[Dict[str, object]]) -> str:
    """A markdown table: one row per strategy, one column per benchmark, final average accuracy mean ± std over
    seeds (and the number of seeds); the best strategy of each benchmark in bold; stored real images per cell."""
    benchmarks = list(dict.fromkeys(str(r["benchmark"]) for r in rows))
    strategies = list(dict.fromkeys(str(r["strategy"]) for r in rows))
    cell = {(str(r["benchmark"]), str(r["strategy"])): r for r in rows}
    best = {b: max((float(r["final_average_accuracy_mean"]), str(r["strategy"])) for r in rows
                   if r["benchmark"] == b and r["strategy"] != "joint")[1] for b in benchmarks}
    lines = ["| strategy | " + " | ".join(benchmarks) + " |", "|---" * (len(benchmarks) + 1) + "|"]
    for strategy in sorted(strategies, key=lambda s: -max(float(cell[b, s]["final_average_accuracy_mean"])
                                                           for b in benchmarks if (b, s) in cell)):
        cells = []
        for b in benchmarks:
            r = cell.get((b, strategy))
            if r is None:
                cells.append("not run")
                continue
            n = len(str(r["seeds"]).split())
            text = (f"{float(r['final_average_accuracy_mean']):.3f} ± {float(r['final_average_accuracy_std']):.3f}"
                    f" ({n} seed{'s' * (n > 1)}; {r['stored_real_images']} real)")
            cells.append(f"**{text}**" if best[b] == strategy else text)
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_index(root: str, readme: Optional[str] = None, studies: bool = False) -> str:
    """Write ``<root>/comparison.csv`` and put :func:`comparison_table` between the comparison markers of
    ``readme`` (default ``<root>/README.md``; the block is appended when the markers are absent); ``studies`` as
    :func:`comparison_rows`."""
    rows = comparison_rows(root, studies)
    atomic_write_csv(os.path.join(root, "comparison.csv"), rows)
    readme = readme or os.path.join(root, "README.md")
    begin = INDEX_BEGIN.format(root=root)
    block = "\n".join([begin, "", comparison_table(rows), "", INDEX_END])
    text = open(readme, encoding="utf-8").read() if os.path.isfile(readme) else ""
    start = text.find(INDEX_BEGIN.split(" (")[0])
    end = text.find(INDEX_END)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(INDEX_END):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    atomic_write_text(readme, text)
    return readme


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avalanche_drcpsd.experiments.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a benchmark folder with runs/<strategy>/seed<k>/logs/ (with --index: the "
                                       "folder holding the benchmark folders)")
    parser.add_argument("--title")
    parser.add_argument("--index", action="store_true",
                        help="rebuild the cross-benchmark table (comparison.csv and the table in README.md) from "
                             "the benchmark folders' summary.csv files")
    parser.add_argument("--studies", action="store_true",
                        help="with --index: also the report folders not named after a benchmark (e.g. "
                             "split_mnist_fresh), as columns after the benchmarks")
    args = parser.parse_args(argv)
    if args.studies and not args.index:
        parser.error("--studies only applies with --index (the cross-benchmark table)")
    try:
        if args.index:
            print(f"wrote {update_index(args.folder, studies=args.studies)}")
            return 0
        rows = build_report(args.folder, args.title)
    except ReportError as exc:
        parser.error(str(exc))
    for r in rows:
        print(f"{r['strategy']:>14}: {r['final_average_accuracy_mean']:.4f} ± {r['final_average_accuracy_std']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
